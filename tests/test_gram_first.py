"""Gram-first path: the Gram matrix without the Jacobian, and training on it."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src import tree_math

K = 3


def _params(dtype=jnp.float32):
  key = jax.random.split(jax.random.key(0), 3)
  return {"trunk": {"w": jax.random.normal(key[0], (4, 3), dtype),
                    "b": jnp.linspace(-1, 1, 3).astype(dtype)},
          "heads": jax.random.normal(key[1], (K, 3), dtype)}


X = jax.random.normal(jax.random.key(1), (5, 4))
SHARED = {"trunk": True, "heads": False}


def task_losses(params, x):
  z = jnp.tanh(x.astype(params["trunk"]["w"].dtype) @ params["trunk"]["w"]
               + params["trunk"]["b"])
  out = z @ params["heads"].T                      # (batch, K)
  return jnp.mean((out - jnp.arange(K, dtype=out.dtype)) ** 2, axis=0)


def _stacked_gram(params, shared=None):
  _, grads = mo.value_and_task_grads(task_losses)(params, X)
  if shared is not None:
    grads = grads["trunk"]
  return np.asarray(tree_math.gram_matrix(grads), np.float64)


@pytest.mark.parametrize("chunk_size, shared", [
    (None, None), (1, SHARED), (2, None),
    *[pytest.param(c, s, marks=pytest.mark.slow)
      for c, s in ((None, SHARED), (1, None), (2, SHARED))]])
def test_gram_equals_stacked_float32(chunk_size, shared):
  params = _params()
  losses, gram = mo.value_and_gram(task_losses, shared=shared,
                                   chunk_size=chunk_size)(params, X)
  np.testing.assert_allclose(losses, task_losses(params, X), rtol=1e-6)
  expected = _stacked_gram(params, shared)
  np.testing.assert_allclose(gram, expected, rtol=2e-5,
                             atol=2e-6 * np.abs(expected).max())
  np.testing.assert_array_equal(gram, np.asarray(gram).T)


def test_gram_equals_stacked_float64_has_aux_chunks_not_dividing():
  with jax.enable_x64(True):
    params = _params(jnp.float64)
    fn = lambda p, x: (task_losses(p, x), {"n": jnp.sum(x)})
    (losses, aux), gram = mo.value_and_gram(fn, has_aux=True, chunk_size=2)(
        params, X.astype(jnp.float64))
    assert gram.dtype == jnp.float64
    np.testing.assert_allclose(aux["n"], np.sum(np.asarray(X)), rtol=1e-6)
    np.testing.assert_allclose(gram, _stacked_gram(params), rtol=1e-12,
                               atol=1e-13)


def test_gram_one_task_and_closed_form():
  fn = lambda w: jnp.stack([3 * w[0] + 4 * w[1]])
  _, gram = mo.value_and_gram(fn)(jnp.ones(2))
  np.testing.assert_allclose(gram, [[25.0]])


def test_gram_tiny_and_huge_gradients_are_scale_safe():
  for scale in (1e-30, 1e30):
    fn = lambda w: jnp.stack([scale * w[0], scale * (w[0] + w[1])])
    _, out = mo.value_and_gram_weighted_grad(fn, mo.mgda(2))(
        mo.mgda(2).init(jnp.ones(2)), jnp.ones(2))[0]
    np.testing.assert_allclose(out.gram, [[2 / 3, 2 / 3], [2 / 3, 4 / 3]],
                               rtol=1e-5)
    np.testing.assert_allclose(out.rms_norm, scale * np.sqrt(1.5), rtol=1e-5)


GRAM_METHODS = {
    "linear_scalarization": lambda: mo.linear_scalarization(K),
    "mgda": lambda: mo.mgda(K),
    "cagrad": lambda: mo.cagrad(K, c=0.4),
    "upgrad": lambda: mo.upgrad(K),
    "dualproj": lambda: mo.dualproj(K),
    "imtl_g": lambda: mo.imtl_g(K),
    "aligned_mtl": lambda: mo.aligned_mtl(K),
    "config": lambda: mo.config(K),
    "nash_mtl": lambda: mo.nash_mtl(K),
    "fairgrad": lambda: mo.fairgrad(K),
    "pcgrad": lambda: mo.pcgrad(K),
    "gradvac": lambda: mo.gradvac(K),
    "krum": lambda: mo.krum(K),
}


def _train(make, gram_first, steps=3, jit=True):
  """Three steps of a trunk-balanced, heads-plain partition; both paths."""
  labels = mo.label_by_path({"trunk": "shared", "heads": "head"})
  tx = optax.chain(optax.partition(
      {"shared": make(), "head": mo.task_sum(K)}, labels), optax.sgd(0.05))
  params = _params()
  opt_state = tx.init(params)

  def step(params, opt_state):
    if gram_first:
      (losses, gram), grads = mo.value_and_gram_weighted_grad(
          task_losses, tx, shared=SHARED, chunk_size=2)(opt_state, params, X)
      extra = {"gram": gram}
    else:
      losses, grads = mo.value_and_task_grads(task_losses, shared=SHARED)(
          params, X)
      extra = {}
    updates, opt_state = tx.update(grads, opt_state, params,
                                   task_losses=losses, **extra)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(step) if jit else step
  history = []
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
    history.append(np.asarray(mo.task_weights(opt_state)))
  return params, np.stack(history)


@pytest.mark.parametrize("name", sorted(GRAM_METHODS))
def test_gram_first_matches_stacked_path(name):
  make = GRAM_METHODS[name]
  p_stacked, w_stacked = _train(make, gram_first=False)
  p_gram, w_gram = _train(make, gram_first=True)
  np.testing.assert_allclose(w_gram, w_stacked, rtol=2e-4, atol=2e-5)
  for a, b in zip(jax.tree.leaves(p_gram), jax.tree.leaves(p_stacked)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gram_first_eager_and_plain_chain():
  make = GRAM_METHODS["cagrad"]
  p_jit, _ = _train(make, gram_first=True)
  p_eager, _ = _train(make, gram_first=True, jit=False)
  for a, b in zip(jax.tree.leaves(p_jit), jax.tree.leaves(p_eager)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  tx = optax.chain(mo.upgrad(K), optax.adam(1e-2))
  params = _params()
  opt_state = tx.init(params)
  (losses, gram), grads = mo.value_and_gram_weighted_grad(task_losses, tx)(
      opt_state, params, X)
  _, stacked = mo.value_and_task_grads(task_losses)(params, X)
  _, ref_state = tx.update(stacked, opt_state, params, task_losses=losses)
  updates, state = tx.update(grads, opt_state, params, task_losses=losses,
                             gram=gram)
  c = mo.task_weights(state)
  np.testing.assert_allclose(c, mo.task_weights(ref_state), rtol=1e-4,
                             atol=1e-6)
  expected = jax.tree.map(lambda g: jnp.tensordot(c, g, 1), stacked)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gram_first_refuses_stacked_only_methods_and_bad_gram():
  tx = mo.graddrop(K)
  with pytest.raises(ValueError, match="not a Gram-weighting method"):
    mo.value_and_gram_weighted_grad(task_losses, tx)(
        tx.init(_params()), _params(), X)
  mgda = mo.mgda(K)
  with pytest.raises(ValueError, match=r"gram has shape \(2, 2\)"):
    mgda.update(_params(), mgda.init(_params()), _params(),
                gram=jnp.eye(2))


def test_gram_first_nonfinite_loss_keeps_state_and_propagates():
  tx = optax.apply_if_finite(optax.chain(mo.cagrad(K, c=0.4),
                                         optax.sgd(0.1)), 3)
  params = _params()
  opt_state = tx.init(params)
  bad = lambda p, x: task_losses(p, x) * jnp.array([1.0, jnp.nan, 1.0])
  for jit in (False, True):
    fn = mo.value_and_gram_weighted_grad(bad, tx)
    fn = jax.jit(fn) if jit else fn
    (losses, gram), grads = fn(opt_state, params, X)
    updates, new_state = tx.update(grads, opt_state, params,
                                   task_losses=losses, gram=gram)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert int(new_state.notfinite_count) == 1
    np.testing.assert_array_equal(mo.task_weights(new_state),
                                  mo.task_weights(opt_state))


def _conv_losses(params, x):
  h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  features = jnp.mean(jnp.tanh(h), axis=(1, 2))            # (batch, C)
  return jnp.mean((features @ params["heads"]) ** 2, axis=0)   # (K,)


def test_gram_of_a_conv_net_is_unrolled_on_cpu_and_equals_stacked():
  """On a CPU, chunks of a model with convolutions run unrolled (XLA:CPU
  runs convolutions slowly in loops); 'auto' means one gradient at a time."""
  assert jax.default_backend() == "cpu"
  key = jax.random.split(jax.random.key(2), 3)
  params = {"conv": jax.random.normal(key[0], (3, 3, 1, 2)),
            "heads": jax.random.normal(key[1], (2, K))}
  x = jax.random.normal(key[2], (2, 4, 4, 1))
  scans = lambda jaxpr: [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert not scans(jax.make_jaxpr(mo.value_and_gram(_conv_losses))(params, x))
  assert scans(jax.make_jaxpr(mo.value_and_gram(task_losses))(_params(), X))
  jac = jax.jacrev(_conv_losses)(params, x)
  rows = np.concatenate([np.asarray(g, np.float64).reshape(K, -1)
                         for g in jax.tree.leaves(jac)], axis=1)
  expected = rows @ rows.T
  for chunk_size in (1, "auto", 2):
    _, gram = jax.jit(mo.value_and_gram(_conv_losses, chunk_size=chunk_size))(
        params, x)
    np.testing.assert_allclose(gram, expected, rtol=2e-5,
                               atol=2e-6 * np.abs(expected).max())
  with pytest.raises(ValueError, match="auto"):
    mo.value_and_gram(_conv_losses, chunk_size="fast")
