"""Nash-MTL, FairGrad and their alpha-fair Newton solver.

Oracle (float64, tests only): ``scipy.optimize.least_squares`` on the
equation ``w^(1/alpha) (A w) - 1 = 0`` in log coordinates, a different
formulation from the library's convex potential.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import mtl_optax as mo
from mtl_optax._src import solvers
from mtl_optax._src import tree_math

from tests.conftest import TORCHJD_J as J
from tests.conftest import apply_fresh


def _jacobians(rng, num_tasks):
  """Inputs with a bargaining solution (no Pareto-stationary point)."""
  dim = 2 * num_tasks + 3
  shared = rng.normal(size=(1, dim))
  out = {"random": rng.normal(size=(num_tasks, dim)),
         "correlated": rng.normal(size=(num_tasks, dim)) + 2 * shared,
         "scaled": rng.normal(size=(num_tasks, dim)) * np.exp(
             2 * rng.normal(size=(num_tasks, 1))),
         "near_colinear": shared * (1 + rng.random(size=(num_tasks, 1))) +
                          1e-3 * rng.normal(size=(num_tasks, dim))}
  if num_tasks >= 3:
    # Rank 2, but all gradients in an open half-space: a solution exists.
    basis = rng.normal(size=(2, dim))
    angles = rng.uniform(-1.2, 1.2, size=num_tasks)
    out["rank_deficient"] = np.stack([np.cos(angles), np.sin(angles)], 1) @ (
        basis) * (1 + rng.random(size=(num_tasks, 1)))
  return out


def _oracle(gram, alpha):
  """Solves w^(1/alpha) (A w) = 1 with scipy in log coordinates z = log w:
  BFGS on the potential 1/2 w^T A w - sum (w^p - 1)/p (whose only
  stationary point in z is the solution; the least-squares form alone has
  spurious minima where some w_i -> 0), then Levenberg-Marquardt on the
  equation itself. The returned point is certified by the equation."""
  power = 1.0 - 1.0 / alpha

  def potential(z):
    w = np.exp(z)
    barrier = np.sum(np.expm1(power * z) / power) if power else np.sum(z)
    grad = w * (gram @ w) - np.exp(power * z)
    return 0.5 * w @ gram @ w - barrier, grad

  def equation(z):
    return np.exp(z / alpha) * (gram @ np.exp(z)) - 1.0

  start = -alpha / (1 + alpha) * np.log(np.diagonal(gram))
  smooth = optimize.minimize(potential, start, jac=True, method="BFGS",
                             options={"gtol": 1e-12, "maxiter": 5000})
  sol = optimize.least_squares(equation, smooth.x, method="lm", xtol=1e-15,
                               ftol=1e-15, gtol=1e-15, max_nfev=20000)
  assert np.max(np.abs(sol.fun)) < 1e-10, "oracle did not converge"
  return np.exp(sol.x)


# ------------------------------------------------------------------ TorchJD


def test_nash_mtl_solves_torchjds_matrix_to_tolerance():
  """(TorchJD's values: tests/test_torchjd_values.py.)"""
  _, state = apply_fresh(mo.nash_mtl(2), J)
  assert float(state.residual) < 1e-5


# ----------------------------------------------------------- solver oracle


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 64])
def test_solver_matches_float64_oracle(num_tasks):
  rng = np.random.default_rng(num_tasks)
  with jax.enable_x64(True):
    solve = jax.jit(solvers.alpha_fair_weights)
    for kind, jac in _jacobians(rng, num_tasks).items():
      gram = jac @ jac.T
      for alpha in (0.5, 1.0, 3.0):
        expected = _oracle(gram, alpha)
        # Unit trace as in the methods, then back to the raw scale.
        unit = np.trace(gram) / num_tasks
        sol = solve(jnp.asarray(gram / unit), alpha)
        ours = np.asarray(sol.weights) * unit ** (-alpha / (1 + alpha))
        np.testing.assert_allclose(ours, expected, rtol=1e-7,
                                   err_msg=f"{kind} alpha={alpha}")
        assert float(sol.residual) < 1e-9, (kind, alpha)


