"""IMTL-G, Aligned-MTL, ConFIG: TorchJD's values, float64 oracles, properties.

The oracles work on the raw gradient matrix J with NumPy (the IMTL-G paper's
difference formula, an SVD of J, a pseudo-inverse of the unit-row matrix),
independent of the library's Gram-matrix eigendecompositions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src import closed_form

from tests.conftest import TORCHJD_J as J
from tests.conftest import apply_fresh


def _jacobians(rng, num_tasks):
  """Random and adversarial task-gradient matrices (rows are tasks)."""
  dim = 2 * num_tasks + 3
  out = {"random": rng.normal(size=(num_tasks, dim)),
         "scaled": rng.normal(size=(num_tasks, dim)) * np.exp(
             2 * rng.normal(size=(num_tasks, 1))),
         "near_colinear": rng.normal(size=(1, dim)) * (
             1 + rng.random(size=(num_tasks, 1))) + 1e-3 * rng.normal(
                 size=(num_tasks, dim))}
  if num_tasks >= 3:
    out["rank_deficient"] = rng.normal(size=(num_tasks, 2)) @ rng.normal(
        size=(2, dim))
  if num_tasks >= 2:
    one_zero = rng.normal(size=(num_tasks, dim))
    one_zero[1] = 0.0
    out["one_zero"] = one_zero
  return out


def _gram(jac):
  gram = jac @ jac.T
  return gram / np.trace(gram) * len(gram)


# ------------------------------------------------------------------ TorchJD


# ------------------------------------------------------------------ oracles


def _imtl_g_oracle(jac):
  """Liu et al. (2021): alpha_{2:K} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum,
  with D_i = g_1 - g_i and U_i = u_1 - u_i (full-rank J only)."""
  if len(jac) == 1:
    return np.ones(1)
  units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  d = jac[0] - jac[1:]
  u = units[0] - units[1:]
  tail = jac[0] @ u.T @ np.linalg.inv(d @ u.T)
  return np.concatenate([[1.0 - tail.sum()], tail])


def _aligned_oracle(jac, pref, scale_mode):
  """Aligned-MTL from an SVD of J: G = U S^2 U^T."""
  u, s, _ = np.linalg.svd(jac, full_matrices=False)
  lam = s ** 2
  keep = lam > lam.max() * len(jac) * np.finfo(np.float64).eps
  lam, u = lam[keep], u[:, keep]
  if not keep.any():
    return pref
  scale = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2],
           "rmse": lam.mean()}[scale_mode]
  return np.sqrt(scale) * (u / np.sqrt(lam)) @ u.T @ pref


def _config_oracle(jac, pref):
  """ConFIG (Eq. 2) with a pseudo-inverse of the unit-row matrix, mean scale."""
  norms = np.linalg.norm(jac, axis=1, keepdims=True)
  units = np.where(norms > 0, jac / np.where(norms > 0, norms, 1), 0)
  best = np.linalg.pinv(units) @ pref
  if np.linalg.norm(best) < 1e-12:
    return np.zeros(jac.shape[1])
  unit = best / np.linalg.norm(best)
  return np.mean(jac @ unit) * unit


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 64])
def test_float64_oracles_random_and_adversarial(num_tasks):
  rng = np.random.default_rng(num_tasks)
  with jax.enable_x64(True):
    imtl = jax.jit(closed_form.imtl_g_weights)
    aligned = jax.jit(closed_form.aligned_mtl_weights,
                      static_argnames="scale_mode")
    config = jax.jit(closed_form.config_weights)
    pref_mean = np.full(num_tasks, 1.0 / num_tasks)
    pref_random = rng.random(num_tasks) + 0.1
    for kind, jac in _jacobians(rng, num_tasks).items():
      gram = jnp.asarray(_gram(jac))
      scale = np.sqrt(np.trace(jac @ jac.T) / num_tasks)
      if kind not in ("rank_deficient", "one_zero"):
        np.testing.assert_allclose(imtl(gram), _imtl_g_oracle(jac),
                                   rtol=1e-6, atol=1e-8, err_msg=kind)
      for mode in closed_form.SCALE_MODES:
        for pref in (pref_mean, pref_random)[:1 if num_tasks > 8 else 2]:
          ours = np.asarray(aligned(gram, jnp.asarray(pref), mode)) @ jac
          expected = _aligned_oracle(jac, pref, mode) @ jac
          # Entry-wise, relative to the update's size: near-colinear
          # gradients make single coordinates cancel.
          np.testing.assert_allclose(
              ours, expected, rtol=0,
              atol=1e-7 * np.abs(expected).max() + 1e-12 * scale,
              err_msg=f"{kind} {mode}")
      for pref in (np.ones(num_tasks), pref_random):
        ours = np.asarray(config(gram, jnp.asarray(pref))) @ jac
        expected = _config_oracle(jac, pref)
        np.testing.assert_allclose(
            ours, expected, rtol=0,
            atol=1e-7 * np.abs(expected).max() + 1e-12 * scale, err_msg=kind)


def test_imtl_g_pseudo_inverse_generalisation():
  """Rank-deficient J: w = G^+ n / sum (TorchJD's generalisation), checked
  with NumPy's pinv in float64; a zero task gets weight 0 there too."""
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    for kind in ("rank_deficient", "one_zero"):
      jac = _jacobians(rng, 4)[kind]
      gram = jac @ jac.T
      raw = np.linalg.pinv(gram) @ np.sqrt(np.diag(gram))
      expected = raw / raw.sum()
      ours = closed_form.imtl_g_weights(jnp.asarray(_gram(jac)))
      np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)
    assert abs(float(ours[1])) < 1e-9


