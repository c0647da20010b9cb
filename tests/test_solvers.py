"""Shared solvers against independent float64 oracles (scipy, brute force)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import mtl_optax as mo
from mtl_optax._src import solvers


def _random_gram(rng, num_tasks, kind="generic"):
  dim = 3 * num_tasks
  g = rng.normal(size=(num_tasks, dim))
  if kind == "correlated":
    g += 2.0 * rng.normal(size=(1, dim))
  elif kind == "rank_deficient":
    g = rng.normal(size=(num_tasks, 2)) @ rng.normal(size=(2, dim))
  gram = g @ g.T
  return gram / np.trace(gram) * num_tasks


def _slsqp_on_simplex(fun, num_tasks, starts):
  best = None
  for x0 in starts:
    res = optimize.minimize(
        fun, x0, method="SLSQP", bounds=[(0.0, 1.0)] * num_tasks,
        constraints={"type": "eq", "fun": lambda x: 1.0 - np.sum(x)},
        options={"ftol": 1e-15, "maxiter": 2000})
    if best is None or res.fun < best.fun:
      best = res
  return best


def _cagrad_objective(gram, c):
  b = np.full(len(gram), 1.0 / len(gram))
  radius = c * np.sqrt(b @ gram @ b)
  return lambda w: w @ gram @ b + radius * np.sqrt(max(w @ gram @ w, 0.0))


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 10, 20, 40])
@pytest.mark.parametrize("c", [0.1, 0.4, 0.9, 10.0])
def test_cagrad_dual_matches_slsqp_float64(num_tasks, c):
  rng = np.random.default_rng(num_tasks * 100 + int(10 * c))
  with jax.enable_x64(True):
    solve = jax.jit(lambda a, c: solvers.cagrad_dual_weights(a, c,
                                                             max_iter=5000))
    for kind in ("generic", "correlated", "rank_deficient"):
      gram = _random_gram(rng, num_tasks, kind)
      objective = _cagrad_objective(gram, c)
      uniform = np.full(num_tasks, 1.0 / num_tasks)
      oracle = _slsqp_on_simplex(objective, num_tasks,
                                 [uniform, np.eye(num_tasks)[0]])
      sol = solve(jnp.asarray(gram), c)
      w = np.asarray(sol.weights)
      assert abs(w.sum() - 1) < 1e-12 and w.min() >= 0
      ours = objective(w)
      # "1e-6 relative": relative to |F*|, or, when the optimum is ~0 (the
      # origin in the hull of rank-deficient J), to the scale of the
      # objective's terms, ||g0|| max_i ||g_i||.
      scale = max(abs(oracle.fun), np.sqrt(np.mean(gram) * np.max(
          np.diagonal(gram))))
      assert ours <= oracle.fun + 1e-6 * scale, (kind, ours, oracle.fun)


def _simplex_grid(num_tasks, steps):
  for idx in itertools.product(range(steps + 1), repeat=num_tasks - 1):
    if sum(idx) <= steps:
      yield np.array([*idx, steps - sum(idx)], np.float64) / steps


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_min_norm_matches_brute_force_grid(num_tasks):
  rng = np.random.default_rng(num_tasks)
  with jax.enable_x64(True):
    for kind in ("generic", "correlated", "rank_deficient"):
      gram = _random_gram(rng, num_tasks, kind)
      grid = np.stack(list(_simplex_grid(num_tasks, 400)))
      grid_best = np.min(np.einsum("ni,ij,nj->n", grid, gram, grid))
      sol = solvers.min_norm_weights(jnp.asarray(gram), max_iter=5000)
      w = np.asarray(sol.weights)
      ours = w @ gram @ w
      # The grid is an upper bound on the optimum; ours must be at least as
      # good, and close to it (grid resolution 1/400).
      assert ours <= grid_best + 1e-12
      assert ours >= grid_best - 5e-3 * max(grid_best, 1e-3)


@pytest.mark.parametrize("num_tasks", [4, 10, 40])
def test_min_norm_matches_slsqp_float64(num_tasks):
  rng = np.random.default_rng(num_tasks)
  with jax.enable_x64(True):
    for kind in ("generic", "correlated", "rank_deficient"):
      gram = _random_gram(rng, num_tasks, kind)
      oracle = _slsqp_on_simplex(lambda w: w @ gram @ w, num_tasks,
                                 [np.full(num_tasks, 1.0 / num_tasks)])
      sol = solvers.min_norm_weights(jnp.asarray(gram), max_iter=5000)
      w = np.asarray(sol.weights)
      assert w @ gram @ w <= oracle.fun + 1e-9
      assert float(sol.residual) < 1e-8 or kind == "rank_deficient"


def _iterative(monkeypatch, solve):
  """``solve`` traced with the enumeration off: the loop used beyond K = 6."""
  def run(*args):
    with monkeypatch.context() as patch:
      patch.setattr(solvers, "_MAX_ENUMERATED", 0)
      return jax.jit(solve)(*args)
  return run


@pytest.mark.parametrize("num_tasks", [3, 4, 6])
def test_every_face_and_the_loop_reach_the_same_optimum(num_tasks,
                                                        monkeypatch):
  """Up to K = 6 MGDA's and CAGrad's duals try every support; the loop they
  use beyond reaches the same objective on the same problems (float64),
  and neither is beaten by the other by more than the loop's tolerance."""
  rng = np.random.default_rng(40 + num_tasks)
  mgda = lambda a: solvers.min_norm_weights(a, max_iter=5000).weights
  dual = lambda a: solvers.cagrad_dual_weights(a, 0.4, max_iter=5000).weights
  with jax.enable_x64(True):
    for kind in ("generic", "correlated", "rank_deficient"):
      gram = _random_gram(rng, num_tasks, kind)
      for solve, objective in ((mgda, lambda w: w @ gram @ w),
                               (dual, _cagrad_objective(gram, 0.4))):
        every = np.asarray(jax.jit(solve)(jnp.asarray(gram)))
        loop = np.asarray(_iterative(monkeypatch, solve)(jnp.asarray(gram)))
        assert abs(every.sum() - 1) < 1e-12 and every.min() >= 0
        assert objective(every) <= objective(loop) + 1e-12, kind
        assert objective(loop) <= objective(every) + 1e-8, kind
        if kind != "rank_deficient":  # unique minimiser
          np.testing.assert_allclose(every, loop, atol=1e-5, err_msg=kind)


