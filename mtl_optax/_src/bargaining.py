"""Bargaining and fairness weightings: Nash-MTL and FairGrad.

Both pick ``d = sum_i w_i g_i`` from the nonlinear system
``A w = w^(-1/alpha)`` on the Gram matrix ``A``: ``alpha = 1`` is the Nash
bargaining solution ``w_i (A w)_i = 1`` (Nash-MTL), general ``alpha`` is
FairGrad's alpha-fairness. The system is the stationarity condition of a
strictly convex potential and is solved on device by Newton's method
(:func:`mtl_optax._src.solvers.alpha_fair_weights`), not by host-side cvxpy
or scipy calls, and never replaced silently by plain averaging: the residual
of the system is kept in the state.

Neither method is invariant to the scale of the gradients: the weights solve
the system for the raw Gram matrix ``A = rms**2 * gram``, recovered from the
scale-free one by a closed-form factor (the solution of
``c A w = w^(-1/alpha)`` is ``c^(-alpha/(1+alpha))`` times that of
``A w = w^(-1/alpha)``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import deprecation
from mtl_optax._src import solvers
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = (
    "FairGradState",
    "NashMTLState",
    "fairgrad",
    "nash_mtl",
)


def _to_raw_scale(weights: jax.Array, rms_norm: jax.Array,
                  exponent: jax.Array) -> jax.Array:
  """``weights * rms_norm**exponent``, 0 where ``weights`` is 0 (all-zero
  gradients have ``rms_norm = 0``)."""
  factor = jnp.exp(exponent * jnp.log(rms_norm))
  return jnp.where(weights > 0, weights * factor, 0.0)


class FairGradSolution(NamedTuple):
  """FairGrad's solution on a normalised Gram matrix (see
  :func:`fairgrad_solution`)."""
  unit: jax.Array  # the solution for the normalised matrix
  raw: jax.Array  # the raw-scale weights (1/K for alpha = 0)
  residual: jax.Array
  fair: jax.Array  # alpha > 0
  alpha: jax.Array  # alpha, or 1 where alpha = 0
  rms_norm: jax.Array  # the RMS task-gradient norm, or 1 where it is 0


def fairgrad_solution(gram: jax.Array, rms_norm: jax.Array,
                      alpha: float | jax.Array, max_iter: int,
                      tol: Optional[float]) -> FairGradSolution:
  """``A w = w^(-1/alpha)`` for ``A = gram * rms_norm**2``: solved on the
  normalised ``gram``, then brought to the raw scale (``w`` scales as
  ``rms_norm**(-2 alpha / (1 + alpha))``); ``alpha = 0`` gives ``1/K``."""
  dtype = gram.dtype
  a = jnp.asarray(alpha, dtype)
  fair = a > 0
  safe = jnp.where(fair, a, 1.0)
  sol = solvers.alpha_fair_weights(gram, safe, max_iter=max_iter, tol=tol)
  rms = rms_norm.astype(dtype)
  safe_rms = jnp.where(rms > 0, rms, 1.0)
  raw = jnp.where(fair, _to_raw_scale(sol.weights, safe_rms,
                                      -2.0 * safe / (1.0 + safe)),
                  base.uniform_weights(gram.shape[0], dtype))
  return FairGradSolution(sol.weights, raw, jnp.where(fair, sol.residual, 0.0),
                          fair, safe, safe_rms)


@jax.jit
def _nash_alpha(gram, rms, previous, residual, step, every, max_iter, tol):
  """Raw-scale bargaining solution, solved every ``every`` steps."""
  # Module-level jit: eager calls reuse the compiled solver and cond.

  def solve(_):
    sol = solvers.alpha_fair_weights(gram, 1.0, init=previous,
                                     max_iter=max_iter, tol=tol)
    # gram = A / rms**2, so alpha(A) = alpha(gram) / rms.
    return (_to_raw_scale(sol.weights, rms, -1.0),
            sol.residual.astype(residual.dtype))

  def reuse(_):
    return previous, residual

  if every is None:  # a solve at every step: no cond to compile
    return solve(None)
  return jax.lax.cond(step % every == 0, solve, reuse, None)


class NashMTLState(NamedTuple):
  """State of :func:`nash_mtl`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update: ``alpha`` after the
      ``max_norm`` rescaling, so ``d = sum_i weights[i] g_i``.
    alpha: ``(K,)`` the last bargaining solution ``alpha_i (A alpha)_i = 1``
      on the raw Gram matrix, before rescaling; reused between solves and
      the warm start of the next one. 0 for tasks with a zero gradient.
    count: ``()`` int32 number of updates so far (formerly ``step``, a
      deprecated alias).
    residual: ``()`` ``max_i |alpha_i (A alpha)_i - 1|`` of the last solve.
  """
  weights: jax.Array
  alpha: jax.Array
  count: jax.Array
  residual: jax.Array

  step = deprecation.renamed_field("count", "step")


def nash_mtl_initial_state(num_tasks: int, dtype: Any) -> NashMTLState:
  """Nash-MTL's initial state (of the factory and of the Gram-weighting
  layer): ``alpha = weights = 1``, no step yet, zero residual."""
  return NashMTLState(jnp.ones((num_tasks,), dtype),
                      jnp.ones((num_tasks,), dtype),
                      jnp.zeros((), jnp.int32), jnp.zeros((), dtype))


@deprecation.renamed_arguments(update_weights_every="update_every",
                               optim_niter="max_iter")
def nash_mtl(num_tasks: int, update_every: int = 1,
             max_iter: int = 100, max_norm: float = 1.0,
             tol: Optional[float] = None
             ) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL: the Nash bargaining solution between the tasks.

  Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
  Learning as a Bargaining Game", ICML 2022. ``d = sum_i alpha_i g_i`` with
  ``alpha_i (A alpha)_i = 1`` for every task (``A`` the raw Gram matrix), i.e.
  every task's improvement ``<g_i, d> = 1 / alpha_i``: the maximiser of
  ``sum_i log <g_i, d>`` on a ball. The paper solves it by a sequence of
  cvxpy problems; here ``alpha`` minimises the convex potential
  ``1/2 alpha^T A alpha - sum_i log alpha_i`` by Newton's method with at most
  ``max_iter`` steps, warm-started from the previous ``alpha`` (see
  ``solvers.alpha_fair_weights``).

  .. math::

     d &= \\sum_i \\alpha_i g_i, \\\\
     \\alpha_i (A \\alpha)_i &= 1 \\;\\; \\forall i
     \\quad \\big(\\text{i.e. } \\langle g_i, d \\rangle = 1 / \\alpha_i\\big)

  As in the official code, the weights are recomputed every
  ``update_every`` steps (the others reuse ``alpha``), and ``alpha``
  is rescaled so that ``||d|| <= max_norm`` (``max_norm = 0`` disables it);
  the official code clips the shared gradient's norm, which is the same.
  The official code also divides the Gram matrix by its Frobenius norm, for
  its solver's conditioning only: its constraints
  ``alpha_i (A alpha)_i >= 1`` multiply the factor back, so its solution is
  the raw-scale one used here (and TorchJD's published value, below, is
  reproduced).

  Output scale: the paper's, not ``g0``'s. At the solution
  ``||d||**2 = alpha^T A alpha = K`` whatever the gradients' scale, so
  ``||d|| = min(sqrt(K), max_norm)``. The official trainers multiply the
  heads' gradients by ``alpha_i`` too; with ``optax.partition`` the heads get
  their own task's gradient unweighted (``mo.task_sum``).

  Degenerate cases, never a silent fallback: tasks with an exactly zero
  gradient get ``alpha_i = 0``; at a Pareto-stationary point (some
  non-negative combination of gradients vanishes) no solution exists, a
  ridge of relative size eps keeps ``alpha`` finite, and ``residual`` (near
  1 or larger) reports it. The method is invariant to rescaling any single
  task's gradient.

  Args:
    num_tasks: number of tasks K.
    update_every: solve every this many steps (int >= 1; formerly
      ``update_weights_every``, a deprecated alias).
    max_iter: cap on Newton steps per solve (int >= 1). The loop stops
      at ``tol``, so warm-started steps take a few; the cap matters on hard
      problems (a 1e6 ratio of task-gradient norms leaves residuals of
      0.15-0.84 after 20 steps and converges to 1e-15 within 100). Not the
      official ``optim_niter``, which counts cvxpy sub-problems (the old
      keyword ``optim_niter`` is a deprecated alias).
    max_norm: bound on ``||d||``; 0 disables it (injectable).
    tol: Newton tolerance on the relative residual; default 1e-5 in
      float32, 1e-10 in float64.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`NashMTLState`.

  Example (TorchJD's test matrix J = [[-4, 1, 1], [6, 1, 1]]; TorchJD's
  NashMTL gives the same update [0.0542, 0.7061, 0.7061]; the bargaining
  equations ``alpha_i (G alpha)_i = 1`` hold):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> update, state = mo.nash_mtl(2).update(jac, mo.nash_mtl(2).init(jac[0]))
    >>> alpha = state.alpha
    >>> print(np.asarray(update, np.float64).round(4),
    ...       np.asarray(alpha * (jac @ jac.T @ alpha), np.float64).round(4))
    [0.0542 0.7061 0.7061] [1. 1.]
  """
  method = "nash_mtl"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_positive_int(update_every, "update_every", method)
  validation.check_positive_int(max_iter, "max_iter", method)
  validation.check_nonnegative(max_norm, "max_norm", method)

  from mtl_optax import gram_weightings  # pylint: disable=g-import-not-at-top

  def rule(context, state):
    return gram_weightings.nash_mtl(
        tree_math.NormalizedGram(context.gram, context.rms_norm), state,
        update_every=update_every, max_iter=max_iter,
        max_norm=max_norm, tol=tol)

  return base.task_weighting_transformation(
      num_tasks, method,
      lambda dtype: nash_mtl_initial_state(num_tasks, dtype), rule)


