"""The K = 2 closed forms against the iterative solvers and brute force."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax._src import solvers
from mtl_optax._src import two_task


def _grams():
  """Random and adversarial 2 x 2 Gram matrices (float64), by name."""
  rng = np.random.default_rng(0)
  out = {}
  for i in range(5):
    jac = rng.normal(size=(2, 5)) * np.exp(rng.normal(size=(2, 1)))
    out[f"random{i}"] = jac
  g = np.array([1.0, 2.0, -0.5])
  out.update({
      "zero": np.zeros((2, 3)),
      "identical": np.stack([g, g]),
      "opposite": np.stack([g, -g]),
      "opposite_unequal": np.stack([g, -3.0 * g]),
      "one_zero": np.stack([g, np.zeros(3)]),
      "zero_one": np.stack([np.zeros(3), g]),
      "orthogonal": np.eye(2, 3),
      "near_colinear": np.stack([g, g + 1e-4 * np.array([0.0, 1.0, 0.0])]),
      "norm_ratio_1e6": np.stack([1e3 * g, 1e-3 * np.array([2.0, -1.0, 1.0])]),
      "aligned_unequal": np.stack([g, 5.0 * g]),
      "torchjd": np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]),
  })
  return {name: (jac @ jac.T, jac) for name, jac in out.items()}


GRAMS = _grams()


def _unit(gram):
  trace = np.trace(gram)
  return gram / trace * 2 if trace > 0 else gram


def _brute_force_1d(objective):
  """Minimiser of a convex function of ``t in [0, 1]`` by ternary search."""
  lo, hi = 0.0, 1.0
  for _ in range(200):
    m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
    if objective(m1) <= objective(m2):
      hi = m2
    else:
      lo = m1
  return 0.5 * (lo + hi)


def _iterative_min_norm(gram):
  value_and_grad = lambda w: (0.5 * w @ gram @ w, gram @ w)
  return solvers.minimize_on_simplex(
      value_and_grad, jnp.full((2,), 0.5, gram.dtype),
      solvers.largest_eigenvalue(gram), 5000, 1e-13)


def _iterative_cagrad(gram, c):
  # The general solver's objective, without the K = 2 dispatch.
  b = jnp.full((2,), 0.5, gram.dtype)
  gram_b = gram @ b
  radius = c * jnp.sqrt(jnp.maximum(b @ gram_b, 0.0))

  def value_and_grad(w):
    norm_w = jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0) + 1e-30)
    return w @ gram_b + radius * norm_w, gram_b + radius * gram @ w / norm_w

  return solvers.minimize_on_simplex(
      value_and_grad, b, solvers.largest_eigenvalue(gram) + radius, 5000,
      1e-13)


@pytest.mark.parametrize("name", list(GRAMS))
def test_min_norm_matches_iterative_solver_and_brute_force(name):
  gram, jac = GRAMS[name]
  gram = _unit(gram)
  with jax.enable_x64(True):
    w, residual = two_task.min_norm_weights(jnp.asarray(gram))
    ref = _iterative_min_norm(jnp.asarray(gram))
  w, ref_w = np.asarray(w), np.asarray(ref.weights)
  assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-12 and w.min() >= 0
  assert float(residual) < 1e-9
  norm = lambda v: float(v @ gram @ v)
  t = _brute_force_1d(lambda t: norm(np.array([t, 1 - t])))
  # The min-norm point (the update direction) is unique; the weights are
  # unless the two gradients coincide.
  for other in (ref_w, np.array([t, 1 - t])):
    np.testing.assert_allclose(w @ jac / np.sqrt(np.trace(jac @ jac.T) / 2 or 1),
                               other @ jac / np.sqrt(
                                   np.trace(jac @ jac.T) / 2 or 1), atol=1e-6)
    assert norm(w) <= norm(other) + 1e-12
  if gram[0, 0] - 2 * gram[0, 1] + gram[1, 1] > 1e-6:
    np.testing.assert_allclose(w, ref_w, atol=1e-6)


@pytest.mark.parametrize("c", [0.0, 0.4, 10.0])
@pytest.mark.parametrize("name", list(GRAMS))
def test_cagrad_dual_matches_iterative_solver_and_brute_force(name, c):
  gram, _ = GRAMS[name]
  gram = _unit(gram)
  b = np.full(2, 0.5)
  radius = c * np.sqrt(max(b @ gram @ b, 0.0))
  objective = lambda w: w @ gram @ b + radius * np.sqrt(max(w @ gram @ w, 0))
  # A is known to its rounding e only, so ||g_w|| = sqrt(w A w) is known to
  # sqrt(q + e) - sqrt(q), q = w A w: about e / (2 sqrt(q)) in general, but
  # sqrt(e) ~ 1e-8 where the gradients cancel (opposite, unequal), which
  # bounds how well any solver working on A (or this objective's own
  # evaluation) can do there.
  rounding = 8 * np.finfo(np.float64).eps * np.abs(gram).max()
  def tol(w):
    q = max(w @ gram @ w, 0.0)
    return 1e-12 + radius * (np.sqrt(q + rounding) - np.sqrt(q))
  with jax.enable_x64(True):
    w, residual = two_task.cagrad_dual_weights(jnp.asarray(gram), c)
    ref = _iterative_cagrad(jnp.asarray(gram), c)
  w, ref_w = np.asarray(w), np.asarray(ref.weights)
  assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-12 and w.min() >= 0
  assert float(residual) == 0.0
  t = _brute_force_1d(lambda t: objective(np.array([t, 1 - t])))
  assert objective(w) <= min(objective(ref_w), objective(
      np.array([t, 1 - t]))) + tol(w)
  # Where the minimiser is unique and well conditioned, the weights agree.
  values = [objective(np.array([s, 1 - s])) for s in (0.0, 0.5, 1.0)]
  if np.ptp(values) > 1e-3 and name not in ("opposite_unequal",):
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    np.testing.assert_allclose(w[0], t, atol=1e-6)


def _qp_oracle(quad, lower):
  """Enumerates the active sets of the 2-variable QP (float64 NumPy), on
  ``quad`` with the solvers' diagonal floor ``eps * max(diag)``."""
  quad = quad + np.finfo(np.float64).eps * np.max(np.diagonal(quad)) * np.eye(2)
  best, best_value = None, np.inf
  for active in itertools.product([False, True], repeat=2):
    v = np.where(active, lower, 0.0)
    free = ~np.array(active)
    if free.any():
      qf = quad[np.ix_(free, free)]
      rhs = -quad[np.ix_(free, ~free)] @ lower[~free]
      v[free] = np.linalg.lstsq(qf, rhs, rcond=None)[0]
    if np.all(v >= lower - 1e-12):
      value = 0.5 * v @ quad @ v
      if value < best_value - 1e-15:
        best, best_value = v, value
  return best


