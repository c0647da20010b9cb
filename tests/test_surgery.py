"""GradVac and GradDrop against float64 NumPy oracles on the flattened J."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src import tree_math
from tests.cases.aggregators_other import adversarial_jacobians

J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])  # TorchJD's test matrix


@functools.partial(jax.jit, static_argnums=1)
def _permutations(key, num_tasks):
  return jax.vmap(lambda k: jax.random.permutation(k, num_tasks - 1))(
      jax.random.split(key, num_tasks))


def _orders(key, num_tasks):
  """Each task's visiting order of the others, drawn as the method draws it."""
  if num_tasks == 1:
    return np.zeros((1, 0), int)
  orders = np.asarray(_permutations(key, num_tasks))
  return orders + (orders >= np.arange(num_tasks)[:, None])


@functools.lru_cache(maxsize=None)
def _jitted(factory, num_tasks, **kwargs):
  """One transformation and one compiled update per configuration."""
  tx = factory(num_tasks, **kwargs)
  return tx, jax.jit(tx.update)


def _gradvac_oracle(jac, targets, beta, orders):
  """Wang et al. (2021) Alg. 1, literally, on the flattened Jacobian."""
  jac = np.asarray(jac, np.float64)
  corrected = jac.copy()
  targets = np.array(targets, np.float64)
  for i in range(len(jac)):
    for j in orders[i]:
      norm_i, norm_j = np.linalg.norm(corrected[i]), np.linalg.norm(jac[j])
      cos = (corrected[i] @ jac[j] / (norm_i * norm_j)
             if norm_i * norm_j > 0 else 0.0)
      cos = float(np.clip(cos, -1, 1))
      target = targets[i, j]
      if cos < target and norm_j > 0:
        corrected[i] += norm_i * (
            target * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - target**2)) / (
                norm_j * np.sqrt(1 - target**2)) * jac[j]
      targets[i, j] = (1 - beta) * target + beta * cos
  return corrected.mean(0), targets


def _run_gradvac(jacs, beta=0.5, seed=0):
  """Method and oracle over a sequence of steps; returns both trajectories."""
  num_tasks = jacs[0].shape[0]
  tx, step = _jitted(mo.gradvac, num_tasks, decay=1 - beta)
  state = tx.init(jnp.zeros(jacs[0].shape[1:], jnp.asarray(jacs[0]).dtype))
  state = state._replace(key=jax.random.PRNGKey(seed))
  key = jax.random.PRNGKey(seed)
  targets = np.zeros((num_tasks, num_tasks))
  ours, theirs = [], []
  for jac in jacs:
    key, subkey = jax.random.split(key)
    expected, targets = _gradvac_oracle(jac, targets, beta,
                                        _orders(subkey, num_tasks))
    update, state = step(jnp.asarray(jac), state)
    ours.append((np.asarray(update), np.asarray(state.targets),
                 np.asarray(state.weights)))
    theirs.append((expected, targets.copy()))
  return ours, theirs


@pytest.mark.parametrize("name", ["random", "near_colinear", "rank_deficient",
                                  "one_zero", "k1", "k64"])
def test_gradvac_matches_oracle_over_three_steps_float64(name):
  """Targets start at 0 (PCGrad), then the EMA makes later steps differ."""
  with jax.enable_x64(True):
    jac = adversarial_jacobians()[name]
    rng = np.random.default_rng(1)
    jacs = [jac, jac + 0.3 * rng.normal(size=jac.shape),
            jac[::-1] * np.linspace(1, 2, jac.shape[0])[:, None]]
    ours, theirs = _run_gradvac(jacs, beta=0.5, seed=3)
    for (update, targets, weights), (expected, expected_targets), jac_k in zip(
        ours, theirs, jacs):
      np.testing.assert_allclose(update, expected, rtol=1e-9, atol=1e-11)
      np.testing.assert_allclose(targets, expected_targets, atol=1e-11)
      np.testing.assert_allclose(weights @ jac_k, expected, atol=1e-11)