class FairGradState(NamedTuple):
  """State of :func:`fairgrad`.

  Attributes:
    weights: ``(K,)`` the solution ``w`` of ``A w = w^(-1/alpha)`` on the raw
      Gram matrix; ``d = sum_i weights[i] g_i``.
    residual: ``()`` ``max_i |w_i^(1/alpha) (A w)_i - 1|`` of the last solve.
  """
  weights: jax.Array
  residual: jax.Array


def fairgrad(num_tasks: int, alpha: float = 1.0, max_iter: int = 50,
             tol: Optional[float] = None
             ) -> optax.GradientTransformationExtraArgs:
  """FairGrad: alpha-fair allocation of the update between tasks.

  Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024,
  Eq. 4 and Algorithm 1. ``d = sum_i w_i g_i`` with ``A w = w^(-1/alpha)``
  (``A`` the raw Gram matrix), the optimality condition of maximising
  ``sum_i (<g_i, d>)^(1-alpha) / (1-alpha)`` on a ball. ``alpha = 1`` is
  Nash-MTL's bargaining solution; larger ``alpha`` moves towards max-min
  fairness. ``alpha = 0`` gives the mean gradient (linear scalarization), as
  in TorchJD. Solved by Newton's method on the convex potential
  ``1/2 w^T A w - sum_i (w_i^p - 1) / p``, ``p = 1 - 1/alpha`` (see
  ``solvers.alpha_fair_weights``), where the official
  code and TorchJD call ``scipy.optimize.least_squares`` on the host. The
  official trainer then multiplies the update by K and clips its norm to 1;
  chain ``optax.scale(num_tasks)`` and ``optax.clip_by_global_norm(1.0)``
  for that.

  .. math::

     d = \\sum_i w_i g_i, \\qquad A w = w^{-1/\\alpha} \\;\\text{(element-wise)}

  Output scale: the paper's. The weights scale as ``|g|^(-2 alpha / (1 +
  alpha))`` and the update as ``|g|^((1 - alpha) / (1 + alpha))``: for
  ``alpha = 1``, ``||d|| = sqrt(K)`` whatever the gradients' scale. The
  system is solved on the scale-free Gram matrix and the update formed as
  ``rms^((1 - alpha)/(1 + alpha)) sum_i (w_hat_i / rms) g_i`` (``rms`` the
  RMS task-gradient norm), so it stays finite from 1e-30 to 1e30 although
  for ``alpha != 1`` the raw weights may not be representable there: then
  ``state.weights`` saturates at the dtype's largest value (or underflows
  to 0) and is no longer exact. Zero gradients and Pareto-stationary points are handled as
  in :func:`nash_mtl` and reported by ``residual``.

  Args:
    num_tasks: number of tasks K.
    alpha: fairness parameter, >= 0 (injectable).
    max_iter: cap on Newton steps (int >= 1).
    tol: Newton tolerance; default 1e-5 in float32, 1e-10 in float64.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`FairGradState`.

  Example (``alpha = 2``: the weights solve ``G w = w^(-1/2)``):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.fairgrad(2, alpha=2.0)
    >>> w = tx.update(jac, tx.init(jnp.zeros(3)))[1].weights
    >>> print(np.asarray(jac @ jac.T @ w, np.float64).round(4),
    ...       np.asarray(w ** -0.5, np.float64).round(4))
    [1.4565 1.7693] [1.4565 1.7693]
  """
  method = "fairgrad"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_positive_int(max_iter, "max_iter", method)
  validation.check_nonnegative(alpha, "alpha", method)

  def init_state(dtype):
    return FairGradState(base.uniform_weights(num_tasks, dtype),
                         jnp.zeros((), dtype))

  def rule(context, state):
    del state
    gram = context.gram
    sol = fairgrad_solution(gram, context.rms_norm, alpha, max_iter, tol)
    # Raw weights w = w_unit * rms**(-2a/(1+a)) leave the float range for
    # alpha != 1 long before the update does: the update is formed as
    # rms**((1-a)/(1+a)) * sum_i (w_unit_i / rms) g_i, every factor finite.
    a, rms = sol.alpha, sol.rms_norm
    update_scale = jnp.where(
        sol.fair, jnp.exp((1.0 - a) / (1.0 + a) * jnp.log(rms)), 1.0)
    coefficients = base.poison_if_nonfinite(
        jnp.where(sol.fair, sol.unit / rms,
                  base.uniform_weights(num_tasks, gram.dtype)), gram)
    # The recorded raw weights saturate at the dtype's range.
    weights = base.poison_if_nonfinite(
        jnp.minimum(sol.raw, jnp.finfo(gram.dtype).max), gram)
    return (base.ScaledCoefficients(coefficients, update_scale),
            FairGradState(weights, sol.residual))

  return base.task_weighting_transformation(num_tasks, method, init_state, rule)