# --------------------------------------------------------------- properties


def test_imtl_g_equal_projections_and_unit_sum():
  rng = np.random.default_rng(3)
  for num_tasks in (3, 7):
    jac = rng.normal(size=(num_tasks, 12)) * np.exp(rng.normal(
        size=(num_tasks, 1)))
    update, state = apply_fresh(mo.imtl_g(num_tasks), jac.astype(np.float32))
    projections = jac @ np.asarray(update) / np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(projections, projections.mean(), rtol=1e-4)
    np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-5)


def test_aligned_mtl_condition_number_one():
  """B G B has all its non-zero eigenvalues equal to the scale: the aligned
  gradients B J have condition number one (on their span)."""
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    for kind, jac in _jacobians(rng, 5).items():
      gram = _gram(jac)
      for mode in closed_form.SCALE_MODES:
        # The balance matrix is the map p -> weights.
        balance = np.stack([np.asarray(closed_form.aligned_mtl_weights(
            jnp.asarray(gram), jnp.asarray(e), mode)) for e in np.eye(5)], 1)
        aligned = balance @ gram @ balance
        lam = np.linalg.eigvalsh(aligned)
        kept = lam[lam > 1e-9 * lam.max()]
        np.testing.assert_allclose(kept, kept.max(), rtol=1e-7,
                                   err_msg=f"{kind} {mode}")
        assert len(kept) == np.linalg.matrix_rank(jac), (kind, mode)


def test_aligned_mtl_scale_modes_order():
  """min <= median <= rmse for the same J (the scale multiplies B)."""
  rng = np.random.default_rng(5)
  jac = rng.normal(size=(4, 9)) + rng.normal(size=(1, 9))
  norms = [np.linalg.norm(apply_fresh(mo.aligned_mtl(4, mode), jac.astype(
      np.float32))[0]) for mode in ("min", "median", "rmse")]
  assert norms[0] < norms[1] < norms[2]


def test_config_equal_cosines_and_preference():
  rng = np.random.default_rng(6)
  for num_tasks in (2, 6):
    jac = rng.normal(size=(num_tasks, 10)) * np.exp(rng.normal(
        size=(num_tasks, 1)))
    update, _ = apply_fresh(mo.config(num_tasks), jac.astype(np.float32))
    d = np.asarray(update, np.float64)
    cosines = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cosines, cosines.mean(), rtol=1e-4)
    assert cosines.min() > 0
    # Length: the mean projection on the unit direction.
    np.testing.assert_allclose(np.linalg.norm(d), np.mean(jac @ d) /
                               np.linalg.norm(d), rtol=1e-5)
    pref = np.arange(1.0, num_tasks + 1)
    update, _ = apply_fresh(mo.config(num_tasks, pref_vector=pref),
                       jac.astype(np.float32))
    d = np.asarray(update, np.float64)
    cosines = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cosines / pref, cosines[0], rtol=1e-4)