def test_identical_tasks_share_their_weight_and_opposite_ones_cancel(
    monkeypatch):
  """Where the minimiser is not unique the enumeration's weights stay
  permutation-symmetric: identical task gradients share equally (as the
  loop does from its uniform start) and the objective is the loop's; an
  opposite pair gives the zero update exactly."""
  g = np.random.default_rng(3).normal(size=(2, 6))
  for jac, weights in (
      (np.stack([g[0], g[0], g[0]]), [1 / 3, 1 / 3, 1 / 3]),
      (np.stack([g[0], g[1], g[0]]), None),
      (np.zeros((4, 6)), [0.25] * 4)):
    gram = jnp.asarray(jac @ jac.T, jnp.float32)
    for solve, objective in (
        (lambda a: solvers.min_norm_weights(a).weights,
         lambda w: np.sum((w @ jac) ** 2)),
        (lambda a: solvers.cagrad_dual_weights(a, 0.4).weights,
         _cagrad_objective(jac @ jac.T, 0.4))):
      w = np.asarray(solve(gram), np.float64)
      loop = np.asarray(_iterative(monkeypatch, solve)(gram), np.float64)
      assert objective(w) <= objective(loop) + 1e-6 * np.sum(g[0] ** 2)
      np.testing.assert_allclose(w[0], w[2], rtol=1e-6)
      if weights is not None:
        np.testing.assert_allclose(w, weights, atol=1e-6)
  opposite = np.stack([g[0], -2 * g[0], g[1]])
  w = np.asarray(solvers.min_norm_weights(
      jnp.asarray(opposite @ opposite.T, jnp.float32)).weights, np.float64)
  assert np.linalg.norm(w @ opposite) < 1e-5 * np.linalg.norm(g[0])


