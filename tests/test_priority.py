"""PCD against TorchJD 0.18's recorded values, and its special cases.

``tests/data/pcd_reference.json`` holds TorchJD's ``PCDWeighting`` weights
(float64, the moving average carried over the steps of each case), recorded
by ``benchmarks/record_pcd_reference.py``.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax import gram_weightings as gw
from mtl_optax._src import priority

from tests.conftest import TORCHJD_J, apply_fresh

REFERENCE = json.loads((pathlib.Path(__file__).parent / "data"
                        / "pcd_reference.json").read_text())["cases"]


def _run_case(case, dtype):
  state = None
  tau = jnp.asarray(case["tau"], dtype)
  for jac, expected in zip(case["jacobians"], case["weights"]):
    jac = jnp.asarray(np.array(jac), dtype)
    out = gw.pcd(jac @ jac.T, state, tau=tau, decay=case["beta"],
                 eps=case["eps"])
    state = out.state
    yield jac, np.asarray(out.weights, np.float64), np.array(expected)


@pytest.mark.parametrize("case", REFERENCE, ids=lambda c: c["name"])
def test_matches_torchjd_float64(case):
  with jax.enable_x64(True):
    for _, weights, expected in _run_case(case, jnp.float64):
      np.testing.assert_allclose(weights, expected, rtol=1e-5,
                                 atol=1e-5 * np.max(np.abs(expected)))


@pytest.mark.parametrize("case", REFERENCE, ids=lambda c: c["name"])
def test_matches_torchjd_float32_updates(case):
  """In float32 the update agrees; the weights of linearly dependent rows
  (``dependent_rows``) are not unique, only their combination is."""
  for jac, weights, expected in _run_case(case, jnp.float32):
    jac = np.asarray(jac, np.float64)
    reference = expected @ jac
    np.testing.assert_allclose(weights @ jac, reference, rtol=1e-4,
                               atol=1e-4 * np.linalg.norm(jac[0]))


def test_factory_reproduces_the_reference_sequence():
  case = next(c for c in REFERENCE if c["name"] == "random_k4_scales")
  tx = mo.pcd(4, tau=case["tau"], decay=case["beta"], eps=case["eps"])
  state = tx.init(jnp.zeros(6))
  step = jax.jit(tx.update)
  for jac, expected in zip(case["jacobians"], case["weights"]):
    jac = jnp.asarray(np.array(jac), jnp.float32)
    update, state = step(jac, state)
    np.testing.assert_allclose(update, np.array(expected) @ np.array(jac),
                               rtol=1e-4, atol=1e-4)
  assert int(state.count) == len(case["jacobians"])


def _brute_force_qp(jac, taus):
  """The QP by enumeration of active sets (float64, small K): the feasible
  KKT point with the smallest objective, None when no d is feasible."""
  import itertools
  g1, others = jac[0], jac[1:]
  lower = taus * np.sum(others ** 2, 1)
  best = None
  for size in range(len(others) + 1):
    for subset in itertools.combinations(range(len(others)), size):
      subset = list(subset)
      if subset:
        a = others[subset]
        mu, *_ = np.linalg.lstsq(a @ a.T, lower[subset] - a @ g1, rcond=None)
        if np.any(mu < -1e-9):
          continue
        d = g1 + mu @ a
      else:
        d = g1
      if np.all(others @ d >= lower - 1e-9):
        value = 0.5 * np.sum((d - g1) ** 2)
        if best is None or value < best[0] - 1e-12:
          best = (value, d)
  return None if best is None else best[1]


@pytest.mark.parametrize("seed", range(6))
def test_qp_solver_matches_enumeration(seed):
  rng = np.random.default_rng(seed)
  num_tasks = 2 + seed % 4
  jac = rng.normal(size=(num_tasks, 6))
  taus = rng.uniform(0.0, 0.8, size=num_tasks - 1)
  with jax.enable_x64(True):
    w = np.asarray(priority.priority_qp_weights(
        jnp.asarray(jac @ jac.T), jnp.asarray(taus), 1e-9))
  expected = _brute_force_qp(jac, taus)
  np.testing.assert_allclose(w @ jac, expected, rtol=1e-7, atol=1e-9)
  assert w[0] == 1.0 and np.all(w[1:] >= 0)


def test_infeasible_constraints_are_dropped():
  jac = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
  update, state = apply_fresh(mo.pcd(3, tau=0.1), jac)
  np.testing.assert_allclose(update, jac[0], rtol=1e-6)
  np.testing.assert_allclose(state.weights, [1.0, 0.0, 0.0], atol=1e-7)


def test_no_conflict_returns_the_primary_gradient():
  jac = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
  update, state = apply_fresh(mo.pcd(3, tau=0.02), jac)
  np.testing.assert_allclose(update, jac[0], rtol=1e-6)
  np.testing.assert_allclose(state.weights, [1.0, 0.0, 0.0], atol=1e-7)


def test_zero_primary_gives_zero_and_the_norm_is_the_primarys():
  jac = jnp.array([[0.0, 0.0], [1.0, 2.0], [0.0, -1.0]])
  update, _ = apply_fresh(mo.pcd(3), jac)
  np.testing.assert_array_equal(update, np.zeros(2))
  jac = jnp.asarray(TORCHJD_J, jnp.float32)
  update, _ = apply_fresh(mo.pcd(2, tau=0.5), jac)
  np.testing.assert_allclose(np.linalg.norm(update), np.linalg.norm(jac[0]),
                             rtol=1e-6)


def test_secondary_tasks_get_their_guaranteed_progress():
  """decay = eps = 0: g~_i = g_i / ||g_i||, and d~ = d / (c_1 ||g_1||) (the
  primary's QP weight is 1), so <g~_j, d~> >= tau_j, with equality for the
  binding constraints."""
  rng = np.random.default_rng(3)
  jac = rng.normal(size=(4, 5)).astype(np.float32)
  taus = np.array([0.1, 0.3, 0.5], np.float32)
  _, state = apply_fresh(mo.pcd(4, tau=jnp.asarray(taus), decay=0.0, eps=0.0),
                         jnp.asarray(jac))
  c = np.asarray(state.weights, np.float64)
  jac = jac.astype(np.float64)
  norms = np.linalg.norm(jac, axis=1)
  d_tilde = c @ jac / (c[0] * norms[0])
  progress = (jac[1:] / norms[1:, None]) @ d_tilde
  assert np.all(progress >= taus - 1e-5)
  binding = c[1:] > 1e-6
  assert np.any(binding)
  np.testing.assert_allclose(progress[binding], taus[binding], atol=1e-5)


def test_huge_and_tiny_gradients_keep_a_finite_state():
  rng = np.random.default_rng(4)
  base = rng.normal(size=(3, 4)).astype(np.float32)
  tx = mo.pcd(3, tau=0.3, decay=0.9)
  state = tx.init(jnp.zeros(4))
  step = jax.jit(tx.update)
  updates = []
  for scale in (1.0, 1e30, 1e-30, 1e30, 1.0):
    update, state = step(jnp.asarray(base * np.float32(scale)), state)
    assert np.all(np.isfinite(update))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
    updates.append(np.asarray(update) / scale)
  # The same direction whatever the (common) scale.
  for u in updates[1:]:
    np.testing.assert_allclose(u, updates[0], rtol=1e-4, atol=1e-5)


def test_nan_is_skipped_by_apply_if_finite_and_keeps_the_average():
  tx = optax.chain(mo.pcd(2), optax.apply_if_finite(optax.sgd(0.1), 3))
  params = jnp.zeros(3)
  state = tx.init(params)
  jac = jnp.asarray(TORCHJD_J, jnp.float32)
  _, state = tx.update(jac, state, params)
  bad = jac.at[1, 0].set(jnp.nan)
  for update_fn in (tx.update, jax.jit(tx.update)):
    update, new_state = update_fn(bad, state, params)
    np.testing.assert_array_equal(update, np.zeros(3))
    np.testing.assert_array_equal(new_state[0].sq_norm_ema,
                                  state[0].sq_norm_ema)
    assert int(new_state[0].count) == 1


def test_invalid_hyper_parameters():
  with pytest.raises(ValueError, match="tau must be in"):
    mo.pcd(3, tau=1.5)
  with pytest.raises(ValueError, match="shape \\(2,\\)"):
    mo.pcd(3, tau=[0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="decay"):
    mo.pcd(3, decay=1.0)
  with pytest.warns(DeprecationWarning, match="decay"):
    mo.pcd(3, beta=0.9)
  with pytest.raises(ValueError, match="eps"):
    mo.pcd(3, eps=-1.0)
