"""CAGrad: the reference's test vectors, the dual identity, special cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src.cagrad import cagrad_coefficients

# CAGrad reference vectors: rows are task gradients.
G = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.5, -0.2, 0.3]])


def _cagrad(grads, c, rescale=1, **kwargs):
  tx = mo.cagrad(grads.shape[0], c=c, rescale=rescale, **kwargs)
  return tx.update(jnp.asarray(grads), tx.init(jnp.zeros(grads.shape[1:])))


@pytest.mark.parametrize("c, w, d", [
    (0.0, None, (0.16667, 0.26667, 0.1)),
    (0.4, (0, 0, 1), (0.05138, 0.19297, 0.14158)),
    (0.5, (0, 0, 1), (0.02627, 0.17051, 0.14424)),
    (10.0, (0.3048, 0.1300, 0.5652), (0.00586, 0.00586, 0.03323)),
])
def test_reference_test_vectors(c, w, d):
  update, state = _cagrad(G, c)
  np.testing.assert_allclose(update, d, atol=2e-5)
  if w is not None:
    np.testing.assert_allclose(state.dual_weights, w, atol=2e-3)


def test_c10_equalises_task_improvements_like_mgda():
  update, _ = _cagrad(G, 10.0)
  improvements = G @ np.asarray(update) * (1 + 10.0 ** 2)
  np.testing.assert_allclose(improvements, 0.5922, atol=2e-3)


def test_dual_value_equals_worst_improvement():
  """Lemma A.2: min_i <g_i, d*> = F(w*) for the unscaled d* (rescale=0)."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    for num_tasks in (2, 3, 7):
      grads = rng.normal(size=(num_tasks, 12)) + rng.normal(size=(1, 12))
      for c in (0.2, 0.5, 0.9):
        update, state = _cagrad(grads, c, rescale=0, tol=1e-12,
                                max_iter=5000)
        g0 = grads.mean(0)
        g_w = np.asarray(state.dual_weights) @ grads
        dual_value = g_w @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(g_w)
        np.testing.assert_allclose(np.min(grads @ np.asarray(update)),
                                   dual_value, rtol=1e-7, atol=1e-10)
        # d* lies on the boundary of the ball ||d - g0|| <= c ||g0||.
        np.testing.assert_allclose(np.linalg.norm(update - g0),
                                   c * np.linalg.norm(g0), rtol=1e-7)


def test_c_zero_is_exactly_the_mean_gradient():
  grads = jax.random.normal(jax.random.PRNGKey(0), (4, 7, 3))
  params = jnp.zeros((7, 3))
  ls = mo.linear_scalarization(4)
  expected, _ = ls.update(grads, ls.init(params))
  for rescale in (0, 1, 2):
    update, _ = _cagrad(grads, 0.0, rescale=rescale)
    np.testing.assert_array_equal(update, expected)


def test_large_c_gives_the_mgda_direction():
  rng = np.random.default_rng(1)
  grads = jnp.asarray(rng.normal(size=(4, 10)) + 0.5, jnp.float32)
  mgda = mo.mgda(4)
  d_mgda, _ = mgda.update(grads, mgda.init(jnp.zeros(10)))
  d_cagrad, _ = _cagrad(grads, 1e4, rescale=0)
  cosine = d_mgda @ d_cagrad / (jnp.linalg.norm(d_mgda) *
                                jnp.linalg.norm(d_cagrad))
  assert cosine > 0.9999


def test_rescale_options_divide_by_the_documented_factor():
  d0, _ = _cagrad(G, 0.4, rescale=0)
  d1, _ = _cagrad(G, 0.4, rescale=1)
  d2, _ = _cagrad(G, 0.4, rescale=2)
  np.testing.assert_allclose(d1, d0 / (1 + 0.4 ** 2), rtol=1e-6)
  np.testing.assert_allclose(d2, d0 / 1.4, rtol=1e-6)


def test_torchjd_parity_vector():
  """TorchJD's CAGrad(c=0.5) on J = [[-4, 1, 1], [6, 1, 1]] is
  [0.1835, 1.2041, 1.2041]: TorchJD applies no rescale (our rescale=0) and
  its weights 1/m + lambda w are our mean-scale coefficients."""
  j = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
  update, state = _cagrad(j, 0.5, rescale=0)
  np.testing.assert_allclose(update, [0.1835, 1.2041, 1.2041], atol=1e-4)
  np.testing.assert_allclose(state.weights, [0.7041, 0.5], atol=1e-4)


def test_degenerate_directions():
  # Exactly opposite gradients: g0 = 0, so the ball is a point and d = 0.
  update, _ = _cagrad(np.array([[1.0, 2.0], [-1.0, -2.0]]), 0.4)
  np.testing.assert_array_equal(update, np.zeros(2))
  # Identical gradients: w arbitrary, g_w = g0, d = (1 + c) g0 / (1 + c^2).
  g = np.array([[3.0, -1.0], [3.0, -1.0]])
  update, _ = _cagrad(g, 0.4)
  np.testing.assert_allclose(update, 1.4 * g[0] / 1.16, rtol=1e-5)
  # K = 1: d = (1 + c) g.
  update, _ = _cagrad(g[:1], 0.5, rescale=0)
  np.testing.assert_allclose(update, 1.5 * g[0], rtol=1e-5)
  # Colinear with different lengths: every weighting is a positive multiple.
  update, _ = _cagrad(np.array([[1.0, 1.0], [3.0, 3.0]]), 0.4)
  assert update[0] > 0 and abs(update[0] - update[1]) < 1e-6