@pytest.mark.parametrize("num_tasks", [2, 5, 64])
def test_solver_one_zero_task_matches_reduced_oracle(num_tasks):
  """A task with an exactly zero gradient leaves the system: weight 0, and
  the others solve the system of the remaining tasks (scipy oracle on it)."""
  rng = np.random.default_rng(100 + num_tasks)
  jac = rng.normal(size=(num_tasks, 2 * num_tasks + 3)) + rng.normal(
      size=(1, 2 * num_tasks + 3))
  zero = num_tasks // 2
  jac[zero] = 0.0
  rest = np.delete(np.arange(num_tasks), zero)
  gram = jac @ jac.T
  with jax.enable_x64(True):
    for alpha in (0.5, 1.0, 3.0):
      sol = solvers.alpha_fair_weights(jnp.asarray(gram), alpha)
      assert float(sol.weights[zero]) == 0.0
      np.testing.assert_allclose(
          np.asarray(sol.weights)[rest],
          _oracle(gram[np.ix_(rest, rest)], alpha), rtol=1e-7,
          err_msg=f"alpha={alpha}")
      assert float(sol.residual) < 1e-9


def _nash_value(jac, w):
  """sum_i log <g_i, d> - (K/2) log ||d||^2 at d = J^T w: the log of the
  product of the improvements on the unit ball (-inf outside the cone)."""
  gram = jac @ jac.T
  improvements = w @ gram
  norm_sq = np.einsum("...j,jk,...k->...", w, gram, w)
  with np.errstate(divide="ignore", invalid="ignore"):
    value = np.sum(np.log(improvements), -1) - len(jac) / 2 * np.log(norm_sq)
  return np.where(np.all(improvements > 0, -1), value, -np.inf)


def _nash_grid_weights(jac, points=400):
  """Brute force over the simplex (K <= 3): the grid point maximising
  :func:`_nash_value`, a different formulation from the solver's
  equation ``alpha_i (A alpha)_i = 1``."""
  steps = np.arange(points + 1) / points
  if len(jac) == 2:
    grid = np.stack([steps, 1 - steps], 1)
  else:
    a, b = np.meshgrid(steps, steps, indexing="ij")
    keep = a + b <= 1 + 1e-12
    grid = np.stack([a[keep], b[keep], np.clip(1 - a[keep] - b[keep], 0,
                                               None)], 1)
  return grid[np.argmax(_nash_value(jac, grid))]


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_nash_mtl_matches_brute_force_simplex_grid(num_tasks):
  rng = np.random.default_rng(20 + num_tasks)
  for trial in range(3):
    jac = rng.normal(size=(num_tasks, 6)) + rng.normal(size=(1, 6))
    if trial == 2:  # one task nearly colinear with another, rescaled
      jac[-1] = 3.0 * jac[0] + 0.05 * rng.normal(size=6)
    grid_w = _nash_grid_weights(jac)
    _, state = apply_fresh(mo.nash_mtl(num_tasks, max_norm=0.0),
                      jac.astype(np.float32))
    ours = np.asarray(state.alpha, np.float64)
    ours = ours / ours.sum()
    # The solution is at least as good as the best grid point, and the
    # update directions agree; near-colinear tasks make the objective flat
    # along w (not along d), so w itself is compared on the generic trials.
    assert _nash_value(jac, ours) >= _nash_value(jac, grid_w) - 1e-9, trial
    d_ours, d_grid = ours @ jac, grid_w @ jac
    cosine = d_ours @ d_grid / np.linalg.norm(d_ours) / np.linalg.norm(d_grid)
    assert cosine > 1 - 1e-4, trial
    if trial < 2:  # grid spacing 1/400
      np.testing.assert_allclose(ours, grid_w, atol=4e-3, err_msg=trial)


# --------------------------------------------------------------- properties


