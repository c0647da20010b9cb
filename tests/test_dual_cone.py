"""UPGrad, DualProj and their lower-bounded QP solver.

Oracles (float64, tests only): exhaustive enumeration of the active set with
the KKT conditions for K <= 3, and ``scipy.optimize.nnls`` (Lawson-Hanson
active set) on a square root of the Gram matrix otherwise.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import mtl_optax as mo
from mtl_optax._src import dual_cone
from mtl_optax._src import solvers

from tests.conftest import TORCHJD_J as J
from tests.conftest import apply_fresh


def _jacobians(rng, num_tasks):
  dim = 2 * num_tasks + 3
  out = {"random": rng.normal(size=(num_tasks, dim)),
         "correlated": rng.normal(size=(num_tasks, dim)) + rng.normal(
             size=(1, dim)),
         "near_colinear": rng.normal(size=(1, dim)) * rng.normal(
             size=(num_tasks, 1)) + 1e-3 * rng.normal(size=(num_tasks, dim))}
  if num_tasks >= 3:
    out["rank_deficient"] = rng.normal(size=(num_tasks, 2)) @ rng.normal(
        size=(2, dim))
  if num_tasks >= 2:
    one_zero = rng.normal(size=(num_tasks, dim))
    one_zero[-1] = 0.0
    out["one_zero"] = one_zero
  return out


def _qp_enumeration(quad, lower):
  """argmin v^T Q v s.t. v >= l by trying every active set (K <= 3)."""
  num = len(lower)
  best, best_value = None, np.inf
  for size in range(num + 1):
    for free in itertools.combinations(range(num), size):
      free = list(free)
      fixed = [i for i in range(num) if i not in free]
      v = lower.astype(np.float64).copy()
      if free:
        sub = quad[np.ix_(free, free)]
        rhs = -quad[np.ix_(free, fixed)] @ lower[fixed]
        v[free] = np.linalg.lstsq(sub, rhs, rcond=None)[0]
      if np.all(v >= lower - 1e-12) and np.all((quad @ v)[fixed] >= -1e-12):
        value = v @ quad @ v
        if value < best_value - 1e-15:
          best, best_value = v, value
  return best


def _qp_nnls(root, lower):
  """argmin v^T Q v s.t. v >= l as NNLS: v = l + x, ||R x + R l||, Q = R^T R."""
  x, _ = optimize.nnls(root, -root @ lower, maxiter=50 * len(lower))
  return lower + x


def _oracle(quad, lower):
  if len(quad) <= 3:
    return np.stack([_qp_enumeration(quad, row)
                     for row in np.atleast_2d(lower)])
  lam, vec = np.linalg.eigh(quad)
  root = (vec * np.sqrt(np.clip(lam, 0.0, None))).T
  return np.stack([_qp_nnls(root, row) for row in np.atleast_2d(lower)])


# ------------------------------------------------------------------ TorchJD


def test_exact_projection_differs_from_torchjd_by_its_ridge():
  """reg_eps=0 gives the exact projections. For DualProj on J it is
  g0 - (<g0, g1>/||g1||^2) g1 = [5/9, 10/9, 10/9] (g0 conflicts with g1
  only); TorchJD's 1e-4 ridge moves the fourth decimal."""
  update, state = apply_fresh(mo.dualproj(2, reg_eps=0.0), J)
  np.testing.assert_allclose(update, [5 / 9, 10 / 9, 10 / 9], atol=1e-5)
  np.testing.assert_allclose(state.weights, [11 / 18, 0.5], atol=1e-6)
  # UPGrad: the projection of g1/2 on the dual cone is the projection on the
  # normal plane of g2 (they conflict), and g2/2 on that of g1.
  g1, g2 = J
  expected = 0.5 * (g1 - (g1 @ g2) / (g2 @ g2) * g2) + 0.5 * (
      g2 - (g1 @ g2) / (g1 @ g1) * g1)
  update, _ = apply_fresh(mo.upgrad(2, reg_eps=0.0), J)
  np.testing.assert_allclose(update, expected, atol=1e-5)
  assert abs(float(update[0]) - 0.2929) > 3e-4


# ----------------------------------------------------------- solver oracles


# Up to K = 6 the public solver tries every active set; "loop" is the
# interior-point loop it uses beyond, run on the same small problems.
_QP_PATHS = {
    "public": solvers.lower_bounded_qp,
    "loop": lambda quad, lower: solvers._lower_bounded_qp(quad, lower, 100,
                                                          None),
}


@pytest.mark.parametrize("num_tasks,path", [
    *((k, "public") for k in (1, 2, 3, 5, 6, 64)),
    *((k, "loop") for k in (1, 2, 3, 5, 6))])