def test_scale_invariance_from_tiny_to_huge():
  base = np.asarray(G, np.float32)
  reference, _ = _cagrad(base, 0.4)
  for scale in (1e-30, 1e-10, 1e10, 1e30):
    update, _ = _cagrad(base * np.float32(scale), 0.4)
    np.testing.assert_allclose(np.asarray(update) / scale, reference,
                               rtol=1e-4, atol=1e-6)


def test_warm_start_state_and_residual():
  tx = mo.cagrad(3, c=0.4)
  grads = jnp.asarray(G, jnp.float32)
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(grads, state)
  assert float(state.residual) < 1e-4
  np.testing.assert_allclose(state.dual_weights, [0, 0, 1], atol=1e-3)
  np.testing.assert_allclose(np.asarray(state.weights) @ G,
                             [0.05138, 0.19297, 0.14158], atol=2e-5)


def test_injectable_c_and_schedules():
  tx = optax.inject_hyperparams(mo.cagrad, static_args=("num_tasks",
                                                        "rescale"))(
                                                            num_tasks=3, c=0.4)
  state = tx.init(jnp.zeros(3))
  update, state = jax.jit(tx.update)(jnp.asarray(G, jnp.float32), state)
  np.testing.assert_allclose(update, [0.05138, 0.19297, 0.14158], atol=2e-5)
  state.hyperparams["c"] = jnp.asarray(0.0)
  update, _ = jax.jit(tx.update)(jnp.asarray(G, jnp.float32), state)
  np.testing.assert_allclose(update, G.mean(0), atol=1e-6)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="rescale"):
    mo.cagrad(2, rescale=3)
  with pytest.raises(ValueError, match="c must be >= 0"):
    mo.cagrad(2, c=-0.1)
  with pytest.raises(ValueError, match="num_tasks"):
    mo.cagrad(0)


def test_coefficients_are_invariant_to_gram_scale():
  gram = jnp.asarray(G @ G.T, jnp.float32)
  a, _ = cagrad_coefficients(gram, 0.4)
  b, _ = cagrad_coefficients(gram * 1e6, 0.4)
  np.testing.assert_allclose(a, b, rtol=1e-4)


def test_cagrad_fast_solves_the_papers_surrogate_problem():
  """CAGrad-Fast: the k sampled tasks plus the mean of the rest, exact."""
  rng = np.random.default_rng(3)
  num_tasks, k, c = 6, 2, 0.5
  grads = rng.normal(size=(num_tasks, 9)) + 0.3
  with jax.enable_x64(True):
    tx = mo.cagrad(num_tasks, c=c, rescale=0, num_sampled_tasks=k, seed=4,
                   tol=1e-12, max_iter=5000)
    state = tx.init(jnp.zeros(9))
    update, new_state = tx.update(jnp.asarray(grads), state)
    _, subkey = jax.random.split(state.key)
    order = np.asarray(jax.random.permutation(subkey, num_tasks))
  sampled, rest = order[:k], order[k:]
  g0 = grads.mean(0)
  g_hat = (num_tasks * g0 - grads[sampled].sum(0)) / (num_tasks - k)
  surrogate = np.vstack([grads[sampled], g_hat])
  # Paper's primal: d* maximises the worst surrogate improvement in the ball;
  # at the optimum min_j <s_j, d*> equals the dual value (Lemma A.2).
  w = np.asarray(new_state.dual_weights)[list(sampled)]
  w = np.append(w, np.asarray(new_state.dual_weights)[rest].sum())
  g_w = w @ surrogate
  dual_value = g_w @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(g_w)
  np.testing.assert_allclose(np.min(surrogate @ np.asarray(update)),
                             dual_value, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(update - g0),
                             c * np.linalg.norm(g0), rtol=1e-6)
  assert not np.array_equal(new_state.key, state.key)


def test_cagrad_fast_rejects_bad_sample_sizes():
  with pytest.raises(ValueError, match="num_sampled_tasks"):
    mo.cagrad(4, num_sampled_tasks=4)


@pytest.mark.parametrize("x64", [False, True])
def test_vanished_g_w_gives_lambda_zero_and_bounded_ema(x64):
  # A task with an exactly zero gradient puts w* on it: g_w = 0, so the
  # correction vanishes and the coefficients are those of g0, (1/K)/(1+c^2).
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    g1 = jnp.array([[1, .2, 0], [.3, 1, 0], [0, 0, 0]], dtype)
    g2 = jnp.array([[1, .2, 0], [.3, 1, 0], [.1, .1, 1]], dtype)
    tx = mo.cagrad(3, c=0.4)
    update, state = tx.update(g1, tx.init(jnp.zeros(3, dtype)))
    np.testing.assert_allclose(state.weights, np.full(3, 1 / 3 / 1.16),
                               rtol=1e-6)
    np.testing.assert_allclose(update, np.asarray(g1).mean(0) / 1.16,
                               rtol=1e-6)
    ema = mo.ema_weights(3, mo.cagrad(3, c=0.4))
    state = ema.init(jnp.zeros(3, dtype))
    for g in (g1, g2):
      update, state = ema.update(g, state)
    # Every coefficient of CAGrad is at most 1/K + c ||g0|| / ||g_w*|| with
    # unit-scale gradients here; the exploded one gave a norm of 635.7.
    assert float(jnp.linalg.norm(update)) < 2.0
