"""Property-based tests (hypothesis) over every method of the registry.

Every method runs as ``optax.chain(method, optax.apply_if_finite(sgd))`` on
inputs drawn by hypothesis: random magnitudes (1e-30 ... 1e30), the
degenerate gradients of the contract (all zero, one task zero, identical,
exactly opposite, multiples of one vector with mixed signs, K = 1), extreme
and zero losses, and non-finite gradients or losses. The properties:

* finite input: the method's update is finite (``apply_if_finite`` counts no
  error), shaped like ``params`` with the params' dtype, and the state stays
  finite;
* non-finite input: the update is non-finite, so ``apply_if_finite`` skips
  the step (its error count grows, the parameters do not move), and the
  method's state equals the previous one. A method that ignores the losses
  may instead return exactly what it returns for finite losses;
* jit == eager on finite input, within the case's ``jit_rtol``.

Compilation dominates the cost: hypothesis draws values for one compiled step
per (method, K, tree, dtype), cached, and never shrinks (each shrink step
would be another compile). The default tier uses one configuration per
method (K = 3, a leaf whose first axis equals K, a vector and a scalar, in
float32); the ``slow`` tier draws K, trees and dtypes.

Known defects are listed in ``KNOWN_DEFECTS`` and run as strict xfails: when
a fix lands the test turns into a failure that asks for the entry's removal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import all_cases, linear_loss_fn

CASES = all_cases()
_BY_NAME = {c.name: c for c in CASES}

#: (case name, input kind) -> the defect, one line. Delete an entry when its
#: fix lands (the strict xfail then fails as XPASS until it is deleted).

KNOWN_DEFECTS: dict[tuple[str, str], str] = {}

FINITE_KINDS = ("random", "all_zero", "one_zero", "identical", "opposite",
                "tiny", "huge", "mixed_scale", "rank_one", "zero_loss",
                "extreme_loss")
NONFINITE_KINDS = ("nan_grad", "inf_grad", "nan_loss", "pos_inf_loss",
                   "neg_inf_loss")
LOSS_KINDS = ("nan_loss", "pos_inf_loss", "neg_inf_loss")

#: The default tier's tree: a leaf whose first axis equals K = 3, a vector
#: and a scalar.
DEFAULT_SHAPES = ((3, 2), (2,), ())
#: Largest decimal exponent of a finite input, per gradient dtype.
_MAX_EXPONENT = {"float32": 30, "bfloat16": 30, "float16": 4, "float64": 30}

_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 phases=(Phase.explicit, Phase.generate),
                 suppress_health_check=list(HealthCheck))


def _marked(case_name: str, kind: str, *marks):
  """``pytest.param(case, kind)`` with a strict xfail if it is a known
  defect."""
  marks = list(marks)
  reason = KNOWN_DEFECTS.get((case_name, kind))
  if reason is not None:
    marks.append(pytest.mark.xfail(strict=True, reason=reason))
  return pytest.param(case_name, kind, marks=marks,
                      id=f"{case_name}-{kind}")


def _fixed_num_tasks(case) -> int | None:
  """K = 3 for cases whose arguments hold one value per task."""
  for key, value in case.kwargs.items():
    if key not in ("inner", "candidates") and np.ndim(value) == 1:
      return len(value)
  return None


# ----------------------------------------------------------------------------
# One compiled step per configuration.


@functools.lru_cache(maxsize=None)
def stepper(case_name: str, num_tasks: int, shapes: tuple, dtype: str,
            jitted: bool, x64: bool = False):
  """``(tx, params, step)`` with ``tx = chain(method, apply_if_finite(sgd))``
  and ``step(grads, state, losses) -> (updates, state)``. ``x64`` only keys
  the cache (a program traced under ``jax_enable_x64`` differs)."""
  del x64
  case = _BY_NAME[case_name]
  tx = optax.chain(case.make(num_tasks),
                   optax.apply_if_finite(optax.sgd(1.0),
                                         max_consecutive_errors=10**6))
  params = {f"p{i}": jnp.zeros(s, dtype) for i, s in enumerate(shapes)}

  def step(grads, state, losses):
    loss_fn = linear_loss_fn(grads, params, losses)
    return tx.update(grads, state, params,
                     **case.extras(params, losses, loss_fn))

  return tx, params, (jax.jit(step) if jitted else step)


# ----------------------------------------------------------------------------
# Inputs.

#: What hypothesis draws: one seed, a decimal exponent, a task index and an
#: entry index. The kinds interpret them, so every kind draws the same
#: sequence of configurations (and reuses their compiled steps).
VALUES = st.tuples(st.integers(0, 2**32 - 1), st.integers(-30, 30),
                   st.integers(0, 5), st.integers(0, 10**6))


def _loss_dtype(dtype: str):
  return jnp.float64 if dtype == "float64" else jnp.float32


def make_inputs(kind: str, values, num_tasks: int, shapes, dtype: str):
  """``(grads, losses, clean_losses)``: stacked gradients ``{p_i: (K, *s_i)}``
  and the (K,) losses of one input kind; ``clean_losses`` are the finite
  losses a non-finite loss replaces."""
  seed, exponent, task, entry = values
  rng = np.random.default_rng(seed)
  task %= num_tasks
  top = _MAX_EXPONENT[dtype]
  exponent = int(np.clip(exponent, -top, top))
  flat = rng.normal(size=(num_tasks, sum(int(np.prod(s)) for s in shapes)))
  scale = np.full((num_tasks, 1), 10.0**exponent)
  if kind == "tiny":
    scale[:] = 10.0**-top
  elif kind == "huge":
    scale[:] = 10.0**top
  elif kind == "mixed_scale":
    scale = 10.0**rng.choice([-top, top], size=(num_tasks, 1))
  flat = flat * scale
  if kind == "rank_one":  # multiples of one vector, signs mixed
    multiples = rng.normal(size=(num_tasks, 1))
    flat = multiples / np.max(np.abs(multiples)) * flat[:1]  # no new peak
  if kind == "all_zero":
    flat[:] = 0.0
  elif kind == "one_zero":
    flat[task] = 0.0
  elif kind == "identical":
    flat[:] = flat[0]
  elif kind == "opposite":
    flat[1::2] = -flat[0]
    flat[0::2] = flat[0]
  losses = rng.uniform(0.5, 2.0, num_tasks) * 10.0**rng.integers(-3, 4)
  if kind == "zero_loss":
    losses[task] = 0.0
  elif kind == "extreme_loss":
    losses = rng.uniform(0.5, 2.0, num_tasks) * 10.0**rng.choice(
        [-30, 30], num_tasks)
  clean_losses = losses.copy()
  if kind in ("nan_grad", "inf_grad") and flat.shape[1]:
    flat[task, entry % flat.shape[1]] = (
        np.nan if kind == "nan_grad" else rng.choice([-np.inf, np.inf]))
  elif kind in LOSS_KINDS:
    losses[task] = {"nan_loss": np.nan, "pos_inf_loss": np.inf,
                    "neg_inf_loss": -np.inf}[kind]
  grads, start = {}, 0
  for i, s in enumerate(shapes):
    size = int(np.prod(s))
    grads[f"p{i}"] = jnp.asarray(
        flat[:, start:start + size].reshape((num_tasks, *s)), dtype)
    start += size
  as_losses = lambda x: jnp.asarray(x, _loss_dtype(dtype))
  return grads, as_losses(losses), as_losses(clean_losses)


def warm_inputs(num_tasks: int, shapes, dtype: str):
  """Unit-scale random gradients and losses for the step before the one
  under test (so the state under test is not the initial one)."""
  return make_inputs("random", (12345, 0, 0, 0), num_tasks, shapes, dtype)[:2]


# ----------------------------------------------------------------------------
# Assertions.


def _arrays(tree):
  out = []
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out.append(np.asarray(leaf))
  return out


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x.astype(np.float64)))
             for x in _arrays(tree) if np.issubdtype(x.dtype, np.inexact)
             or x.dtype.name == "bfloat16")


def _tree_equal(a, b) -> bool:
  xs, ys = _arrays(a), _arrays(b)
  return len(xs) == len(ys) and all(
      x.shape == y.shape and np.array_equal(
          x.astype(np.float64), y.astype(np.float64), equal_nan=True)
      for x, y in zip(xs, ys))


def _notfinite_count(chain_state) -> int:
  return int(chain_state[1].notfinite_count)


def check_kind(kind: str, num_tasks: int, shapes, dtype: str, step, tx,
               params, values) -> None:
  """One warm step, then one step on ``kind``'s input; asserts the
  properties of the module docstring."""
  warm_grads, warm_losses = warm_inputs(num_tasks, shapes, dtype)
  _, before = step(warm_grads, tx.init(params), warm_losses)
  assert _notfinite_count(before) == 0, "the warm-up step is not finite"
  grads, losses, clean_losses = make_inputs(kind, values, num_tasks, shapes,
                                            dtype)
  updates, after = step(grads, before, losses)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert (u.shape, u.dtype) == (p.shape, p.dtype), (u.shape, u.dtype)
  if kind in FINITE_KINDS:
    assert _notfinite_count(after) == 0, f"non-finite update on {kind} input"
    assert _all_finite(after[0]), f"non-finite state on {kind}: {after[0]}"
    return
  if kind in LOSS_KINDS:
    clean_updates, clean_after = step(grads, before, clean_losses)
    if (_notfinite_count(clean_after) == 0
        and _tree_equal(updates, clean_updates)
        and _tree_equal(after[0], clean_after[0])):
      return  # the method ignores the losses: nothing to corrupt.
  assert _notfinite_count(after) == 1, (
      f"finite update on {kind} input: apply_if_finite does not skip it")
  assert all(np.all(x == 0) for x in _arrays(updates)), "params moved"
  assert _tree_equal(after[0], before[0]), (
      f"the method's state changed on {kind} input")


# ----------------------------------------------------------------------------
# Default tier: one configuration per method, values drawn by hypothesis.


def _default_params():
  return [_marked(c.name, kind) for c in CASES
          for kind in FINITE_KINDS + NONFINITE_KINDS]


@pytest.mark.parametrize(("case_name", "kind"), _default_params())
@settings(max_examples=3, **_SETTINGS)
@given(values=VALUES)
def test_properties_default_tree(case_name, kind, values):
  tx, params, step = stepper(case_name, 3, DEFAULT_SHAPES, "float32", True)
  check_kind(kind, 3, DEFAULT_SHAPES, "float32", step, tx, params, values)


def _jit_eager_params():
  return [_marked(c.name, "jit_vs_eager") for c in CASES]


def assert_jit_matches_eager(case_name, num_tasks, shapes, dtype, values,
                             x64=False):
  case = _BY_NAME[case_name]
  tx, params, jitted = stepper(case_name, num_tasks, shapes, dtype, True, x64)
  _, _, eager = stepper(case_name, num_tasks, shapes, dtype, False, x64)
  warm_grads, warm_losses = warm_inputs(num_tasks, shapes, dtype)
  grads, losses, _ = make_inputs("random", values, num_tasks, shapes, dtype)
  results = []
  for step in (eager, jitted):
    _, state = step(warm_grads, tx.init(params), warm_losses)
    results.append(step(grads, state, losses))
  (eager_updates, eager_state), (jit_updates, jit_state) = results
  # Updates: relative to each leaf's scale (inputs reach 1e+-30), and at
  # least to the solver tolerance times the leaf's gradients: an update that
  # nearly cancels (the origin almost in the gradients' hull) is a sum of
  # gradients whose weights an iterative solver only knows to its
  # tolerance, so jit and eager round it differently. State: weights, EMAs
  # and solver diagnostics such as residuals, which are O(1) or below and
  # only need to agree to the tolerance (a residual near the solver's
  # stopping tolerance may be 0 one way and 5e-5 the other).
  grad_scales = [np.max(np.abs(np.asarray(g, np.float64)), initial=0.0)
                 for g in _arrays(grads)]
  for x, y, grad_scale in zip(_arrays(eager_updates), _arrays(jit_updates),
                              grad_scales):
    x, y = x.astype(np.float64), y.astype(np.float64)
    atol = max(1e-5 * np.max(np.abs(x), initial=0.0),
               case.jit_rtol * grad_scale)
    np.testing.assert_allclose(y, x, rtol=case.jit_rtol, atol=atol + 1e-30)
  for x, y in zip(_arrays(eager_state), _arrays(jit_state)):
    x, y = x.astype(np.float64), y.astype(np.float64)
    scale = max(np.max(np.abs(x), initial=0.0), 1.0)
    np.testing.assert_allclose(y, x, rtol=case.jit_rtol,
                               atol=max(1e-5 * scale, case.jit_rtol))


@pytest.mark.parametrize(("case_name", "kind"), _jit_eager_params())
@settings(max_examples=1, **_SETTINGS)
@given(values=VALUES)
def test_jit_matches_eager_default_tree(case_name, kind, values):
  del kind
  assert_jit_matches_eager(case_name, 3, DEFAULT_SHAPES, "float32", values)


def _nonfinite_params():
  out = []
  for c in CASES:
    for kind in NONFINITE_KINDS:
      for mode in ("jit", "eager"):
        eager_only_in_slow = mode == "eager" and kind != "nan_grad"
        slow = (pytest.mark.slow,) if eager_only_in_slow else ()
        out.append(_marked(c.name, f"{kind}@{mode}", *slow))
  return out


@pytest.mark.parametrize(("case_name", "kind"), _nonfinite_params())
def test_nonfinite_propagates_eager_and_jit(case_name, kind):
  """NaN/inf in, skipped step out, under jit and eagerly (XLA may rewrite a
  multiply into a select under jit, which drops the NaN)."""
  kind, mode = kind.split("@")
  tx, params, step = stepper(case_name, 3, DEFAULT_SHAPES, "float32",
                             mode == "jit")
  check_kind(kind, 3, DEFAULT_SHAPES, "float32", step, tx, params,
             (7, 0, 1, 4))


# ----------------------------------------------------------------------------
# Slow tier: random K, trees and dtypes.

#: Leaf shapes a tree draws from; "K" is replaced by the number of tasks.
_LEAF_SHAPES = ((), (3,), ("K",), ("K", 2), (2, 1, 3))


@st.composite
def configs(draw, case):
  fixed = _fixed_num_tasks(case)
  num_tasks = fixed or draw(st.integers(max(1, case.min_tasks), 6))
  leaves = draw(st.lists(st.sampled_from(_LEAF_SHAPES), min_size=1,
                         max_size=3))
  shapes = tuple(tuple(num_tasks if d == "K" else d for d in s)
                 for s in leaves)
  return num_tasks, shapes


def _slow_params():
  return [_marked(c.name, dtype, pytest.mark.slow) for c in CASES
          for dtype in ("float32", "bfloat16", "float16")]


def _kinds_to_check(case_name, num_tasks):
  kinds = [k for k in FINITE_KINDS + NONFINITE_KINDS
           if (case_name, k) not in KNOWN_DEFECTS]
  if num_tasks < 2:
    kinds = [k for k in kinds if k != "opposite"]
  return kinds


@pytest.mark.parametrize(("case_name", "kind"), _slow_params())
@settings(max_examples=4, **_SETTINGS)
@given(data=st.data(), values=VALUES)
def test_properties_random_trees_and_dtypes(case_name, kind, data, values):
  """Every input kind that is not a known defect of the default tier, on a
  random K and tree in one dtype (``kind`` here names the dtype)."""
  dtype = kind
  num_tasks, shapes = data.draw(configs(_BY_NAME[case_name]))
  tx, params, step = stepper(case_name, num_tasks, shapes, dtype, True)
  for input_kind in _kinds_to_check(case_name, num_tasks):
    check_kind(input_kind, num_tasks, shapes, dtype, step, tx, params, values)
  if dtype == "float32":
    assert_jit_matches_eager(case_name, num_tasks, shapes, dtype, values)


def _k1_params():
  return [_marked(c.name, "k1", pytest.mark.slow) for c in CASES
          if c.min_tasks <= 1 and _fixed_num_tasks(c) is None]


@pytest.mark.parametrize(("case_name", "kind"), _k1_params())
@settings(max_examples=2, **_SETTINGS)
@given(values=VALUES)
def test_properties_one_task(case_name, kind, values):
  del kind
  tx, params, step = stepper(case_name, 1, DEFAULT_SHAPES, "float32", True)
  for input_kind in _kinds_to_check(case_name, 1):
    check_kind(input_kind, 1, DEFAULT_SHAPES, "float32", step, tx, params,
               values)


def _zero_size_params():
  return [_marked(c.name, "zero_size_leaf", pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize(("case_name", "kind"), _zero_size_params())
def test_zero_size_leaf(case_name, kind):
  """Plain optax accepts zero-size leaves; so must every method."""
  del kind
  shapes = ((3, 2), (0,), (2, 0, 1))
  tx, params, step = stepper(case_name, 3, shapes, "float32", True)
  for input_kind in ("random", "all_zero", "nan_grad"):
    check_kind(input_kind, 3, shapes, "float32", step, tx, params,
               (3, 0, 1, 2))


def _x64_params():
  return [_marked(c.name, f"x64_{dtype}", pytest.mark.slow) for c in CASES
          for dtype in ("float64", "float32")]


@pytest.mark.parametrize(("case_name", "kind"), _x64_params())
@settings(max_examples=2, **_SETTINGS)
@given(values=VALUES)
def test_properties_under_x64(case_name, kind, values):
  """With ``jax_enable_x64``: float64 gradients, and float32 gradients
  (which must stay float32 through the solvers)."""
  dtype = kind.removeprefix("x64_")
  with jax.enable_x64(True):
    tx, params, step = stepper(case_name, 3, DEFAULT_SHAPES, dtype, True,
                               True)
    for input_kind in _kinds_to_check(case_name, 3):
      check_kind(input_kind, 3, DEFAULT_SHAPES, dtype, step, tx, params,
                 values)
    assert_jit_matches_eager(case_name, 3, DEFAULT_SHAPES, dtype, values,
                             x64=True)