def test_solver_matches_float64_oracles(num_tasks, path):
  rng = np.random.default_rng(num_tasks)
  with jax.enable_x64(True):
    solve = jax.jit(_QP_PATHS[path])
    for kind, jac in _jacobians(rng, num_tasks).items():
      gram = jac @ jac.T
      gram = gram / np.trace(gram) * num_tasks
      rms = np.sqrt(np.trace(jac @ jac.T) / num_tasks)
      for ridge in (1e-4 * num_tasks, 0.0):
        quad = gram + ridge * np.eye(num_tasks)
        lower = np.eye(num_tasks)[:8] / num_tasks  # UPGrad's rows
        if num_tasks > 3:  # and arbitrary (mixed-sign) bounds
          lower = np.concatenate([lower, rng.normal(size=(2, num_tasks))])
        sol = solve(jnp.asarray(quad), jnp.asarray(lower))
        expected = _oracle(quad, lower)
        # The projection J^T v is unique even when v is not (singular Q).
        np.testing.assert_allclose(
            np.asarray(sol.solution) @ jac, expected @ jac, rtol=0,
            atol=1e-6 * rms, err_msg=f"{kind} ridge={ridge}")
        if ridge > 0:
          np.testing.assert_allclose(sol.solution, expected, rtol=1e-6,
                                     atol=1e-9, err_msg=kind)
          assert float(sol.residual) < 1e-10, kind


@pytest.mark.parametrize("num_tasks", [8, 5])  # the loop; every active set
def test_solver_in_float32_against_float64_oracle(num_tasks):
  rng = np.random.default_rng(7)
  solve = jax.jit(solvers.lower_bounded_qp)
  for kind, jac in _jacobians(rng, num_tasks).items():
    gram = jac @ jac.T
    quad = gram / np.trace(gram) * num_tasks + num_tasks * 1e-4 * np.eye(
        num_tasks)
    lower = np.eye(num_tasks) / num_tasks
    sol = solve(jnp.asarray(quad, jnp.float32), jnp.asarray(lower, jnp.float32))
    expected = _oracle(quad, lower)
    rms = np.sqrt(np.trace(gram) / num_tasks)
    np.testing.assert_allclose(np.asarray(sol.solution, np.float64) @ jac,
                               expected @ jac, atol=2e-5 * rms, err_msg=kind)
    assert float(sol.residual) <= 1e-5


def test_solver_reports_capped_iterations():
  rng = np.random.default_rng(8)
  jac = rng.normal(size=(12, 30)) + rng.normal(size=(1, 30))
  jac[:6] *= -1
  gram = jnp.asarray(jac @ jac.T / np.trace(jac @ jac.T) * 12, jnp.float32)
  lower = jnp.eye(12) / 12
  full = solvers.lower_bounded_qp(gram, lower)
  capped = solvers.lower_bounded_qp(gram, lower, max_iter=1)
  assert int(capped.iterations) == 1 < int(full.iterations)
  assert float(capped.residual) > 1e-3 > 1e-5 >= float(full.residual)


# --------------------------------------------------------------- properties


@pytest.mark.parametrize("weights_fn", [dual_cone.upgrad_weights,
                                        dual_cone.dualproj_weights])
def test_non_conflicting_float64(weights_fn):
  """<g_i, d> >= 0 for every task: exactly (to rounding) with reg_eps=0,
  and within the ridge's bound reg_eps ||J||_F^2 max_i v_i otherwise; and
  gradients that do not conflict are combined with the preference as is."""
  rng = np.random.default_rng(9)
  with jax.enable_x64(True):
    solve = jax.jit(weights_fn)
    for num_tasks in (3, 16):
      pref = jnp.full((num_tasks,), 1.0 / num_tasks)
      for kind, jac in _jacobians(rng, num_tasks).items():
        norms = np.linalg.norm(jac, axis=1)
        gram = jnp.asarray(jac @ jac.T / np.sum(norms ** 2) * num_tasks)
        weights, _ = solve(gram, pref, 0.0)
        improvements = jac @ (np.asarray(weights) @ jac)
        assert np.all(improvements >= -1e-9 * norms * norms.max()), kind
        weights, _ = solve(gram, pref, 1e-4)
        improvements = jac @ (np.asarray(weights) @ jac)
        bound = 1e-4 * np.sum(norms ** 2) * np.abs(weights).max()
        assert np.all(improvements >= -1.01 * bound - 1e-12), kind
      # No two gradients conflict: the preference-weighted sum is returned.
      jac = np.abs(rng.normal(size=(num_tasks, 7)))
      gram = jnp.asarray(jac @ jac.T / np.trace(jac @ jac.T) * num_tasks)
      custom = jnp.asarray(rng.random(num_tasks))
      for p in (pref, custom):
        weights, _ = solve(gram, p, 0.0)
        np.testing.assert_allclose(weights, p, rtol=1e-9)


