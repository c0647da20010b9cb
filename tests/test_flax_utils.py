"""Flax glue: NNX per-task gradients and train steps, Linen TrainState, labels."""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import mtl_optax as mo

K = 3
IN, HIDDEN = 6, 16
STEPS = 40


# ---------------------------------------------------------------------------
# A conflicting multi-task regression: the three targets share one direction
# and pull the trunk along two opposed ones.
# ---------------------------------------------------------------------------


def _data(seed=0, n=128):
  kx, kn = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, IN))
  a = jnp.array([1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
  b = jnp.array([0.0, 0.0, 1.0, -1.0, 0.5, 0.0])
  w = jnp.stack([a + b, a - b, -a + 0.5 * b])      # (K, IN)
  y = jnp.tanh(x @ w.T) + 0.05 * jax.random.normal(kn, (n, K))
  return x, y                                        # y: (n, K)


class NNXNet(nnx.Module):
  """Shared trunk and K scalar heads."""

  def __init__(self, rngs):
    self.trunk = nnx.Sequential(nnx.Linear(IN, HIDDEN, rngs=rngs), nnx.tanh,
                                nnx.Linear(HIDDEN, HIDDEN, rngs=rngs))
    self.heads = nnx.List([nnx.Linear(HIDDEN, 1, rngs=rngs) for _ in range(K)])

  def __call__(self, x):
    z = jnp.tanh(self.trunk(x))
    return jnp.concatenate([h(z) for h in self.heads], axis=1)   # (n, K)


class NNXNetBN(nnx.Module):
  """With mutable non-parameter state (BatchNorm statistics, dropout RNG)."""

  def __init__(self, rngs):
    self.trunk = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.bn = nnx.BatchNorm(HIDDEN, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(HIDDEN, 1, rngs=rngs) for _ in range(K)])

  def __call__(self, x):
    z = jnp.tanh(self.bn(self.trunk(x)))
    return jnp.concatenate([h(z) for h in self.heads], axis=1)


def nnx_losses(model, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0)


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    z = nn.Dense(HIDDEN, name="trunk_0")(x)
    z = jnp.tanh(nn.Dense(HIDDEN, name="trunk_1")(jnp.tanh(z)))
    return jnp.concatenate(
        [nn.Dense(1, name=f"head_{i}")(z) for i in range(K)], axis=1)


def _tree_close(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                               atol=atol)


# ---------------------------------------------------------------------------
# A spy transformation: records what reaches tx.update.
# ---------------------------------------------------------------------------


class SpyState(NamedTuple):
  weights: jax.Array
  seen_losses: jax.Array
  lookahead_losses: jax.Array


def spy(num_tasks):
  """Mean of the task gradients; stores task_losses and loss_fn(params)."""

  def init(params):
    del params
    z = jnp.zeros(num_tasks)
    return SpyState(jnp.full(num_tasks, 1.0 / num_tasks), z - 1.0, z - 1.0)

  def update(updates, state, params=None, *, task_losses=None, loss_fn=None,
             **unused):
    seen = state.seen_losses if task_losses is None else task_losses
    look = (state.lookahead_losses if loss_fn is None or params is None
            else loss_fn(params))
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), updates)
    return mean, SpyState(state.weights, seen, look)

  return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------------------
# NNX: gradients.
# ---------------------------------------------------------------------------


def test_nnx_task_grads_rows_are_single_task_grads():
  model = NNXNet(nnx.Rngs(0))
  x, y = _data()

  @nnx.jit
  def both(model, x, y):
    out = mo.nnx_value_and_task_grads(nnx_losses)(model, x, y)
    rows = [nnx.grad(lambda m, i=i: nnx_losses(m, x, y)[i])(model)
            for i in range(K)]
    return out, rows, nnx_losses(model, x, y)

  (losses, grads), rows, direct = both(model, x, y)
  np.testing.assert_allclose(losses, direct, rtol=1e-6)
  assert isinstance(grads, nnx.State)
  for i in range(K):
    _tree_close(jax.tree.map(lambda g, i=i: g[i], grads), rows[i])
  # The heads' rows vanish for the other tasks.
  kernel0 = grads["heads"][0]["kernel"][...]
  assert kernel0.shape == (K, HIDDEN, 1)
  assert np.all(np.asarray(kernel0[1:]) == 0) and np.any(kernel0[0] != 0)


