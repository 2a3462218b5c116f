"""Convolution whose backward pass is written as canonical forward convolutions.

``conv(x, kernel, ...)`` computes the same function as ``lax.conv_general_dilated`` with
channels-last inputs (``NHWC``, or ``NWC`` / ``NDHWC``) and ``HWIO`` kernels, with strides, every
padding form of ``flax.linen.Conv``, input and kernel dilation and feature groups. Its backward
pass is a ``jax.custom_vjp`` made of two *forward* convolutions in the canonical ``NHWC`` /
``HWIO`` layout. Per spatial axis (input size ``n``, kernel size ``k``, stride ``s``, input
dilation ``a``, kernel dilation ``d``, ``k_eff = (k - 1) * d + 1``, padding ``(lo, hi)``, output
size ``out``; ``G`` groups of ``Ci = Cin / G`` input and ``Co = Cout / G`` output channels):

- input gradient: ``dx[i] = sum_k dilate(g, s)[a*i + lo - k*d] w[k]``, i.e. a forward conv of the
  output gradient ``g`` (``lhs_dilation = s``, ``window_strides = a``, ``rhs_dilation = d``) with
  the spatially flipped kernel, whose ``(Ci, Co)`` block of each group is transposed (the kernel
  ``(*K, Ci, G*Co)`` becomes ``(*K, Co, G*Ci)``, still ``G`` groups), padded by
  ``(k_eff - 1 - lo, (n - 1) * a + lo - (out - 1) * s)`` (negative entries crop);
- kernel gradient: ``dw[k, i, o] = sum_{n, p} x_pad[n, p*s + k*d, i] * g[n, p, o]``, i.e. a
  grouped forward conv whose "batch" is the ``Ci`` input channels of a group (``x`` transposed to
  ``(Ci, *S, G*N)``), whose "input features" are the batch of each group (``g`` transposed to
  ``(*So, N, Cout)`` as an ``HWIO`` kernel), with ``window_strides = d``, ``lhs_dilation = a``,
  ``rhs_dilation = s`` and ``feature_group_count = G``. On XLA:CPU, for batches of 64 and more,
  it is summed over chunks of 8 examples in a ``lax.scan`` (``KERNEL_GRAD_BATCH_CHUNK``): the same
  sum in another order, 2-3x faster there.

Every combination of strides, padding, dilations and groups takes this backward (none falls back
to autodiff); it equals autodiff to float64 rounding, second derivatives included (tested for
``G = 1``, ``2`` and depthwise).

Why: JAX's own transpose rules express both gradients through ``dimension_numbers`` (no transposes).
Inside a ``lax.scan`` / ``nn.scan`` loop body XLA:CPU then keeps those convolutions in
non-canonical layouts and runs them on a slow path, 10x (input gradient) to 130x (kernel
gradient) slower than the same convolutions unrolled. With explicit transposes to canonical
layouts the loop body runs at close to the unrolled speed (measured numbers: BENCHMARKS.md). The
gradients are the same function as autodiff's.

What the custom VJP rules out: forward-mode AD (``jax.jvp``, ``jax.jacfwd``, evaluating
``jax.linearize``) raises "can't apply forward-mode autodiff (jvp) to a custom_vjp function".
Pass ``custom_backward=False`` to get plain ``lax.conv_general_dilated`` (autodiff backward) there.
Reverse mode, reverse-over-reverse, ``jax.hessian`` (forward-over-reverse differentiates the
VJP's own ops, which are ordinary convolutions), ``vmap``, ``lax.scan`` and ``jax.checkpoint`` all
work (tested).

References:
  Dumoulin and Visin (2016), "A guide to convolution arithmetic for deep learning",
  arXiv:1603.07285 (the padding algebra of the transpose of a strided, padded, dilated
  convolution; JAX's ``_conv_general_vjp_lhs_padding`` / ``_conv_general_vjp_rhs_padding`` do the
  same). The XLA:CPU layout measurements are in BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm.functional._checks import check_floating, fail

_LAYER = 'conv'

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _dimension_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
  """Channels-last (N, *spatial, C) inputs/outputs and (*spatial, I, O) kernels."""
  n = num_spatial
  spatial = tuple(range(1, n + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, n + 1) + spatial,
      rhs_spec=(n + 1, n) + tuple(range(n)),
      out_spec=(0, n + 1) + spatial,
  )


def _as_tuple(layer: str, arg: str, value, n: int) -> tuple[int, ...]:
  """Broadcasts an int (or a length-n sequence of ints) to a tuple of n positive ints."""
  if isinstance(value, int | np.integer):
    value = (int(value),) * n
  value = tuple(value)
  if len(value) != n or not all(isinstance(v, int | np.integer) and v >= 1 for v in value):
    fail(layer, arg, f'a positive int or a sequence of {n} positive ints', repr(value))
  return tuple(int(v) for v in value)


def resolve_padding(
    padding: PaddingLike,
    in_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    kernel_dilation: Sequence[int],
    *,
    layer: str = _LAYER,
) -> tuple[tuple[int, int], ...]:
  """Turns ``padding`` into explicit ``(lo, hi)`` pairs, one per spatial axis.

  Args:
    padding: ``'SAME'`` (output size ``ceil(in / stride)``, the extra pad element at the end, as in
      ``lax``/TensorFlow), ``'SAME_LOWER'`` (the same, the extra element at the start),
      ``'VALID'`` (no padding), an int (the same pad on both sides of every axis), a sequence of
      ints (per axis, both sides) or a sequence of ``(lo, hi)`` pairs. (``'CIRCULAR'``,
      ``'REFLECT'`` and ``'CAUSAL'`` are handled by ``conv`` itself, before this is called.)
    in_shape: spatial sizes of the input.
    kernel_shape: spatial sizes of the kernel.
    strides: window strides per spatial axis.
    kernel_dilation: kernel dilation per spatial axis.
    layer: layer name for error messages.

  Returns:
    A tuple of ``(lo, hi)`` int pairs.
  """
  n = len(in_shape)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == 'VALID':
      return ((0, 0),) * n
    if mode in ('SAME', 'SAME_LOWER'):
      pads = []
      for size, k, s, d in zip(in_shape, kernel_shape, strides, kernel_dilation, strict=True):
        k_eff = (k - 1) * d + 1
        out = -(-size // s)
        total = max((out - 1) * s + k_eff - size, 0)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if mode == 'SAME' else (large, small))
      return tuple(pads)
    fail(layer, 'padding', "'SAME', 'SAME_LOWER', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL', an "
         'int or a sequence of ints or (lo, hi) pairs', repr(padding))
  if isinstance(padding, int | np.integer):
    return ((int(padding), int(padding)),) * n
  padding = tuple(padding)
  if len(padding) != n:
    fail(layer, 'padding', f'{n} entries (one per spatial axis)', repr(padding))
  pairs = []
  for p in padding:
    if isinstance(p, int | np.integer):
      pairs.append((int(p), int(p)))
    elif len(tuple(p)) == 2 and all(isinstance(v, int | np.integer) for v in p):
      pairs.append((int(p[0]), int(p[1])))
    else:
      fail(layer, 'padding', 'ints or (lo, hi) pairs of ints', repr(padding))
  return tuple(pairs)


def _forward(x, w, strides, pads, lhs_dilation, dilation, groups, precision, dn):
  return lax.conv_general_dilated(
      x, w, window_strides=strides, padding=pads, lhs_dilation=lhs_dilation,
      rhs_dilation=dilation, dimension_numbers=dn, feature_group_count=groups,
      precision=precision)


def _input_grad(g, w, x_spatial, strides, pads, lhs_dilation, dilation, groups, precision, dn):
  """dx: a conv of dilate(g, strides) with flip(w), (I, O) swapped per group, canonical layouts.

  Per spatial axis (input size ``n``, input dilation ``a``, output size ``out``), ``dx[i] =
  sum_k gd[a*i + lo - k*d] w[k]`` with ``gd`` the output gradient dilated by the strides. With the
  flipped kernel that is a forward conv of ``g`` with ``lhs_dilation = strides``,
  ``window_strides = a``, ``rhs_dilation = d``, padded by ``(k_eff - 1 - lo,
  (n - 1) * a + lo - (out - 1) * s)`` (negative entries crop). With ``G`` groups the kernel
  ``(*K, Cin/G, Cout)`` becomes ``(*K, Cout/G, Cin)``: group ``g``'s block, transposed.
  """
  n = len(strides)
  out_spatial = g.shape[1:n + 1]
  k_spatial = w.shape[:n]
  ci, cout = w.shape[n], w.shape[n + 1]
  co = cout // groups
  # Flip every spatial axis; per group swap (I, O): an HWIO kernel mapping Cout -> Cin in G groups.
  w_t = jnp.flip(w, axis=tuple(range(n))).reshape(*k_spatial, ci, groups, co)
  w_t = jnp.transpose(w_t, tuple(range(n)) + (n + 2, n + 1, n)).reshape(
      *k_spatial, co, groups * ci)
  grad_pads = []
  for size, out, k, s, a, d, (lo, _) in zip(
      x_spatial, out_spatial, k_spatial, strides, lhs_dilation, dilation, pads, strict=True):
    k_eff = (k - 1) * d + 1
    grad_pads.append((k_eff - 1 - lo, (size - 1) * a + lo - (out - 1) * s))
  return lax.conv_general_dilated(
      g, w_t, window_strides=lhs_dilation, padding=grad_pads, lhs_dilation=strides,
      rhs_dilation=dilation, dimension_numbers=dn, feature_group_count=groups,
      precision=precision)


def _kernel_grad_conv(x, g, k_spatial, strides, pads, lhs_dilation, dilation, groups, precision,
                      dn):
  """dw as a canonical conv: batch <- input channels of a group, input features <- batch.

  ``dw[k, i, o] = sum_{n, p} x_pad[n, p*s + k*d, i] * g[n, p, o]`` (``x_pad``: ``x`` dilated by
  the input dilation ``a``, then padded). ``x`` ``(N, *S, G*Ci)`` is transposed to
  ``(Ci, *S, G*N)`` (group ``g``'s channels ``i`` as the batch, ``(g, n)`` as the features) and
  ``g`` to ``(*So, N, Cout)`` (an ``HWIO`` kernel with ``I = N``); a forward conv with
  ``feature_group_count = G``, ``window_strides = d``, ``lhs_dilation = a``, ``rhs_dilation = s``
  and padding ``(lo, k_eff - 1 + (out - 1) * s - (n - 1) * a - lo)`` (exactly ``k`` windows) gives
  ``(Ci, *K, Cout)``: each group's kernel gradient, and only those (no ``G``-fold waste).
  """
  n = len(strides)
  batch = x.shape[0]
  x_spatial = x.shape[1:n + 1]
  out_spatial = g.shape[1:n + 1]
  spatial = tuple(range(1, n + 1))
  ci = x.shape[-1] // groups
  # x: (N, *S, G*Ci) -> (Ci, *S, G, N) -> (Ci, *S, G*N).
  x_t = jnp.transpose(x.reshape(batch, *x_spatial, groups, ci),
                      (n + 2,) + spatial + (n + 1, 0)).reshape(ci, *x_spatial, groups * batch)
  # g: (N, *So, Cout) -> (*So, N, Cout): an HWIO kernel with I = batch and O = output channels.
  g_t = jnp.transpose(g, spatial + (0, n + 1))
  grad_pads = []
  for size, out, k, s, a, d, (lo, _) in zip(
      x_spatial, out_spatial, k_spatial, strides, lhs_dilation, dilation, pads, strict=True):
    k_eff = (k - 1) * d + 1
    # Trim the high side so that exactly k windows (stride d) fit.
    grad_pads.append((lo, k_eff - 1 + (out - 1) * s - (size - 1) * a - lo))
  dw = lax.conv_general_dilated(
      x_t, g_t, window_strides=dilation, padding=grad_pads, lhs_dilation=lhs_dilation,
      rhs_dilation=strides, dimension_numbers=dn, feature_group_count=groups,
      precision=precision)
  # (Ci, *K, Cout) -> (*K, Ci, Cout).
  return jnp.transpose(dw, spatial + (0, n + 1))


# Batch chunk of the kernel gradient on XLA:CPU. Its kernel-gradient convolution slows down more
# than linearly with the batch (the contraction axis): at 128 x 32 x 32 x 16 one call over the batch
# took 40.6 ms, a lax.scan over 16 chunks of 8 examples 18.4 ms (0.33-0.46x at every ResNet-20
# layer shape). Whole ResNet-20 SGD step: 0.74x at batch 128, 0.90x at 64, but 1.12x at 32
# (BENCHMARKS.md, section 6). So: on CPU, from KERNEL_GRAD_MIN_BATCH examples up, when the batch is
# a multiple of the chunk. None turns it off; other backends never chunk.
KERNEL_GRAD_BATCH_CHUNK: int | None = 8
KERNEL_GRAD_MIN_BATCH = 64


def _kernel_grad(x, g, k_spatial, strides, pads, lhs_dilation, dilation, groups, precision, dn):
  """dw, summed over batch chunks of ``KERNEL_GRAD_BATCH_CHUNK`` examples where that is faster."""
  args = (k_spatial, strides, pads, lhs_dilation, dilation, groups, precision, dn)
  batch, chunk = x.shape[0], KERNEL_GRAD_BATCH_CHUNK
  if (chunk is None or batch < KERNEL_GRAD_MIN_BATCH or batch % chunk
      or jax.default_backend() != 'cpu'):
    return _kernel_grad_conv(x, g, *args)
  xs = x.reshape(batch // chunk, chunk, *x.shape[1:])
  gs = g.reshape(batch // chunk, chunk, *g.shape[1:])
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

  def add_chunk(acc, xg):
    # Each chunk in (at least) float32, so bf16 inputs round once, at the end, not per chunk.
    xc, gc = xg[0].astype(acc_dtype), xg[1].astype(acc_dtype)
    return acc + _kernel_grad_conv(xc, gc, *args), None

  shape = (*k_spatial, x.shape[-1] // groups, g.shape[-1])
  dw, _ = lax.scan(add_chunk, jnp.zeros(shape, acc_dtype), (xs, gs))
  return dw.astype(x.dtype)


def _make_conv(strides, pads, lhs_dilation, dilation, groups, precision, n):
  """Builds the custom-VJP conv for one set of (Python) hyperparameters."""
  dn = _dimension_numbers(n)
  hyper = (strides, pads, lhs_dilation, dilation, groups, precision, dn)

  @jax.custom_vjp
  def conv_fn(x, w):
    return _forward(x, w, *hyper)

  def fwd(x, w):
    # The primal conv itself (not `conv_fn`), so forward-over-reverse (jax.hessian) works.
    return _forward(x, w, *hyper), (x, w)

  def bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _input_grad(g, w, x.shape[1:n + 1], *hyper)
    dw = _kernel_grad(x, g, w.shape[:n], *hyper)
    return dx.astype(x.dtype), dw.astype(w.dtype)

  conv_fn.defvjp(fwd, bwd)
  return conv_fn


def _dilations(layer: str, arg: str, value, n: int) -> tuple[int, ...]:
  """Like ``_as_tuple``; None means 1 (flax's backward-compatible sentinel)."""
  return _as_tuple(layer, arg, 1 if value is None else value, n)


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] | None = 1,
    padding: PaddingLike = 'SAME',
    input_dilation: int | Sequence[int] | None = 1,
    kernel_dilation: int | Sequence[int] | None = 1,
    feature_group_count: int = 1,
    precision: Any = None,
    custom_backward: bool = True,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    conv_general_dilated: Callable[..., jax.Array] | None = None,
    layer: str = _LAYER,
) -> jax.Array:
  r"""Channels-last (grouped) convolution with a canonical-layout backward pass.

  Per spatial axis, with ``x_pad`` the input dilated by ``a`` (``input_dilation``) and then
  padded, ``G = feature_group_count``, ``Ci = Cin / G`` and ``Co = Cout / G``:

  .. math::

    y[n, p, o] = \sum_{k} \sum_{i < C_i} x_{pad}[n, p s + k d, \lfloor o / C_o \rfloor C_i + i]
    \, w[k, i, o],

  the same function as ``lax.conv_general_dilated`` with ``('NHWC', 'HWIO', 'NHWC')``,
  ``lhs_dilation = input_dilation``, ``rhs_dilation = kernel_dilation`` and
  ``feature_group_count``, i.e. what ``flax.linen.Conv`` / ``flax.nnx.Conv`` compute.

  Every combination of strides, padding, dilations and groups has the canonical custom backward
  (input gradient: a forward conv of the output gradient with the flipped kernel, in/out swapped
  per group; kernel gradient: a grouped forward conv of ``x`` with the output gradient, batch and
  channels exchanged; see the module docstring). Only three options take JAX's autodiff instead,
  because the custom rule cannot honour them: ``preferred_element_type``, ``out_sharding`` and a
  user-supplied ``conv_general_dilated``.

  Args:
    x: input of shape ``(N, *spatial, Cin)`` (``NHWC`` for 2-D), 1 to 3 spatial axes.
    kernel: kernel of shape ``(*kernel_spatial, Cin / G, Cout)`` (``HWIO`` for 2-D), ``Cout`` a
      multiple of ``G``. ``x`` and ``kernel`` are promoted to a common dtype first; the output has
      that dtype (bf16 in, bf16 out).
    strides: window strides, an int or one per spatial axis (None: 1).
    padding: ``'SAME'`` / ``'SAME_LOWER'`` (output size ``ceil(in / stride)``; the odd pad element
      at the end / start), ``'VALID'``, an int (both sides of every axis), per-axis ints, or
      per-axis ``(lo, hi)`` pairs (negative entries crop); ``'CIRCULAR'`` / ``'REFLECT'`` (the input
      is padded by ``((k_eff - 1) // 2, k_eff // 2)`` with ``jnp.pad`` mode ``'wrap'`` /
      ``'reflect'`` and then convolved ``'VALID'``), or ``'CAUSAL'`` (1-D only: ``k_eff - 1``
      zeros on the left), all as in ``flax.linen.Conv``. A string padding with
      ``input_dilation != 1`` raises, as in flax (``lax`` has no string padding for it).
    input_dilation: input (lhs) dilation, an int or one per spatial axis (None: 1); a conv with
      input dilation ``a`` is a transposed conv with stride ``a``.
    kernel_dilation: kernel (atrous, rhs) dilation, an int or one per spatial axis (None: 1).
    feature_group_count: ``G``, the number of groups (``G = Cin``: depthwise); must divide ``Cin``
      and ``Cout``.
    precision: ``lax.Precision`` passed to every convolution (forward and backward).
    custom_backward: if True (default), the backward pass is the ``jax.custom_vjp`` made of
      canonical forward convolutions (fast inside ``scan`` on XLA:CPU). It does not support
      forward-mode AD (``jax.jvp`` / ``jax.jacfwd``): pass False there, which uses
      ``lax.conv_general_dilated`` with JAX's autodiff.
    preferred_element_type: passed to ``lax.conv_general_dilated`` (output accumulation dtype);
      when given, the backward pass is JAX's autodiff.
    out_sharding: passed to ``lax.conv_general_dilated`` (explicit-sharding meshes); when given,
      the backward pass is JAX's autodiff.
    conv_general_dilated: a replacement for ``lax.conv_general_dilated`` (as ``flax.linen.Conv``'s
      ``conv_general_dilated`` / ``flax.nnx.Conv``'s argument), called as ``fn(x, kernel, strides,
      pads, lhs_dilation=..., rhs_dilation=..., dimension_numbers=..., feature_group_count=...,
      precision=...)`` with explicit ``(lo, hi)`` pads (plus ``preferred_element_type`` /
      ``out_sharding`` when given) and differentiated by autodiff.
    layer: the name error messages start with (layers pass their class name).

  Returns:
    The output, shape ``(N, *out_spatial, Cout)``.

  Raises:
    ValueError: on a rank, channel-count, group, stride, dilation or padding that does not fit.
    TypeError: on non-floating ``x`` or ``kernel``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.functional as F
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    >>> w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    >>> y = F.conv(x, w, strides=2)                  # NHWC input, HWIO kernel
    >>> ref = jax.lax.conv_general_dilated(x, w, (2, 2), 'SAME',
    ...                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> y.shape, bool(jnp.allclose(y, ref, atol=1e-5))
    ((2, 4, 4, 4), True)

  References:
    Dumoulin and Visin (2016), "A guide to convolution arithmetic for deep learning",
    arXiv:1603.07285 (transposed convolutions, the padding algebra of the backward pass).
  """
  check_floating(layer, 'x', x)
  check_floating(layer, 'kernel', kernel)
  if x.ndim < 3 or x.ndim > 5:
    fail(layer, 'x', 'an array of rank 3, 4 or 5 (N, *spatial, C)', f'rank {x.ndim} '
         f'(shape {x.shape})')
  if kernel.ndim != x.ndim:
    fail(layer, 'kernel', f'an array of rank {x.ndim} (*spatial, Cin / G, Cout) to match `x`',
         f'rank {kernel.ndim} (shape {kernel.shape})')
  groups = feature_group_count
  if (isinstance(groups, bool) or not isinstance(groups, int | np.integer) or groups < 1):
    fail(layer, 'feature_group_count', 'a positive int', repr(groups))
  groups = int(groups)
  cin, cout = x.shape[-1], kernel.shape[-1]
  if cin % groups:
    fail(layer, 'feature_group_count', f'a divisor of the input channels {cin}', groups)
  if cout % groups:
    fail(layer, 'feature_group_count', f'a divisor of the output channels {cout} '
         f'(kernel shape {kernel.shape})', groups)
  if kernel.shape[-2] * groups != cin:
    fail(layer, 'kernel', f'input-channel dimension {cin // groups} (Cin {cin} from `x` / '
         f'feature_group_count {groups})', f'shape {kernel.shape}')
  n = x.ndim - 2
  strides = _dilations(layer, 'strides', strides, n)
  lhs_dilation = _dilations(layer, 'input_dilation', input_dilation, n)
  dilation = _dilations(layer, 'kernel_dilation', kernel_dilation, n)
  k_spatial = kernel.shape[:n]
  if isinstance(padding, str):
    mode = padding.upper()
    if lhs_dilation != (1,) * n:
      fail(layer, 'padding', 'explicit (lo, hi) pairs or ints with input_dilation != 1 (as in '
           'flax / lax, a string padding is not defined for an input-dilated conv)',
           f'{padding!r} with input_dilation {lhs_dilation}')
    if mode in ('CIRCULAR', 'REFLECT', 'CAUSAL'):
      k_eff = [(k - 1) * d + 1 for k, d in zip(k_spatial, dilation, strict=True)]
      if mode == 'CAUSAL':
        if n != 1:
          fail(layer, 'padding', "'CAUSAL' only for a 1-D convolution (as in flax)",
               f"'CAUSAL' for {n} spatial axes")
        x = jnp.pad(x, [(0, 0), (k_eff[0] - 1, 0), (0, 0)])
      else:
        # Pad the input itself (periodic / mirrored), then convolve without further padding.
        pad_mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[mode]
        x = jnp.pad(x, [(0, 0)] + [((e - 1) // 2, e // 2) for e in k_eff] + [(0, 0)],
                    mode=pad_mode)
      padding = 'VALID'
  pads = resolve_padding(padding, x.shape[1:n + 1], k_spatial, strides, dilation, layer=layer)
  for size, k, a, d, (lo, hi) in zip(x.shape[1:n + 1], k_spatial, lhs_dilation, dilation, pads,
                                     strict=True):
    if (size - 1) * a + 1 + lo + hi < (k - 1) * d + 1:
      fail(layer, 'x', f'padded (input-dilated) spatial size >= dilated kernel size '
           f'{(k - 1) * d + 1}', f'shape {x.shape} with padding {pads} and input_dilation '
           f'{lhs_dilation}')
  dtype = jnp.result_type(x, kernel)
  x = jnp.asarray(x, dtype)
  kernel = jnp.asarray(kernel, dtype)
  extra = {k: v for k, v in (('preferred_element_type', preferred_element_type),
                              ('out_sharding', out_sharding)) if v is not None}
  if conv_general_dilated is not None or extra:
    fn = lax.conv_general_dilated if conv_general_dilated is None else conv_general_dilated
    return fn(x, kernel, strides, pads, lhs_dilation=lhs_dilation, rhs_dilation=dilation,
              dimension_numbers=_dimension_numbers(n), feature_group_count=groups,
              precision=precision, **extra)
  if not custom_backward:
    return _forward(x, kernel, strides, pads, lhs_dilation, dilation, groups, precision,
                    _dimension_numbers(n))
  return _make_conv(strides, pads, lhs_dilation, dilation, groups, precision, n)(x, kernel)
