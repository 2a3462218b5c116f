"""Random-matrix spectra (Bjorck et al.) and layer-Jacobian spectra against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.diagnostics import spectra, theory


@pytest.mark.parametrize('num_matrices', [1, 3, 5])
def test_gaussian_product_largest_singular_value_matches_fuss_catalan_edge(num_matrices):
  sv = spectra.gaussian_product_singular_values(jax.random.key(0), 300, num_matrices, 2)
  assert sv.shape == (2, 300)
  smax = float(jnp.mean(sv[:, 0]))
  # Finite-N edge fluctuations shrink like N^(-2/3); 300 is within ~6 % of the limit.
  assert smax == pytest.approx(theory.gaussian_product_max_singular_value(num_matrices), rel=0.06)


def test_single_gaussian_matrix_is_quarter_circle():
  """M = 1: squared singular values follow Marchenko-Pastur(1): E s^2 = 1, E s^4 = 2."""
  sv = np.asarray(spectra.gaussian_product_singular_values(jax.random.key(1), 300, 1, 2))
  assert np.mean(sv ** 2) == pytest.approx(1.0, rel=0.03)
  assert np.mean(sv ** 4) == pytest.approx(2.0, rel=0.05)


def test_products_pile_up_near_zero_and_stretch_the_tail():
  sv1 = np.asarray(spectra.gaussian_product_singular_values(jax.random.key(2), 200, 1))
  sv5 = np.asarray(spectra.gaussian_product_singular_values(jax.random.key(2), 200, 5))
  assert np.median(sv5) < np.median(sv1) and sv5.max() > sv1.max()
  # E s^2 of a product of M unit-variance Gaussian matrices stays 1 (the mean does not move).
  assert np.mean(sv5 ** 2) == pytest.approx(1.0, rel=0.25)


def test_jacobian_singular_values_of_a_linear_map_are_its_singular_values():
  w = jax.random.normal(jax.random.key(3), (7, 5))
  sv = spectra.jacobian_singular_values(lambda x: x @ w, jnp.ones((7,)))
  np.testing.assert_allclose(sv, np.linalg.svd(np.asarray(w), compute_uv=False), rtol=1e-5)


def test_layer_jacobian_spectra_products_compose():
  keys = jax.random.split(jax.random.key(4), 3)
  ws = [jax.random.normal(k, (6, 6)) / np.sqrt(6) for k in keys]
  layers = [lambda h, w=w: jnp.tanh(h @ w) for w in ws]
  x = jax.random.normal(jax.random.key(5), (6,))
  out = spectra.layer_jacobian_spectra(layers, x)
  assert len(out['layer']) == len(out['product']) == 3
  # Independent check: numpy chain rule, J = diag(1 - tanh^2(h w)) w^T per layer.
  h, prod = np.asarray(x), np.eye(6)
  for w, sv_layer, sv_prod in zip(ws, out['layer'], out['product'], strict=True):
    w = np.asarray(w)
    pre = h @ w
    jac = (1 - np.tanh(pre) ** 2)[:, None] * w.T
    prod = jac @ prod
    np.testing.assert_allclose(sv_layer, np.linalg.svd(jac, compute_uv=False), rtol=1e-4)
    np.testing.assert_allclose(sv_prod, np.linalg.svd(prod, compute_uv=False), rtol=1e-4,
                               atol=1e-6)
    h = np.tanh(pre)


def test_bad_arguments_fail_fast():
  with pytest.raises(ValueError, match='num_matrices'):
    spectra.gaussian_product_singular_values(jax.random.key(0), 4, 0)
  with pytest.raises(ValueError, match='layers'):
    spectra.layer_jacobian_spectra([], jnp.ones(3))