def test_gradvac_float32_matches_oracle_and_targets_evolve():
  rng = np.random.default_rng(2)
  jacs = [rng.normal(size=(3, 10)) for _ in range(4)]
  ours, theirs = _run_gradvac([j.astype(np.float32) for j in jacs], beta=0.5,
                              seed=5)
  for (update, targets, _), (expected, expected_targets) in zip(ours, theirs):
    np.testing.assert_allclose(update, expected, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(targets, expected_targets, atol=2e-5)
  # The EMA moved away from its zero start: GradVac is no longer PCGrad.
  assert np.abs(ours[-1][1]).max() > 0.05


def test_gradvac_equals_pcgrad_on_first_call_and_torchjd_values():
  """GradVac's first step is PCGrad's, on TorchJD's matrix and a random one
  (TorchJD's values: tests/test_torchjd_values.py)."""
  for num_tasks, jac in ((2, J_BASE),
                         (3, np.random.default_rng(3).normal(size=(3, 10)))):
    (vac, vac_step), (pc, pc_step) = (_jitted(mo.gradvac, num_tasks, decay=0.5),
                                      _jitted(mo.pcgrad, num_tasks))
    jac = jnp.asarray(jac, jnp.float32)
    key = jax.random.PRNGKey(7)
    u_vac, s_vac = vac_step(jac, vac.init(jac[0])._replace(key=key))
    u_pc, s_pc = pc_step(jac, pc.init(jac[0])._replace(key=key))
    np.testing.assert_allclose(u_vac, u_pc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_vac.weights, s_pc.weights, rtol=1e-5,
                               atol=1e-6)


def test_gradvac_trees_equal_flat_and_extreme_targets_stay_finite():
  rng = np.random.default_rng(4)
  tree = {"a": rng.normal(size=(3, 2, 2)), "b": rng.normal(size=(3, 5))}
  flat = np.concatenate([tree["a"].reshape(3, -1), tree["b"]], axis=1)
  tx, step = _jitted(mo.gradvac, 3, decay=0.5)
  u_tree, _ = jax.jit(tx.update)(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree),
      tx.init(jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), tree)))
  u_flat, _ = step(jnp.asarray(flat, jnp.float32),
                   tx.init(jnp.zeros(flat.shape[1])))
  np.testing.assert_allclose(
      np.concatenate([np.ravel(u_tree["a"]), u_tree["b"]]), u_flat,
      rtol=1e-5, atol=1e-6)
  # Targets of +-1 (reachable in float32 after long colinear runs): the
  # correction towards t = 1 needs an infinite step; it is floored, finite.
  state = tx.init(jnp.zeros(flat.shape[1]))
  state = state._replace(targets=jnp.array([[0.0, 1.0, -1.0], [1.0, 0, 1.0],
                                            [1.0, 1.0, 0.0]]))
  update, new_state = step(jnp.asarray(flat, jnp.float32), state)
  assert np.all(np.isfinite(update)) and np.all(np.isfinite(new_state.weights))


def test_gradvac_hyperparameter_errors_and_injection():
  with pytest.raises(ValueError, match="decay"):
    mo.gradvac(3, decay=1.5)
  with pytest.warns(DeprecationWarning, match="decay"):
    old = mo.gradvac(3, beta=0.25)
  jac3 = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4)),
                     jnp.float32)
  new = mo.gradvac(3, decay=0.75)
  np.testing.assert_array_equal(
      old.update(jac3, old.init(jnp.zeros(4)))[1].targets,
      new.update(jac3, new.init(jnp.zeros(4)))[1].targets)
  jac = np.random.default_rng(5).normal(size=(3, 4))
  injected = optax.inject_hyperparams(mo.gradvac, static_args=(
      "num_tasks", "seed"))(num_tasks=3, decay=0.5, seed=0)
  state = injected.init(jnp.zeros(4))
  step = jax.jit(injected.update)
  key, targets = jax.random.PRNGKey(0), np.zeros((3, 3))
  for beta in (0.5, 0.9):  # a schedule changes beta between steps
    state.hyperparams["decay"] = jnp.asarray(1 - beta)
    update, state = step(jnp.asarray(jac, jnp.float32), state)
    key, subkey = jax.random.split(key)
    expected, targets = _gradvac_oracle(jac, targets, beta, _orders(subkey, 3))
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.inner_state.targets, targets, atol=1e-5)


# ------------------------------------------------------------------ GradDrop


def _uniforms(key, leaves):
  """The method's draws: split(key) -> (next, sub); split(sub, n_leaves)."""
  key, subkey = jax.random.split(key)
  keys = jax.random.split(subkey, len(leaves))
  return key, [np.asarray(jax.random.uniform(k, np.shape(x)[1:]), np.float64)
               for k, x in zip(keys, leaves)]