def test_upgrad_preference_selects_a_projected_task():
  """pref = e_1: d is the projection of g_1 onto the dual cone."""
  g = np.array([[2.0, 1.0], [-1.0, 1.0]], np.float32)
  update, _ = apply_fresh(mo.upgrad(2, pref_vector=[1.0, 0.0], reg_eps=0.0), g)
  assert g[0] @ g[1] < 0
  expected = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
  np.testing.assert_allclose(update, expected, atol=1e-5)


def test_weights_match_functional_api_and_residual_in_state():
  gram = jnp.asarray(J @ J.T / np.trace(J @ J.T) * 2, jnp.float32)
  pref = jnp.full((2,), 0.5)
  for factory, weights_fn in ((mo.upgrad, dual_cone.upgrad_weights),
                              (mo.dualproj, dual_cone.dualproj_weights)):
    _, state = apply_fresh(factory(2), J.astype(np.float32))
    weights, sol = weights_fn(gram, pref)
    np.testing.assert_allclose(state.weights, weights, rtol=1e-5)
    assert 0 <= float(state.residual) <= 1e-5
    assert float(state.residual) == pytest.approx(float(sol.residual),
                                                  abs=1e-6)


@pytest.mark.parametrize("factory", [mo.upgrad, mo.dualproj])
def test_scale_invariance_from_tiny_to_huge(factory):
  jac = np.array([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0],
                  [-1.0, 0.2, 0.3, -0.4]], np.float32)
  step = jax.jit(lambda g, tx=factory(3): apply_fresh(tx, g))
  reference = np.asarray(step(jac)[0])
  for scale in (1e-30, 1e-10, 1e10, 1e30):
    update, _ = step(jac * np.float32(scale))
    np.testing.assert_allclose(np.asarray(update) / scale, reference,
                               rtol=1e-4, atol=1e-6)


def test_degenerate_inputs_without_ridge():
  """reg_eps=0: opposite gradients give 0, identical ones give g, a zero
  task changes nothing, all zero gives the preference weights and 0."""
  g = np.array([1.0, 2.0, -1.0], np.float32)
  for factory in (mo.upgrad, mo.dualproj):
    step = jax.jit(lambda grads, tx=factory(2, reg_eps=0.0): apply_fresh(tx, grads))
    update, _ = step(np.stack([g, -g]))
    np.testing.assert_allclose(update, np.zeros(3), atol=1e-6)
    update, _ = step(np.stack([g, g]))
    np.testing.assert_allclose(update, g, rtol=1e-5)
    update, _ = step(np.stack([g, 0 * g]))
    np.testing.assert_allclose(update, g / 2, rtol=1e-5)
    update, state = step(np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(update, np.zeros(3))
    np.testing.assert_allclose(state.weights, [0.5, 0.5])
    conflicting = np.stack([g, np.array([-1.0, 0.5, 2.0], np.float32)])
    reference, _ = step(conflicting)
    for scale in (1e-30, 1e30):
      update, state = step(conflicting * np.float32(scale))
      np.testing.assert_allclose(np.asarray(update) / scale, reference,
                                 rtol=1e-4, atol=1e-6)


def test_injectable_reg_eps_and_preference():
  tx = optax.inject_hyperparams(mo.dualproj, static_args=("num_tasks",))(
      num_tasks=2, reg_eps=0.0, pref_vector=jnp.array([0.5, 0.5]))
  grads = jnp.asarray(J, jnp.float32)
  step = jax.jit(tx.update)
  state = tx.init(jnp.zeros(3))
  update, state = step(grads, state)
  np.testing.assert_allclose(update, [5 / 9, 10 / 9, 10 / 9], atol=1e-5)
  state.hyperparams["reg_eps"] = jnp.asarray(1e-4)
  update, state = step(grads, state)
  np.testing.assert_allclose(update, [0.5563, 1.1109, 1.1109], atol=1e-4)
  state.hyperparams["reg_eps"] = jnp.asarray(0.0)
  state.hyperparams["pref_vector"] = jnp.array([0.0, 1.0])
  update, _ = step(grads, state)
  g1, g2 = J  # g2 conflicts with g1: projected on g1's normal plane
  np.testing.assert_allclose(update, g2 - (g1 @ g2) / (g1 @ g1) * g1,
                             atol=1e-4)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="reg_eps"):
    mo.upgrad(2, reg_eps=-1.0)
  with pytest.raises(ValueError, match="max_iter"):
    mo.dualproj(2, max_iter=0)
  with pytest.raises(ValueError, match=r"pref_vector.*\(2,\)"):
    mo.upgrad(2, pref_vector=[1.0, 2.0, 3.0])