def test_nnx_task_grads_write_back_state_like_nnx_grad():
  """BatchNorm statistics change once, as with nnx.grad (eager: doctest)."""
  x, y = _data()
  model_a, model_b = NNXNetBN(nnx.Rngs(0)), NNXNetBN(nnx.Rngs(0))
  _, grads = nnx.jit(mo.nnx_value_and_task_grads(nnx_losses))(model_a, x, y)
  summed = nnx.jit(nnx.grad(lambda m, x, y: jnp.sum(nnx_losses(m, x, y))))(
      model_b, x, y)
  _tree_close(jax.tree.map(lambda g: jnp.sum(g, axis=0), grads), summed,
              rtol=1e-5, atol=1e-6)
  assert np.any(np.asarray(model_a.bn.mean[...]) != 0)
  np.testing.assert_allclose(model_a.bn.mean[...], model_b.bn.mean[...],
                             rtol=1e-6)
  np.testing.assert_allclose(model_a.bn.var[...], model_b.bn.var[...],
                             rtol=1e-6)


@pytest.mark.parametrize("unroll", [False, True])
def test_nnx_chunked_task_grads_and_train_step_equal_vmap(unroll):
  """chunk_size changes how the K backward passes are batched, not the
  gradients, the BatchNorm write-back or a training step's result."""
  x, y = _data()
  model_a, model_b = NNXNetBN(nnx.Rngs(0)), NNXNetBN(nnx.Rngs(0))
  losses_a, grads_a = nnx.jit(mo.nnx_value_and_task_grads(
      nnx_losses, chunk_size=2, unroll=unroll))(model_a, x, y)
  losses_b, grads_b = nnx.jit(mo.nnx_value_and_task_grads(nnx_losses))(
      model_b, x, y)
  np.testing.assert_allclose(losses_a, losses_b, rtol=1e-6)
  _tree_close(grads_a, grads_b)
  np.testing.assert_allclose(model_a.bn.mean[...], model_b.bn.mean[...],
                             rtol=1e-6)
  models = [NNXNet(nnx.Rngs(3)), NNXNet(nnx.Rngs(3))]
  opts = [nnx.Optimizer(m, optax.chain(mo.mgda(K), optax.sgd(0.05)),
                        wrt=nnx.Param) for m in models]
  steps = [mo.nnx_train_step(nnx_losses, chunk_size=1, unroll=unroll),
           mo.nnx_train_step(nnx_losses)]
  for model, opt, step in zip(models, opts, steps):
    for _ in range(3):
      step(model, opt, x, y)
  _tree_close(nnx.state(models[0], nnx.Param), nnx.state(models[1], nnx.Param),
              rtol=1e-4, atol=1e-6)


def test_nnx_weighted_grad_is_weighted_sum_of_task_grads():
  model = NNXNet(nnx.Rngs(1))
  x, y = _data()
  method = mo.linear_scalarization(K)  # not a loss weighting: rejected
  with pytest.raises(ValueError, match="probe"):
    mo.nnx_value_and_weighted_grad(nnx_losses, method)(
        method.init(nnx.state(model, nnx.Param)), model, *_data())
  method = mo.gls(K)
  opt = nnx.Optimizer(model, optax.chain(method, optax.sgd(0.1)),
                      wrt=nnx.Param)
  state = nnx.as_pure(opt.opt_state)[0]
  losses, grad = mo.nnx_value_and_weighted_grad(nnx_losses, method)(
      state, model, x, y)
  _, task_grads = mo.nnx_value_and_task_grads(nnx_losses)(model, x, y)
  c = method.loss_weights(state, losses)
  _tree_close(grad, jax.tree.map(lambda g: jnp.tensordot(c, g, 1), task_grads),
              rtol=1e-5, atol=1e-6)