def _graddrop_oracle(jac, uniform, leak):
  """Chen et al. (2020) Alg. 1 per coordinate, as the CAGrad repository's
  baseline, divided by K (mean scale)."""
  jac = np.asarray(jac, np.float64)
  num_tasks = jac.shape[0]
  leak = np.broadcast_to(np.asarray(leak, np.float64), (num_tasks,))
  leak = leak.reshape((num_tasks,) + (1,) * (jac.ndim - 1))
  total = np.abs(jac).sum(0)
  purity = 0.5 * (1 + np.divide(jac.sum(0), total, out=np.zeros_like(total),
                                where=total > 0))
  mask = ((purity > uniform) & (jac > 0)) | ((purity < uniform) & (jac < 0))
  factor = leak + (1 - leak) * mask
  update = (factor * jac).sum(0) / num_tasks
  sq = (jac**2).reshape(num_tasks, -1).sum(1)
  kept = (factor * jac**2).reshape(num_tasks, -1).sum(1)
  weights = np.where(sq > 0, kept / np.where(sq > 0, sq, 1), 1) / num_tasks
  return update, weights


@pytest.mark.parametrize("name", ["random", "near_colinear", "rank_deficient",
                                  "one_zero", "k1", "k64"])
def test_graddrop_matches_oracle_with_the_same_draws(name):
  jac = adversarial_jacobians()[name]
  num_tasks = jac.shape[0]
  leak = np.linspace(0.0, 0.6, num_tasks)
  tx, step = _jitted(mo.graddrop, num_tasks, seed=11,
                     leak=tuple(leak.tolist()))
  state = tx.init(jnp.zeros(jac.shape[1]))
  key = jax.random.PRNGKey(11)
  for k in range(2):  # the key advances between steps
    jac_k = jac * (1 + k)
    key, (uniform,) = _uniforms(key, [jac_k])
    expected, expected_w = _graddrop_oracle(jac_k, uniform, leak)
    update, state = step(jnp.asarray(jac_k, jnp.float32), state)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights, expected_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(state.key, key)


def test_graddrop_on_a_tree_draws_per_leaf():
  rng = np.random.default_rng(6)
  tree = {"a": rng.normal(size=(3, 4, 2)), "b": rng.normal(size=(3, 5))}
  tx = mo.graddrop(3, seed=2)
  update, state = jax.jit(tx.update)(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree),
      tx.init(jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), tree)))
  leaves, treedef = jax.tree.flatten(tree)
  _, uniforms = _uniforms(jax.random.PRNGKey(2), leaves)
  for leaf, uniform, got in zip(leaves, uniforms, jax.tree.leaves(update)):
    np.testing.assert_allclose(got, _graddrop_oracle(leaf, uniform, 0.0)[0],
                               rtol=1e-5, atol=1e-6)
  flat = np.concatenate([x.reshape(3, -1) for x in leaves], axis=1)
  flat_u = np.concatenate([u.ravel() for u in uniforms])
  np.testing.assert_allclose(state.weights,
                             _graddrop_oracle(flat, flat_u, 0.0)[1], rtol=1e-5)
  assert treedef == jax.tree.structure(update)


@pytest.mark.parametrize("shape", [(2 ** 19 + 77,), (700, 750)])
def test_graddrop_weights_of_long_leaves_match_the_oracle(shape):
  # On one CPU device leaves this long take the kept-norm sums block by
  # block (a loop over slices plus a remainder); a 2-D leaf is raveled.
  num_tasks, size = 3, int(np.prod(shape))
  assert tree_math.cpu_column_block(num_tasks, size) is not None
  rng = np.random.default_rng(12)
  jac = rng.normal(size=(num_tasks,) + shape).astype(np.float32)
  jac[2] = np.abs(jac[2]) * np.sign(jac[0] + jac[1] + 1e-3)  # mostly agrees
  leak = np.array([0.0, 0.25, 0.5])
  tx = mo.graddrop(num_tasks, seed=5, leak=tuple(leak.tolist()))
  update, state = jax.jit(tx.update)(jnp.asarray(jac),
                                     tx.init(jnp.zeros(shape)))
  _, (uniform,) = _uniforms(jax.random.PRNGKey(5), [jac])
  expected, expected_w = _graddrop_oracle(jac.astype(np.float64), uniform,
                                          leak)
  np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.weights, expected_w, rtol=1e-5)
  # A non-finite entry on the blocked path: NaN there only, state kept,
  # eagerly and under jit (XLA may rewrite the masking as a select).
  init = tx.init(jnp.zeros(shape))
  for bad in (np.nan, np.inf):
    broken = jac.copy()
    broken.reshape(num_tasks, -1)[1, size - 3] = bad   # in the remainder
    for update_fn in (tx.update, jax.jit(tx.update)):
      update, new = update_fn(jnp.asarray(broken), init)
      flat = np.asarray(update).ravel()
      assert np.isnan(flat[size - 3])
      assert np.isfinite(np.delete(flat, size - 3)).all()
      np.testing.assert_array_equal(new.weights, init.weights)
      np.testing.assert_array_equal(new.key, init.key)


