"""M-ConFIG against the official PseudoMomentumOperator (recorded values);
PSMGD against MGDA and a NumPy re-implementation of its schedule."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo

DATA = json.loads((pathlib.Path(__file__).parent / "data" /
                   "official_new_methods.json").read_text())


@pytest.mark.parametrize("record", DATA["momentum_config"],
                         ids=lambda r: f"K{r['num_tasks']}")
@pytest.mark.parametrize("single", [False, True], ids=["stacked", "single"])
def test_momentum_config_matches_official_operator(record, single):
  k = record["num_tasks"]
  grads = np.asarray(record["grads"], np.float32)
  tx = mo.momentum_config(k)
  params = jnp.zeros(grads.shape[2])
  state = tx.init(params)
  step = jax.jit(tx.update)
  for n, expected in enumerate(record["updates"]):
    g = grads[n, n % k] if single else grads[n]
    update, state = step(jnp.asarray(g), state, params)
    np.testing.assert_allclose(update, expected, rtol=2e-4, atol=2e-5)
  assert int(state.count) == grads.shape[0]


def test_momentum_config_direction_is_config_on_the_momenta():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(5, 3, 4)).astype(np.float32)
  beta = 0.8
  tx = mo.momentum_config(3, beta_1=beta, normalize=False)
  params = jnp.zeros(4)
  state = tx.init(params)
  momenta, counts = np.zeros((3, 4)), np.zeros(3)
  for n in range(5):
    task = n % 3
    update, state = tx.update(jnp.asarray(grads[n, task]), state, params)
    momenta[task] = beta * momenta[task] + (1 - beta) * grads[n, task]
    counts[task] += 1
    if n < 2:
      np.testing.assert_array_equal(update, np.zeros(4))
      continue
    m_hat = momenta / (1 - beta ** counts)[:, None]
    config = mo.config(3)
    expected, _ = config.update(jnp.asarray(m_hat, jnp.float32),
                                config.init(params))
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-6)


def test_momentum_config_keeps_state_on_nan():
  tx = mo.momentum_config(2)
  params = jnp.zeros(3)
  state = tx.init(params)
  _, state = tx.update(jnp.ones(3), state, params)
  update, new = jax.jit(tx.update)(jnp.array([1.0, jnp.nan, 0.0]), state,
                                   params)
  assert np.all(np.isnan(update))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("row", [0, 1])
def test_momentum_config_stacked_non_finite_row_is_nan_and_keeps_state(
    bad, row):
  # Stacked input folds row ``count % K`` by a select over the momenta:
  # a non-finite entry in that row or in any other must still give a NaN
  # update and the previous state, eagerly and under jit.
  tx = mo.momentum_config(2)
  params = jnp.zeros(3)
  state = tx.init(params)
  _, state = tx.update(jnp.ones((2, 3)), state)   # the next task is 1
  grads = jnp.ones((2, 3)).at[row, 1].set(bad)
  for update_fn in (tx.update, jax.jit(tx.update)):
    update, new = update_fn(grads, state)
    assert np.all(np.isnan(update))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
      np.testing.assert_array_equal(a, b)


def test_momentum_config_second_moment_cannot_overflow():
  """The normalised update is invariant to the gradients' scale (eps = 0):
  at 1e25, where the squared pseudo gradients overflow float32, the update
  and the state stay those of the unit scale, times the scale."""
  rng = np.random.default_rng(3)
  grads = rng.normal(size=(6, 2, 3)).astype(np.float32)
  params = jnp.zeros(3)
  runs = []
  for scale in (1.0, 1e25):
    tx = mo.momentum_config(2, eps=0.0)
    state, updates = tx.init(params), []
    for n in range(len(grads)):
      update, state = tx.update(jnp.asarray(grads[n] * scale), state, params)
      updates.append(update)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
    runs.append((np.asarray(updates), state))
  (unit, unit_state), (big, big_state) = runs
  np.testing.assert_allclose(big, unit, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(big_state.second_moment_root,
                             1e25 * unit_state.second_moment_root, rtol=1e-5)
  # The old field name: the second moment itself, with a warning.
  with pytest.warns(DeprecationWarning, match="second_moment_root"):
    second = unit_state.second_moment
  np.testing.assert_allclose(second,
                             np.square(unit_state.second_moment_root))


def _psmgd_oracle(stacked_seq, period):
  """Weights re-solved (MGDA) on steps 0, R, 2R, ...; reused in between."""
  mgda = mo.mgda(stacked_seq.shape[1])
  out, weights = [], None
  for n, grads in enumerate(stacked_seq):
    if n % period == 0:
      _, s = mgda.update(jnp.asarray(grads), mgda.init(jnp.zeros(grads.shape[1])))
      weights = np.asarray(s.weights)
    out.append(weights @ grads)
  return np.asarray(out)


@pytest.mark.parametrize("single", [False, True], ids=["stacked", "mixed"])
def test_psmgd_reuses_mgda_weights_between_solves(single):
  rng = np.random.default_rng(1)
  seq = rng.normal(size=(7, 3, 4)).astype(np.float32)
  period = 3
  tx = mo.psmgd(3, update_every=period)
  params = jnp.zeros(4)
  state = tx.init(params)
  expected = _psmgd_oracle(seq, period)
  losses = jnp.ones(3)
  for n, grads in enumerate(seq):
    if single and n % period:
      # The single-backward path: the weighted-loss gradient, stored weights.
      g = jnp.asarray(np.asarray(state.weights) @ grads)
    else:
      g = jnp.asarray(grads)
    update, state = tx.update(g, state, params, task_losses=losses)
    np.testing.assert_allclose(update, expected[n], rtol=1e-4, atol=1e-5)


def test_psmgd_single_backward_uses_the_stored_weights():
  losses_fn = lambda p: jnp.stack([jnp.sum((p - 1) ** 2), jnp.sum(p ** 2),
                                   p[0] - p[1]])
  params = jnp.array([0.5, -0.3])
  tx = mo.psmgd(3, update_every=2)
  state = tx.init(params)
  losses, stacked = mo.value_and_task_grads(losses_fn)(params)
  _, state = tx.update(stacked, state, params, task_losses=losses)
  losses, grad = mo.value_and_weighted_grad(losses_fn, tx)(state, params)
  np.testing.assert_allclose(grad, np.asarray(state.weights) @ stacked,
                             rtol=1e-5)
  update, state2 = tx.update(grad, state, params, task_losses=losses)
  np.testing.assert_allclose(update, grad)
  np.testing.assert_allclose(state2.weights, state.weights)


def test_psmgd_period_one_is_mgda():
  rng = np.random.default_rng(2)
  grads = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  tx, mgda = mo.psmgd(3, update_every=1), mo.mgda(3)
  state, mstate = tx.init(jnp.zeros(5)), mgda.init(jnp.zeros(5))
  for _ in range(2):
    u, state = tx.update(grads, state, jnp.zeros(5), task_losses=jnp.ones(3))
    m, mstate = mgda.update(grads, mstate)
    np.testing.assert_allclose(u, m, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="update_every"):
    mo.psmgd(3, update_every=0)


def test_momentum_config_trains_with_sgd():
  targets = jnp.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])
  losses_fn = lambda p: 0.5 * jnp.sum((p[None] - targets) ** 2, axis=1)
  params = jnp.array([0.3, -1.2])
  tx = optax.chain(mo.momentum_config(3), optax.sgd(0.02))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    task = state[0].count % 3
    grad = jax.grad(lambda p: losses_fn(p)[task])(params)
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(60):
    params, state = step(params, state)
  assert np.all(np.asarray(losses_fn(params)) < np.asarray(
      losses_fn(jnp.array([0.3, -1.2]))))
