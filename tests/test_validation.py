"""Shared trace-time checks: every stacked method refuses the same mistakes
with the same clear message, and the construction-time validators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src import validation

# One method per builder: the Gram-based builder and the generic one.
STACKED = {
    "mgda": lambda k: mo.mgda(k),
    "graddrop": lambda k: mo.graddrop(k),
    "sdmgrad": lambda k: mo.sdmgrad(k),
    "trimmed_mean": lambda k: mo.trimmed_mean(k, trim_number=0),
}


@pytest.mark.parametrize("name", sorted(STACKED))
def test_unstacked_gradient_whose_first_axis_is_k_is_refused(name):
  tx = STACKED[name](3)
  params = {"w": jnp.zeros((3, 5)), "b": jnp.zeros(2)}
  grads = {"w": jnp.ones((3, 5)), "b": jnp.ones((3, 2))}
  with pytest.raises(ValueError,
                     match=r"\['w'\].*\(3, 5\).*\(3, 5\).*\(3, 3, 5\)"):
    tx.update(grads, tx.init(params), params)
  # The stacked tree passes, and without params the leading axis suffices.
  stacked = {"w": jnp.ones((3, 3, 5)), "b": jnp.ones((3, 2))}
  update, _ = tx.update(stacked, tx.init(params), params)
  assert update["w"].shape == (3, 5)
  tx.update(grads, tx.init(params))


def test_loss_weightings_still_accept_one_ordinary_gradient():
  tx = mo.gls(3)
  params = {"w": jnp.zeros((3, 5))}
  grads = {"w": jnp.ones((3, 5))}
  update, _ = tx.update(grads, tx.init(params), params,
                        task_losses=jnp.array([1.0, 2.0, 4.0]))
  np.testing.assert_array_equal(update["w"], grads["w"])


@pytest.mark.parametrize("name", sorted(STACKED))
def test_integer_gradients_are_refused_naming_leaf_and_dtype(name):
  tx = STACKED[name](2)
  grads = {"a": jnp.ones((2, 3)), "n": jnp.array([[1, 2], [2, 1]])}
  with pytest.raises(TypeError, match=r"\['n'\].*int32.*floating"):
    tx.update(grads, tx.init({"a": jnp.zeros(3), "n": jnp.zeros(2)}))


@pytest.mark.parametrize("name", sorted(STACKED))
def test_state_built_for_another_num_tasks_is_named(name):
  tx = STACKED[name](3)
  state = STACKED[name](4).init(jnp.zeros(2))
  with pytest.raises(ValueError, match=r"state.*\(4,\).*\(3,\).*num_tasks=3"):
    jax.jit(tx.update)(jnp.ones((3, 2)), state)


def test_task_sum_errors_name_task_sum():
  tx = mo.task_sum(2)
  with pytest.raises(ValueError, match="^task_sum:"):
    tx.update(jnp.ones((3, 2)), tx.init(jnp.zeros(2)))


@pytest.mark.parametrize("build, error, match", [
    (lambda: mo.cagrad(3, c=float("nan")), ValueError, "c must"),
    (lambda: mo.cagrad(3, c=float("inf")), ValueError, "c must be finite"),
    (lambda: mo.linear_scalarization(3, weights=(1.0, float("nan"), 1.0)),
     ValueError,
     "weights must be finite"),
    (lambda: mo.mgda(3, max_iter=0), ValueError, "max_iter"),
    (lambda: mo.mgda(3, max_iter=2.5), TypeError, "max_iter"),
    (lambda: mo.mgda(3, tol=-1.0), ValueError, "tol must be > 0"),
    (lambda: mo.moco(3, decay=2.0), ValueError, r"decay must be in \[0, 1\)"),
    (lambda: mo.moco(3, decay=1.0), ValueError, "decay"),
    (lambda: mo.random_weighting(3, seed=1.5), TypeError, "seed must be an int"),
    (lambda: mo.pcgrad(3, seed=2.5), TypeError, "seed must be an int"),
    (lambda: mo.cagrad(3, seed=jnp.array(1.0)), TypeError, "seed"),
    (lambda: mo.graddrop(3, leak=float("nan")), ValueError, "leak"),
    (lambda: mo.sdmgrad(3, momentum=1.0), ValueError, r"momentum.*\[0, 1\)"),
    (lambda: mo.sdmgrad(3, learning_rate=float("nan")), ValueError,
     "learning_rate must be > 0"),
    (lambda: mo.krum(5, n_byzantine=True), TypeError, "n_byzantine"),
    (lambda: mo.trimmed_mean(5, trim_number=-1), ValueError, "trim_number"),
    (lambda: mo.ema_weights(2, mo.mgda(2), decay=1.5), ValueError, "decay"),
    (lambda: mo.nash_mtl(2, max_iter=2.5), TypeError, "max_iter"),
])
def test_construction_errors(build, error, match):
  with pytest.raises(error, match=match):
    build()


def test_validators_are_lenient_with_traced_values_only():
  assert validation.static_int(np.int64(3), "n", "m", 1) == 3
  assert validation.static_int(2.0, "n", "m") == 2
  for bad in (True, "3", 1.5, np.ones(2)):
    with pytest.raises(TypeError):
      validation.static_int(bad, "n", "m")
  with pytest.raises(ValueError, match=r"m: n must be >= 1, got 0"):
    validation.static_int(0, "n", "m", 1)
  validation.check_probability(np.array([0.0, 1.0]), "p", "m")
  for bad in (-0.1, 1.1, float("nan")):
    with pytest.raises(ValueError):
      validation.check_probability(bad, "p", "m")
  with pytest.raises(ValueError):
    validation.check_probability(0.0, "p", "m", exclude_zero=True)

  def traced(x):  # traced hyper-parameters pass every value check
    validation.check_positive(x, "x", "m")
    validation.check_finite(x, "x", "m")
    validation.check_probability(x, "x", "m")
    return x
  jax.jit(traced)(-1.0)


# Old keyword spellings through optax.inject_hyperparams: (factory, the old
# keywords, the same arguments under the new names, the static arguments).
INJECTED_OLD_SPELLINGS = {
    "sdmgrad": (mo.sdmgrad, {"lr": 0.3, "num_iters": 4},
                {"learning_rate": 0.3, "max_iter": 4}, ("max_iter",)),
    "gradvac": (mo.gradvac, {"beta": 0.25}, {"decay": 0.75}, ()),
    "nash_mtl": (mo.nash_mtl, {"optim_niter": 7}, {"max_iter": 7},
                 ("max_iter", "update_every")),
}


@pytest.mark.parametrize("name", sorted(INJECTED_OLD_SPELLINGS))
def test_inject_hyperparams_accepts_old_spellings(name):
  factory, old, new, static = INJECTED_OLD_SPELLINGS[name]
  static = ("num_tasks",) + static
  grads = jnp.array([[1.0, 0.5, -2.0], [-1.0, 2.0, 0.5]])
  params = jnp.zeros(3)

  def run(**kwargs):
    tx = optax.inject_hyperparams(factory, static_args=static)(2, **kwargs)
    state = tx.init(params)
    update, _ = tx.update(grads, state, params)
    return update, state.hyperparams

  with pytest.warns(DeprecationWarning, match="is deprecated: use"):
    old_update, old_hyperparams = run(**old)
  new_update, new_hyperparams = run(**new)
  np.testing.assert_array_equal(np.asarray(old_update),
                                np.asarray(new_update))
  # The injected hyper-parameters are the new names, holding the value given.
  assert sorted(old_hyperparams) == sorted(new_hyperparams)
  assert not set(old) & set(old_hyperparams)
  for key, value in new.items():
    if key in new_hyperparams:
      np.testing.assert_allclose(np.asarray(old_hyperparams[key]), value,
                                 rtol=1e-6)


def test_renamed_arguments_signature_lists_old_names_keyword_only():
  import inspect  # pylint: disable=g-import-not-at-top
  params = inspect.signature(mo.nash_mtl).parameters
  assert params["max_iter"].default == 100
  for old in ("optim_niter", "update_weights_every"):
    assert params[old].kind is inspect.Parameter.KEYWORD_ONLY
  with pytest.raises(TypeError, match="got both"):
    inspect.signature(mo.nash_mtl).bind(2, optim_niter=3, max_iter=4)


# The same checks through the single-backward builder option (one ordinary
# gradient or stacked ones), for loss weightings and M-ConFIG alike.
SINGLE_BACKWARD = {
    "famo": lambda k: mo.famo(k),
    "psmgd": lambda k: mo.psmgd(k),
    "momentum_config": lambda k: mo.momentum_config(k),
    "marigold": lambda k: mo.marigold(k),
}


@pytest.mark.parametrize("name", sorted(SINGLE_BACKWARD))
def test_single_backward_methods_refuse_integer_leaves_and_foreign_states(
    name):
  params = {"a": jnp.zeros(3), "n": jnp.zeros(2)}
  tx, losses = SINGLE_BACKWARD[name](2), jnp.ones(2)
  grads = {"a": jnp.ones((2, 3)), "n": jnp.array([[1, 2], [2, 1]])}
  with pytest.raises(TypeError, match=r"\['n'\].*int32.*floating"):
    tx.update(grads, tx.init(params), params, task_losses=losses)
  state = SINGLE_BACKWARD[name](3).init(params)
  stacked = jax.tree.map(lambda p: jnp.ones((2, *p.shape)), params)
  with pytest.raises(ValueError, match=r"state.*\(3,\).*\(2,\).*num_tasks=2"):
    tx.update(stacked, state, params, task_losses=losses)
  # An ordinary gradient without params: the error says to pass them.
  with pytest.raises(ValueError, match="pass params|needs params"):
    tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params),
              task_losses=losses)