def test_nash_bargaining_condition_and_norm():
  """alpha_i <g_i, d> = 1 on the raw scale, ||d|| = sqrt(K) unclipped,
  max_norm rescales; invariance to per-task gradient scales."""
  rng = np.random.default_rng(4)
  for num_tasks in (2, 5):
    jac = (rng.normal(size=(num_tasks, 10)) + rng.normal(size=(1, 10))) * 3.7
    jac = jac.astype(np.float32)
    update, state = apply_fresh(mo.nash_mtl(num_tasks, max_norm=0.0), jac)
    products = np.asarray(state.alpha) * (jac @ np.asarray(update))
    np.testing.assert_allclose(products, 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(update), np.sqrt(num_tasks),
                               rtol=1e-4)
    clipped, clipped_state = apply_fresh(mo.nash_mtl(num_tasks, max_norm=0.5),
                                    jac)
    np.testing.assert_allclose(clipped, 0.5 * np.asarray(update) /
                               np.sqrt(num_tasks), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(clipped_state.alpha, state.alpha, rtol=1e-5)
    scales = np.exp(rng.normal(size=(num_tasks, 1))).astype(np.float32)
    rescaled, _ = apply_fresh(mo.nash_mtl(num_tasks, max_norm=0.0), jac * scales)
    np.testing.assert_allclose(rescaled, update, rtol=1e-4, atol=1e-5)


def test_fairgrad_equation_and_scale_law():
  """A w = w^(-1/alpha) on the raw Gram matrix; with J -> s J the update
  scales as s^((1 - alpha) / (1 + alpha)). alpha is injected, so one
  compilation serves every value."""
  rng = np.random.default_rng(1)
  jac = rng.normal(size=(4, 9)) + rng.normal(size=(1, 9))
  with jax.enable_x64(True):
    tx = optax.inject_hyperparams(mo.fairgrad, static_args=(
        "num_tasks", "max_iter"))(num_tasks=4, alpha=1.0, max_iter=50)
    state = tx.init(jnp.zeros(9))
    step = jax.jit(tx.update)
    for alpha in (0.5, 1.0, 2.0, 5.0):
      state.hyperparams["alpha"] = jnp.asarray(alpha)
      update, new_state = step(jnp.asarray(jac), state)
      w = np.asarray(new_state.inner_state.weights)
      np.testing.assert_allclose((jac @ jac.T) @ w, w ** (-1 / alpha),
                                 rtol=1e-9)
      np.testing.assert_allclose(w, _oracle(jac @ jac.T, alpha), rtol=1e-8)
      assert float(new_state.inner_state.residual) < 1e-9
      for scale in (1e-3, 1e3):
        scaled, _ = step(jnp.asarray(jac * scale), state)
        np.testing.assert_allclose(
            scaled, np.asarray(update) * scale ** ((1 - alpha) / (1 + alpha)),
            rtol=1e-8)


def test_fairgrad_alpha_one_is_nash_and_alpha_zero_is_the_mean():
  rng = np.random.default_rng(5)
  jac = (rng.normal(size=(2, 3)) + rng.normal(size=(1, 3))).astype(np.float32)
  fair, fair_state = apply_fresh(mo.fairgrad(2, alpha=1.0), jac)
  nash, nash_state = apply_fresh(mo.nash_mtl(2, max_norm=0.0), jac)
  np.testing.assert_allclose(fair, nash, rtol=1e-5)
  np.testing.assert_allclose(fair_state.weights, nash_state.weights,
                             rtol=1e-5)
  mean, state = apply_fresh(mo.fairgrad(2, alpha=0.0), jac)
  np.testing.assert_allclose(mean, jac.mean(0), rtol=1e-6)
  np.testing.assert_allclose(state.weights, 0.5)


def test_update_every_reuses_alpha():
  rng = np.random.default_rng(6)
  grads = [(rng.normal(size=(3, 7)) + rng.normal(size=(1, 7))).astype(
      np.float32) for _ in range(4)]
  tx = mo.nash_mtl(3, update_every=3, max_norm=0.0)
  step = jax.jit(tx.update)
  state = tx.init(jnp.zeros(7))
  alphas = []
  for g in grads:
    update, state = step(jnp.asarray(g), state)
    alphas.append(np.asarray(state.alpha))
    np.testing.assert_allclose(update, state.weights @ g, rtol=1e-5,
                               atol=1e-6)
  assert int(state.count) == 4
  np.testing.assert_array_equal(alphas[0], alphas[1])
  np.testing.assert_array_equal(alphas[0], alphas[2])
  assert not np.allclose(alphas[2], alphas[3])
  # Step 3 solved afresh: the bargaining condition holds for grads[3].
  products = alphas[3] * (grads[3] @ (alphas[3] @ grads[3]))
  np.testing.assert_allclose(products, 1.0, rtol=1e-4)


def test_degenerate_inputs_are_reported_not_averaged():
  g = np.array([1.0, 2.0, -1.0], np.float32)
  # K = 1: alpha = 1 / ||g||, d = g / ||g|| (norm 1 = sqrt(K)).
  update, state = apply_fresh(mo.nash_mtl(1, max_norm=0.0), g[None])
  np.testing.assert_allclose(update, g / np.linalg.norm(g), rtol=1e-5)
  # A zero task: weight 0, the others solve their own system.
  two = np.stack([g, 0 * g, np.array([0.5, 1.0, 1.0], np.float32)])
  update, state = apply_fresh(mo.nash_mtl(3, max_norm=0.0), two)
  assert float(state.alpha[1]) == 0.0
  reduced, _ = apply_fresh(mo.nash_mtl(2, max_norm=0.0), two[[0, 2]])
  np.testing.assert_allclose(update, reduced, rtol=1e-5)
  assert float(state.residual) < 1e-5
  # Opposite gradients (Pareto-stationary): no solution; finite answer,
  # zero update, residual ~1 says so.
  for tx in (mo.nash_mtl(2), mo.fairgrad(2)):
    update, state = apply_fresh(tx, np.stack([g, -g]))
    # The ridge-regularised weights are ~1/sqrt(eps): their float32
    # cancellation leaves ~5e-5 of ||g||.
    np.testing.assert_allclose(update, np.zeros(3), atol=5e-4)
    assert np.all(np.isfinite(state.weights))
    assert float(state.residual) > 0.5
  # All zero: zero update, zero weights.
  update, state = apply_fresh(mo.nash_mtl(2), np.zeros((2, 3), np.float32))
  np.testing.assert_array_equal(update, np.zeros(3))
  np.testing.assert_array_equal(state.alpha, np.zeros(2))
  # FairGrad with alpha != 1 on the same inputs: finite, documented answers.
  step = jax.jit(lambda grads: apply_fresh(mo.fairgrad(2, alpha=0.5), grads))
  for grads in (np.stack([g, -g]), np.stack([g, 0 * g]), np.zeros((2, 3)),
                np.stack([g, 2 * g]) * np.float32(1e-30),
                np.stack([g, 2 * g]) * np.float32(1e30)):
    update, state = step(jnp.asarray(grads, jnp.float32))
    assert np.all(np.isfinite(update)) and np.all(np.isfinite(
        state.weights)), grads
  update, state = step(jnp.asarray(np.stack([g, 0 * g])))
  assert float(state.weights[1]) == 0.0
  np.testing.assert_allclose(  # w = |g|^(-2/3): A w = w^-2 for one task
      state.weights[0], np.linalg.norm(g) ** (-2 / 3), rtol=1e-5)


def test_warm_start_from_an_unconverged_solve_stays_finite():
  """Gradients that are multiples of one vector with mixed signs (a
  Pareto-stationary point) leave the first solve unconverged; the next solve,
  warm-started there, started on a ray where the rounded quadratic was 0 and
  returned inf weights and a NaN residual."""
  rng = np.random.default_rng(0)
  rng.normal(size=(3, 9))   # the draw the failing input came after
  grads = np.zeros((3, 9), np.float32)
  grads[:, 3] = rng.normal(size=3)   # -0.92, -0.46, 0.22
  gram = tree_math.normalized_gram(jnp.asarray(grads)).gram  # as the method
  first = solvers.alpha_fair_weights(gram, init=jnp.ones(3), max_iter=20)
  assert float(first.residual) > 1.0   # no solution: reported, not hidden
  second = solvers.alpha_fair_weights(gram, init=first.weights, max_iter=20)
  assert np.all(np.isfinite(second.weights)) and np.all(second.weights > 0)
  assert np.isfinite(float(second.residual))
  # The same through the method, solving every other step.
  tx = mo.nash_mtl(3, update_every=2, max_iter=20, max_norm=0.0)
  step = jax.jit(tx.update)
  state = tx.init(jnp.zeros(9))
  for _ in range(4):
    update, state = step(jnp.asarray(grads), state)
    assert np.all(np.isfinite(update))
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


def test_magnitudes_from_tiny_to_huge():
  """Nash-MTL's update has norm sqrt(K) whatever the scale (clipped to 1);
  the raw-scale alpha stays finite for gradients of 1e-30 ... 1e30."""
  jac = np.array([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0],
                  [-1.0, 0.2, 0.3, -0.4]], np.float32)
  tx = mo.nash_mtl(3, max_norm=0.0)
  step = jax.jit(lambda g: apply_fresh(tx, g))
  reference, ref_state = step(jac)
  for scale in (1e-30, 1e-10, 1e10, 1e30):
    update, state = step(jac * np.float32(scale))
    np.testing.assert_allclose(update, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.alpha) * scale,
                               ref_state.alpha, rtol=1e-4)