def test_nnx_loss_fn_accepts_pure_and_variable_states():
  model = NNXNet(nnx.Rngs(2))
  x, y = _data()
  loss_fn = mo.nnx_loss_fn(nnx_losses, model, x, y)
  params = nnx.state(model, nnx.Param)
  np.testing.assert_allclose(loss_fn(params), nnx_losses(model, x, y),
                             rtol=1e-6)
  shifted = jax.tree.map(lambda p: p + 0.1, nnx.as_pure(params))
  moved = loss_fn(shifted)
  assert not np.allclose(moved, nnx_losses(model, x, y))
  # The model itself is untouched.
  np.testing.assert_allclose(loss_fn(params), nnx_losses(model, x, y),
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# NNX: nnx.Optimizer forwards keyword arguments (flax 0.12), and the step.
# ---------------------------------------------------------------------------


def test_nnx_optimizer_update_forwards_kwargs():
  model = NNXNet(nnx.Rngs(3))
  x, y = _data()
  opt = nnx.Optimizer(model, optax.chain(spy(K), optax.sgd(0.0)),
                      wrt=nnx.Param)
  losses, grads = mo.nnx_value_and_task_grads(nnx_losses)(model, x, y)
  marker = jnp.array([7.0, 8.0, 9.0])
  opt.update(model, grads, task_losses=marker,
             loss_fn=lambda p: 2.0 * mo.nnx_loss_fn(nnx_losses, model, x, y)(p))
  state = nnx.as_pure(opt.opt_state)[0]
  np.testing.assert_array_equal(state.seen_losses, marker)
  np.testing.assert_allclose(state.lookahead_losses, 2.0 * losses, rtol=1e-6)


def test_nnx_train_step_passes_task_losses_and_loss_fn():
  model = NNXNet(nnx.Rngs(4))
  x, y = _data()
  opt = nnx.Optimizer(model, optax.chain(spy(K), optax.sgd(0.05)),
                      wrt=nnx.Param)
  step = mo.nnx_train_step(nnx_losses)
  before = nnx_losses(model, x, y)
  losses = step(model, opt, x, y)
  np.testing.assert_allclose(losses, before, rtol=1e-6)
  state = nnx.as_pure(opt.opt_state)[0]
  np.testing.assert_allclose(state.seen_losses, before, rtol=1e-6)
  # loss_fn was evaluated on the parameters tx.update received (pre-step).
  np.testing.assert_allclose(state.lookahead_losses, before, rtol=1e-6)
  assert int(opt.step[...]) == 1
  # pass_loss_fn=False: the spy keeps its old look-ahead record.
  opt2 = nnx.Optimizer(model, optax.chain(spy(K), optax.sgd(0.05)),
                       wrt=nnx.Param)
  mo.nnx_train_step(nnx_losses, pass_loss_fn=False)(model, opt2, x, y)
  np.testing.assert_array_equal(
      nnx.as_pure(opt2.opt_state)[0].lookahead_losses, -np.ones(K))


def _train_nnx(tx_fn, method=None, steps=STEPS, seed=0):
  model = NNXNet(nnx.Rngs(seed))
  x, y = _data()
  opt = nnx.Optimizer(model, tx_fn(), wrt=nnx.Param)
  step = mo.nnx_train_step(nnx_losses, method=method)
  first = nnx_losses(model, x, y)
  for _ in range(steps):
    step(model, opt, x, y)
  return np.asarray(first), np.asarray(nnx_losses(model, x, y)), opt


def _shared_heads(method):
  labels = mo.label_by_path({"trunk": "shared", "heads": "head"})
  return optax.partition({"shared": method, "head": mo.task_sum(K)}, labels)


@pytest.mark.parametrize("name", ["cagrad", "mgda", "cagrad_partition"])
def test_nnx_training_lowers_every_task(name):
  make = {
      "cagrad": lambda: optax.chain(mo.cagrad(K, c=0.4), optax.adam(1e-2)),
      "mgda": lambda: optax.chain(mo.mgda(K), optax.adam(1e-2)),
      "cagrad_partition": lambda: optax.chain(
          _shared_heads(mo.cagrad(K, c=0.4)), optax.adam(1e-2)),
  }[name]
  first, last, opt = _train_nnx(make)
  assert np.all(last < 0.8 * first), (first, last)
  state = nnx.as_pure(opt.opt_state)[0]
  if name.endswith("partition"):
    state = state.inner_states["shared"]
  weights = optax.tree.get(state, "weights")
  assert weights.shape == (K,) and np.all(np.isfinite(weights))


def test_nnx_training_single_backward_loss_weighting():
  method = mo.uncertainty_weighting(K)
  first, last, opt = _train_nnx(
      lambda: optax.chain(method, optax.adam(1e-2)), method=method)
  assert np.all(last < 0.8 * first), (first, last)
  state = nnx.as_pure(opt.opt_state)[0]
  # The method's state advanced: the log-variances moved from their start.
  assert not np.allclose(state.weights, mo.uncertainty_weighting(K).init(
      None).weights)


# ---------------------------------------------------------------------------
# Linen.
# ---------------------------------------------------------------------------


def _linen_state(tx, seed=0):
  module = LinenNet()
  x, y = _data()
  params = module.init(jax.random.key(seed), x)["params"]
  state = train_state.TrainState.create(apply_fn=module.apply, params=params,
                                        tx=tx)
  fn = lambda p, x, y: jnp.mean((module.apply({"params": p}, x) - y) ** 2, 0)
  return state, fn, x, y


def test_linen_apply_gradients_drops_kwargs_but_helper_forwards_them():
  state, fn, x, y = _linen_state(optax.chain(spy(K), optax.sgd(0.1)))
  losses, grads = mo.value_and_task_grads(fn)(state.params, x, y)
  # The trap: TrainState.apply_gradients treats kwargs as dataclass fields.
  with pytest.raises(TypeError):
    state.apply_gradients(grads=grads, task_losses=losses)
  loss_fn = lambda p: fn(p, x, y) + 1.0
  new = jax.jit(lambda s, g, l: mo.apply_task_gradients(
      s, g, task_losses=l, loss_fn=loss_fn))(state, grads, losses)
  seen = new.opt_state[0]
  np.testing.assert_allclose(seen.seen_losses, losses, rtol=1e-6)
  np.testing.assert_allclose(seen.lookahead_losses, losses + 1.0, rtol=1e-6)
  assert int(new.step) == 1
  # The update is sgd on the mean gradient, as apply_gradients would give.
  mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
  ref = state.replace(tx=optax.sgd(0.1), opt_state=optax.sgd(0.1).init(
      state.params)).apply_gradients(grads=mean)
  _tree_close(new.params, ref.params)


def test_linen_training_lowers_every_task():
  # (MGDA is covered on the NNX side; here CAGrad, PCGrad on the trunk only,
  # and FAMO on the single-backward path.)
  for make, method in [
      (lambda m: optax.chain(m, optax.adam(1e-2)), mo.cagrad(K, c=0.4)),
      (lambda m: optax.chain(optax.partition(
          {"shared": m, "head": mo.task_sum(K)},
          mo.label_by_path({"trunk_*": "shared", "head_*": "head"})),
                             optax.adam(1e-2)), mo.pcgrad(K)),
      (lambda m: optax.chain(m, optax.adam(1e-2)), mo.famo(K)),
  ]:
    state, fn, x, y = _linen_state(make(method))
    single = isinstance(method, mo.LossWeightingTransformation)

    @jax.jit
    def step(state, x, y):
      if single:
        losses, grads = mo.value_and_weighted_grad(fn, method)(
            state.opt_state[0], state.params, x, y)
      else:
        losses, grads = mo.value_and_task_grads(fn)(state.params, x, y)
      return mo.apply_task_gradients(state, grads, task_losses=losses,
                                     loss_fn=lambda p: fn(p, x, y))

    first = np.asarray(fn(state.params, x, y))
    for _ in range(STEPS):
      state = step(state, x, y)
    last = np.asarray(fn(state.params, x, y))
    assert np.all(last < 0.8 * first), (method, first, last)


# ---------------------------------------------------------------------------
# Labels for optax.partition.
# ---------------------------------------------------------------------------


def test_label_by_path_rules():
  tree = {"trunk": {"w": 1, "b": 2}, "trunk_extra": {"w": 3},
          "heads": [{"w": 4}, {"w": 5}], "head_0": {"kernel": 6}}
  labels = mo.label_by_path(
      [("heads/1", "special"), ("heads", "head"), ("trunk", "shared"),
       ("head_*", "glob")], default="other")(tree)
  assert labels == {"trunk": {"w": "shared", "b": "shared"},
                    "trunk_extra": {"w": "other"},
                    "heads": [{"w": "head"}, {"w": "special"}],
                    "head_0": {"kernel": "glob"}}
  with pytest.raises(ValueError, match="trunk_extra/w"):
    mo.label_by_path({"trunk": "a", "heads": "b", "head_*": "c"})(tree)
  with pytest.raises(TypeError):
    mo.label_by_path({1: "a"})


def test_label_by_path_on_nnx_state_drops_value_key():
  model = NNXNet(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  labels = mo.label_by_path({"trunk": "shared", "heads/*/kernel": "hk"},
                            default="hb")(nnx.as_pure(params))
  assert labels["trunk"]["layers"][0]["kernel"] == "shared"
  assert labels["heads"][2]["kernel"] == "hk"
  assert labels["heads"][2]["bias"] == "hb"


def test_partition_shared_method_and_head_task_sum():
  """Trunk: the method on trunk-only gradients; head i: its own task's grad."""
  model = NNXNet(nnx.Rngs(5))
  x, y = _data()
  losses, grads = mo.nnx_value_and_task_grads(nnx_losses)(model, x, y)
  grads = nnx.as_pure(grads)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = _shared_heads(mo.cagrad(K, c=0.4))
  ref_tx = mo.cagrad(K, c=0.4)

  @jax.jit
  def both(grads, params, losses):
    out = tx.update(grads, tx.init(params), params, task_losses=losses)
    ref = ref_tx.update(grads["trunk"], ref_tx.init(params["trunk"]),
                        params["trunk"], task_losses=losses)
    return out, ref

  (updates, state), (ref, ref_state) = both(grads, params, losses)
  _tree_close(updates["trunk"], ref, rtol=1e-5, atol=1e-7)
  for i in range(K):
    _tree_close(updates["heads"][i],
                jax.tree.map(lambda g, i=i: g[i], grads["heads"][i]))
  got = state.inner_states["shared"].inner_state.weights
  np.testing.assert_allclose(got, ref_state.weights, rtol=1e-5)


def test_nnx_train_step_lookahead_method_inside_partition():
  """Affinity tracking on the trunk only: its look-ahead gets MaskedNode heads."""
  model = NNXNet(nnx.Rngs(6))
  x, y = _data()
  shared = optax.chain(mo.track_affinity(K, lr=0.01, update_every=2),
                       mo.cagrad(K, c=0.4))
  tx = optax.chain(_shared_heads(shared), optax.adam(1e-2))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = mo.nnx_train_step(nnx_losses)
  first = nnx_losses(model, x, y)
  for _ in range(10):
    step(model, opt, x, y)
  tracked = nnx.as_pure(opt.opt_state)[0].inner_states["shared"].inner_state[0]
  assert int(tracked.num_averaged) == 5
  z = np.asarray(tracked.affinity)
  assert np.all(np.isfinite(z)) and np.all(np.diag(z) > 0)
  assert np.all(np.asarray(nnx_losses(model, x, y)) < np.asarray(first))
  # The masked loss_fn fills the heads in with their current values.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  masked = jax.tree_util.tree_map_with_path(
      lambda path, v: optax.MaskedNode() if "heads" in jax.tree_util.keystr(
          path) else v, params)
  loss_fn = mo.nnx_loss_fn(nnx_losses, model, x, y)
  np.testing.assert_allclose(loss_fn(masked), loss_fn(params), rtol=1e-6)


# ---------------------------------------------------------------------------
# The three training paths on NNX: one partition, heads not stacked.
# ---------------------------------------------------------------------------

_NNX_LABELS = mo.label_by_path({"trunk": "shared", "heads": "head"})


def _nnx_shared(state):
  return jax.tree.map(lambda label: label == "shared", _NNX_LABELS(state))


def _partitioned(method):
  return optax.chain(optax.partition(
      {"shared": method, "head": mo.task_sum(K)}, _NNX_LABELS),
      optax.sgd(0.05))


@pytest.mark.parametrize("path", ["stacked", "gram"])
def test_nnx_train_step_gram_first_matches_stacked(path):
  x, y = _data()
  models = {}
  for p in ("stacked", path):
    model = NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _partitioned(mo.cagrad(K, c=0.4)),
                              wrt=nnx.Param)
    step = mo.nnx_train_step(nnx_losses, path=p, shared=_nnx_shared,
                             chunk_size=2)
    for _ in range(3):
      step(model, optimizer, x, y)
    models[p] = (model, mo.task_weights(optimizer.opt_state))
  (a, wa), (b, wb) = models["stacked"], models[path]
  np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-6)
  _tree_close(nnx.state(a, nnx.Param), nnx.state(b, nnx.Param), rtol=1e-4,
              atol=1e-6)


