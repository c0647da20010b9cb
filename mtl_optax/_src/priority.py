"""Priority-Constrained Descent: a primary task, guarantees for the others.

PCD follows the gradient of the first task as closely as possible while
every other task keeps a fraction of the progress that its own normalised
gradient would give. The direction is the solution of a small quadratic
program on the K x K Gram matrix, solved on device by an exact dual
active-set loop (``priority_qp_weights``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import deprecation
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = ("pcd", "PCDState")


class PCDState(NamedTuple):
  """State of :func:`pcd`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update,
      ``d = sum_i weights[i] g_i`` (``(1, 0, ..., 0)`` before the first step).
    sq_norm_ema: ``(K,)`` exponential moving average of the squared
      gradient norms ``||g_i||^2``, divided by ``ema_scale**2`` so that it
      stays finite for gradients of any magnitude (its largest entry is 1;
      zeros before the first step).
    ema_scale: ``()`` the square root of the largest entry of the moving
      average: ``sq_norm_ema * ema_scale**2`` is the average itself.
    count: ``()`` int32 number of steps averaged (for the bias correction).
  """
  weights: jax.Array
  sq_norm_ema: jax.Array
  ema_scale: jax.Array
  count: jax.Array


def initial_state(num_tasks: int, dtype: jnp.dtype) -> PCDState:
  """The state before the first step."""
  return PCDState(jax.nn.one_hot(0, num_tasks, dtype=dtype),
                  jnp.zeros((num_tasks,), dtype), jnp.zeros((), dtype),
                  jnp.zeros((), jnp.int32))


class _ActiveSet(NamedTuple):
  multipliers: jax.Array   # mu_j >= 0, one per secondary task
  active: jax.Array        # bool: constraint j holds with equality
  entering: jax.Array      # index p of the violated constraint being added
  entering_slack: jax.Array
  adding: jax.Array        # bool: p is being added (inner loop of the method)
  iterations: jax.Array
  done: jax.Array
  infeasible: jax.Array


def priority_qp_weights(gram: jax.Array, taus: jax.Array,
                        dependence_tol: float | jax.Array,
                        tol: float = 1e-9,
                        max_iter: Optional[int] = None) -> jax.Array:
  """``w = (1, mu)``: ``d = sum_i w_i g_i`` solves PCD's quadratic program.

  ``min_d 1/2 ||d - g_1||^2  s.t.  g_j^T d >= tau_j ||g_j||^2`` (j >= 2), by
  the dual active-set method of Goldfarb & Idnani (Math. Programming 27,
  1983) for an identity Hessian, as TorchJD's ``PCDWeighting``: the
  stationarity condition ``d = g_1 + sum_j mu_j g_j`` holds at every
  iteration, so every inner product is read from ``gram``. Each iteration
  adds the most violated constraint or drops the active one whose multiplier
  reaches zero first; a constraint counts as met when violated by at most
  ``tol * max(diag gram)``, and a gradient as dependent on the active ones
  when its orthogonal part has a squared norm of at most ``dependence_tol``
  times its own. Infeasible constraints (no ``d`` meets them all) give
  ``(1, 0, ..., 0)``. One ``lax.while_loop`` with a masked ``K x K`` solve
  per iteration, at most ``max_iter`` (default ``10 K``) iterations.

  Example (the second task conflicts with the first; half of its progress
  ``||g_2||^2`` is guaranteed, which ``d = g_1 + g_2 = (0, 1)`` meets exactly):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax._src.priority import priority_qp_weights
    >>> g = jnp.array([[1., 0.], [-1., 1.]])
    >>> w = priority_qp_weights(g @ g.T, jnp.array([0.5]), 1e-9)
    >>> print(np.asarray(w, np.float64).round(4))
    [1. 1.]
  """
  num_tasks = gram.shape[0]
  dtype = gram.dtype
  primary = jax.nn.one_hot(0, num_tasks, dtype=dtype)
  if num_tasks == 1:
    return primary
  max_iter = 10 * num_tasks if max_iter is None else max_iter
  secondary = gram[1:, 1:]
  num_secondary = num_tasks - 1
  index = jnp.arange(num_secondary)
  diagonal = jnp.diagonal(secondary)
  # b_j > 0 iff g_1 alone violates constraint j.
  violation = jnp.asarray(taus, dtype) * diagonal - gram[1:, 0]
  atol = tol * jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(dtype).tiny)

  def choose(s: _ActiveSet) -> _ActiveSet:
    slacks = jnp.where(s.active, 0.0, secondary @ s.multipliers - violation)
    p = jnp.argmin(slacks).astype(jnp.int32)
    done = slacks[p] >= -atol
    return s._replace(entering=p, entering_slack=slacks[p], adding=~done,
                      done=done)

  def add(s: _ActiveSet) -> _ActiveSet:
    p, active, mu = s.entering, s.active, s.multipliers
    # Dual step: +1 on mu_p, -r on the active multipliers; primal step along
    # the part of g_p orthogonal to the active gradients.
    system = jnp.where(active[:, None] & active[None, :], secondary,
                       0.0) + jnp.diag(jnp.where(active, 0.0, 1.0))
    r = jnp.where(active, jnp.linalg.solve(
        system, jnp.where(active, secondary[:, p], 0.0)), 0.0)
    orthogonal_sq = secondary[p, p] - secondary[p] @ r
    shrinks = active & (r > 0)
    ratios = jnp.where(shrinks, mu / jnp.where(shrinks, r, 1.0), jnp.inf)
    leaving = jnp.argmin(ratios)
    partial_step = ratios[leaving]
    independent = orthogonal_sq > dependence_tol * secondary[p, p]
    full_step = jnp.where(independent, -s.entering_slack / jnp.where(
        independent, orthogonal_sq, 1.0), jnp.inf)
    step = jnp.minimum(partial_step, full_step)
    infeasible = jnp.isinf(step)
    step = jnp.where(infeasible, 0.0, step)
    mu = mu - step * r + step * (index == p)
    added = full_step <= partial_step
    # Otherwise the leaving constraint is dropped and p is tried again.
    mu = jnp.where(~added & (index == leaving), 0.0, mu)
    active = jnp.where(added, active | (index == p),
                       active & (index != leaving))
    return _ActiveSet(mu, active, p, secondary[p] @ mu - violation[p],
                      ~added & ~infeasible, s.iterations + 1, infeasible,
                      infeasible)

  start = _ActiveSet(
      jnp.zeros((num_secondary,), dtype), jnp.zeros((num_secondary,), bool),
      jnp.zeros((), jnp.int32), jnp.zeros((), dtype), jnp.zeros((), bool),
      jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), bool))
  out = jax.lax.while_loop(
      lambda s: ~s.done & (s.iterations < max_iter),
      lambda s: jax.lax.cond(s.adding, add, choose, s), start)
  mu = jnp.where(out.infeasible, 0.0, jnp.maximum(out.multipliers, 0.0))
  return jnp.concatenate([jnp.ones((1,), dtype), mu])


def _updated_average(state: PCDState, gram: tree_math.NormalizedGram,
                     beta: jax.Array) -> PCDState:
  """The moving average of ``||g_i||^2``, kept as ``sq_norm_ema *
  ema_scale**2`` with a largest entry of 1: no overflow at 1e30, no
  underflow at 1e-30, whatever the history."""
  dtype = gram.gram.dtype
  old_scale = state.ema_scale.astype(dtype)
  reference = jnp.maximum(old_scale, gram.rms_norm.astype(dtype))
  safe = jnp.where(reference > 0, reference, 1.0)
  average = (beta * state.sq_norm_ema.astype(dtype) * (old_scale / safe) ** 2
             + (1.0 - beta) * jnp.diagonal(gram.gram)
             * (gram.rms_norm.astype(dtype) / safe) ** 2)
  peak = jnp.max(average)
  positive = peak > 0
  return state._replace(
      sq_norm_ema=jnp.where(positive, average / jnp.where(positive, peak, 1.0),
                            0.0),
      ema_scale=jnp.where(positive, reference * jnp.sqrt(peak), 0.0),
      count=state.count + 1)


def _relative_scales(state: PCDState, beta: jax.Array,
                     eps: jax.Array) -> jax.Array:
  """``s_i = 1 / sqrt(v_i + eps)`` (``v`` the bias-corrected average) up to
  one common positive factor, which changes neither the QP's solution nor
  the final weights; 0 where ``v_i + eps`` is 0."""
  dtype = state.sq_norm_ema.dtype
  tiny = jnp.finfo(dtype).tiny
  debiased = state.sq_norm_ema / (
      1.0 - jnp.power(beta, state.count.astype(dtype)))
  # sqrt(eps / ema_scale**2), and a common factor that keeps it <= 1.
  eps_root = jnp.sqrt(eps) / jnp.maximum(state.ema_scale, tiny)
  common = jnp.maximum(eps_root, 1.0)
  denominators = jnp.sqrt(debiased / common ** 2 + (eps_root / common) ** 2)
  return jnp.where(denominators > 0,
                   1.0 / jnp.where(denominators > 0, denominators, 1.0), 0.0)


def pcd_weights(gram: tree_math.NormalizedGram, state: PCDState,
                tau: float | jax.Array, beta: float | jax.Array,
                eps: float | jax.Array, max_iter: Optional[int] = None
                ) -> tuple[jax.Array, PCDState]:
  """PCD's coefficients on the raw task gradients and the advanced state.

  ``gram`` is the unit-trace Gram matrix with its RMS norm; only ratios of
  the moving average enter the QP and the weights (``eps`` is compared with
  it in the raw scale), so the result is that of the raw Gram matrix. The
  precision threshold of the solver and of the zero-direction test is
  ``10 eps`` of the working dtype (TorchJD: of the Gram matrix's dtype).
  """
  g = gram.gram
  dtype = g.dtype
  num_tasks = g.shape[0]
  beta = jnp.asarray(beta, dtype)
  taus = jnp.broadcast_to(jnp.asarray(tau, dtype), (num_tasks - 1,))
  state = _updated_average(state, gram, beta)
  scales = _relative_scales(state, beta, jnp.asarray(eps, dtype))
  precision = 10.0 * jnp.finfo(dtype).eps
  normalized = g * scales[:, None] * scales[None, :]
  w = priority_qp_weights(normalized, taus, jnp.maximum(1e-9, precision),
                          max_iter=max_iter)
  direction_sq = w @ normalized @ w
  magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diagonal(normalized),
                                                 0.0))) ** 2
  # d is rescaled to ||g_1|| unless g_1 = 0 or d vanishes up to rounding.
  keep = (g[0, 0] > 0) & (direction_sq > precision * magnitude)
  ratio = jnp.sqrt(g[0, 0] / jnp.where(keep, direction_sq, 1.0))
  weights = base.poison_if_nonfinite(
      jnp.where(keep, w * scales * ratio, 0.0), g)
  return weights, state._replace(weights=weights)


def _check_hyperparameters(num_tasks, tau, beta, eps, method):
  if validation.is_concrete(tau):
    tau_np = np.asarray(tau)
    if tau_np.shape not in ((), (num_tasks - 1,)):
      raise ValueError(
          f"{method}: tau must be a scalar or have shape ({num_tasks - 1},) "
          f"(one per secondary task), got shape {tau_np.shape}.")
    if np.any(tau_np < 0) or np.any(tau_np > 1):
      raise ValueError(f"{method}: tau must be in [0, 1], got {tau!r}.")
  if validation.is_concrete(beta) and not 0.0 <= float(beta) < 1.0:
    raise ValueError(f"{method}: decay must be in [0, 1), got {beta!r}.")
  validation.check_nonnegative(eps, "eps", method)


@deprecation.renamed_arguments(beta="decay")
def pcd(num_tasks: int, tau: float | Sequence[float] | jax.Array = 0.02,
        decay: float = 0.999, eps: float = 1e-8,
        max_iter: Optional[int] = None
        ) -> optax.GradientTransformationExtraArgs:
  """PCD: Priority-Constrained Descent, the first task as the primary one.

  Varam et al., "Not All Objectives Are Born Equal: Priority-Constrained
  Descent for Hierarchical Multi-Objective Optimization", TMLR 2026
  (arXiv:2606.29521), as TorchJD 0.18's ``PCD``:
  ``d~ = argmin_d 1/2 ||d - g~_1||^2  s.t.  g~_j^T d >= tau_j ||g~_j||^2``
  (j = 2..K), ``g~_i = g_i / sqrt(v_i + eps)`` with ``v_i`` the
  bias-corrected moving average (decay ``decay``) of ``||g_i||^2``, and
  ``d = ||g_1|| d~ / ||d~||``. Infeasible constraints (e.g. two opposite
  secondary gradients) are dropped (``d = g_1``); ``g_1 = 0`` or ``d~ = 0``
  up to rounding gives ``d = 0``. The QP is solved exactly on the Gram
  matrix by a dual active-set loop on device
  (``priority_qp_weights``), as TorchJD does on the host.

  .. math::

     d &= \\|g_1\\| \\frac{\\tilde d}{\\|\\tilde d\\|}, \\qquad
     \\tilde g_i = \\frac{g_i}{\\sqrt{v_i + \\epsilon}}, \\\\
     \\tilde d &= \\arg\\min_d \\tfrac{1}{2} \\|d - \\tilde g_1\\|^2 \\;\\text{ s.t. }\\;
     \\tilde g_j^\\top d \\ge \\tau_j \\|\\tilde g_j\\|^2 \\;(j \\ge 2)

  PCD is not symmetric in the tasks: the task at index 0 of the stacked
  gradients (the first loss) is the primary one. Because of the
  normalisation, ``tau`` is a scale-free fraction; multiplying a task's
  gradients by a constant at every step changes nothing (up to ``eps``).

  Output scale: ``||d|| = ||g_1||``, the scale of one task gradient, and
  ``d = g_1`` (weights ``(1, 0, ..., 0)``, summing to one) when no
  constraint binds: this is already the library's mean-gradient convention
  (weights summing to one, not K), and TorchJD's values are reproduced with
  no ``optax.scale``. The moving average is kept relative to its own scale
  in the state, so gradients from 1e-30 to 1e30 are safe.

  Args:
    num_tasks: number of tasks K (the first is the primary task).
    tau: guaranteed fraction in [0, 1], one shared value or ``(K - 1,)``
      values, one per secondary task. Injectable.
    decay: decay of the moving average of the squared norms, in [0, 1).
      Injectable. Formerly ``beta`` (same meaning), a deprecated alias.
    eps: non-negative constant added to the average before its inverse
      square root (absolute, in squared-gradient units). Injectable.
    max_iter: cap on active-set iterations (static); default ``10 K``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`PCDState`.

  Example (TorchJD's test matrix J = [[-4, 1, 1], [6, 1, 1]]: task 2 gets
  2 % of its normalised progress, and ``||d|| = ||g_1||``):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.pcd(2)
    >>> d, state = tx.update(jac, tx.init(jnp.zeros(3)))
    >>> print(np.asarray(state.weights, np.float64).round(4),
    ...       np.linalg.norm(d).round(4), np.linalg.norm(jac[0]).round(4))
    [1.8481 1.0954] 4.2426 4.2426
  """
  method = "pcd"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  _check_hyperparameters(num_tasks, tau, decay, eps, method)
  if max_iter is not None:
    validation.check_positive_int(max_iter, "max_iter", method)
  from mtl_optax import gram_weightings  # pylint: disable=g-import-not-at-top

  def rule(context, state):
    return gram_weightings.pcd(
        tree_math.NormalizedGram(context.gram, context.rms_norm), state,
        tau=tau, decay=decay, eps=eps, max_iter=max_iter)

  return base.task_weighting_transformation(
      num_tasks, method, lambda dtype: initial_state(num_tasks, dtype), rule)