def test_injectable_max_norm_and_traced_iteration_counts():
  """alpha is injected in test_fairgrad_equation_and_scale_law; here
  max_norm, with the iteration counts left out of static_args (they only
  bound loops, so traced values work)."""
  grads = jnp.asarray(J, jnp.float32)
  tx = optax.inject_hyperparams(mo.nash_mtl, static_args=("num_tasks",))(
      num_tasks=2, max_norm=1.0)
  step = jax.jit(tx.update)
  state = tx.init(jnp.zeros(3))
  update, state = step(grads, state)
  np.testing.assert_allclose(update, [0.0542, 0.7061, 0.7061], atol=1e-4)
  state.hyperparams["max_norm"] = jnp.asarray(0.0)
  update, _ = step(grads, state)
  np.testing.assert_allclose(update, [0.0766, 0.9985, 0.9985], atol=1e-4)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="alpha"):
    mo.fairgrad(2, alpha=-1.0)
  with pytest.raises(ValueError, match="max_norm"):
    mo.nash_mtl(2, max_norm=-1.0)
  with pytest.raises(ValueError, match="update_every"):
    mo.nash_mtl(2, update_every=0)
  with pytest.raises(ValueError, match="max_iter"):
    mo.nash_mtl(2, max_iter=0)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 3.0])
