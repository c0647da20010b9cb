"""Eager calls of the pure kernels run as one compiled program."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax import gram_weightings as gw
from mtl_optax._src import eager


def _scaled(x, factor, *, flag=False):
  if factor < 0:  # Python control flow on a static argument
    raise ValueError(f"factor must be >= 0, got {factor}")
  return {"out": x * factor + (1.0 if type(flag) is bool and flag else 0.0),
          "kind": jnp.asarray(type(factor) is int)}


scaled = eager.compiled_when_eager(_scaled)


def _cache_size():
  return eager._compiled_call._cache_size()  # pylint: disable=protected-access


def test_eager_call_equals_the_function_and_compiles_once_per_config():
  x = jnp.arange(3.0)
  before = _cache_size()
  first = scaled(x, 2.0, flag=True)
  np.testing.assert_array_equal(first["out"], _scaled(x, 2.0, flag=True)["out"])
  scaled(x + 1.0, 2.0, flag=True)  # new values, same config: no compile
  assert _cache_size() == before + 1
  scaled(x, 3.0, flag=True)  # another static value: another program
  assert _cache_size() == before + 2


def test_static_arguments_are_keyed_by_type_as_well_as_value():
  x = jnp.ones(2)
  # 1 == 1.0 == True for a dict key; the function sees the difference.
  assert bool(scaled(x, 1)["kind"]) and not bool(scaled(x, 1.0)["kind"])
  np.testing.assert_array_equal(scaled(x, 1.0, flag=1)["out"], [1.0, 1.0])
  np.testing.assert_array_equal(scaled(x, 1.0, flag=True)["out"], [2.0, 2.0])


def test_numpy_arrays_are_arguments_not_constants():
  before = _cache_size()
  for value in (1.0, 2.0):
    out = scaled(np.full(2, value, np.float32), 2.0, flag=False)
    np.testing.assert_array_equal(out["out"], [2 * value, 2 * value])
  assert _cache_size() == before + 1


def test_inside_a_trace_the_function_runs_as_written():
  jaxpr = jax.make_jaxpr(lambda x: scaled(x, 2.0)["out"])(jnp.ones(2))
  assert all(e.primitive.name != "pjit" for e in jaxpr.jaxpr.eqns), jaxpr
  np.testing.assert_array_equal(
      jax.jit(lambda x: scaled(x, 2.0)["out"])(jnp.ones(2)), [2.0, 2.0])
  grad = jax.grad(lambda x: jnp.sum(scaled(x, 3.0)["out"]))(jnp.ones(2))
  np.testing.assert_array_equal(grad, [3.0, 3.0])


def test_trace_time_errors_are_raised_unchanged():
  with pytest.raises(ValueError, match="factor must be >= 0, got -1.0"):
    scaled(jnp.ones(2), -1.0)


def test_an_unhashable_argument_runs_the_function_directly():
  before = _cache_size()
  out = eager.compiled_when_eager(lambda x, s: x * len(s))(jnp.ones(2), {1, 2})
  np.testing.assert_array_equal(out, [2.0, 2.0])
  assert _cache_size() == before


def test_the_wrapper_keeps_the_name_signature_and_docstring():
  assert gw.mgda.__name__ == "mgda" and gw.mgda.__module__ == gw.__name__
  assert "min-norm" in gw.mgda.__doc__
  assert "max_iter" in inspect.signature(gw.mgda).parameters


def test_gram_weighting_eagerly_equals_jitted_and_reuses_the_program():
  jac = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.5, -0.2, 0.3]])
  gram = jac @ jac.T
  before = _cache_size()
  first = gw.cagrad(gram, c=0.4)
  again = gw.cagrad(2.0 * gram, first.state, c=0.4)
  assert _cache_size() - before <= 2  # a state of None is another signature
  jitted = jax.jit(lambda g: gw.cagrad(g, c=0.4))(gram)
  np.testing.assert_allclose(first.weights, jitted.weights, rtol=1e-6)
  np.testing.assert_allclose(again.weights, first.weights, rtol=1e-5)


def test_factory_update_eagerly_equals_jitted_with_non_finite_input():
  tx = mo.mgda(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])}
  state = tx.init(params)
  eager_out = tx.update(grads, state, params)
  jit_out = jax.jit(tx.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(eager_out), jax.tree.leaves(jit_out)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  bad = {"w": grads["w"].at[0, 0].set(jnp.nan)}
  for update_fn in (tx.update, jax.jit(tx.update)):
    update, new_state = update_fn(bad, eager_out[1], params)
    assert np.all(np.isnan(update["w"]))
    for a, b in zip(jax.tree.leaves(new_state),
                    jax.tree.leaves(eager_out[1])):
      np.testing.assert_array_equal(a, b)
