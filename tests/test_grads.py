"""Per-task gradients against jax.jacrev and explicit loops."""

import jax
import jax.numpy as jnp
import numpy as np
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


def test_value_and_weighted_grad_is_one_weighted_backward():
  from mtl_optax._src.base import loss_weighting_transformation
  params, x, y = _problem()
  weights = jnp.array([0.2, 0.5, 0.3])
  method = loss_weighting_transformation(
      lambda p: (), lambda u, s, p=None, **kw: (u, s), lambda s, l: weights)
  losses, grads = mo.value_and_weighted_grad(_task_losses, method)(
      (), params, x, y)
  _, stacked = mo.value_and_task_grads(_task_losses)(params, x, y)
  for name in params:
    np.testing.assert_allclose(
        grads[name], jnp.tensordot(weights, stacked[name], axes=1),
        rtol=1e-5, atol=1e-6)
  with pytest.raises(TypeError, match="loss_weights"):
    mo.value_and_weighted_grad(_task_losses, mo.mgda(3))


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
  (ref_losses, ref_aux), ref = mo.value_and_task_grads(fn, has_aux=True)(
      params, x, y)
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


@pytest.mark.parametrize("chunk_size,unroll,error", [
    (0, False, ValueError), (-2, False, ValueError), (1.5, False, TypeError),
    (True, False, TypeError), (2, "yes", TypeError), (None, 1, TypeError),
    (None, True, ValueError)])
def test_bad_chunking_raises_at_construction(chunk_size, unroll, error):
  with pytest.raises(error):
    mo.value_and_task_grads(_task_losses, chunk_size=chunk_size,
                            unroll=unroll)