@pytest.mark.parametrize("num_tasks", [3, 6])
def test_every_face_solvers_propagate_non_finite_input_jitted_too(num_tasks):
  """A NaN or inf Gram entry gives NaN weights (the QP: NaN solution and
  residual), eagerly and under jit, where XLA may rewrite the guards."""
  gram = jnp.asarray(_random_gram(np.random.default_rng(2), num_tasks),
                     jnp.float32)
  lower = jnp.eye(num_tasks) / num_tasks
  outputs = (
      lambda a: solvers.min_norm_weights(a).weights,
      lambda a: solvers.cagrad_dual_weights(a, 0.4).weights,
      lambda a: jnp.concatenate([
          solvers.lower_bounded_qp(a, lower).solution.ravel(),
          solvers.lower_bounded_qp(a, lower).residual[None]]))
  for bad in (jnp.nan, jnp.inf):
    broken = gram.at[0, 1].set(bad).at[1, 0].set(bad)
    for out in outputs:
      for run in (out, jax.jit(out)):
        assert np.all(np.isnan(np.asarray(run(broken)))), (bad, out)
        assert np.all(np.isfinite(np.asarray(run(gram))))


def test_min_norm_known_two_task_closed_form():
  # For K = 2 the min-norm weight is (g22 - g12) / (g11 + g22 - 2 g12),
  # clipped to [0, 1] (Sener & Koltun, Alg. 1).
  rng = np.random.default_rng(7)
  for _ in range(20):
    g = rng.normal(size=(2, 5))
    a = g @ g.T
    expected = np.clip((a[1, 1] - a[0, 1]) / (a[0, 0] + a[1, 1] - 2 * a[0, 1]),
                       0, 1)
    w = solvers.min_norm_weights(jnp.asarray(a / np.trace(a) * 2,
                                             jnp.float32)).weights
    np.testing.assert_allclose(w[0], expected, atol=2e-4)


def test_projection_onto_simplex_matches_qp_oracle():
  rng = np.random.default_rng(3)
  for num_tasks in (1, 2, 5, 17):
    for _ in range(5):
      x = rng.normal(size=num_tasks) * 3
      oracle = _slsqp_on_simplex(lambda w: np.sum((w - x) ** 2), num_tasks,
                                 [np.full(num_tasks, 1.0 / num_tasks)])
      with jax.enable_x64(True):
        ours = np.asarray(solvers.project_to_simplex(jnp.asarray(x)))
      np.testing.assert_allclose(ours, oracle.x, atol=1e-6)


def _sorted_simplex_projection(x):
  """The sort-based threshold algorithm (Held, Wolfe & Crowder), NumPy."""
  u = np.sort(x)[::-1]
  cumulative = np.cumsum(u)
  count = np.arange(1, len(x) + 1)
  size = np.count_nonzero(1 / count + (u - cumulative / count) > 0)
  return np.maximum(1 / size + (x - cumulative[size - 1] / size), 0.0)


