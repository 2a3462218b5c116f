"""Singular-value spectra: products of random matrices and a network's layer Jacobians.

Bjorck et al. contrast deep unnormalized networks with random-matrix theory: the singular values of
a product of M Gaussian matrices pile up near 0 while the largest one grows to
``sqrt((M + 1)^(M + 1) / M^M)`` (``theory.gaussian_product_max_singular_value``), so the condition
number of the input-output map grows with depth.

References:
  Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
  arXiv:1806.02375 (the comparison with random-matrix theory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.functional._checks import fail

_LAYER = 'jaxnorm.diagnostics.spectra'


def gaussian_product_singular_values(key: jax.Array, size: int, num_matrices: int,
                                     num_samples: int = 1) -> jax.Array:
  """Singular values of a product of ``num_matrices`` Gaussian matrices, entries ``N(0, 1/size)``.

  The product is ``G_M ... G_1`` with i.i.d. ``G_i[a, b] ~ N(0, 1/size)``.

  Args:
    key: PRNG key.
    size: N, the side of the square matrices.
    num_matrices: M >= 1.
    num_samples: independent products (the leading axis of the result).

  Returns:
    float32 array ``(num_samples, size)`` of singular values, descending in each row.

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375: quarter circle on [0, 2] for M = 1, a stretched tail for larger M.
  """
  if not isinstance(size, int) or size < 1:
    fail(_LAYER, 'size', 'a positive int', repr(size))
  if not isinstance(num_matrices, int) or num_matrices < 1:
    fail(_LAYER, 'num_matrices', 'an int >= 1', repr(num_matrices))
  if not isinstance(num_samples, int) or num_samples < 1:
    fail(_LAYER, 'num_samples', 'a positive int', repr(num_samples))
  g = jax.random.normal(key, (num_samples, num_matrices, size, size)) / np.sqrt(size)

  def product(mats):
    return jax.lax.fori_loop(1, num_matrices, lambda i, p: mats[i] @ p, mats[0])

  prods = jax.vmap(product)(g)
  return jnp.linalg.svd(prods, compute_uv=False)


def jacobian_singular_values(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """Singular values of the Jacobian of ``fn`` at ``x`` (both flattened to vectors).

  Uses reverse mode (``jax.jacrev``), so it works through jaxnorm's custom-VJP layers, which rule
  out forward-mode AD.

  Args:
    fn: a function from an array to an array (e.g. one layer applied to one example).
    x: the point of evaluation.

  Returns:
    Descending singular values, length ``min(out.size, x.size)``.

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375.
  """
  x = jnp.asarray(x)

  def flat(v):
    return jnp.reshape(fn(jnp.reshape(v, x.shape)), (-1,))

  jac = jax.jacrev(flat)(jnp.reshape(x, (-1,)))
  return jnp.linalg.svd(jac, compute_uv=False)


def layer_jacobian_spectra(layers: Sequence[Callable[[jax.Array], jax.Array]],
                           x: jax.Array) -> dict[str, list[np.ndarray]]:
  """Spectra of each layer's Jacobian and of the cumulative products along a network.

  Runs ``x`` through ``layers`` in order; at each layer ``k`` takes the Jacobian ``J_k`` at its
  input, and the end-to-end Jacobian ``J_k ... J_1`` of the first ``k + 1`` layers.

  Args:
    layers: callables applied in order (e.g. ``functools.partial(block.apply, vars_k)``), each on
      a single example or a whole batch (the Jacobian is then over the whole batch).
    x: input of the first layer.

  Returns:
    ``{'layer': [...], 'product': [...]}``: lists of numpy arrays of descending singular values.

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375 (products of layer Jacobians vs products of Gaussians).
  """
  if not layers:
    fail(_LAYER, 'layers', 'a non-empty sequence of callables', layers)
  layer_sv, prod_sv = [], []
  prod = None
  h = jnp.asarray(x)
  for fn in layers:
    shape = h.shape

    def flat(v, fn=fn, shape=shape):
      return jnp.reshape(fn(jnp.reshape(v, shape)), (-1,))

    jac = jax.jacrev(flat)(jnp.reshape(h, (-1,)))
    prod = jac if prod is None else jac @ prod
    layer_sv.append(np.asarray(jnp.linalg.svd(jac, compute_uv=False)))
    prod_sv.append(np.asarray(jnp.linalg.svd(prod, compute_uv=False)))
    h = fn(h)
  return {'layer': layer_sv, 'product': prod_sv}
