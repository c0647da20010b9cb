"""Per-task gradients against jax.jacrev and explicit loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo


def _task_losses(params, x, y):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  preds = hidden @ params["w2"]                       # (batch, K)
  return jnp.mean((preds - y) ** 2, axis=0)            # (K,)


def _problem(num_tasks=3):
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"w1": jax.random.normal(k[0], (4, 6)), "b1": jnp.zeros(6),
            "w2": jax.random.normal(k[1], (6, num_tasks))}
  return params, jax.random.normal(k[2], (8, 4)), jax.random.normal(
      k[3], (8, num_tasks))


def test_value_and_task_grads_equals_jacrev():
  params, x, y = _problem()
  losses, grads = jax.jit(mo.value_and_task_grads(_task_losses))(params, x, y)
  np.testing.assert_allclose(losses, _task_losses(params, x, y), rtol=1e-6)
  jac = jax.jacrev(_task_losses)(params, x, y)
  for name in params:
    assert grads[name].shape == (3, *params[name].shape)
    np.testing.assert_allclose(grads[name], jac[name], rtol=1e-5, atol=1e-6)


def test_rows_are_single_task_gradients():
  params, x, y = _problem()
  _, grads = mo.value_and_task_grads(_task_losses)(params, x, y)
  for i in range(3):
    single = jax.grad(lambda p: _task_losses(p, x, y)[i])(params)
    for name in params:
      np.testing.assert_allclose(grads[name][i], single[name], rtol=1e-5,
                                 atol=1e-6)


def test_has_aux_and_argnums_tuple():
  params, x, y = _problem()
  fn = lambda p, x, y: (_task_losses(p, x, y), {"n": x.shape[0]})
  (losses, aux), grads = mo.value_and_task_grads(fn, has_aux=True)(params, x, y)
  assert aux["n"] == 8 and losses.shape == (3,)
  _, (g_params, g_x) = mo.value_and_task_grads(_task_losses, argnums=(0, 1))(
      params, x, y)
  np.testing.assert_allclose(g_x, jax.jacrev(_task_losses, argnums=1)(
      params, x, y), rtol=1e-5, atol=1e-6)
  assert g_params["w1"].shape == (3, 4, 6)


def test_non_vector_losses_raise():
  with pytest.raises(ValueError, match="1-D vector of task losses"):
    mo.value_and_task_grads(lambda p: jnp.sum(p))(jnp.ones(3))


def test_from_batches_equals_python_loop():
  num_tasks = 4
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  w = jax.random.normal(k[0], (5,))
  batches = {"x": jax.random.normal(k[1], (num_tasks, 7, 5)),
             "y": jax.random.normal(k[2], (num_tasks, 7))}
  loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
  losses, grads = jax.jit(mo.value_and_task_grads_from_batches(loss))(
      w, batches)
  for i in range(num_tasks):
    batch_i = jax.tree.map(lambda a: a[i], batches)
    np.testing.assert_allclose(losses[i], loss(w, batch_i), rtol=1e-6)
    np.testing.assert_allclose(grads[i], jax.grad(loss)(w, batch_i),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size,unroll", [
    ("auto", False), (None, False), (1, False), (1, True), (3, False),
    (3, True), (5, False)])
def test_from_batches_every_chunking_equals_the_vmap(chunk_size, unroll):
  # Five tasks (3 does not divide it), aux, the batch before the parameters
  # (a negative batch_argnum), a keyword argument: every chunking returns
  # what one vmap of the five tasks returns.
  num_tasks = 5
  k = jax.random.split(jax.random.PRNGKey(4), 3)
  params = {"w": jax.random.normal(k[0], (3, 2)), "b": jnp.ones(2)}
  batches = {"x": jax.random.normal(k[1], (num_tasks, 6, 3)),
             "y": jax.random.normal(k[2], (num_tasks, 6, 2))}

  def loss(batch, p, scale=1.0):
    err = jnp.tanh(batch["x"] @ p["w"] + p["b"]) - batch["y"]
    return scale * jnp.mean(err ** 2), jnp.max(jnp.abs(err))

  make = lambda **kw: jax.jit(mo.value_and_task_grads_from_batches(
      loss, argnums=1, batch_argnum=-2, has_aux=True, **kw))
  expected = make(chunk_size=None)(batches, params, scale=2.0)
  got = make(chunk_size=chunk_size, unroll=unroll)(batches, params, scale=2.0)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  (losses, aux), grads = got
  chex.assert_shape((losses, aux, grads["w"]), [(5,), (5,), (5, 3, 2)])
  with pytest.raises(ValueError, match="unroll=True unrolls chunks"):
    mo.value_and_task_grads_from_batches(loss, chunk_size=None, unroll=True)


def test_value_and_weighted_grad_is_one_weighted_backward():
  params, x, y = _problem()
  tx = optax.chain(mo.gls(3), optax.sgd(0.1))
  state = tx.init(params)
  losses, grads = mo.value_and_weighted_grad(_task_losses, tx)(
      state, params, x, y)
  _, new_state = tx.update(grads, state, params, task_losses=losses)
  weights = mo.task_weights(new_state)
  geometric_mean = jnp.exp(jnp.mean(jnp.log(losses)))
  np.testing.assert_allclose(weights, geometric_mean / (3 * losses),
                             rtol=1e-5)
  _, stacked = mo.value_and_task_grads(_task_losses)(params, x, y)
  for name in params:
    np.testing.assert_allclose(
        grads[name], jnp.tensordot(weights, stacked[name], axes=1),
        rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="probe"):
    mo.value_and_weighted_grad(_task_losses, mo.mgda(3))(
        mo.mgda(3).init(params), params, x, y)


def test_representation_grads_recover_the_parameter_gradient_for_the_mean():
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  trunk = jax.random.normal(k[0], (4, 6))
  heads = jax.random.normal(k[1], (3, 6))
  x = jax.random.normal(k[2], (5, 4))
  encode = lambda w, x: jnp.tanh(x @ w)
  losses_fn = lambda h, z: jnp.mean((z @ h.T) ** 2, axis=0)   # (K,)
  losses, z_grads, h_grads, encoder_vjp = mo.value_and_representation_grads(
      encode, losses_fn)(trunk, heads, x)
  full = lambda t, h: losses_fn(h, encode(t, x))
  np.testing.assert_allclose(losses, full(trunk, heads), rtol=1e-6)
  assert z_grads.shape == (3, 5, 6)
  mean = mo.linear_scalarization(3)
  z_update, _ = mean.update(z_grads, mean.init(None))
  expected_trunk = jax.grad(lambda t: jnp.mean(full(t, heads)))(trunk)
  np.testing.assert_allclose(encoder_vjp(z_update), expected_trunk, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(h_grads, jax.grad(
      lambda h: jnp.sum(full(trunk, h)))(heads), rtol=1e-5, atol=1e-6)
  # MGDA-UB: the min-norm combination of the feature gradients.
  mgda = mo.mgda(3)
  z_mgda, state = mgda.update(z_grads, mgda.init(None))
  flat = np.asarray(z_grads).reshape(3, -1)
  np.testing.assert_allclose(np.asarray(z_mgda).ravel(),
                             np.asarray(state.weights) @ flat, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("chunk_size,unroll", [
    (1, False), (2, False), (3, False), (4, False), (5, False), (7, False),
    (1, True), (2, True), (3, True), (7, True)])
def test_chunked_backward_equals_vmap(chunk_size, unroll):
  """Every chunking (loop or unrolled, with a remainder or not) gives the
  same stacked gradients as the single vmap, under jit and with aux."""
  params, x, y = _problem(num_tasks=5)
  fn = lambda p, x, y: (_task_losses(p, x, y), jnp.sum(x))
  (losses, aux), grads = jax.jit(mo.value_and_task_grads(
      fn, has_aux=True, chunk_size=chunk_size, unroll=unroll))(params, x, y)
  (ref_losses, ref_aux), ref = mo.value_and_task_grads(
      fn, has_aux=True, chunk_size=None)(params, x, y)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  np.testing.assert_allclose(aux, ref_aux, rtol=1e-6)
  for name in params:
    assert grads[name].shape == ref[name].shape
    np.testing.assert_allclose(grads[name], ref[name], rtol=1e-5, atol=1e-6)


def test_chunked_backward_with_argnums_tuple():
  params, x, y = _problem(num_tasks=4)
  _, (g_params, g_x) = mo.value_and_task_grads(
      _task_losses, argnums=(0, 1), chunk_size=3)(params, x, y)
  _, (r_params, r_x) = mo.value_and_task_grads(
      _task_losses, argnums=(0, 1))(params, x, y)
  np.testing.assert_allclose(g_x, r_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_params["w2"], r_params["w2"], rtol=1e-5,
                             atol=1e-6)


def test_chunked_backward_loops_once_per_chunk():
  """chunk_size=1 back-propagates one task per loop iteration: the traced
  program holds a loop whose trip count is K and no K-wide vmap."""
  params, x, y = _problem(num_tasks=6)
  jaxpr = jax.make_jaxpr(mo.value_and_task_grads(_task_losses, chunk_size=1))(
      params, x, y)
  scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == 6


def _scan_lengths(jaxpr):
  return [e.params["length"] for e in jaxpr.eqns
          if e.primitive.name == "scan"]


def _conv_task_losses(params, x):
  """A one-layer conv net with K linear heads: (K,) losses."""
  h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  features = jnp.mean(jnp.tanh(h), axis=(1, 2))           # (batch, C)
  return jnp.mean((features @ params["heads"]) ** 2, axis=0)


def _assert_same_grads(grads, ref):
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_auto_on_cpu_is_one_task_per_loop_iteration_and_equals_vmap():
  """The default, chunk_size='auto', on the CPU backend: one loop of K
  backward passes (chunk_size=1), the same numbers as the vmap."""
  assert jax.default_backend() == "cpu"
  params, x, y = _problem(num_tasks=4)
  default = mo.value_and_task_grads(_task_losses)
  assert _scan_lengths(jax.make_jaxpr(default)(params, x, y)) == [4]
  losses, grads = jax.jit(default)(params, x, y)
  ref_losses, ref = jax.jit(mo.value_and_task_grads(
      _task_losses, chunk_size=None))(params, x, y)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  _assert_same_grads(grads, ref)
  jac = jax.jacrev(_task_losses)(params, x, y)
  _assert_same_grads(grads, jac)


def test_auto_on_cpu_unrolls_convolutions():
  """A backward pass with a convolution is unrolled (XLA:CPU runs
  convolutions slowly inside loops): no loop, K transposed convolutions."""
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  params = {"conv": jax.random.normal(k[0], (3, 3, 1, 2)),
            "heads": jax.random.normal(k[1], (2, 3))}
  x = jax.random.normal(k[2], (2, 4, 4, 1))
  jaxpr = jax.make_jaxpr(mo.value_and_task_grads(_conv_task_losses))(
      params, x)
  assert _scan_lengths(jaxpr) == []
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 1 + 3          # the forward, one kernel grad per task
  _, grads = jax.jit(mo.value_and_task_grads(_conv_task_losses))(params, x)
  _, ref = jax.jit(mo.value_and_task_grads(
      _conv_task_losses, chunk_size=None))(params, x)
  _assert_same_grads(grads, ref)
  _assert_same_grads(grads, jax.jacrev(_conv_task_losses)(params, x))


def test_explicit_chunk_size_overrides_auto(monkeypatch):
  """chunk_size=None is the vmap on a CPU too; chunk_size=1 the loop even
  where 'auto' would unroll or vmap; on accelerators 'auto' is the vmap."""
  params, x, y = _problem(num_tasks=4)
  trace = lambda **kw: jax.make_jaxpr(mo.value_and_task_grads(
      _task_losses, **kw))(params, x, y)
  assert _scan_lengths(trace(chunk_size=None)) == []
  assert _scan_lengths(trace(chunk_size=2)) == [2]
  assert _scan_lengths(trace(unroll=True)) == []      # 'auto', unrolled
  conv_params = {"conv": jnp.ones((3, 3, 1, 2)), "heads": jnp.ones((2, 3))}
  conv_jaxpr = jax.make_jaxpr(mo.value_and_task_grads(
      _conv_task_losses, chunk_size=1))(conv_params, jnp.ones((1, 4, 4, 1)))
  assert _scan_lengths(conv_jaxpr) == [3]
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert _scan_lengths(trace()) == []
    assert _scan_lengths(trace(chunk_size=1)) == [4]


@pytest.mark.parametrize("chunk_size,unroll,error", [
    ("fast", False, ValueError), (0, False, ValueError),
    (-2, False, ValueError), (1.5, False, TypeError),
    (True, False, TypeError), (2, "yes", TypeError), (None, 1, TypeError),
    (None, True, ValueError)])
def test_bad_chunking_raises_at_construction(chunk_size, unroll, error):
  with pytest.raises(error):
    mo.value_and_task_grads(_task_losses, chunk_size=chunk_size,
                            unroll=unroll)


# ---------------------------------------------------------------------------
# The training-step protocol: task_weights, single backward, shared heads.
# ---------------------------------------------------------------------------

import warnings  # noqa: E402


_K = 2
_LABELS = mo.label_by_path({"trunk": "shared", "heads": "head"})
_SHARED = {"trunk": True, "heads": False}


def _two_task_params():
  return {"trunk": jnp.array([1.0, 2.0, -0.5]),
          "heads": jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])}


def _two_task_losses(params, x):
  z = jnp.tanh(params["trunk"] * x)
  return jnp.sum((params["heads"] * z - 1.0) ** 2, axis=1) + 0.1


_X = jnp.array([0.3, 0.7, -1.2])


def _injected_famo(learning_rate):
  tx = optax.inject_hyperparams(mo.famo, static_args=("num_tasks",))(
      num_tasks=_K, learning_rate=0.025)
  return tx, lambda state: state._replace(hyperparams={
      **state.hyperparams, "learning_rate": jnp.asarray(learning_rate)})


def test_task_weights_through_every_wrapper():
  params = _two_task_params()
  _, grads = mo.value_and_task_grads(_two_task_losses)(params, _X)
  mgda = mo.mgda(_K)
  _, alone = mgda.update(grads, mgda.init(params), params)
  expected = np.asarray(alone.weights)
  part = optax.partition({"shared": mo.mgda(_K), "head": mo.task_sum(_K)},
                         lambda p: jax.tree.map(lambda _: "shared", p))
  wrappers = [
      optax.chain(mo.mgda(_K), optax.adam(1e-3)),
      optax.inject_hyperparams(mo.mgda, static_args=("num_tasks",))(
          num_tasks=_K),
      optax.chain(part, optax.sgd(0.1)),
  ]
  for tx in wrappers:
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(mo.task_weights(state), expected, rtol=1e-6)
  # MultiSteps after the method (the supported order) and heads on task_sum.
  tx = optax.chain(optax.partition(
      {"shared": mo.mgda(_K), "head": mo.task_sum(_K)}, _LABELS),
      optax.MultiSteps(optax.sgd(0.1), 2))
  _, shared_grads = mo.value_and_task_grads(_two_task_losses,
                                            shared=_SHARED)(params, _X)
  _, state = tx.update(shared_grads, tx.init(params), params)
  trunk = mo.mgda(_K)
  _, trunk_state = trunk.update(grads["trunk"], trunk.init(params["trunk"]))
  np.testing.assert_allclose(mo.task_weights(state), trunk_state.weights,
                             rtol=1e-6)


def test_task_weights_several_methods_by_label_and_clear_error():
  params = _two_task_params()
  _, grads = mo.value_and_task_grads(_two_task_losses)(params, _X)
  tx = optax.partition({"shared": mo.mgda(_K),
                        "head": mo.linear_scalarization(_K)}, _LABELS)
  _, state = tx.update(grads, tx.init(params), params)
  weights = mo.task_weights(state)
  assert set(weights) == {"shared", "head"}
  np.testing.assert_allclose(weights["head"], [0.5, 0.5])
  with pytest.raises(ValueError, match="no mtl_optax method state"):
    mo.task_weights(optax.adam(1e-3).init(params))


def test_task_weights_of_nnx_optimizer_state():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, _K, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.chain(mo.famo(_K), optax.sgd(0.1)),
                      wrt=nnx.Param)
  np.testing.assert_allclose(mo.task_weights(opt.opt_state), [0.5, 0.5])


def test_injected_famo_gradient_uses_the_recorded_coefficients():
  """Regression: with inject_hyperparams(mo.famo) and a changed
  learning_rate the gradient was computed with other coefficients than the
  state recorded."""
  params = _two_task_params()
  tx, set_lr = _injected_famo(0.9)
  state = set_lr(tx.init(params))
  losses_seq = []
  for _ in range(4):
    losses, grads = mo.value_and_weighted_grad(_two_task_losses, tx)(
        state, params, _X)
    _, per_task = mo.value_and_task_grads(_two_task_losses)(params, _X)
    _, state = tx.update(grads, state, params, task_losses=losses)
    c = mo.task_weights(state)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(per_task)):
      np.testing.assert_allclose(g, jnp.tensordot(c, p, 1), rtol=1e-6,
                                 atol=1e-7)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    losses_seq.append(c)
  # The injected learning rate is the one used: learning_rate=0.025 moves less.
  plain = mo.famo(_K, learning_rate=0.025)
  assert not np.allclose(losses_seq[-1], plain.init(params).weights,
                         atol=1e-3)


@pytest.mark.parametrize("layout", ["chain", "partition", "injected"])
def test_single_backward_c_used_equals_c_recorded_under_jit(layout):
  if layout == "chain":
    tx = optax.chain(mo.uncertainty_weighting(_K), optax.adam(1e-2))
  elif layout == "partition":
    tx = optax.chain(optax.partition(
        {"shared": mo.famo(_K, learning_rate=0.3), "head": mo.task_sum(_K)},
        _LABELS),
        optax.adam(1e-2))
  else:
    inner, set_lr = _injected_famo(0.5)
    tx = optax.chain(inner, optax.sgd(0.1))
  params = _two_task_params()
  state = tx.init(params)
  if layout == "injected":
    state = (set_lr(state[0]),) + state[1:]

  @jax.jit
  def step(params, state):
    losses, grads = mo.value_and_weighted_grad(_two_task_losses, tx)(
        state, params, _X)
    _, per_task = mo.value_and_task_grads(_two_task_losses)(params, _X)
    updates, state = tx.update(grads, state, params, task_losses=losses)
    c = mo.task_weights(state)
    err = jnp.max(jnp.stack([jnp.max(jnp.abs(g - jnp.tensordot(c, p, 1)))
                             for g, p in zip(jax.tree.leaves(grads),
                                             jax.tree.leaves(per_task))]))
    return optax.apply_updates(params, updates), state, err

  for _ in range(4):
    params, state, err = step(params, state)
    assert float(err) < 1e-6


def test_single_backward_shared_heads_get_the_summed_gradient():
  params = _two_task_params()
  tx = optax.partition({"shared": mo.famo(_K), "head": optax.identity()},
                       _LABELS)
  state = tx.init(params)
  for _ in range(2):
    losses, grads = mo.value_and_weighted_grad(
        _two_task_losses, tx, shared=_SHARED)(state, params, _X)
    _, state = tx.update(grads, state, params, task_losses=losses)
  _, per_task = mo.value_and_task_grads(_two_task_losses)(params, _X)
  c = mo.task_weights(state)
  np.testing.assert_allclose(grads["trunk"],
                             jnp.tensordot(c, per_task["trunk"], 1),
                             rtol=1e-6)
  np.testing.assert_allclose(grads["heads"], per_task["heads"].sum(0),
                             rtol=1e-6)


def test_single_backward_deprecated_method_form_and_errors():
  params = _two_task_params()
  method = mo.gls(_K)
  tx = optax.chain(method, optax.sgd(0.1))
  state = tx.init(params)
  new_losses, new_grads = mo.value_and_weighted_grad(_two_task_losses, tx)(
      state, params, _X)
  with pytest.warns(DeprecationWarning, match=r"value_and_weighted_grad\(fn, "
                    r"tx\)\(opt_state"):
    old = mo.value_and_weighted_grad(_two_task_losses, method=method)
  losses, grads = old(state[0], params, _X)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(new_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    # A stacked-only method in the chain: refused with the recipe.
    stacked = optax.chain(mo.cagrad(_K), optax.sgd(0.1))
    with pytest.raises(ValueError, match="optax.identity"):
      mo.value_and_weighted_grad(_two_task_losses, stacked)(
          stacked.init(params), params, _X)
    none = optax.sgd(0.1)
    with pytest.raises(TypeError, match="no method of the right kind"):
      mo.value_and_weighted_grad(_two_task_losses, none)(
          none.init(params), params, _X)


def test_famo_pending_logit_step_once_per_update(monkeypatch):
  calls = []
  real = optax.adam

  def counting_adam(*args, **kwargs):
    inner = real(*args, **kwargs)

    def update(*a, **k):
      calls.append(1)
      return inner.update(*a, **k)
    return optax.GradientTransformation(inner.init, update)
  monkeypatch.setattr(optax, "adam", counting_adam)
  tx = mo.famo(_K)
  params = _two_task_params()
  state = tx.init(params)
  calls.clear()
  losses, grads = mo.value_and_weighted_grad(_two_task_losses, tx)(
      state, params, _X)
  tx.update(grads, state, params, task_losses=losses)
  assert len(calls) == 2   # once in the probe, once in the update


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_task_grads_shared_heads_not_stacked(chunk_size):
  params = _two_task_params()
  _, full = mo.value_and_task_grads(_two_task_losses)(params, _X)
  for shared in (_SHARED, lambda p: jax.tree.map(
      lambda label: label == "shared", _LABELS(p))):
    losses, grads = mo.value_and_task_grads(
        _two_task_losses, shared=shared, chunk_size=chunk_size)(params, _X)
    assert grads["trunk"].shape == (_K, 3)
    assert grads["heads"].shape == (_K, 3)   # the params' own shape
    np.testing.assert_allclose(grads["trunk"], full["trunk"], rtol=1e-6)
    np.testing.assert_allclose(grads["heads"], full["heads"].sum(0),
                               rtol=1e-6)
  with pytest.raises(TypeError, match="Python bools"):
    mo.value_and_task_grads(_two_task_losses, shared={
        "trunk": "shared", "heads": "head"})(params, _X)


def test_shared_heads_partition_matches_stacked_update():
  params = _two_task_params()
  tx = optax.chain(optax.partition(
      {"shared": mo.cagrad(_K, c=0.4), "head": mo.task_sum(_K)}, _LABELS),
      optax.sgd(0.1))
  state = tx.init(params)
  _, full = mo.value_and_task_grads(_two_task_losses)(params, _X)
  _, mixed = mo.value_and_task_grads(_two_task_losses, shared=_SHARED)(
      params, _X)
  u_full, s_full = tx.update(full, state, params)
  u_mixed, s_mixed = jax.jit(tx.update)(mixed, state, params)
  for a, b in zip(jax.tree.leaves(u_full), jax.tree.leaves(u_mixed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mo.task_weights(s_full),
                             mo.task_weights(s_mixed), rtol=1e-5)


# --------------------------------------------- TorchJD habits and messages


def _two_losses(w, x):
  return (w @ x) ** 2, jnp.sum(w)


def test_loss_function_returning_a_list_or_tuple_is_stacked():
  w, x = jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0])
  expected_losses = np.array([9.0, 3.0])
  expected_grads = np.array([[6.0, 6.0], [1.0, 1.0]])  # 2 (w.x) x ; ones
  for fn in (lambda w, x: list(_two_losses(w, x)), _two_losses):
    losses, grads = mo.value_and_task_grads(fn)(w, x)
    np.testing.assert_allclose(losses, expected_losses)
    np.testing.assert_allclose(grads, expected_grads)
  (losses, aux), grads = mo.value_and_task_grads(
      lambda w, x: (list(_two_losses(w, x)), "aux"), has_aux=True)(w, x)
  assert aux == "aux" and losses.shape == (2,)
  np.testing.assert_allclose(grads, expected_grads)


def test_loss_list_with_non_scalar_items_says_what_to_return():
  fn = lambda w: [w, jnp.sum(w)]
  with pytest.raises(TypeError, match=r"item 0 has shape \(2,\).*1-D array"):
    mo.value_and_task_grads(fn)(jnp.ones(2))
  # (losses, aux) without has_aux: the message points at has_aux.
  with pytest.raises(TypeError, match="has_aux=True"):
    mo.value_and_task_grads(lambda w: (w * 2, {"a": 1}))(jnp.ones(2))


@pytest.mark.parametrize("argnums", [1.0, "0", None, (0, 1.5), True, ()])
def test_bad_argnums_is_a_clear_type_error(argnums):
  with pytest.raises(TypeError, match="argnums must be an int or a non-empty"):
    mo.value_and_task_grads(lambda w: w, argnums=argnums)


def _batch_loss(w, batch):
  return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def test_list_of_per_task_batches_is_stacked():
  batches = [{"x": jnp.ones((3, 1)), "y": jnp.full(3, 1.0)},
             {"x": jnp.ones((3, 1)), "y": jnp.full(3, 3.0)}]
  stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches)
  fn = mo.value_and_task_grads_from_batches(_batch_loss, num_tasks=2)
  losses, grads = fn(jnp.array([2.0]), batches)
  ref_losses, ref_grads = fn(jnp.array([2.0]), stacked)
  np.testing.assert_allclose(losses, [1.0, 1.0])
  np.testing.assert_allclose(grads.ravel(), [2.0, -2.0])  # 2 (w - y)
  np.testing.assert_allclose(losses, ref_losses)
  np.testing.assert_allclose(grads, ref_grads)


def test_batch_without_task_axis_is_refused_naming_the_shapes():
  one_batch = {"x": jnp.ones((5, 1)), "y": jnp.ones(5)}
  fn = mo.value_and_task_grads_from_batches(_batch_loss, num_tasks=2)
  with pytest.raises(ValueError, match=r"num_tasks = 2.*\['x'\] \(5, 1\)"):
    fn(jnp.array([2.0]), one_batch)
  # Without num_tasks, leaves whose leading axes disagree are refused too.
  ragged = {"x": jnp.ones((2, 5, 1)), "y": jnp.ones((5,))}
  with pytest.raises(ValueError, match=r"\['y'\] \(5,\)"):
    mo.value_and_task_grads_from_batches(_batch_loss)(jnp.array([2.0]), ragged)
  with pytest.raises(ValueError, match="of one structure"):
    fn(jnp.array([2.0]), [one_batch, {"x": jnp.ones((5, 1))}])


def test_out_of_range_batch_argnum_is_a_clear_error():
  fn = mo.value_and_task_grads_from_batches(_batch_loss, batch_argnum=3)
  with pytest.raises(ValueError, match="batch_argnum=3 is out of range for 2"):
    fn(jnp.array([2.0]), {"x": jnp.ones((2, 3, 1)), "y": jnp.ones((2, 3))})
