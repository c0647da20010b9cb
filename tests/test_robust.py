"""Krum and the trimmed mean against float64 NumPy oracles on flat J."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests.cases.aggregators_other import adversarial_jacobians

# TorchJD's test matrices (tests/unit/aggregation/test_values.py).
J_KRUM = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0],
                   [1.0, 2.0, 3.0], [2.0, 0.0, 1.0]])
J_TRIMMED = np.array([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])


@functools.lru_cache(maxsize=None)
def _jitted(factory, num_tasks, **kwargs):
  tx = factory(num_tasks, **kwargs)
  return tx, jax.jit(tx.update)


def _apply(factory, jac, dtype=jnp.float32, **kwargs):
  tx, step = _jitted(factory, jac.shape[0], **kwargs)
  jac = jnp.asarray(jac, dtype)
  return step(jac, tx.init(jac[0]))


def _krum_oracle(jac, n_byzantine, n_selected):
  """Blanchard et al. (2017): squared distances to the K - f - 2 nearest."""
  jac = np.asarray(jac, np.float64)
  num_tasks = len(jac)
  dist2 = ((jac[:, None, :] - jac[None, :, :]) ** 2).sum(-1)
  scores = np.array([np.sort(np.delete(dist2[i], i))[:num_tasks - n_byzantine
                                                      - 2].sum()
                     for i in range(num_tasks)])
  chosen = np.argsort(scores, kind="stable")[:n_selected]
  weights = np.zeros(num_tasks)
  weights[chosen] = 1.0 / n_selected
  return weights @ jac, weights, scores


def test_krum_torchjd_values():
  """TorchJD: Krum(1, 4) on J_KRUM = [1.25, 0.75, 1.5], weights 0.25 on every
  row but the adversarial one."""
  update, state = _apply(mo.krum, J_KRUM, n_byzantine=1, n_selected=4)
  np.testing.assert_allclose(update, [1.25, 0.75, 1.5], atol=1e-5)
  np.testing.assert_allclose(state.weights, [0.25, 0.25, 0.0, 0.25, 0.25])
  expected, weights, _ = _krum_oracle(J_KRUM, 1, 4)
  np.testing.assert_allclose(update, expected, atol=1e-5)
  np.testing.assert_allclose(state.weights, weights)


@pytest.mark.parametrize("name", ["random", "rank_deficient", "one_zero",
                                  "k64"])
def test_krum_matches_oracle(name):
  """The selected tasks have the n_selected lowest oracle scores (with K = 3,
  f = 0 two mutual nearest neighbours tie exactly: either is right), and the
  update is their mean."""
  jac = adversarial_jacobians()[name]
  num_tasks = len(jac)
  for n_byzantine, n_selected in ((0, 1), (num_tasks - 3, 2)):
    _, _, scores = _krum_oracle(jac, n_byzantine, n_selected)
    update, state = _apply(mo.krum, jac, n_byzantine=n_byzantine,
                           n_selected=n_selected)
    chosen = np.flatnonzero(np.asarray(state.weights))
    assert len(chosen) == n_selected
    np.testing.assert_allclose(state.weights[chosen], 1.0 / n_selected)
    np.testing.assert_allclose(np.sort(scores[chosen]),
                               np.sort(scores)[:n_selected], rtol=1e-4)
    np.testing.assert_allclose(update, jac[chosen].mean(0), rtol=1e-5,
                               atol=1e-5)
  # K = 64 has no near ties: the choice itself matches the oracle's.
  if num_tasks == 64:
    _, weights, _ = _krum_oracle(jac, 10, 7)
    _, state = _apply(mo.krum, jac, n_byzantine=10, n_selected=7)
    np.testing.assert_allclose(state.weights, weights, rtol=1e-6)


def test_krum_rejects_an_outlier_task_and_ties_go_to_the_lower_index():
  rng = np.random.default_rng(0)
  honest = rng.normal(size=(5, 6)) * 0.1 + 1.0
  jac = np.concatenate([honest[:2], [[-50.0] * 6], honest[2:]])
  update, state = _apply(mo.krum, jac, n_byzantine=1, n_selected=5)
  assert state.weights[2] == 0.0
  np.testing.assert_allclose(update, honest.mean(0), rtol=1e-5)
  # Identical gradients: every score is 0 -> the first n_selected tasks.
  _, state = _apply(mo.krum, np.ones((4, 6)), n_byzantine=1, n_selected=2)
  np.testing.assert_array_equal(state.weights, [0.5, 0.5, 0.0, 0.0])


def test_krum_is_scale_free_and_near_colinear():
  jac = adversarial_jacobians()["near_colinear"]
  base, _ = _apply(mo.krum, jac, n_byzantine=0, n_selected=1)
  for scale in (1e-30, 1e30):
    scaled, state = _apply(mo.krum, jac * scale, n_byzantine=0, n_selected=1)
    np.testing.assert_allclose(np.asarray(scaled) / scale, base, rtol=1e-5)
  with jax.enable_x64(True):
    expected, weights, _ = _krum_oracle(jac, 0, 1)
    update, state = _apply(mo.krum, jac, jnp.float64, n_byzantine=0,
                           n_selected=1)
    np.testing.assert_allclose(state.weights, weights, rtol=1e-15)
    np.testing.assert_allclose(update, expected, rtol=1e-12)


def test_krum_errors():
  with pytest.raises(ValueError, match="n_byzantine \\+ 3"):
    mo.krum(3, n_byzantine=1)
  with pytest.raises(ValueError, match="n_selected"):
    mo.krum(4, n_selected=5)
  with pytest.raises(TypeError, match="static"):
    optax.inject_hyperparams(mo.krum, static_args=("num_tasks",))(
        num_tasks=4, n_byzantine=1).init(jnp.zeros(2))


def _trimmed_oracle(jac, trim):
  jac = np.asarray(jac, np.float64)
  num_tasks = len(jac)
  ordered = np.sort(jac, axis=0, kind="stable")
  update = ordered[trim:num_tasks - trim].mean(0)
  rank = np.argsort(np.argsort(jac, axis=0, kind="stable"), axis=0,
                    kind="stable")
  inside = (rank >= trim) & (rank < num_tasks - trim)
  weights = inside.reshape(num_tasks, -1).sum(1) / (
      inside[0].size * (num_tasks - 2 * trim))
  return update, weights


def test_trimmed_mean_torchjd_values():
  """TorchJD: TrimmedMean(1) on J_TRIMMED = [1.5, 2.5]."""
  update, state = _apply(mo.trimmed_mean, J_TRIMMED, trim_number=1)
  np.testing.assert_allclose(update, [1.5, 2.5])
  np.testing.assert_allclose(state.weights, [0.25, 0.25, 0.0, 0.5])


@pytest.mark.parametrize("name", ["random", "near_colinear", "rank_deficient",
                                  "one_zero", "k1", "k64"])
def test_trimmed_mean_matches_oracle(name):
  jac = adversarial_jacobians()[name]
  num_tasks = len(jac)
  for trim in sorted({0, (num_tasks - 1) // 2, min(1, (num_tasks - 1) // 2)}):
    expected, weights = _trimmed_oracle(jac, trim)
    update, state = _apply(mo.trimmed_mean, jac, trim_number=trim)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights, weights, rtol=1e-6)
    np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-6)


def test_trimmed_mean_on_a_tree_median_and_nan():
  rng = np.random.default_rng(1)
  tree = {"a": rng.normal(size=(3, 2, 3)), "b": rng.normal(size=(3, 4))}
  tx = mo.trimmed_mean(3, trim_number=1)
  update, state = jax.jit(tx.update)(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree),
      tx.init(jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), tree)))
  for key in tree:  # K = 3, trim 1: the coordinate-wise median
    np.testing.assert_allclose(update[key], np.median(tree[key], 0),
                               rtol=1e-6)
  flat = np.concatenate([tree["a"].reshape(3, -1), tree["b"]], axis=1)
  np.testing.assert_allclose(state.weights, _trimmed_oracle(flat, 1)[1],
                             rtol=1e-6)
  # A NaN that the trimming would drop still reaches the output.
  bad = tree["b"].copy()
  bad[0, 1] = np.nan
  out, _ = _apply(mo.trimmed_mean, bad, trim_number=1)
  assert np.isnan(out[1]) and np.all(np.isfinite(np.delete(out, 1)))
  with pytest.raises(ValueError, match="2 \\* trim_number \\+ 1"):
    mo.trimmed_mean(2, trim_number=1)


def test_krum_scores_squared_distances_as_the_paper_not_torchjd():
  """TorchJD sums plain distances; the paper (and we) sum squared ones. On
  this configuration the two choices differ (task 3 vs task 1)."""
  jac = np.array([[-6.113, 1.254], [0.107, 0.268], [14.717, 1.254],
                  [0.633, -0.811], [-0.249, -8.236], [2.836, 2.763]])
  dist2 = ((jac[:, None] - jac[None]) ** 2).sum(-1)
  np.fill_diagonal(dist2, np.inf)
  squared = np.sort(dist2, 1)[:, :4].sum(1)
  plain = np.sort(np.sqrt(dist2), 1)[:, :4].sum(1)
  assert (np.argmin(squared), np.argmin(plain)) == (3, 1)
  _, state = _apply(mo.krum, jac, n_byzantine=0, n_selected=1)
  np.testing.assert_array_equal(state.weights, np.eye(6)[3])


@pytest.mark.parametrize("jit", [False, True])
def test_krum_scores_an_ulp_apart_tie_and_nan_stays(jit):
  # XLA can round two copies of one fused distance apart: scores equal in
  # exact arithmetic then differ by an ulp, and must still tie (lower index).
  from mtl_optax._src import robust  # pylint: disable=g-import-not-at-top
  one_up = np.nextafter(np.float32(1), np.float32(2))
  scores = jnp.array([2.0, one_up, 1.0, 3.0, np.nan], jnp.float32)
  snap = jax.jit(robust._snapped_to_ties) if jit else robust._snapped_to_ties
  out = np.asarray(snap(scores, jnp.float32(1e-6)))
  np.testing.assert_array_equal(out[:4], [2.0, 1.0, 1.0, 3.0])
  assert np.isnan(out[4])
  # Beyond the tolerance nothing moves.
  far = np.asarray(snap(scores, jnp.float32(0.0)))
  np.testing.assert_array_equal(far[:4], np.asarray(scores)[:4])
  _, picked = jax.lax.top_k(-snap(scores[:4], jnp.float32(1e-6)), 1)
  assert int(picked[0]) == 1
