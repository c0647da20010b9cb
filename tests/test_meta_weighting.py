"""Auto-Lambda against the official AutoLambda class and LDC-MTL against the
official trainers' objective (values recorded with torch, tests/data)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests.conftest import jit_as_users_compile

DATA = json.loads((pathlib.Path(__file__).parent / "data" /
                   "official_new_methods.json").read_text())


def _quadratic_losses(x, y):
  x, y = jnp.asarray(x), jnp.asarray(y)
  return lambda theta: 0.5 * jnp.mean((x @ theta - y) ** 2, axis=1)


def test_auto_lambda_matches_official_sequence():
  rec = DATA["auto_lambda"]
  with jax.enable_x64(True):
    train = _quadratic_losses(rec["x_train"], rec["y_train"])
    val = _quadratic_losses(rec["x_val"], rec["y_val"])
    k, init = 3, rec["weight_init"]
    # The official model step is sum_i lambda_i g_i at lr; ours is on the
    # g0 scale (lambda / (K init)), so the SGD rate carries K init.
    tx = optax.chain(
        mo.auto_lambda(k, virtual_lr=rec["lr"], meta_lr=rec["meta_lr"],
                       weight_init=init),
        optax.sgd(rec["lr"] * k * init))
    theta = jnp.asarray(rec["theta0"])
    state = tx.init(theta)

    @jax.jit
    def step(theta, state):
      losses, grads = mo.value_and_task_grads(train)(theta)
      updates, state = tx.update(grads, state, theta, task_losses=losses,
                                 loss_fn=val)
      return optax.apply_updates(theta, updates), state

    for meta, expected_theta in zip(rec["meta_weights"], rec["thetas"]):
      theta, state = step(theta, state)
      np.testing.assert_allclose(state[0].meta_weights, meta, rtol=1e-8)
      np.testing.assert_allclose(theta, expected_theta, rtol=1e-8, atol=1e-10)


def test_auto_lambda_single_backward_path():
  """train_loss_fn's forward-mode derivatives give the stacked path's first
  meta-update; the model step then uses the previous weights."""
  rec = DATA["auto_lambda"]
  train = _quadratic_losses(rec["x_train"], rec["y_train"])
  val = _quadratic_losses(rec["x_val"], rec["y_val"])
  tx = mo.auto_lambda(3, virtual_lr=rec["lr"], meta_lr=rec["meta_lr"])
  theta = jnp.asarray(rec["theta0"], jnp.float32)
  state = tx.init(theta)
  losses, grad = mo.value_and_weighted_grad(train, tx)(state, theta)
  update, new = tx.update(grad, state, theta, task_losses=losses, loss_fn=val,
                          train_loss_fn=train)
  np.testing.assert_allclose(new.meta_weights, rec["meta_weights"][0],
                             rtol=1e-5)
  np.testing.assert_allclose(update, grad)
  with pytest.raises(ValueError, match="train_loss_fn"):
    tx.update(grad, state, theta, task_losses=losses, loss_fn=val)
  with pytest.raises(ValueError, match="loss_fn"):
    tx.update(grad, state, theta, task_losses=losses)


def test_auto_lambda_loss_weights_after_a_single_backward_step():
  """After a single-backward update (the meta-step follows the model step),
  tx.loss_weights gives the next update's coefficients lambda / (K init),
  the ones the probe of value_and_weighted_grad reads."""
  rec = DATA["auto_lambda"]
  train = _quadratic_losses(rec["x_train"], rec["y_train"])
  val = _quadratic_losses(rec["x_val"], rec["y_val"])
  tx = mo.auto_lambda(3, virtual_lr=rec["lr"], meta_lr=0.1, weight_init=0.5)
  theta = jnp.asarray(rec["theta0"], jnp.float32)
  losses, grad = mo.value_and_weighted_grad(train, tx)(tx.init(theta), theta)
  _, state = tx.update(grad, tx.init(theta), theta, task_losses=losses,
                       loss_fn=val, train_loss_fn=train)
  expected = np.asarray(state.meta_weights) / (3 * 0.5)
  assert not np.allclose(state.weights, expected)  # the meta-step moved
  np.testing.assert_allclose(tx.loss_weights(state, losses), expected,
                             rtol=1e-6)
  _, probed = tx.update(jnp.zeros_like(theta), state, theta,
                        task_losses=losses, weighting_probe=True)
  np.testing.assert_allclose(probed.weights, expected, rtol=1e-6)
  np.testing.assert_array_equal(probed.meta_weights, state.meta_weights)


def test_auto_lambda_primary_tasks():
  targets = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  losses_fn = lambda p: 0.5 * jnp.sum((p - targets) ** 2, axis=1)
  tx = mo.auto_lambda(2, virtual_lr=0.1, weight_init=0.5, primary_tasks=[1],
                      meta_optimizer=optax.sgd(1.0))
  params = jnp.zeros(2)
  grads = mo.value_and_task_grads(losses_fn)(params)[1]
  _, state = tx.update(grads, tx.init(params), params,
                       task_losses=losses_fn(params), loss_fn=losses_fn)
  # theta' = -alpha sum_i lambda_i g_i = (0.05, 0.05); d = grad L_1(theta')
  # = (0.05, -0.95); lambda_i += alpha <g_i, d> with g = -I.
  np.testing.assert_allclose(state.meta_weights, [0.5 - 0.005, 0.5 + 0.095],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="primary_tasks"):
    mo.auto_lambda(2, primary_tasks=[2])


def test_ldc_mtl_matches_official_objective_sequence():
  rec = DATA["ldc_mtl"]
  with jax.enable_x64(True):
    losses_fn = _quadratic_losses(rec["x"], rec["y"])
    tx = optax.chain(mo.ldc_mtl(3, penalty=rec["penalty"],
                                learning_rate=rec["lr"]), optax.adam(rec["lr"]))
    theta = jnp.asarray(rec["theta0"])
    state = tx.init(theta)

    def step(theta, state):
      # The stacked path gives the same update as the single-backward one.
      losses, grads = mo.value_and_task_grads(losses_fn)(theta)
      updates, state = tx.update(grads, state, theta, task_losses=losses)
      return optax.apply_updates(theta, updates), state

    # At the first step every weighted loss ties; under XLA's default
    # options their differences must still be exactly 0 (not the sign of
    # an FMA's rounding, which Adam turns into a router step of +-lr).
    step = jit_as_users_compile(step, theta, state)
    for expected_theta, router in zip(rec["thetas"], rec["router"]):
      theta, state = step(theta, state)
      np.testing.assert_allclose(theta, expected_theta, rtol=1e-7, atol=1e-9)
      np.testing.assert_allclose(jax.nn.softmax(state[0].logits), router,
                                 rtol=1e-7)


def test_ldc_mtl_coefficients_are_the_objectives_gradient():
  tx = mo.ldc_mtl(3, penalty=0.3)
  state = tx.init(jnp.zeros(1))
  first = jnp.array([2.0, 1.0, 4.0])
  _, state = tx.update(jnp.zeros(1), state, jnp.zeros(1), task_losses=first)
  losses = jnp.array([1.5, 0.2, 3.0])
  w = np.asarray(jax.nn.softmax(state.logits))
  r = np.asarray(first) / 1.0
  scaled = w * np.asarray(losses) / r
  sign = np.sign(scaled[:-1] - scaled[1:])
  expected = w / r
  expected[:-1] += 0.3 * sign * w[:-1] / r[:-1]
  expected[1:] -= 0.3 * sign * w[1:] / r[1:]
  np.testing.assert_allclose(tx.loss_weights(state, losses), expected,
                             rtol=1e-5)
