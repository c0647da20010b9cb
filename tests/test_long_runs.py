"""Long runs of every stateful method: thousands of steps, finite state.

Each run is one ``jax.lax.scan`` (compiled once) over about 7,000 steps on
a small fixed problem whose gradient norms shrink by 0.99 per step down to
1e-30, or grow by 1.01 per step up to 1e30 (both held at the bound once
reached); the losses follow the same scale. An all-finite flag, the first
step with a non-finite update or state and the number of such steps are
carried through the scan, so a failure names where it happened.

Known defects are strict xfails in ``KNOWN_DEFECTS``: delete an entry when
its fix lands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import all_cases, linear_loss_fn

pytestmark = pytest.mark.slow

CASES = all_cases()
NUM_TASKS = 3
STEPS = 7000
SCHEDULES = {"decaying": 0.99, "growing": 1.01}

#: (case name, schedule) -> the defect, one line.

KNOWN_DEFECTS: dict[tuple[str, str], str] = {}


def _is_stateful(case) -> bool:
  """State with more than the ``weights`` array."""
  state = case.make(NUM_TASKS).init(jnp.zeros(2))
  return len(jax.tree.leaves(state)) > 1


def _params():
  out = []
  for case in CASES:
    if not _is_stateful(case):
      continue
    for schedule in SCHEDULES:
      reason = KNOWN_DEFECTS.get((case.name, schedule))
      marks = ([pytest.mark.xfail(strict=True, reason=reason)]
               if reason else [])
      out.append(pytest.param(case, schedule, marks=marks,
                              id=f"{case.name}-{schedule}"))
  return out


def _all_finite(tree):
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def long_run(case, rate: float, steps: int = STEPS):
  """``(first_bad_step, num_bad_steps)``; -1 and 0 when every update and
  state were finite."""
  tx = case.make(NUM_TASKS)
  # A leaf whose first axis equals K, and a vector.
  params = {"w": jnp.zeros((NUM_TASKS, 2)), "b": jnp.zeros(2)}
  width = 2 * NUM_TASKS + 2
  rng = np.random.default_rng(0)
  base = jnp.asarray(rng.normal(size=(NUM_TASKS, width)), jnp.float32)
  key = jax.random.PRNGKey(0)

  def step(carry, t):
    state, first_bad, num_bad = carry
    scale = jnp.clip(jnp.exp(t * jnp.log(rate)), 1e-30, 1e30)
    noise = jax.random.normal(jax.random.fold_in(key, t), base.shape)
    flat = scale * (base + 0.3 * noise)
    grads = {"w": flat[:, :2 * NUM_TASKS].reshape(NUM_TASKS, NUM_TASKS, 2),
             "b": flat[:, 2 * NUM_TASKS:]}
    losses = scale * (1.0 + jnp.abs(noise[:, 0]))
    loss_fn = linear_loss_fn(grads, params, losses)
    update, state = tx.update(grads, state, params,
                              **case.extras(params, losses, loss_fn))
    ok = _all_finite(update) & _all_finite(state)
    first_bad = jnp.where((first_bad < 0) & ~ok, t, first_bad)
    return (state, first_bad, num_bad + (~ok).astype(jnp.int32)), None

  @jax.jit
  def run():
    init = (tx.init(params), jnp.int32(-1), jnp.int32(0))
    (_, first_bad, num_bad), _ = jax.lax.scan(
        step, init, jnp.arange(steps, dtype=jnp.int32))
    return first_bad, num_bad

  first_bad, num_bad = run()
  return int(first_bad), int(num_bad)


def test_schedules_reach_the_bounds():
  """The runs are long enough to reach 1e-30 and 1e30."""
  for rate, bound in ((0.99, 1e-30), (1.01, 1e30)):
    assert abs(np.log10(rate**STEPS)) >= abs(np.log10(bound))


@pytest.mark.parametrize(("case", "schedule"), _params())
def test_long_run_keeps_state_finite(case, schedule):
  first_bad, num_bad = long_run(case, SCHEDULES[schedule])
  assert first_bad == -1, (
      f"{case.name}, {schedule} gradients: first non-finite update or state "
      f"at step {first_bad}, {num_bad} of {STEPS} steps non-finite")