def test_aligned_mtl_preference_vector():
  jac = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
  # Orthogonal gradients: G = diag(1, 4, 16), B = sqrt(s) G^-1/2 with s = 1.
  update, state = apply_fresh(mo.aligned_mtl(3, pref_vector=[1.0, 2.0, 3.0]), jac)
  np.testing.assert_allclose(state.weights, [1.0, 1.0, 0.75], rtol=1e-5)
  np.testing.assert_allclose(update, [1.0, 2.0, 3.0], rtol=1e-5)


# ----------------------------------------------------- scale and degeneracy


@pytest.mark.parametrize("factory", [mo.imtl_g, mo.aligned_mtl, mo.config])
def test_scale_invariance_from_tiny_to_huge(factory):
  jac = np.array([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0],
                  [-1.0, 0.2, 0.3, -0.4]], np.float32)
  tx = factory(3)
  step = jax.jit(lambda g: apply_fresh(tx, g))
  reference = np.asarray(step(jac)[0])
  for scale in (1e-30, 1e-10, 1e10, 1e30):
    update, state = step(jac * np.float32(scale))
    np.testing.assert_allclose(np.asarray(update) / scale, reference,
                               rtol=2e-4, atol=1e-6 * np.abs(reference).max())


def test_degenerate_directions():
  g = np.array([1.0, 2.0, -1.0], np.float32)
  # Exactly opposite gradients: no equal-projection direction, no ConFIG
  # direction (unit vectors sum to zero): the update is zero.
  for factory in (mo.imtl_g, mo.config):
    update, _ = apply_fresh(factory(2), np.stack([g, -g]))
    np.testing.assert_array_equal(update, np.zeros(3))
  # Identical gradients: every method returns g (IMTL-G), the aligned mean
  # (rank one, B p = p), and ConFIG's mean projection.
  same = np.stack([g, g, g])
  for factory in (mo.imtl_g, mo.aligned_mtl, mo.config):
    update, _ = apply_fresh(factory(3), same)
    np.testing.assert_allclose(update, g, rtol=1e-5)
  # K = 1.
  for factory in (mo.imtl_g, mo.aligned_mtl, mo.config):
    update, _ = apply_fresh(factory(1), g[None])
    np.testing.assert_allclose(update, g, rtol=1e-5)


def test_median_and_rmse_on_degenerate_inputs_are_finite():
  base = np.array([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0],
                   [-1.0, 0.2, 0.3, -0.4]], np.float32)
  inputs = [np.zeros((3, 4), np.float32), base * [[1.0], [0.0], [1.0]],
            np.repeat(base[:1], 3, 0), base * np.float32(1e-30),
            base * np.float32(1e30)]
  for mode in ("median", "rmse"):
    step = jax.jit(lambda g, mode=mode: apply_fresh(mo.aligned_mtl(3, mode), g))
    for grads in inputs:
      update, state = step(jnp.asarray(grads, jnp.float32))
      assert np.all(np.isfinite(update)) and np.all(np.isfinite(
          state.weights)), (mode, grads)
  np.testing.assert_array_equal(step(jnp.zeros((3, 4)))[0], np.zeros(4))


def test_injected_preference_vector():
  tx = optax.inject_hyperparams(mo.aligned_mtl, static_args=("num_tasks",))(
      num_tasks=2, pref_vector=jnp.array([0.5, 0.5]))
  grads = jnp.asarray(J, jnp.float32)
  state = tx.init(jnp.zeros(3))
  update, state = jax.jit(tx.update)(grads, state)
  np.testing.assert_allclose(update, [0.2133, 0.9673, 0.9673], atol=1e-4)
  state.hyperparams["pref_vector"] = jnp.array([1.0, 1.0])
  update, _ = jax.jit(tx.update)(grads, state)
  np.testing.assert_allclose(update, [0.4266, 1.9346, 1.9346], atol=2e-4)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="scale_mode"):
    mo.aligned_mtl(2, scale_mode="max")
  with pytest.raises(ValueError, match=r"pref_vector.*\(3,\)"):
    mo.config(3, pref_vector=[1.0, 2.0])
  with pytest.raises(ValueError, match="pref_vector"):
    mo.aligned_mtl(2, pref_vector=np.ones((2, 2)))