def test_nnx_task_grads_shared_heads_not_stacked():
  model = NNXNet(nnx.Rngs(1))
  x, y = _data()
  _, full = mo.nnx_value_and_task_grads(nnx_losses)(model, x, y)
  _, mixed = mo.nnx_value_and_task_grads(nnx_losses, shared=_nnx_shared)(
      model, x, y)
  _tree_close(mixed["trunk"], full["trunk"], rtol=1e-6)
  _tree_close(mixed["heads"], jax.tree.map(lambda g: g.sum(0), full["heads"]),
              rtol=1e-6, atol=1e-7)


def test_nnx_weighted_path_uses_the_recorded_coefficients():
  model = NNXNet(nnx.Rngs(2))
  x, y = _data()
  optimizer = nnx.Optimizer(model, _partitioned(mo.famo(K, learning_rate=0.3)),
                            wrt=nnx.Param)
  step = mo.nnx_train_step(nnx_losses, path="weighted", jit=False)
  for _ in range(3):
    step(model, optimizer, x, y)
  losses, grads = mo.nnx_value_and_weighted_grad(nnx_losses, optimizer.tx)(
      optimizer.opt_state, model, x, y)
  _, per_task = mo.nnx_value_and_task_grads(nnx_losses)(model, x, y)
  optimizer.update(model, grads, task_losses=losses)
  c = mo.task_weights(optimizer.opt_state)
  assert not np.allclose(c, 1 / K)
  _tree_close(grads, jax.tree.map(lambda g: jnp.tensordot(c, g, 1), per_task),
              rtol=1e-5, atol=1e-7)
  with pytest.warns(DeprecationWarning, match="path='weighted'"):
    mo.nnx_train_step(nnx_losses, method=mo.famo(K))