def test_fairgrad_alpha_not_one_is_scale_safe(alpha):
  # A w = w^(-1/alpha) for s^2 A is solved by s^(-2a/(1+a)) w, so the update
  # scales as s^((1-a)/(1+a)): finite and exact from 1e-30 to 1e30.
  grads = jnp.array([[1.0, 0.0], [0.3, 1.0]])
  tx = mo.fairgrad(2, alpha=alpha)
  unit, unit_state = tx.update(grads, tx.init(jnp.zeros(2)))
  for scale in (1e-30, 1e-10, 1e10, 1e30):
    update, state = jax.jit(tx.update)(scale * grads, tx.init(jnp.zeros(2)))
    expected = np.asarray(unit, np.float64) * scale ** (
        (1 - alpha) / (1 + alpha))
    np.testing.assert_allclose(np.asarray(update, np.float64), expected,
                               rtol=1e-4)
    assert np.all(np.isfinite(state.weights)) and np.isfinite(state.residual)
    np.testing.assert_allclose(state.residual, unit_state.residual, atol=1e-5)


def test_nash_mtl_default_converges_at_a_large_norm_ratio():
  rng = np.random.default_rng(0)
  for _ in range(3):
    directions = rng.normal(size=(4, 12))
    norms = np.array([1e-3, 1.0, 1e3, 3.0])
    grads = jnp.asarray(directions / np.linalg.norm(
        directions, axis=1, keepdims=True) * norms[:, None], jnp.float32)
    tx = mo.nash_mtl(4, max_norm=0.0)
    _, state = tx.update(grads, tx.init(jnp.zeros(12)))
    assert float(state.residual) < 1e-4


def test_nash_mtl_old_spellings_warn_and_keep_working():
  jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
  new = mo.nash_mtl(2, update_every=2, max_iter=30)
  with pytest.warns(DeprecationWarning) as caught:
    old = mo.nash_mtl(2, update_weights_every=2, optim_niter=30)
  assert {"update_every", "max_iter"} <= {
      w for c in caught for w in ("update_every", "max_iter")
      if w in str(c.message)}
  u_new, s_new = new.update(jac, new.init(jnp.zeros(3)))
  u_old, s_old = old.update(jac, old.init(jnp.zeros(3)))
  np.testing.assert_array_equal(u_new, u_old)
  with pytest.warns(DeprecationWarning, match="count"):
    assert int(s_old.step) == int(s_new.count) == 1
  with pytest.warns(DeprecationWarning, match="update_every"):
    mo.gram_weightings.nash_mtl(jac @ jac.T, update_weights_every=1)
