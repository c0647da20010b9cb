"""Constant, random (RLW) and EMA-smoothed (CR-MOGM) weights, against NumPy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests.cases.aggregators_other import adversarial_jacobians

J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])  # TorchJD's test matrix


@functools.lru_cache(maxsize=None)
def _jitted(factory, num_tasks, **kwargs):
  tx = factory(num_tasks, **kwargs)
  return tx, jax.jit(tx.update)


def test_given_weights_match_the_oracle():
  """Weights used as given (TorchJD's Constant: tests/test_torchjd_values.py)."""
  rng = np.random.default_rng(0)
  for name in ("random", "k64", "k1"):
    jac = adversarial_jacobians()[name]
    weights = rng.normal(size=len(jac))  # any sign, not normalised
    tx = mo.linear_scalarization(len(jac), weights)
    update, _ = jax.jit(tx.update)(jnp.asarray(jac, jnp.float32),
                                   tx.init(jnp.zeros(jac.shape[1])))
    np.testing.assert_allclose(update, weights @ jac, rtol=1e-5, atol=1e-5)


def test_given_weights_injected_and_errors():
  injected = optax.inject_hyperparams(mo.linear_scalarization,
                                      static_args="num_tasks")(
      num_tasks=2, weights=jnp.array([1.0, 2.0]))
  state = injected.init(jnp.zeros(3))
  state.hyperparams["weights"] = jnp.array([0.5, -1.0])
  update, state = jax.jit(injected.update)(jnp.asarray(J_BASE, jnp.float32),
                                           state)
  np.testing.assert_allclose(update, [-8.0, -0.5, -0.5])
  # The injected hyper-parameter is a second `weights` entry in the state:
  # read the method's own through its state (optax.tree.get refuses two).
  np.testing.assert_allclose(state.inner_state.weights, [0.5, -1.0])
  with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
    mo.linear_scalarization(2, (1.0, 2.0, 3.0))
  with pytest.warns(DeprecationWarning, match="linear_scalarization"):
    with pytest.raises(ValueError, match="required"):
      mo.constant(2, None)


def test_constant_is_a_deprecated_alias_of_linear_scalarization():
  with pytest.warns(DeprecationWarning, match="linear_scalarization"):
    old = mo.constant(2, (1.0, 2.0))
  new = mo.linear_scalarization(2, (1.0, 2.0))
  grads = jnp.asarray(J_BASE, jnp.float32)
  u_old, s_old = old.update(grads, old.init(jnp.zeros(3)))
  u_new, s_new = new.update(grads, new.init(jnp.zeros(3)))
  np.testing.assert_array_equal(u_old, u_new)
  assert isinstance(s_old, mo.ConstantState) and type(s_old) is type(s_new)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rlw_draws(key, num_tasks, steps):
  """The method's draws: each step key, sub = split(key); normal(sub, (K,))."""
  def body(key, _):
    key, subkey = jax.random.split(key)
    return key, jax.random.normal(subkey, (num_tasks,), jnp.float32)
  return jax.lax.scan(body, key, None, length=steps)[1]


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", ["random", "one_zero", "k1", "k64"])
def test_random_weighting_matches_oracle_with_the_same_draws(name):
  jac = adversarial_jacobians()[name]
  num_tasks = len(jac)
  tx, step = _jitted(mo.random_weighting, num_tasks, seed=3)
  state = tx.init(jnp.zeros(jac.shape[1]))
  draws = _rlw_draws(jax.random.PRNGKey(3), num_tasks, 3)
  for k in range(3):
    update, state = step(jnp.asarray(jac, jnp.float32), state)
    weights = _softmax(draws[k])
    np.testing.assert_allclose(state.weights, weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(update, weights @ jac, rtol=1e-5, atol=1e-5)


def test_random_weighting_torchjd_structure_and_distribution():
  """TorchJD's Random value on J_BASE ([-2.6229, 1, 1]) comes from torch's
  RNG; what any draw must give is a convex combination: the last two
  coordinates are exactly 1 and the first lies in [-4, 6]."""
  num_tasks, steps = 3, 3000
  tx = mo.random_weighting(2, seed=0)
  update, _ = tx.update(jnp.asarray(J_BASE, jnp.float32), tx.init(jnp.zeros(3)))
  np.testing.assert_allclose(update[1:], [1.0, 1.0], rtol=1e-6)
  assert -4.0 <= float(update[0]) <= 6.0

  tx = mo.random_weighting(num_tasks, seed=1)

  @jax.jit
  def run(grads):
    def body(state, _):
      _, state = tx.update(grads, state)
      return state, state.weights
    return jax.lax.scan(body, tx.init(grads[0]), None, length=steps)[1]

  weights = np.asarray(run(jnp.eye(num_tasks)), np.float64)
  assert np.all(weights > 0)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
  # E[w_i] = 1/K by symmetry; each w_i has std ~0.2 for K = 3.
  np.testing.assert_allclose(weights.mean(0), 1 / num_tasks, atol=0.015)
  # Successive draws differ: the key advances.
  assert len(np.unique(weights[:, 0])) == steps
  np.testing.assert_allclose(weights, _softmax(_rlw_draws(
      jax.random.PRNGKey(1), num_tasks, steps)), rtol=1e-5, atol=1e-7)


def _mgda2(jac):
  """Closed-form two-task min-norm weights (Sener & Koltun, Alg. 1)."""
  g1, g2 = np.asarray(jac, np.float64)
  diff = g1 - g2
  denom = diff @ diff
  a = 0.5 if denom == 0 else np.clip((g2 - g1) @ g2 / denom, 0.0, 1.0)
  return np.array([a, 1 - a])


def test_ema_weights_matches_oracle_over_steps():
  """CR-MOGM: w_1 = w_hat_1, w_k = decay w_{k-1} + (1 - decay) w_hat_k, with
  the two-task MGDA closed form as the wrapped weighting."""
  rng = np.random.default_rng(1)
  jacs = [rng.normal(size=(2, 6)) + 0.5 for _ in range(5)]
  alpha = 0.6
  tx = mo.ema_weights(2, mo.mgda(2), decay=alpha)
  step = jax.jit(tx.update)
  state = tx.init(jnp.zeros(6))
  smoothed = None
  for jac in jacs:
    fresh = _mgda2(jac)
    smoothed = fresh if smoothed is None else alpha * smoothed + (
        1 - alpha) * fresh
    update, state = step(jnp.asarray(jac, jnp.float32), state)
    np.testing.assert_allclose(state.weights, smoothed, atol=2e-5)
    np.testing.assert_allclose(update, smoothed @ jac, rtol=1e-4, atol=2e-5)
  assert int(state.count) == len(jacs)
  # optax.tree.get finds exactly one `weights`: the smoothed ones.
  np.testing.assert_array_equal(optax.tree.get(state, "weights"),
                                state.weights)


def test_ema_weights_advances_a_stateful_inner_and_special_alphas():
  """The wrapped method's state advances as if run alone (GradVac's targets
  and key), decay = 0 reproduces it, decay = 1 freezes the first weights."""
  rng = np.random.default_rng(2)
  jacs = [jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for _ in range(3)]
  inner = mo.gradvac(3, seed=4)
  alone_state = inner.init(jnp.zeros(5))
  injected = optax.inject_hyperparams(mo.ema_weights, static_args="num_tasks")(
      num_tasks=3, inner=inner, decay=0.0)
  state = injected.init(jnp.zeros(5))
  step, alone_step = jax.jit(injected.update), jax.jit(inner.update)
  first = None
  for k, jac in enumerate(jacs):
    state.hyperparams["decay"] = jnp.asarray(0.0 if k < 2 else 1.0)
    update, state = step(jac, state)
    alone_update, alone_state = alone_step(jac, alone_state)
    wrapped = state.inner_state.inner_state.value
    np.testing.assert_allclose(wrapped.targets, alone_state.targets, atol=1e-6)
    np.testing.assert_array_equal(wrapped.key, alone_state.key)
    if k < 2:  # decay = 0: exactly the wrapped method
      np.testing.assert_allclose(update, alone_update, rtol=1e-5, atol=1e-6)
      first = np.asarray(state.inner_state.weights)
    else:  # decay = 1: the previous weights, whatever the new ones are
      np.testing.assert_allclose(state.inner_state.weights, first, rtol=1e-6)


def test_ema_weights_keeps_its_state_on_nan_and_errors():
  tx = mo.ema_weights(2, mo.linear_scalarization(2), decay=0.5)
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(jnp.asarray(J_BASE, jnp.float32), state)
  bad = jnp.asarray(J_BASE, jnp.float32).at[0, 1].set(jnp.nan)
  update, bad_state = tx.update(bad, state)
  assert np.isnan(update[1]) and int(bad_state.count) == int(state.count)
  with pytest.raises(ValueError, match="not a weighting"):
    mo.ema_weights(2, mo.graddrop(2)).init(jnp.zeros(3))
  with pytest.raises(ValueError, match="not a weighting"):
    mo.ema_weights(3, optax.inject_hyperparams(mo.trimmed_mean, static_args=(
        "num_tasks", "trim_number"))(num_tasks=3, trim_number=1)
                   ).init(jnp.zeros(3))
  with pytest.raises(ValueError, match=r"shape \(3,\)"):
    mo.ema_weights(3, mo.mgda(2)).init(jnp.zeros(3))
  with pytest.raises(TypeError, match="argument order"):
    mo.ema_weights(3, 3)
  with pytest.raises(ValueError, match="decay"):
    mo.ema_weights(2, mo.mgda(2), decay=1.5)
  with pytest.raises(ValueError, match="no `weights`|weights` field"):
    mo.ema_weights(2, optax.sgd(0.1)).init(jnp.zeros(3))


def test_ema_weights_old_order_and_alpha_warn_and_keep_working():
  grads = jnp.asarray(J_BASE, jnp.float32)
  new = mo.ema_weights(2, mo.mgda(2), decay=0.5)
  with pytest.warns(DeprecationWarning) as caught:
    old = mo.ema_weights(mo.mgda(2), 2, alpha=0.5)
  messages = " ".join(str(c.message) for c in caught)
  assert "num_tasks first" in messages and "decay" in messages
  state_new, state_old = new.init(jnp.zeros(3)), old.init(jnp.zeros(3))
  for _ in range(2):
    u_new, state_new = new.update(grads, state_new)
    u_old, state_old = old.update(grads, state_old)
  np.testing.assert_array_equal(u_new, u_old)
