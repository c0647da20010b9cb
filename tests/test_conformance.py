"""Conformance suite: every public method of the registry, every contract check.

A method joins by adding a ``MethodCase`` to a module of ``tests/cases``.
The checks follow the contract of the README: shapes, extra arguments, errors, degenerate input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests.conftest import all_cases, linear_loss_fn, params_like, stacked_tree

CASES = all_cases()
NUM_TASKS = 3


def _update(tx, grads, state=None, params=None, losses=None, case=None):
  params = params_like(grads) if params is None else params
  state = tx.init(params) if state is None else state
  num_tasks = jax.tree.leaves(grads)[0].shape[0]
  losses = jnp.linspace(1.0, 2.0, num_tasks) if losses is None else losses
  return tx.update(grads, state, params, **_extras(case, grads, params, losses))


def _extras(case, grads, params, losses):
  return case.extras(params, losses, linear_loss_fn(grads, params, losses))


def _allclose(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol, atol=atol)


#: Methods that take every check in the default run: one per kind of solver
#: (min-norm, dual cone, bargaining) and a loss weighting; each costs about
#: 25 s of CPU there. Every other method takes the core checks (jit equals
#: eager, shapes and dtypes, the errors) by default and the rest under
#: ``-m slow``.
REPRESENTATIVE = {"mgda", "famo"}
#: Degenerate inputs of the default run (on the representative methods).
REPRESENTATIVE_INPUTS = {"all_zero", "huge", "k_equals_1"}
_SLOW = pytest.mark.slow


def _every_case():
  return [pytest.param(c, id=c.name) for c in CASES]


def _representative_cases():
  return [pytest.param(c, id=c.name,
                       marks=() if c.name in REPRESENTATIVE else _SLOW)
          for c in CASES]


def _one_case_per_factory():
  """Every case; those after the first of their factory (configuration
  variants: CAGrad-Fast, MARIGOLD's estimators, two-batch inputs, ...)
  under ``-m slow``."""
  seen, params = set(), []
  for c in CASES:
    params.append(pytest.param(c, id=c.name,
                               marks=_SLOW if c.factory in seen else ()))
    seen.add(c.factory)
  return params


every_case = pytest.mark.parametrize("case", _every_case())
every_factory = pytest.mark.parametrize("case", _one_case_per_factory())
representative_case = pytest.mark.parametrize("case", _representative_cases())


def test_registry_covers_public_factories():
  """Every public factory returning a transformation is in the registry."""
  registered = {c.factory for c in CASES}
  helpers = {
      "value_and_task_grads", "value_and_task_grads_from_batches",
      "value_and_weighted_grad", "value_and_representation_grads",
      "delta_m_flat", "delta_m_per_task", "masked_loss_fn",
      "gram_vector_product", "task_affinity", "select_task_groups",
      "apply_task_gradients", "label_by_path", "nnx_loss_fn", "nnx_train_step",
      "nnx_value_and_task_grads", "nnx_value_and_weighted_grad",
      "task_weights", "value_and_gram", "value_and_gram_weighted_grad",
      "nnx_value_and_gram_weighted_grad",
      "constant"}  # deprecated alias of linear_scalarization
  for name in mo.__all__:
    obj = getattr(mo, name)
    if name in helpers or isinstance(obj, type) or not callable(obj):
      continue
    if name[0].isupper():
      continue
    assert obj in registered, f"mo.{name} is not in the conformance registry"


@every_factory
def test_jit_matches_eager_over_two_steps(case):
  tx = case.make(NUM_TASKS)
  grads = stacked_tree(jax.random.PRNGKey(0), NUM_TASKS)
  grads2 = stacked_tree(jax.random.PRNGKey(1), NUM_TASKS)
  params = params_like(grads)
  losses = jnp.array([1.0, 2.0, 0.5])

  def two_steps(init, update):
    state = init(params)
    u1, state = update(grads, state, params, losses)
    u2, state = update(grads2, state, params, losses)
    return u1, u2, state

  def update(g, state, params, losses):
    return tx.update(g, state, params, **_extras(case, g, params, losses))

  eager = two_steps(tx.init, update)
  # One compiled update, called twice: the state carried between the calls
  # is what a jitted training loop carries.
  jitted = two_steps(jax.jit(tx.init), jax.jit(update))
  _allclose(eager[:2], jitted[:2], rtol=case.jit_rtol, atol=1e-5)
  _allclose(optax.tree.get(eager[2], "weights"),
            optax.tree.get(jitted[2], "weights"), rtol=case.jit_rtol,
            atol=1e-5)


@every_case
def test_output_shape_dtype_and_weights_field(case):
  tx = case.make(NUM_TASKS)
  grads = stacked_tree(jax.random.PRNGKey(0), NUM_TASKS)
  update, state = _update(tx, grads, case=case)
  params = params_like(grads)
  assert jax.tree.structure(update) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(update), jax.tree.leaves(params)):
    assert u.shape == p.shape and u.dtype == p.dtype
    assert np.all(np.isfinite(u))
  weights = optax.tree.get(state, "weights")
  assert weights.shape == (NUM_TASKS,)
  assert np.all(np.isfinite(weights))


@representative_case
def test_permuting_tasks_permutes_weights(case):
  if not (case.deterministic and case.permutation_equivariant):
    pytest.skip("randomised or positional method")
  tx = case.make(NUM_TASKS)
  grads = stacked_tree(jax.random.PRNGKey(4), NUM_TASKS)
  losses = jnp.array([1.0, 2.0, 0.5])
  perm = np.array([2, 0, 1])
  u, s = _update(tx, grads, losses=losses, case=case)
  up, sp = _update(tx, jax.tree.map(lambda g: g[perm], grads),
                   losses=losses[perm], case=case)
  _allclose(u, up, rtol=2e-3, atol=2e-4)
  _allclose(np.asarray(optax.tree.get(s, "weights"))[perm],
            optax.tree.get(sp, "weights"), rtol=2e-3, atol=2e-4)


@representative_case
def test_chains_with_adam_and_trains_every_task(case):
  """A short run on a conflicting quadratic problem lowers every task loss."""
  if not case.trains_every_task:
    pytest.skip("method does not promise per-task descent")
  # Task optima at (+-2, 0) and (0, 3). The start sits inside the sphere with
  # diameter t1 t2 (||theta0||^2 < 4), so g1 and g2 conflict, and far enough
  # out (||theta0||^2 > 1) that the average-loss optimum, the centroid
  # (0, 1), is better than the start for every task.
  targets = jnp.array([[2.0, 0, 0, 0, 0], [-2.0, 0, 0, 0, 0],
                       [0.0, 3.0, 0, 0, 0]])

  def task_losses(params):
    theta = jnp.concatenate([params["a"], params["b"]])
    return 0.5 * jnp.sum((theta[None] - targets) ** 2, axis=1)

  params = {"a": jnp.array([0.0, -1.2, 0.6]), "b": jnp.array([0.3, -0.3])}
  grads0 = mo.value_and_task_grads(task_losses)(params)[1]
  gram = sum(np.einsum("ki,li->kl", g.reshape(NUM_TASKS, -1),
                       g.reshape(NUM_TASKS, -1)) for g in jax.tree.leaves(grads0))
  assert np.min(gram) < 0, "the test problem must have conflicting gradients"
  # Adam's eps is raised from 1e-8: the min-norm directions are exactly zero
  # along the first axis here (tasks 1 and 2 are mirror images), and Adam
  # with eps = 1e-8 would blow that coordinate's rounding noise (~1e-8) up
  # to full lr-sized steps, which is Adam's doing, not the method's.
  tx = optax.chain(case.make(NUM_TASKS), optax.adam(0.02, eps=1e-4))

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      losses, grads = mo.value_and_task_grads(task_losses)(params)
      updates, state = tx.update(grads, state, params,
                                 **case.extras(params, losses, task_losses))
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None,
                                  length=40)
    return params

  before = np.asarray(task_losses(params))
  after = np.asarray(task_losses(run(params)))
  assert np.all(after < before), (before, after)


@representative_case
def test_partition_shared_and_heads(case):
  """Method on shared leaves, plain task sum on heads, via optax.partition."""
  tx_alone = case.make(NUM_TASKS)
  shared = stacked_tree(jax.random.PRNGKey(5), NUM_TASKS)
  heads = {"h": jax.random.normal(jax.random.PRNGKey(6), (NUM_TASKS, 2))}
  grads = {"shared": shared, "heads": heads}
  params = params_like(grads)
  tx = optax.partition(
      {"shared": case.make(NUM_TASKS), "head": mo.task_sum(NUM_TASKS)},
      {"shared": "shared", "heads": "head"})
  losses = jnp.array([1.0, 2.0, 0.5])
  state = tx.init(params)
  update, _ = tx.update(grads, state, params,
                        **_extras(case, grads, params, losses))
  alone, _ = _update(tx_alone, shared, losses=losses, case=case)
  _allclose(update["shared"], alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(update["heads"]["h"], heads["h"].sum(0),
                             rtol=1e-6)


@representative_case
def test_inject_hyperparams_with_static_ints(case):
  kwargs = dict(case.kwargs)
  injected = optax.inject_hyperparams(
      case.factory, static_args=case.static_args())(num_tasks=NUM_TASKS,
                                                    **kwargs)
  grads = stacked_tree(jax.random.PRNGKey(7), NUM_TASKS)
  params = params_like(grads)
  losses = jnp.array([1.0, 2.0, 0.5])
  step = jax.jit(lambda s, g: injected.update(
      g, s, params, **_extras(case, g, params, losses)))
  update, state = step(injected.init(params), grads)
  plain, _ = _update(case.make(NUM_TASKS), grads, losses=losses, case=case)
  _allclose(update, plain, rtol=1e-4, atol=1e-5)
  assert optax.tree.get(state, "weights").shape == (NUM_TASKS,)


def _degenerate_inputs():
  base = np.array([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0],
                   [-1.0, 0.2, 0.3, -0.4]], np.float32)
  return {
      "all_zero": np.zeros((3, 4), np.float32),
      "one_zero": base * np.array([[1.0], [0.0], [1.0]], np.float32),
      "identical": np.repeat(base[:1], 3, axis=0),
      "opposite": np.stack([base[0], -base[0]]),
      "k_equals_1": base[:1],
      "tiny": base * np.float32(1e-30),
      "huge": base * np.float32(1e30),
      "colinear": np.stack([base[0], 2 * base[0], 0.5 * base[0]]),
  }


def _degenerate_params():
  return [pytest.param(c, kind, id=f"{c.name}-{kind}", marks=(
      () if c.name in REPRESENTATIVE and kind in REPRESENTATIVE_INPUTS
      else _SLOW)) for c in CASES for kind in _degenerate_inputs()]


_JITTED_UPDATES = {}


def _jitted_update(case, num_tasks):
  """One jitted ``update`` per method and K, shared by the degenerate inputs
  of that K (their shapes agree): whether a finite input gives a finite
  output does not depend on a fresh compile."""
  key = (case.name, num_tasks)
  if key not in _JITTED_UPDATES:
    tx = case.make(num_tasks)
    _JITTED_UPDATES[key] = jax.jit(lambda g: _update(tx, g, case=case))
  return _JITTED_UPDATES[key]


@pytest.mark.parametrize("case,kind", _degenerate_params())
def test_degenerate_inputs_are_finite(case, kind):
  grads = jnp.asarray(_degenerate_inputs()[kind])
  num_tasks = grads.shape[0]
  if num_tasks < case.min_tasks:
    pytest.skip(f"method needs at least {case.min_tasks} tasks")
  update, state = _jitted_update(case, num_tasks)(grads)
  assert np.all(np.isfinite(update)), (kind, update)
  assert np.all(np.isfinite(optax.tree.get(state, "weights")))
  if kind == "all_zero":
    np.testing.assert_array_equal(update, np.zeros(4))


@representative_case
def test_bfloat16_gradients(case):
  grads32 = stacked_tree(jax.random.PRNGKey(8), NUM_TASKS)
  grads16 = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads32)
  tx = case.make(NUM_TASKS)
  update16, _ = jax.jit(lambda g: _update(tx, g, case=case))(grads16)
  update32, _ = _update(tx, jax.tree.map(lambda g: g.astype(jnp.float32),
                                         grads16), case=case)
  for u16, u32 in zip(jax.tree.leaves(update16), jax.tree.leaves(update32)):
    assert u16.dtype == jnp.bfloat16
    scale = np.max(np.abs(np.asarray(u32))) + 1e-6
    np.testing.assert_allclose(np.asarray(u16, np.float32), u32,
                               atol=0.05 * scale)


@representative_case
def test_float64_with_x64(case):
  with jax.enable_x64(True):
    grads = jax.tree.map(lambda g: g.astype(jnp.float64),
                         stacked_tree(jax.random.PRNGKey(9), NUM_TASKS))
    update, state = _update(case.make(NUM_TASKS), grads, case=case)
    assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(update))
    assert optax.tree.get(state, "weights").dtype == jnp.float64


@representative_case
def test_nan_propagates_and_apply_if_finite_skips(case):
  """NaN in -> NaN out; chain(method, apply_if_finite(opt)) skips the step.

  ``apply_if_finite`` cannot wrap a chain that starts with a stacked-task
  method (its skip branch returns zeros shaped like the stacked input), so it
  wraps the optimizer after the method; the method keeps its previous state.
  """
  grads = stacked_tree(jax.random.PRNGKey(10), NUM_TASKS)
  good = stacked_tree(jax.random.PRNGKey(11), NUM_TASKS)
  grads["dense"]["bias"] = grads["dense"]["bias"].at[1, 0].set(jnp.nan)
  params = jax.tree.map(lambda g: jnp.ones(g.shape[1:]), grads)
  tx = optax.chain(case.make(NUM_TASKS),
                   optax.apply_if_finite(optax.sgd(0.1), 3))
  losses = jnp.ones(NUM_TASKS)
  state = tx.init(params)
  _, state = tx.update(good, state, params,
                       **_extras(case, good, params, losses))
  updates, bad_state = tx.update(grads, state, params,
                                 **_extras(case, grads, params, losses))
  new_params = optax.apply_updates(params, updates)
  _allclose(new_params, params, rtol=0, atol=0)
  assert int(bad_state[1].notfinite_count) == 1
  _allclose(bad_state[0], state[0], rtol=0, atol=0)
  raw, _ = _update(case.make(NUM_TASKS), grads, case=case)
  assert not all(np.all(np.isfinite(u)) for u in jax.tree.leaves(raw))


@every_case
def test_wrong_leading_axis_is_a_clear_error(case):
  tx = case.make(NUM_TASKS)
  grads = stacked_tree(jax.random.PRNGKey(0), NUM_TASKS)
  grads["dense"]["kernel"] = grads["dense"]["kernel"][:2]
  params = params_like(stacked_tree(jax.random.PRNGKey(0), NUM_TASKS))
  with pytest.raises(ValueError, match=r"kernel.*\(2, 4, 3\).*num_tasks=3"):
    tx.update(grads, tx.init(params), params,
              **case.extras(params, jnp.ones(NUM_TASKS)))


@every_case
def test_wrong_task_losses_shape_is_a_clear_error(case):
  tx = case.make(NUM_TASKS)
  grads = stacked_tree(jax.random.PRNGKey(0), NUM_TASKS)
  params = params_like(grads)
  extras = _extras(case, grads, params, jnp.ones(NUM_TASKS))
  extras["task_losses"] = jnp.ones(NUM_TASKS + 1)
  with pytest.raises(ValueError, match="task_losses"):
    tx.update(grads, tx.init(params), params, **extras)


@every_case
def test_traced_num_tasks_is_rejected(case):
  with pytest.raises(TypeError, match="static"):
    optax.inject_hyperparams(case.factory)(num_tasks=NUM_TASKS,
                                           **case.kwargs).init(jnp.zeros(2))