# Every public method inside nnx.Optimizer (the conformance suite's cases).
# ---------------------------------------------------------------------------

from tests.conftest import all_cases  # noqa: E402


def _linear_losses(model, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0)


def _nnx_step(case, model, optimizer, x, y):
  """One ``optimizer.update`` with the case's extra arguments (stacked path)."""
  losses, grads = mo.nnx_value_and_task_grads(_linear_losses)(model, x, y)
  loss_fn = mo.nnx_loss_fn(_linear_losses, model, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  optimizer.update(model, grads, **case.extras(params, losses, loss_fn))


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", all_cases(), ids=str)
def test_every_method_inside_nnx_optimizer(case, jitted):
  """Two steps through ``nnx.Optimizer`` equal the same two steps of the
  method on plain arrays (its states, wrappers' included, survive NNX's
  variable boxing, eagerly and under ``nnx.jit``)."""
  x = jax.random.normal(jax.random.key(1), (8, IN))
  y = jax.random.normal(jax.random.key(2), (8, K))
  model = nnx.Linear(IN, K, rngs=nnx.Rngs(0))
  tx = optax.chain(case.make(K), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)

  # Oracle: the same steps on pure arrays, without NNX.
  def pure_losses(p):
    return _linear_losses(nnx.merge(graphdef, p), x, y)

  expected, state = params, tx.init(params)
  for _ in range(2):
    losses, grads = mo.value_and_task_grads(pure_losses)(expected)
    extras = case.extras(expected, losses, mo.masked_loss_fn(
        pure_losses, expected))
    updates, state = tx.update(grads, state, expected, **extras)
    expected = optax.apply_updates(expected, updates)

  step = nnx.jit(functools.partial(_nnx_step, case)) if jitted else (
      functools.partial(_nnx_step, case))
  for _ in range(2):
    step(model, optimizer, x, y)
  got = nnx.as_pure(nnx.state(model, nnx.Param))
  _tree_close(got, expected, rtol=1e-4, atol=1e-6)
  assert jax.tree.structure(nnx.as_pure(optimizer.opt_state)) == (
      jax.tree.structure(state))
