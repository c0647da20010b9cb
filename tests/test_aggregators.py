"""Foundation aggregators against direct NumPy oracles and TorchJD's vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src.aggregators import pcgrad_coefficients

from tests.conftest import TORCHJD_J as J
from tests.conftest import apply_fresh


def test_mgda_output_is_min_norm_and_common_descent():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(5, 20)) + 1.0
  update, _ = apply_fresh(mo.mgda(5), grads)
  # Optimality of the min-norm point: <g_i, d> >= ||d||^2 for every i.
  np.testing.assert_array_less(np.sum(np.asarray(update) ** 2) - 1e-4,
                               grads @ np.asarray(update))


def _official_pcgrad(grads, orders):
  """The CAGrad repository's PCGrad, on the flat J, with given orders."""
  num_tasks = len(grads)
  normalized = grads / (np.linalg.norm(grads, axis=1, keepdims=True) + 1e-30)
  modified = grads.copy()
  for round_ in range(num_tasks - 1):
    for i in range(num_tasks):
      other = normalized[orders[i][round_]]
      dot = modified[i] @ other
      modified[i] -= min(dot, 0.0) * other
  return modified.mean(0)


def test_pcgrad_matches_the_official_algorithm_for_the_same_orders():
  rng = np.random.default_rng(1)
  key = jax.random.PRNGKey(5)
  for num_tasks in (2, 3, 6):
    grads = rng.normal(size=(num_tasks, 9))
    gram = grads @ grads.T
    with jax.enable_x64(True):
      coeffs = pcgrad_coefficients(jnp.asarray(gram), key)
      orders = np.asarray(jax.vmap(
          lambda k: jax.random.permutation(k, num_tasks - 1))(
              jax.random.split(key, num_tasks)))
    orders = orders + (orders >= np.arange(num_tasks)[:, None])
    np.testing.assert_allclose(np.asarray(coeffs) @ grads,
                               _official_pcgrad(grads, orders), rtol=1e-9,
                               atol=1e-12)


def test_pcgrad_removes_conflicts_for_two_tasks():
  grads = np.array([[1.0, 0.0], [-1.0, 1.0]])
  update, _ = apply_fresh(mo.pcgrad(2), grads)
  np.testing.assert_allclose(update, [0.25, 0.75], atol=1e-6)
  assert np.all(grads @ np.asarray(update) >= -1e-6)


def test_pcgrad_draws_a_new_order_every_step():
  grads = jnp.asarray(np.random.default_rng(2).normal(size=(5, 8)),
                      jnp.float32)
  tx = mo.pcgrad(5, seed=1)
  state = tx.init(jnp.zeros(8))
  u1, state1 = tx.update(grads, state)
  u2, _ = tx.update(grads, state1)
  assert not np.array_equal(state.key, state1.key)
  u1_again, _ = tx.update(grads, state)
  np.testing.assert_array_equal(u1, u1_again)  # same key, same result
  assert not np.allclose(u1, u2)


def test_weights_are_reachable_with_optax_tree_get():
  tx = optax.chain(mo.mgda(2), optax.adam(1e-3))
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(jnp.asarray(J, jnp.float32), state, jnp.zeros(3))
  np.testing.assert_allclose(optax.tree.get(state, "weights"), [0.6, 0.4],
                             atol=1e-4)


@pytest.mark.parametrize("make, num_tasks", [
    (lambda k: mo.task_sum(k), 5),
    (lambda k: mo.cagrad(k, c=10.0, rescale=0), 4),
], ids=["task_sum", "cagrad_rescale0"])
def test_float16_update_beyond_the_range_is_scaled_to_fit(make, num_tasks):
  """A float16 update whose true length leaves the dtype's range (the sum of
  K large gradients; CAGrad's (1 + c)-times longer step) is finite and
  points where the float32 update points."""
  rng = np.random.default_rng(0)
  grads32 = jnp.asarray(3e4 * (1.0 + 0.1 * rng.normal(size=(num_tasks, 3))),
                        jnp.float32)
  grads16 = grads32.astype(jnp.float16)
  tx = make(num_tasks)
  ref, _ = tx.update(grads16.astype(jnp.float32), tx.init(jnp.zeros(3)))
  out, state = jax.jit(tx.update)(grads16, tx.init(jnp.zeros(3, jnp.float16)))
  assert out.dtype == jnp.float16
  out = np.asarray(out, np.float64)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(state.weights))
  assert np.max(np.abs(np.asarray(ref))) > np.finfo(np.float16).max
  cosine = out @ np.asarray(ref) / (np.linalg.norm(out)
                                   * np.linalg.norm(np.asarray(ref)))
  assert cosine > 1 - 1e-3
  assert np.max(np.abs(out)) >= np.finfo(np.float16).max / 4