@pytest.mark.parametrize("ridge", [0.0, 2e-4])
@pytest.mark.parametrize("name", list(GRAMS))
def test_box_qp_matches_interior_point_and_enumeration(name, ridge):
  gram, jac = GRAMS[name]
  quad = _unit(gram) + ridge * np.eye(2)
  rng = np.random.default_rng(1)
  lower = np.concatenate([np.eye(2) / 2, [[0.5, 0.5]], rng.normal(size=(3, 2))])
  with jax.enable_x64(True):
    v, residual = two_task.lower_bounded_qp(jnp.asarray(quad),
                                            jnp.asarray(lower))
    ref = solvers._lower_bounded_qp(jnp.asarray(quad), jnp.asarray(lower),
                                    100, None)
  v, ref_v = np.asarray(v), np.asarray(ref.solution)
  assert np.all(np.isfinite(v)) and np.all(v >= lower - 1e-12)
  assert float(residual) < 1e-9
  scale = np.sqrt(np.trace(jac @ jac.T) / 2) or 1.0
  unit_jac = jac / scale
  for row in range(len(lower)):
    expected = _qp_oracle(quad, lower[row])
    # The projection J^T v is unique even when v is not (singular Q).
    np.testing.assert_allclose(v[row] @ unit_jac, ref_v[row] @ unit_jac,
                               atol=1e-6)
    np.testing.assert_allclose(v[row] @ unit_jac, expected @ unit_jac,
                               atol=1e-6)
    if ridge > 0 and np.all(np.diagonal(quad) > 1e-3):
      np.testing.assert_allclose(v[row], ref_v[row], atol=1e-6)
      np.testing.assert_allclose(v[row], expected, atol=1e-6)


def test_closed_forms_propagate_nan_and_report_no_iterations():
  bad = jnp.array([[1.0, jnp.nan], [jnp.nan, 1.0]])
  assert np.all(np.isnan(two_task.min_norm_weights(bad)[0]))
  assert np.all(np.isnan(two_task.cagrad_dual_weights(bad, 0.4)[0]))
  assert np.all(np.isnan(two_task.lower_bounded_qp(bad, jnp.eye(2))[0]))
  sol = solvers.min_norm_weights(jnp.eye(2))
  assert int(sol.iterations) == 0
  np.testing.assert_allclose(sol.weights, [0.5, 0.5])


@pytest.mark.parametrize("factory", [mo.mgda, mo.cagrad, mo.upgrad,
                                     mo.dualproj])
def test_methods_at_two_tasks_are_finite_on_degenerate_gradients(factory):
  tx = factory(2)
  for name in ("zero", "identical", "opposite", "opposite_unequal",
               "one_zero", "zero_one"):
    grads = jnp.asarray(GRAMS[name][1], jnp.float32)
    params = jnp.zeros(3)
    for run in (tx.update, jax.jit(tx.update)):
      update, state = run(grads, tx.init(params), params)
      assert np.all(np.isfinite(update)), name
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)), name
    bad = grads.at[0, 0].set(jnp.nan)
    update, state = jax.jit(tx.update)(bad, tx.init(params), params)
    assert np.all(np.isnan(update)), name