def test_sort_free_projection_matches_the_sorted_threshold_to_rounding():
  """Ties, scales from 1e-3 to 1e3, K from 1 to 40: within a few ulps of the
  sorted algorithm, bit for bit for K <= 2 up to unit scale (a sum of two is
  exact in any order; beyond it the input is shifted), and the custom
  derivative is the projection's Jacobian."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    project = jax.jit(solvers.project_to_simplex)
    for num in (1, 2, 3, 5, 40):
      for trial in range(20):
        x = rng.normal(size=num) * np.exp(rng.normal() * 2)
        if trial % 3 == 0:
          x[: (num + 1) // 2] = x[0]   # ties, at or away from the threshold
        ours = np.asarray(project(jnp.asarray(x)))
        expected = _sorted_simplex_projection(x)
        if num <= 2 and abs(np.max(x)) <= 1:  # unshifted: optax's bits
          np.testing.assert_array_equal(ours, expected)
        np.testing.assert_allclose(ours, expected, rtol=0,
                                   atol=16 * np.finfo(np.float64).eps
                                   * max(1.0, np.max(np.abs(x))))
        assert ours.min() >= 0 and abs(ours.sum() - 1) < 1e-12
    x = jnp.array([0.3, 1.1, -2.0, 0.9])
    tangent = jnp.array([1.0, -2.0, 0.5, 3.0])
    _, ours = jax.jvp(solvers.project_to_simplex, (x,), (tangent,))
    support = np.asarray(solvers.project_to_simplex(x)) > 0
    jacobian = np.diag(support) - np.outer(support, support) / support.sum()
    np.testing.assert_allclose(ours, jacobian @ np.asarray(tangent),
                               atol=1e-12)


def test_solver_reports_residual_and_stops_early():
  gram = jnp.array([[2.0, 0.5], [0.5, 1.0]])
  sol = solvers.min_norm_weights(gram)
  assert int(sol.iterations) < 50
  assert float(sol.residual) <= 1e-5
  capped = solvers.min_norm_weights(jnp.asarray(
      _random_gram(np.random.default_rng(0), 30, "correlated"), jnp.float32),
                                    max_iter=1)
  assert int(capped.iterations) == 1 and float(capped.residual) > 1e-5


def test_warm_start_at_the_solution_takes_one_step():
  gram = jnp.asarray(_random_gram(np.random.default_rng(1), 8), jnp.float32)
  cold = solvers.cagrad_dual_weights(gram, 0.4)
  warm = solvers.cagrad_dual_weights(gram, 0.4, init=cold.weights)
  assert int(warm.iterations) <= 2 < int(cold.iterations)
  np.testing.assert_allclose(warm.weights, cold.weights, atol=1e-5)


def test_jacobi_cholesky_solver_and_step_to_boundary():
  """The two linear-algebra helpers shared by the interior-point QP and the
  alpha-fair Newton solver, against NumPy in float64."""
  rng = np.random.default_rng(12)
  root = rng.normal(size=(5, 5)) * np.exp(rng.normal(size=(1, 5)))
  matrix = root @ root.T  # badly scaled but positive definite
  rhs = rng.normal(size=5)
  with jax.enable_x64(True):
    solve = solvers._jacobi_cholesky_solver(jnp.asarray(matrix))
    np.testing.assert_allclose(solve(jnp.asarray(rhs)),
                               np.linalg.solve(matrix, rhs), rtol=1e-9)
    # A shift of the unit-diagonal matrix: D^1/2 (S + s I) D^1/2.
    shifted = solvers._jacobi_cholesky_solver(jnp.asarray(matrix), 0.5)
    d = np.sqrt(np.diag(matrix))
    expected = np.linalg.solve(matrix + 0.5 * np.diag(d * d), rhs)
    np.testing.assert_allclose(shifted(jnp.asarray(rhs)), expected,
                               rtol=1e-9)
    z = jnp.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(
        solvers._step_to_boundary(z, jnp.array([-2.0, 1.0, -0.25])), 0.5)
    assert float(solvers._step_to_boundary(z, jnp.ones(3))) == np.inf


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_projection_stays_on_the_simplex_at_any_magnitude(dtype):
  """Shift invariance used: ties of 1e30 (3e38, 6e4 in float16) give 1/K
  each, and near ties far from zero are resolved at the scale of their
  spread, not of their magnitude (float64 shifted truth)."""
  big = float(jnp.finfo(dtype).max) / 2
  rng = np.random.default_rng(11)
  for magnitude in (1e4, 1e30, big, -1e30, -big):
    if abs(magnitude) > float(jnp.finfo(dtype).max):
      continue
    out = np.asarray(solvers.project_to_simplex(jnp.full(3, magnitude, dtype)),
                     np.float64)
    np.testing.assert_allclose(out, 1 / 3, rtol=2e-3)
  for _ in range(10):
    spread = rng.normal(size=5)
    x = (np.float32(1e6) + spread.astype(np.float32)).astype(np.float32)
    truth = _sorted_simplex_projection(x.astype(np.float64) - 1e6)
    ours = np.asarray(solvers.project_to_simplex(jnp.asarray(x)), np.float64)
    assert ours.min() >= 0 and abs(ours.sum() - 1) < 1e-5
    np.testing.assert_allclose(ours, truth, atol=1e-5)


def test_project_to_simplex_keeps_the_input_dtype_under_x64():
  with jax.enable_x64(True):
    for dtype in (jnp.float32, jnp.float64):
      out = solvers.project_to_simplex(jnp.array([0.5, 2.0, -1.0], dtype))
      assert out.dtype == dtype


@pytest.mark.parametrize("make", [lambda k: mo.mgda(k), lambda k: mo.cagrad(k),
                                  lambda k: mo.nash_mtl(k),
                                  lambda k: mo.upgrad(k)])
@pytest.mark.parametrize("num_tasks", [2, 5])
def test_residuals_are_finite_for_degenerate_gradients(make, num_tasks):
  tx = make(num_tasks)
  opposite = jnp.concatenate([jnp.array([[1.0, 2.0], [-1.0, -2.0]]),
                              jnp.ones((num_tasks - 2, 2))])
  for grads in (jnp.zeros((num_tasks, 3)), jnp.full((num_tasks, 3), 1e-45),
                opposite if num_tasks == 2 else jnp.zeros((num_tasks, 2))):
    state = tx.init(jnp.zeros(grads.shape[1:]))
    for step in (tx.update, jax.jit(tx.update)):
      _, new_state = step(grads, state)
      for leaf in jax.tree.leaves(new_state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
          assert np.all(np.isfinite(leaf)), new_state


def _brute_force_min_norm(gram):
  """Exact min-norm weights by enumerating supports (KKT on each face)."""
  num_tasks = len(gram)
  for size in range(1, num_tasks + 1):
    for support in itertools.combinations(range(num_tasks), size):
      idx = list(support)
      try:
        raw = np.linalg.solve(gram[np.ix_(idx, idx)], np.ones(size))
      except np.linalg.LinAlgError:
        continue
      if np.any(raw <= 0):
        continue
      w = np.zeros(num_tasks)
      w[idx] = raw / raw.sum()
      if np.all(gram @ w >= (w @ gram @ w) * (1 - 1e-9)):
        return w
  raise AssertionError("no KKT point found")


@pytest.mark.parametrize("x64", [True])
def test_mgda_exact_with_task_norms_1e_minus_3_and_1e3(x64):
  rng = np.random.default_rng(0)
  norms = np.array([1e-3, 1e3, 1e3, 1e-3, 1e3])
  directions = rng.normal(size=(5, 20))
  jac = directions / np.linalg.norm(directions, axis=1,
                                    keepdims=True) * norms[:, None]
  expected = _brute_force_min_norm(jac @ jac.T) @ jac
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    tx = mo.mgda(5)
    update, state = tx.update(jnp.asarray(jac, dtype),
                              tx.init(jnp.zeros(20, dtype)))
  update = np.asarray(update, np.float64)
  cosine = update @ expected / np.linalg.norm(update) / np.linalg.norm(expected)
  assert cosine > 1 - (1e-12 if x64 else 1e-5)
  np.testing.assert_allclose(np.linalg.norm(update), np.linalg.norm(expected),
                             rtol=1e-9 if x64 else 1e-3)
  assert float(state.residual) < (1e-10 if x64 else 1e-5)