def test_graddrop_draws_per_leaf_without_partitionable_threefry():
  # Without the partitionable Threefry a draw's values depend on its length:
  # the small leaves are then drawn one by one, still the per-leaf stream.
  rng = np.random.default_rng(8)
  tree = {"a": rng.normal(size=(3, 4, 2)), "b": rng.normal(size=(3, 5))}
  previous = jax.config.jax_threefry_partitionable
  jax.config.update("jax_threefry_partitionable", False)
  try:
    tx = mo.graddrop(3, seed=4)
    update, _ = jax.jit(tx.update)(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree),
        tx.init(jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), tree)))
    leaves = jax.tree.leaves(tree)
    _, uniforms = _uniforms(jax.random.PRNGKey(4), leaves)
  finally:
    jax.config.update("jax_threefry_partitionable", previous)
  for leaf, uniform, got in zip(leaves, uniforms, jax.tree.leaves(update)):
    np.testing.assert_allclose(got, _graddrop_oracle(leaf, uniform, 0.0)[0],
                               rtol=1e-5, atol=1e-6)


def test_graddrop_torchjd_value_and_both_sign_branches():
  """TorchJD: GradDrop(J_BASE) = [6, 2, 2], its draw keeping the positive sign
  at the first coordinate (P = 0.6 there, 1 elsewhere). Ours is the mean:
  [3, 1, 1] when U < 0.6, and [-2, 1, 1] (the negative sign) otherwise."""
  tx, step = _jitted(mo.graddrop, 2)
  state = tx.init(jnp.zeros(3))
  seen = set()
  for seed in range(12):
    state = state._replace(key=jax.random.PRNGKey(seed))
    _, (uniform,) = _uniforms(jax.random.PRNGKey(seed), [J_BASE])
    update, _ = step(jnp.asarray(J_BASE, jnp.float32), state)
    positive = uniform[0] < 0.6
    seen.add(positive)
    expected = [3.0, 1.0, 1.0] if positive else [-2.0, 1.0, 1.0]
    np.testing.assert_allclose(update, expected, atol=1e-6)
    if positive:
      np.testing.assert_allclose(2 * np.asarray(update), [6.0, 2.0, 2.0])
  assert seen == {True, False}


def test_graddrop_keeps_each_sign_with_probability_purity():
  """Two tasks (+a, -b) at every coordinate: the positive part survives with
  probability P = a / (a + b), so E[d] = (P a - (1 - P) b) / 2."""
  a, b, n = 3.0, 1.0, 20000
  jac = jnp.stack([jnp.full((n,), a), jnp.full((n,), -b)])
  tx = mo.graddrop(2, seed=9)
  update, state = tx.update(jac, tx.init(jnp.zeros(n)))
  purity = a / (a + b)
  kept_positive = np.mean(np.asarray(update) > 0)
  assert abs(kept_positive - purity) < 0.015
  np.testing.assert_allclose(np.mean(update),
                             (purity * a - (1 - purity) * b) / 2, atol=0.03)
  # Each task's kept share is its survival frequency: weights ~ [P, 1-P] / 2.
  np.testing.assert_allclose(state.weights, [purity / 2, (1 - purity) / 2],
                             atol=0.01)


def test_graddrop_leak_one_is_the_mean_and_errors():
  jac = jnp.asarray(np.random.default_rng(7).normal(size=(3, 6)), jnp.float32)
  tx = mo.graddrop(3, leak=1.0)
  update, state = tx.update(jac, tx.init(jnp.zeros(6)))
  np.testing.assert_allclose(update, np.mean(jac, 0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.weights, np.full(3, 1 / 3), rtol=1e-6)
  with pytest.raises(ValueError, match="leak"):
    mo.graddrop(3, leak=1.5)
  with pytest.raises(ValueError, match="shape"):
    mo.graddrop(3, leak=jnp.zeros(2))
  # An unsigned coordinate where every task is zero stays zero.
  zero_col = jac.at[:, 0].set(0.0)
  update, _ = tx.update(zero_col, tx.init(jnp.zeros(6)))
  assert update[0] == 0.0


def test_graddrop_propagates_nan_and_inf_under_jit_and_keeps_its_key():
  # XLA rewrites mask * row as a select under jit, which dropped NaN/inf.
  tx = mo.graddrop(3, seed=1)
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    grads = jnp.array([[1.0, -2.0], [bad, 3.0], [0.5, 1.0]])
    for update, new_state in (tx.update(grads, state, params),
                              step(grads, state)):
      assert np.isnan(update[0]) and np.isfinite(update[1])
      np.testing.assert_array_equal(new_state.key, state.key)
      np.testing.assert_array_equal(new_state.weights, state.weights)
