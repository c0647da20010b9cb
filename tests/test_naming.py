"""Printing a method shows its factory call; bad task counts are refused."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src import cagrad as cagrad_module
from tests.conftest import all_cases


def test_repr_shows_name_and_every_hyper_parameter():
  assert repr(mo.cagrad(3, c=0.4)) == (
      "cagrad(num_tasks=3, c=0.4, rescale=1, max_iter=500, tol=None, "
      "warm_start=True, num_sampled_tasks=None, seed=0)")
  assert str(mo.mgda(2, max_iter=7)) == (
      "mgda(num_tasks=2, max_iter=7, tol=None, warm_start=True)")
  assert repr(mo.upgrad(2, pref_vector=jnp.array([0.25, 0.75]))).startswith(
      "upgrad(num_tasks=2, pref_vector=[0.25, 0.75], reg_eps=0.0001")
  # A wrapper shows the method it wraps.
  assert repr(mo.ema_weights(2, mo.mgda(2), decay=0.5)) == (
      "ema_weights(num_tasks=2, inner=mgda(num_tasks=2, max_iter=500, "
      "tol=None, warm_start=True), decay=0.5)")


@pytest.mark.parametrize("case", all_cases(), ids=str)
def test_every_public_method_prints_its_factory_name(case):
  tx = case.make(3)
  name = case.factory.__name__
  assert repr(tx).startswith(f"{name}(") and "num_tasks=3" in repr(tx)
  # Still the factory's transformation: same class family and functions.
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  init, update = tx
  assert init is tx.init and update is tx.update


def test_printable_transformation_behaves_like_the_plain_one():
  grads = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  params = jnp.zeros(2)
  named, plain = mo.cagrad(2, c=0.4), cagrad_module.cagrad(2, c=0.4)
  assert "cagrad(" not in repr(plain)
  expected, _ = plain.update(grads, plain.init(params), params)
  got, _ = jax.jit(named.update)(grads, named.init(params), params)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # optax.chain keeps optax's own repr and runs it.
  chained = optax.chain(named, optax.sgd(1.0))
  out, _ = chained.update(grads, chained.init(params), params)
  np.testing.assert_allclose(out, -np.asarray(expected), rtol=1e-6)
  # inject_hyperparams calls the factory inside init and update.
  injected = optax.inject_hyperparams(mo.cagrad, static_args=("num_tasks",))(
      num_tasks=2, c=0.4)
  out, state = injected.update(grads, injected.init(params), params)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert float(state.hyperparams["c"]) == pytest.approx(0.4)
  # Loss weightings keep their class and single-backward rule.
  famo = mo.famo(2)
  assert isinstance(famo, mo.LossWeightingTransformation)
  assert repr(famo).startswith("famo(num_tasks=2, learning_rate=0.025")


def test_factories_keep_docstrings_and_signatures():
  assert mo.cagrad.__doc__ == cagrad_module.cagrad.__doc__
  assert inspect.signature(mo.cagrad) == inspect.signature(
      cagrad_module.cagrad)
  assert mo.cagrad.__name__ == "cagrad"


@pytest.mark.parametrize("bad", [3.0, np.float32(2.0), 2.5, True, np.bool_(1),
                                 "2"])
def test_non_integer_task_counts_are_refused(bad):
  with pytest.raises(TypeError, match="num_tasks must be an int"):
    mo.mgda(bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_task_counts_are_refused(bad):
  with pytest.raises(ValueError, match="num_tasks must be >= 1"):
    mo.cagrad(bad)


def test_numpy_integer_task_count_is_accepted():
  assert repr(mo.mgda(np.int64(2))).startswith("mgda(num_tasks=2,")
