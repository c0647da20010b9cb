"""Small solvers on K x K quantities, jitted ``lax`` loops, written once.

Every MGDA-type inner problem of the library is a smooth convex function of
task weights on the probability simplex. :func:`minimize_on_simplex` solves
them all with accelerated projected gradient (FISTA) with backtracking and
adaptive restart, stopped on the norm of the gradient mapping, the standard
stationarity measure for constrained problems. Solutions carry their final
residual so that no method ever hides a non-converged solve.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import eager
from mtl_optax._src import two_task


# K x K algebra as multiply-and-reduce, not ``dot``: XLA:CPU emits every dot
# as a kernel of its own that no neighbouring elementwise work fuses into,
# while a reduction takes its operands' elementwise producers with it. On
# these tiny operands the kernel count, not the arithmetic, sets the compile
# time of the solvers' loops.
def _inner(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum(a * b)


def _matvec(matrix: jax.Array, v: jax.Array) -> jax.Array:
  return jnp.sum(matrix * v[None, :], axis=1)


def _quadratic(matrix: jax.Array, v: jax.Array) -> jax.Array:
  return _inner(v, _matvec(matrix, v))


@jax.custom_jvp
def project_to_simplex(x: jax.Array) -> jax.Array:
  """Euclidean projection onto ``{w >= 0, sum(w) = 1}``, without a sort.

  The threshold algorithm of Held, Wolfe & Crowder (1974) on the values in
  descending order ``u`` and their cumulative sums, computed exactly as
  :func:`optax.projections.projection_simplex` computes them, so the result
  is the same to the last bit; only the sort is replaced: each entry's rank
  comes from ``K x K`` comparisons (ties broken by position) and ``u`` is
  gathered by rank. On ``K x K`` problems that is a few fused elementwise
  kernels where XLA emits a sort, a reversal and their copies, inside every
  iteration of the solvers below.

  Beyond unit scale (``|max x| > 1``) the input is first shifted by its
  maximum, which leaves the projection unchanged (the simplex is invariant
  to a common shift) and makes its rounding relative to the spread of the
  entries rather than to their magnitude: tied entries of 1e30 give ``1/K``
  each, not a point off the simplex. Up to unit scale nothing is shifted and
  the bits are those of optax's.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.solvers import project_to_simplex
    >>> print(project_to_simplex(jnp.array([0.5, 2.0, -1.0])))
    [0. 1. 0.]
  """
  # Entries in the support lie within 1 of the maximum, so after the shift
  # every sum below is of unit scale. Not finite: no shift, NaN propagates.
  peak = jnp.max(x)
  x = x - jnp.where(jnp.isfinite(peak) & (jnp.abs(peak) > 1), peak, 0)
  # Entry i with the entries not below it: their count and sum.
  not_below = x[None, :] >= x[:, None]
  count = jnp.sum(not_below, axis=1)
  total = jnp.sum(jnp.where(not_below, x[None, :], 0), axis=1)
  in_support = 1 / count + (x - total / count) > 0
  size = jnp.max(jnp.where(in_support, count, 0))
  # Entries tied at the threshold share one row of `not_below`: one total.
  threshold_total = jnp.max(jnp.where(count == size, total, -jnp.inf))
  # Divisions by an integer array compute in the default float type (float64
  # under jax_enable_x64): cast back, so that loop carries keep their dtype.
  return jax.nn.relu(1 / size + (x - threshold_total / size)).astype(x.dtype)


@project_to_simplex.defjvp
def _project_to_simplex_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  out = project_to_simplex(x)
  support = (out > 0).astype(x_dot.dtype)
  mean = jnp.dot(support, x_dot) / jnp.sum(support)
  return out, support * (x_dot - mean)


class SimplexSolution(NamedTuple):
  """Result of a solve on the simplex.

  Attributes:
    weights: the solution, shape ``(K,)``, on the simplex.
    residual: norm of the gradient mapping at ``weights``; zero exactly at
      the optimum. Relative to a problem normalised to unit scale.
    iterations: number of accelerated steps taken.
  """
  weights: jax.Array
  residual: jax.Array
  iterations: jax.Array


# Reported by the K = 2 closed forms (two_task), which take no steps.
def _no_iterations():
  return jnp.zeros((), jnp.int32)

# After an accepted step the Lipschitz estimate is relaxed by this factor, so
# that steps can lengthen again where the curvature is lower.
RELAX = 0.9


def default_tolerance(dtype: jnp.dtype) -> float:
  """Stopping tolerance on the gradient mapping for unit-scale problems."""
  return 1e-5 if jnp.finfo(dtype).bits <= 32 else 1e-10


def _gradient_mapping(grad_fn, w, lipschitz):
  # A flat problem (zero gradients) relaxes its Lipschitz estimate towards
  # zero; 0 / 0 would make the residual NaN.
  lipschitz = jnp.maximum(lipschitz, jnp.finfo(w.dtype).tiny)
  step = project_to_simplex(w - grad_fn(w) / lipschitz)
  return lipschitz * jnp.linalg.norm(step - w)


def minimize_on_simplex(
    value_and_grad_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    init: jax.Array,
    lipschitz: jax.Array,
    max_iter: int = 500,
    tol: float | jax.Array | None = None,
) -> SimplexSolution:
  """Minimises a smooth convex function over the probability simplex.

  FISTA (Beck & Teboulle, 2009) with backtracking on the Lipschitz estimate
  and gradient-based adaptive restart (O'Donoghue & Candes, 2015), stopped
  when the gradient mapping ``L * ||w - P(w - grad/L)||`` falls below ``tol``
  or after ``max_iter`` steps. It also stops when the projected step is
  below the dtype's resolution (``||w - P(w - grad/L)|| <= 10 eps``): on
  badly conditioned problems (CAGrad near ``g_w = 0``) the gradient mapping
  cannot fall below ``L * eps`` and no representable progress is left.
  Everything is a ``lax.while_loop``.

  Args:
    value_and_grad_fn: ``w -> (f(w), grad f(w))``.
    init: starting point, projected onto the simplex first.
    lipschitz: initial estimate of the gradient's Lipschitz constant; it is
      doubled while the sufficient-decrease test fails and relaxed by 0.9
      after each accepted step.
    max_iter: cap on accelerated steps (static).
    tol: stopping tolerance; default :func:`default_tolerance`.

  Returns:
    A :class:`SimplexSolution`.

  Example (the min-norm point of ``{(1, 0), (0, 2)}``):
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.solvers import minimize_on_simplex
    >>> a = jnp.array([[1., 0.], [0., 4.]])
    >>> sol = minimize_on_simplex(lambda w: (0.5 * w @ a @ w, a @ w),
    ...                           jnp.array([0.5, 0.5]), lipschitz=4.0)
    >>> print(sol.weights.round(4))
    [0.8 0.2]
  """
  x, lipschitz, iterations = _accelerated_projected_gradient(
      value_and_grad_fn, init, lipschitz, max_iter, tol)
  grad_fn = lambda w: value_and_grad_fn(w)[1]
  return SimplexSolution(x, _gradient_mapping(grad_fn, x, lipschitz),
                         iterations)


def _accelerated_projected_gradient(value_and_grad_fn, init, lipschitz,
                                    max_iter, tol):
  """:func:`minimize_on_simplex`'s loop: ``(x, lipschitz, iterations)``,
  the Lipschitz estimate being the one to measure the residual with."""
  init = project_to_simplex(init)
  dtype = init.dtype
  tol = default_tolerance(dtype) if tol is None else tol
  eps = jnp.finfo(dtype).eps
  tiny = jnp.finfo(dtype).tiny
  lipschitz = jnp.maximum(jnp.asarray(lipschitz, dtype), tiny)
  value_fn = lambda w: value_and_grad_fn(w)[0]

  class Loop(NamedTuple):
    x: jax.Array
    y: jax.Array
    t: jax.Array
    lipschitz: jax.Array
    residual: jax.Array
    step_norm: jax.Array
    iteration: jax.Array

  def cond(s: Loop):
    return (s.iteration < max_iter) & (s.residual > tol) & (
        s.step_norm > 10 * eps)

  def body(s: Loop):
    f_y, g_y = value_and_grad_fn(s.y)

    def candidate(lip):
      p = project_to_simplex(s.y - g_y / lip)
      d = p - s.y
      f_p = value_fn(p)
      # Relative slack only: an absolute one lets flat problems drift uphill.
      slack = 8 * eps * jnp.maximum(jnp.abs(f_y), jnp.abs(f_p))
      ok = f_p <= f_y + _inner(g_y, d) + 0.5 * lip * _inner(d, d) + slack
      return p, ok

    # One loop for the first trial and the doublings (k = -1 is the first
    # trial, at the current estimate): the candidate is emitted once.
    def bt_cond(c):
      _, ok, k, _ = c
      return (~ok) & (k < 40)

    def bt_body(c):
      _, _, k, lip = c
      lip = jnp.where(k < 0, lip, 2.0 * lip)
      p, ok = candidate(lip)
      return p, ok, k + 1, lip

    p, _, _, lip = jax.lax.while_loop(
        bt_cond, bt_body,
        (s.y, jnp.zeros((), bool), -jnp.ones((), jnp.int32), s.lipschitz))
    step_norm = jnp.linalg.norm(p - s.y)
    residual = lip * step_norm
    restart = _inner(s.y - p, p - s.x) > 0
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.t * s.t))
    momentum = jnp.where(restart, 0.0, (s.t - 1.0) / t_next)
    y = p + momentum * (p - s.x)
    return Loop(p, y, jnp.where(restart, jnp.ones_like(s.t), t_next),
                jnp.maximum(RELAX * lip, tiny), residual, step_norm,
                s.iteration + 1)

  one = jnp.ones((), dtype)
  inf = jnp.full((), jnp.inf, dtype)
  start = Loop(init, init, one, lipschitz, inf, inf, jnp.zeros((), jnp.int32))
  out = jax.lax.while_loop(cond, body, start)
  # The residual is measured at the last accepted estimate.
  return out.x, out.lipschitz / RELAX, out.iteration


def largest_eigenvalue(gram: jax.Array, num_iterations: int = 8) -> jax.Array:
  """Power-iteration estimate of ``lambda_max`` of a PSD matrix (from below).

  Used as the starting Lipschitz estimate of quadratic objectives; the
  solvers' backtracking corrects an underestimate.
  """
  def step(v, _):
    v = _matvec(gram, v)
    return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(gram.dtype).tiny), None
  start = jnp.ones((gram.shape[0],), gram.dtype) + 0.1 * jnp.arange(
      gram.shape[0], dtype=gram.dtype) / gram.shape[0]
  v, _ = jax.lax.scan(step, start / jnp.linalg.norm(start), None,
                      length=num_iterations)
  return jnp.maximum(_quadratic(gram, v), jnp.max(jnp.diagonal(gram)))


# Up to this many tasks, MGDA's min-norm problem, CAGrad's dual and the
# dual-cone QPs are solved by trying every face (active set) at once instead
# of iterating: exact to rounding, no loop to compile (the K = 3 QPs compile
# in a third of the interior-point loop's time), and as fast at run time up
# to K = 6 (measured on CPU; at K = 8 the 256 faces take 3.5 times the
# loop's time).
_MAX_ENUMERATED = 6


def _every_face(num: int, dtype, nonempty: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """Every face (active set) twice, with the shifts of its system.

  Returns ``(free, shift)``: ``free`` ``(2F, num)`` booleans, the free
  variables of each face; ``shift`` ``(2F,)``, 0 and, for the same face, a
  relative diagonal shift just above the rounding of a ``num x num``
  Cholesky, which still factorises a face singular to rounding (opposite or
  colinear task gradients) where the exact system fails. Every candidate is
  feasible and judged afterwards, so the second one can only help.
  """
  codes = np.arange(1 if nonempty else 0, 2 ** num)
  free = ((codes[:, None] >> np.arange(num)[None, :]) & 1).astype(bool)
  shifts = np.array([0.0, 8 * num * np.finfo(dtype).eps])
  return (jnp.asarray(np.repeat(free, 2, axis=0)),
          jnp.asarray(np.tile(shifts, len(codes)), dtype))


def _floored(gram: jax.Array) -> jax.Array:
  """``gram + eps max(diag gram) I``: every face positive definite, and the
  one minimiser (of least norm) where ``gram`` is singular, e.g. for
  identical task gradients; a change below the Gram matrix's resolution."""
  dtype = gram.dtype
  peak = jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(dtype).tiny)
  return gram + jnp.finfo(dtype).eps * peak * jnp.eye(gram.shape[0],
                                                      dtype=dtype)


def _enumerated_min_norm_weights(gram: jax.Array) -> SimplexSolution:
  """:func:`min_norm_weights` by trying every support ``S`` at once.

  On ``S`` the minimiser solves ``A_S w_S = t 1`` (one Jacobi-scaled
  Cholesky per face, which keeps task norms from 1e-3 to 1e3 exact; no
  absolute floor, which would not); clipped and normalised, every
  candidate lies on the simplex, so the least objective is the minimum: a
  singular face or a poor solve can only lose. Where the minimiser is not
  unique because tasks have identical gradients (identical Gram rows), they
  share their weight equally, as from the iterative solver's uniform start.
  Reports the gradient mapping at step ``1 / tr A``, as the K = 2 closed
  form.
  """
  def on_face(support, shift):
    solved = _face_solver(gram, support, shift)(jnp.where(support, 1.0, 0.0))
    # A vertex needs no solve (and a zero task's would divide by zero).
    w = _on_simplex(jnp.where(support, jnp.where(
        jnp.sum(support) == 1, 1.0, solved), 0.0))
    value = _quadratic(gram, w)
    return w, jnp.where((jnp.sum(w) > 0) & ~jnp.isnan(value), value, jnp.inf)

  w, value = jax.vmap(on_face)(*_every_face(gram.shape[0], gram.dtype,
                                            nonempty=True))
  weights = _least_of(w, value, gram)
  residual = _gradient_mapping(lambda w: _matvec(gram, w), weights,
                               jnp.trace(gram))
  return SimplexSolution(weights, residual, _no_iterations())


def _least_of(candidates: jax.Array, values: jax.Array, gram: jax.Array
              ) -> jax.Array:
  """The candidate of least value; tasks with identical gradients (identical
  Gram rows), where the minimiser is not unique, share their weight
  equally; NaN for a non-finite Gram matrix."""
  weights = candidates[jnp.argmin(values)]
  duplicate = jnp.all(gram[:, None, :] == gram[None, :, :], axis=-1)
  weights = _matvec(duplicate.astype(gram.dtype), weights) / jnp.sum(
      duplicate, axis=1)
  return jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)


def _on_simplex(raw: jax.Array) -> jax.Array:
  """A face's candidate made feasible: clipped at 0 and normalised (left
  at zero when nothing is positive, for the caller to reject)."""
  raw = jnp.maximum(raw, 0.0)
  total = jnp.sum(raw)
  return raw / jnp.where(total > 0, total, 1.0)


@eager.compiled_when_eager
def min_norm_weights(gram: jax.Array, init: jax.Array | None = None,
                     max_iter: int = 500,
                     tol: float | None = None) -> SimplexSolution:
  """MGDA's weights: ``argmin_{w in simplex} w^T A w`` (min-norm hull point).

  For K = 2 in closed form; for K <= 6 exactly, by trying every support at
  once (no iterations; tasks with identical gradients share their weight
  equally); beyond, by accelerated projected gradient with a crossover to
  the exact minimiser on the iterate's support.

  Args:
    gram: ``(K, K)`` Gram matrix, ideally from
      :func:`~mtl_optax._src.tree_math.normalized_gram` (unit scale).
    init: warm start; uniform by default (K > 6).
    max_iter: iteration cap (K > 6).
    tol: stopping tolerance on the gradient mapping (K > 6).

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.solvers import min_norm_weights
    >>> print(min_norm_weights(jnp.array([[1., -1.], [-1., 4.]])).weights.round(4))
    [0.7143 0.2857]
  """
  num_tasks = gram.shape[0]
  if num_tasks == 2:  # closed form, no loop
    return SimplexSolution(*two_task.min_norm_weights(gram), _no_iterations())
  if num_tasks <= _MAX_ENUMERATED:
    return _enumerated_min_norm_weights(gram)
  if init is None:
    init = jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype)
  value_and_grad = lambda w: (0.5 * _quadratic(gram, w), _matvec(gram, w))
  lipschitz = largest_eigenvalue(gram)
  x, final_lipschitz, iterations = _accelerated_projected_gradient(
      value_and_grad, init, lipschitz, max_iter, tol)
  weights, use = _polish_on_support(gram, x)
  # One residual for whichever point is kept: the polished one is measured
  # with the initial estimate, the iterate with the loop's last one.
  residual = _gradient_mapping(lambda w: _matvec(gram, w), weights, jnp.where(
      use, lipschitz, final_lipschitz))
  return SimplexSolution(weights, residual, iterations)


def _polish_on_support(gram: jax.Array, x: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """Crossover: the exact minimiser on the face the iterate lies on.

  A first-order method with the global Lipschitz constant crawls along a
  face whose own curvature is many orders smaller (task norms 1e-3 and 1e3
  make it 1e-12 on the unit-trace Gram matrix) and its gradient mapping is
  then tiny while the weights are far off. On the support ``S`` of the
  iterate the minimiser solves ``A_S w_S = t 1`` (one Jacobi-scaled
  Cholesky solve); it replaces the iterate when it is feasible and does not
  increase the objective. Returns ``(weights, whether they are polished)``.
  """
  support = x > 0
  raw = _face_solver(gram, support)(jnp.where(support, 1.0, 0.0))
  raw = jnp.where(support, raw, 0.0)
  total = jnp.sum(raw)
  polished = raw / jnp.where(total > 0, total, 1.0)
  value = lambda w: _quadratic(gram, w)
  eps = jnp.finfo(gram.dtype).eps
  use = (jnp.all(jnp.isfinite(polished)) & jnp.all(polished >= 0)
         & (total > 0) & (value(polished) <= value(x) * (1 + 8 * eps)))
  return jnp.where(use, polished, x), use


@eager.compiled_when_eager
def cagrad_dual_weights(gram: jax.Array, c: jax.Array | float,
                        init: jax.Array | None = None, max_iter: int = 500,
                        tol: float | None = None,
                        anchor: jax.Array | None = None) -> SimplexSolution:
  """CAGrad's dual: ``argmin_w g_w^T g0 + c ||g0|| ||g_w||`` over the simplex.

  In Gram form (Liu et al., 2021, Eq. 3 and the official code), with
  ``g0 = sum_j anchor_j g_j`` (``anchor = 1/K`` by default):
  ``F(w) = w^T A b + c sqrt(b^T A b) sqrt(w^T A w)``, ``b = anchor``. The
  square root is smoothed by ``eps**2`` of the working dtype (relative to a
  unit-scale ``A``), far below the official code's absolute 1e-8.

  Example (the test vector of the CAGrad reference, c = 0.4):
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.solvers import cagrad_dual_weights
    >>> g = jnp.array([[1., 0., 0.], [0., 1., 0.], [-0.5, -0.2, 0.3]])
    >>> print(cagrad_dual_weights(g @ g.T, 0.4).weights.round(4))
    [0. 0. 1.]
  """
  num_tasks = gram.shape[0]
  dtype = gram.dtype
  if num_tasks == 2:  # closed form, no loop
    return SimplexSolution(*two_task.cagrad_dual_weights(gram, c, anchor),
                           _no_iterations())
  if init is None:
    init = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  if anchor is None:
    anchor = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  gram_b = _matvec(gram, anchor)
  radius = jnp.asarray(c, dtype) * jnp.sqrt(jnp.maximum(_inner(anchor, gram_b), 0.0))
  smooth = jnp.finfo(dtype).eps ** 2 * (jnp.trace(gram) / num_tasks + 1.0)
  if num_tasks <= _MAX_ENUMERATED:
    return _enumerated_cagrad_dual_weights(gram, gram_b, radius, smooth)

  def value_and_grad(w):
    gram_w = _matvec(gram, w)
    norm_w = jnp.sqrt(jnp.maximum(_inner(w, gram_w), 0.0) + smooth)
    return _inner(w, gram_b) + radius * norm_w, gram_b + radius * gram_w / norm_w

  # The Hessian of the norm term is bounded by radius * A / ||g_w||; start
  # from its value at the initial point and let backtracking adjust.
  start_norm = jnp.sqrt(jnp.maximum(_quadratic(gram, init), 0.0) + smooth)
  lipschitz = largest_eigenvalue(gram) * radius / start_norm
  return minimize_on_simplex(value_and_grad, init, lipschitz, max_iter, tol)


def _enumerated_cagrad_dual_weights(gram, gram_b, radius, smooth
                                    ) -> SimplexSolution:
  """:func:`cagrad_dual_weights` by trying every support ``S`` at once.

  On the affine hull of the face ``S`` the stationary point of ``F`` solves
  ``A_S w_S = (||g_w|| / r) (mu 1 - (A b)_S)``, ``1^T w = 1``: with
  ``u = A_S^-1 1``, ``v = A_S^-1 (A b)_S``, ``alpha = 1^T u``,
  ``beta = 1^T v``, ``gamma = (A b)_S^T v`` and
  ``D = beta^2 - alpha gamma + alpha r^2``, it is
  ``w_S = (mu u - v) / sqrt(D)``, ``mu = (beta + sqrt(D)) / alpha`` (none
  where ``D <= 0``); every vertex is a candidate too (``r = 0``: ``F`` is
  linear). Each candidate is made feasible and the one of least ``F`` kept,
  so a singular face or a poor solve can only lose; ties as in MGDA's.
  """
  def value(w):
    norm_w = jnp.sqrt(jnp.maximum(_quadratic(gram, w), 0.0) + smooth)
    return _inner(w, gram_b) + radius * norm_w, norm_w

  def on_face(support, shift):
    solve = _face_solver(gram, support, shift)
    u = jnp.where(support, solve(jnp.where(support, 1.0, 0.0)), 0.0)
    v = jnp.where(support, solve(jnp.where(support, gram_b, 0.0)), 0.0)
    alpha, beta = jnp.sum(u), jnp.sum(v)
    disc = beta ** 2 - alpha * _inner(jnp.where(support, gram_b, 0.0), v) + (
        alpha * radius ** 2)
    stationary = (alpha > 0) & (disc > 0)
    root = jnp.sqrt(jnp.where(stationary, disc, 1.0))
    mu = (beta + root) / jnp.where(stationary, alpha, 1.0)
    vertex = jnp.sum(support) == 1
    w = _on_simplex(jnp.where(support, jnp.where(vertex, 1.0,
                                                 (mu * u - v) / root), 0.0))
    f = value(w)[0]
    keep = (vertex | stationary) & (jnp.sum(w) > 0) & ~jnp.isnan(f)
    return w, jnp.where(keep, f, jnp.inf)

  w, f = jax.vmap(on_face)(*_every_face(gram.shape[0], gram.dtype,
                                        nonempty=True))
  weights = _least_of(w, f, gram)
  # The gradient mapping at a bound of the norm term's curvature,
  # radius tr(A) / ||g_w|| (tr A >= its largest eigenvalue; no power loop).
  norm_w = value(weights)[1]
  residual = _gradient_mapping(
      lambda w: gram_b + radius * _matvec(gram, w) / norm_w, weights,
      jnp.trace(gram) * radius / norm_w)
  return SimplexSolution(weights, residual, _no_iterations())


# --- Lower-bounded QPs (UPGrad, DualProj) and alpha-fair systems (Nash-MTL,
# FairGrad). ---
# Neither fits minimize_on_simplex: the dual-cone QPs live on a shifted
# orthant, not the simplex, and need their exact active set (a first-order
# method crawls on the near-colinear Gram matrices where it matters); the
# alpha-fair potential has a log barrier at w = 0, with no Lipschitz
# gradient. Both are second-order loops on K x K systems and share the two
# helpers below.

# Iterations without the residual halving before an interior-point loop
# stops: the float floor has been reached.
_PATIENCE = 8
# Armijo sufficient-decrease fraction of the Newton solver below.
_ARMIJO = 1e-4
# Halvings of the step before a line search gives up (no representable
# decrease left); the solver then stops and reports its residual.
_MAX_HALVINGS = 30


class BoxQPSolution(NamedTuple):
  """Result of :func:`lower_bounded_qp`.

  Attributes:
    solution: ``(..., K)``, one solution per row of ``lower``.
    residual: ``()`` largest relative residual over the rows:
      ``max_i |v_i - max(l_i, v_i - (Q v)_i)| / max_i |l_i|``, the fixed-point
      (projected gradient) condition; zero exactly at the optimum.
    iterations: ``()`` largest number of interior-point iterations over the
      rows (0 for K <= 6, solved without iterating).
  """
  solution: jax.Array
  residual: jax.Array
  iterations: jax.Array


def _jacobi_cholesky_solver(matrix, shift=0.0):
  """``rhs -> (matrix + shift D)^-1 rhs``, ``D = diag(matrix)``, through a
  Cholesky factor of the Jacobi-scaled ``D^-1/2 matrix D^-1/2 + shift I``
  (unit diagonal, better conditioned). A failed factorisation is not always
  signalled by NaN (batched Cholesky): callers test the result."""
  jacobi = jax.lax.rsqrt(jnp.diagonal(matrix))
  scaled = jacobi[:, None] * matrix * jacobi[None, :]
  factor = jnp.linalg.cholesky(
      scaled + shift * jnp.eye(matrix.shape[0], dtype=matrix.dtype))
  return lambda rhs: jacobi * jax.scipy.linalg.cho_solve((factor, True),
                                                         jacobi * rhs)


def _face_solver(matrix, free, shift=0.0):
  """``rhs -> x`` on the face ``free`` (a boolean mask): the free rows and
  columns of ``matrix``, the identity elsewhere, solved by
  :func:`_jacobi_cholesky_solver`; ``rhs`` is zero off the face, and so
  is ``x``."""
  face = jnp.where(free[:, None] & free[None, :], matrix, 0.0) + jnp.diag(
      jnp.where(free, 0.0, 1.0))
  return _jacobi_cholesky_solver(face, shift)


def _step_to_boundary(z, dz):
  """Largest ``t`` with ``z + t dz >= 0`` for ``z > 0`` (inf if ``dz >= 0``)."""
  shrinking = dz < 0
  return jnp.min(jnp.where(shrinking, -z / jnp.where(shrinking, dz, -1.0),
                           jnp.inf))


def _first_acceptable(trial, t_max):
  """Backtracking without a nested loop: ``trial(t) -> (point, ok)`` on the
  steps ``t_max * 2**-k``, k < ``_MAX_HALVINGS``, all at once; returns the
  point of the longest accepted step (and whether there was one)."""
  steps = t_max * 0.5 ** jnp.arange(_MAX_HALVINGS, dtype=t_max.dtype)
  points, oks = jax.vmap(trial)(steps)
  first = jnp.argmax(oks)
  return points[first], oks[first]


def _box_qp_residual(quad, lower, x):
  """The fixed-point residual of ``v = lower + x`` (:class:`BoxQPSolution`)."""
  largest = jnp.max(jnp.abs(lower))
  scale = jnp.where(largest > 0, largest, 1.0)
  grad = _matvec(quad, lower + x)
  return jnp.max(jnp.abs(x - jnp.maximum(0.0, x - grad))) / scale


@eager.compiled_when_eager
def _enumerated_lower_bounded_qp(quad, lower):
  """:func:`lower_bounded_qp` by trying every active set.

  On each face the free variables solve their linear system (one
  Jacobi-scaled Cholesky per face, shared by the rows), the candidate is
  clipped to the feasible set, and each row keeps its candidate of smallest
  residual, which is zero at the optimum and only there (the KKT
  conditions). A singular face gives NaN or a poor candidate, which the
  residual rejects; the all-active face needs no solve.
  """
  num = quad.shape[0]
  rows = jnp.reshape(lower, (-1, num))
  q = _floored(quad)  # the interior-point loop's floor: the same problem
  q_lower = rows @ q  # Q l for every row (Q is symmetric)

  def on_face(free, shift):
    x = jax.vmap(_face_solver(q, free, shift))(jnp.where(free, -q_lower, 0.0))
    x = jnp.where(free, jnp.maximum(x, 0.0), 0.0)
    return x, jax.vmap(lambda row, x: _box_qp_residual(quad, row, x))(rows, x)

  x, residual = jax.vmap(on_face)(*_every_face(num, quad.dtype))
  residual = jnp.where(jnp.isnan(residual), jnp.inf, residual)
  best = jnp.argmin(residual, axis=0)
  x = jnp.take_along_axis(x, best[None, :, None], axis=0)[0]
  residual = jnp.max(jnp.take_along_axis(residual, best[None], axis=0))
  # As in the loop: variables with a zero row of Q take their bound.
  x = jnp.where(jnp.diagonal(quad) > 0, x, 0.0)
  finite = jnp.all(jnp.isfinite(quad)) & jnp.all(jnp.isfinite(rows))
  return BoxQPSolution(
      jnp.reshape(jnp.where(finite, rows + x, jnp.nan), lower.shape),
      jnp.where(finite, residual, jnp.nan), _no_iterations())


def _lower_bounded_qp_row(quad, lower, max_iter, tol):
  dtype = quad.dtype
  num = quad.shape[0]
  tiny = jnp.finfo(dtype).tiny
  largest = jnp.max(jnp.abs(lower))
  scale = jnp.where(largest > 0, largest, 1.0)
  q_max = jnp.maximum(jnp.max(jnp.diagonal(quad)), tiny)
  # A floor of eps * max(diag Q), below the resolution of a float Gram matrix,
  # keeps every barrier subproblem bounded: zero rows (zero gradients) and
  # directions z >= 0 with Q z = 0 (Pareto-stationary points) would
  # otherwise send the slacks to infinity.
  q = _floored(quad)
  q_lower = _matvec(q, lower)

  def residual(x):  # v = lower + x; the projected-gradient condition on Q.
    return _box_qp_residual(quad, lower, x)

  def to_boundary(z, dz):
    return jnp.minimum(1.0, _step_to_boundary(z, dz))

  class Loop(NamedTuple):
    x: jax.Array          # slack v - lower > 0
    lam: jax.Array        # multiplier of v >= lower, > 0
    iteration: jax.Array
    best_x: jax.Array
    best_lam: jax.Array
    best_residual: jax.Array
    stall: jax.Array      # iterations since the residual last halved

  def cond(s):
    return ((s.iteration < max_iter) & (s.best_residual > tol)
            & (s.stall < _PATIENCE))

  def body(s):
    x, lam = s.x, s.lam
    grad = q_lower + _matvec(q, x)
    mu = _inner(x, lam) / num
    ratio = lam / x
    solve = _jacobi_cholesky_solver(q + jnp.diag(ratio))
    # Mehrotra predictor-corrector: one factorisation, two solves.
    dx = solve(-grad)
    dlam = -lam - ratio * dx
    mu_affine = _inner(x + to_boundary(x, dx) * dx,
                       lam + to_boundary(lam, dlam) * dlam) / num
    sigma = jnp.where(mu > 0, jnp.clip(
        mu_affine / jnp.where(mu > 0, mu, 1.0), 0.0, 1.0) ** 3, 0.0)
    centring = sigma * mu - dx * dlam
    dx = solve(centring / x - grad)
    dlam = centring / x - lam - ratio * dx
    # A failed factorisation (at the float floor) ends the loop; batched
    # Cholesky does not always signal it with NaN, so test every output.
    ok = jnp.all(jnp.isfinite(dx)) & jnp.all(jnp.isfinite(dlam))
    x = jnp.where(ok, jnp.maximum(x + 0.99 * to_boundary(x, dx) * dx, tiny), x)
    lam = jnp.where(ok, jnp.maximum(
        lam + 0.99 * to_boundary(lam, dlam) * dlam, tiny), lam)
    res = residual(x)
    better = ok & (res < s.best_residual)
    halved = ok & (res < 0.5 * s.best_residual)
    return Loop(x, lam, s.iteration + 1,
                jnp.where(better, x, s.best_x),
                jnp.where(better, lam, s.best_lam),
                jnp.where(better, res, s.best_residual),
                jnp.where(halved, 0, jnp.where(ok, s.stall + 1, _PATIENCE)))

  x0 = jnp.full((num,), scale, dtype)
  lam0 = jnp.full((num,), scale * q_max, dtype)
  res0 = residual(x0)
  out = jax.lax.while_loop(cond, body, Loop(
      x0, lam0, jnp.zeros((), jnp.int32), x0, lam0, res0,
      jnp.zeros((), jnp.int32)))
  # Crossover: the face read off the interior point (slack large relative to
  # its multiplier) gives the exact solution by one linear solve.
  x, lam = out.best_x, out.best_lam
  free = x * q_max > lam
  # On a singular face (colinear gradients) the factorisation may fail; its
  # NaN is rejected by the comparison below.
  polished = _face_solver(q, free)(jnp.where(free, -q_lower, 0.0))
  polished = jnp.where(free, jnp.maximum(polished, 0.0), 0.0)
  polished_residual = residual(polished)
  use = jnp.all(jnp.isfinite(polished)) & (polished_residual
                                           < out.best_residual)
  x = jnp.where(use, polished, x)
  # Variables with a zero row of Q (zero gradients) do not enter the
  # objective; the smallest feasible value is the natural choice.
  x = jnp.where(jnp.diagonal(quad) > 0, x, 0.0)
  return (lower + x, jnp.where(use, polished_residual, out.best_residual),
          out.iteration)


def lower_bounded_qp(quad: jax.Array, lower: jax.Array, max_iter: int = 100,
                     tol: float | jax.Array | None = None) -> BoxQPSolution:
  """``argmin_v 1/2 v^T Q v  s.t.  v >= lower`` for a PSD ``Q``, batched.

  The dual of the projection onto the dual cone of the task gradients
  (Lopez-Paz & Ranzato, 2017, Eq. 11; Quinton & Rey, "Jacobian Descent for
  Multi-Objective Optimization", 2024, Prop. 1), solved for every row of
  ``lower`` at once. For K = 2 in closed form; for K <= 6 exactly, by
  trying all ``2**K`` active sets at once (one Jacobi-scaled Cholesky per
  face, shared by the rows; each row keeps the candidate of smallest
  residual, zero only at the optimum; no iterations); beyond, by a
  primal-dual interior-point method (``vmap`` over the rows) with
  Mehrotra's predictor-corrector (Nocedal & Wright, "Numerical
  Optimization", 2nd ed., 2006, Sec. 16.6), which needs 10-25 iterations
  whatever the conditioning, then a crossover: the active face read off the
  interior point gives the exact solution by one linear solve, kept when its
  residual is smaller. Each iteration costs one ``K x K`` Cholesky per row (Jacobi-
  scaled); a floor of ``eps * max(diag Q)`` on the diagonal keeps singular
  ``Q`` (colinear, zero or Pareto-stationary task gradients) bounded. The
  loop stops at the tolerance, after ``max_iter`` steps, or when the
  residual has not halved for eight steps (the float floor). Everything is
  ``lax`` loops.

  Args:
    quad: ``(K, K)`` symmetric PSD matrix, ideally unit scale (e.g. the
      normalised Gram matrix, plus any ridge).
    lower: ``(K,)`` or ``(B, K)`` lower bounds; one problem per row.
    max_iter: cap on interior-point iterations per row (an int; may be
      traced); not read for K <= 6.
    tol: stopping tolerance on the relative residual (see
      :class:`BoxQPSolution`); default :func:`default_tolerance`; not read
      for K <= 6.

  Returns:
    A :class:`BoxQPSolution` whose ``solution`` has the shape of ``lower``.

  Example (the min-norm element of ``{J^T v : v >= (1/2, 0)}``):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax._src.solvers import lower_bounded_qp
    >>> q = jnp.array([[1., -1.], [-1., 2.]])
    >>> sol = lower_bounded_qp(q, jnp.array([0.5, 0.]))
    >>> print(np.asarray(sol.solution, np.float64).round(4))
    [0.5  0.25]
  """
  if quad.shape[0] == 2:  # closed form, no loop
    return BoxQPSolution(*two_task.lower_bounded_qp(quad, lower),
                         _no_iterations())
  lower = jnp.asarray(lower, quad.dtype)
  if quad.shape[0] <= _MAX_ENUMERATED:
    return _enumerated_lower_bounded_qp(quad, lower)
  return _lower_bounded_qp(quad, lower, max_iter, tol)


# Jitted once at module level, so that eager (un-jitted) calls reuse the
# compiled loops instead of recompiling them on every call; iteration caps
# and tolerances are traced, so injected hyper-parameters work too.
@jax.jit
def _lower_bounded_qp(quad, lower, max_iter, tol):
  tol = default_tolerance(quad.dtype) if tol is None else tol
  rows = jnp.reshape(lower, (-1, quad.shape[0]))
  solve = lambda row: _lower_bounded_qp_row(quad, row, max_iter, tol)
  if rows.shape[0] == 1:  # one problem (DualProj): no batched loop to emit
    v, residual, iterations = jax.tree.map(lambda x: x[None], solve(rows[0]))
  else:
    v, residual, iterations = jax.vmap(solve)(rows)
  return BoxQPSolution(jnp.reshape(v, lower.shape), jnp.max(residual),
                       jnp.max(iterations))


class PositiveSolution(NamedTuple):
  """Result of :func:`alpha_fair_weights`.

  Attributes:
    weights: ``(K,)`` positive solution; zero for tasks whose Gram diagonal
      is exactly zero.
    residual: ``()`` ``max_i |w_i^(1/alpha) (A w)_i - 1|`` over tasks with a
      non-zero gradient, for the Gram matrix ``A`` as given (without the
      ridge): zero at an exact solution; close to 1 when none exists.
    iterations: ``()`` Newton steps taken.
  """
  weights: jax.Array
  residual: jax.Array
  iterations: jax.Array


def _exprel(x):
  """``expm1(x) / x``, equal to 1 at 0 and accurate near it."""
  small = jnp.abs(x) < 1e-3
  safe = jnp.where(small, 1.0, x)
  return jnp.where(small, 1.0 + x / 2 + x * x / 6, jnp.expm1(safe) / safe)


def alpha_fair_weights(gram: jax.Array, alpha: float | jax.Array = 1.0,
                       init: jax.Array | None = None, max_iter: int = 50,
                       tol: float | jax.Array | None = None,
                       ridge: float | jax.Array | None = None
                       ) -> PositiveSolution:
  """Solves ``A w = w^(-1/alpha)``, ``w > 0`` (Nash-MTL, FairGrad).

  ``alpha = 1`` is the Nash bargaining system ``w_i (A w)_i = 1`` of Navon et
  al. (ICML 2022); general ``alpha > 0`` is FairGrad's alpha-fair system (Ban
  & Ji, ICML 2024, Eq. 4). Both are the stationarity condition of the
  strictly convex potential

      ``f(w) = 1/2 w^T A w - sum_i (w_i^p - 1) / p,   p = 1 - 1/alpha``

  (``- sum_i log w_i`` for ``alpha = 1``) on the positive orthant, which is
  minimised by Newton's method with Jacobi-scaled steps, a fraction-to-the-
  boundary rule and Armijo backtracking. The starting point is the solution
  for the diagonal of ``A``, rescaled optimally along its ray.

  A solution exists iff no non-negative combination of the task gradients
  vanishes (the point is not Pareto-stationary). A relative ridge
  ``ridge * diag(A)`` (by default the dtype's epsilon, the resolution of a
  float Gram matrix) keeps the potential bounded below, so the answer is
  always finite; at a Pareto-stationary point it is the ridge-regularised
  solution and ``residual`` (measured without the ridge) is near 1. Tasks
  with an exactly zero gradient are left out of the system and get weight 0.

  Args:
    gram: ``(K, K)`` Gram matrix (any scale; the solution scales as
      ``A^(-alpha/(1+alpha))``).
    alpha: fairness parameter, > 0.
    init: optional warm start (its direction is used).
    max_iter: cap on Newton steps (an int; may be traced).
    tol: stopping tolerance on the residual of the regularised system;
      default :func:`default_tolerance`.
    ridge: ridge relative to the diagonal of ``A``; default as above.

  Returns:
    A :class:`PositiveSolution`.

  Example (``w_i (A w)_i = 1`` for TorchJD's J = [[-4, 1, 1], [6, 1, 1]]):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax._src.solvers import alpha_fair_weights
    >>> a = jnp.array([[18., -22.], [-22., 38.]])
    >>> sol = alpha_fair_weights(a)
    >>> print(np.asarray(sol.weights, np.float64).round(4), sol.residual < 1e-5)
    [0.5915 0.4071] True
  """
  # alpha = 1 given as a number (Nash-MTL) is a static special case: its
  # powers are identities, and the compiled loop has no exp/log/expm1.
  nash = isinstance(alpha, (int, float)) and alpha == 1
  return _alpha_fair_weights(gram, None if nash else alpha, init, max_iter,
                             tol, ridge)


@jax.jit
def _alpha_fair_weights(gram, alpha, init, max_iter, tol, ridge):
  dtype = gram.dtype
  eps = jnp.finfo(dtype).eps
  tol = default_tolerance(dtype) if tol is None else tol
  nash = alpha is None  # alpha = 1, static
  alpha = jnp.asarray(1.0 if nash else alpha, dtype)
  inv_alpha = 1.0 / alpha
  power = 1.0 - inv_alpha
  # w^(1/alpha), w^p and s^p (p = 1 - 1/alpha), and expm1(p r) / (p r).
  root = (lambda w: w) if nash else (lambda w: jnp.exp(jnp.log(w) * inv_alpha))
  to_power = ((lambda w: jnp.ones_like(w)) if nash
              else (lambda w: jnp.exp(power * jnp.log(w))))
  exprel_of_power = ((lambda r: jnp.ones_like(r)) if nash
                     else (lambda r: _exprel(power * r)))
  diag = jnp.diagonal(gram)
  active = diag > 0
  ridge = eps if ridge is None else ridge
  pair = active[:, None] & active[None, :]
  # Tasks with a zero gradient decouple (their row of A is zero) and would
  # push their weight to infinity; they are given the equation w_i = 1 and
  # reported as 0. The ridge is relative to each task's own squared norm,
  # which keeps the alpha = 1 system invariant to per-task gradient scales.
  ridge_diag = jnp.where(active, jnp.asarray(ridge, dtype) * diag, 1.0)
  system = jnp.where(pair, gram, 0.0) + jnp.diag(ridge_diag)

  def residual_of(matrix, w):
    lhs = root(w) * _matvec(matrix, w)
    return jnp.max(jnp.where(active, jnp.abs(lhs - 1.0), 0.0))

  start = jnp.exp(-alpha / (1.0 + alpha) * jnp.log(jnp.diagonal(system)))
  if init is not None:
    init = jnp.asarray(init, dtype)
    usable = jnp.all(jnp.isfinite(init) & (init > 0))
    start = jnp.where(usable, init / jnp.where(usable, jnp.max(init), 1.0),
                      start)
  # Optimal scale along the ray: d/ds f(s w0) = 0.
  total = jnp.sum(to_power(start))
  # A warm start from an unconverged solve (at a Pareto-stationary point)
  # can lie almost in the null space of A, where the rounded quadratic
  # cancels to 0 or below; the ridge's share is its exact lower bound.
  curvature = jnp.maximum(_quadratic(system, start),
                          jnp.sum(ridge_diag * start * start))
  start = start * jnp.exp(alpha / (1.0 + alpha) * jnp.log(total / curvature))

  class Loop(NamedTuple):
    w: jax.Array
    residual: jax.Array
    iteration: jax.Array
    moved: jax.Array

  def cond(s):
    return (s.iteration < max_iter) & (s.residual > tol) & s.moved

  def body(s):
    w = s.w
    aw = _matvec(system, w)
    barrier_grad = 1.0 / w if nash else jnp.exp(-inv_alpha * jnp.log(w))
    grad = aw - barrier_grad
    hessian = system + jnp.diag(inv_alpha * barrier_grad / w)
    step = -_jacobi_cholesky_solver(hessian, eps)(grad)
    # A failed factorisation is not always NaN (batched Cholesky): no step.
    step = jnp.where(jnp.all(jnp.isfinite(step)), step, 0.0)
    slope = _inner(grad, step)
    t_max = jnp.minimum(1.0, 0.99 * _step_to_boundary(w, step))
    quad_step = _quadratic(system, step)
    w_pow = to_power(w)

    def trial(t):
      ratio = jnp.log1p(t * step / w)
      barrier = -jnp.sum(w_pow * ratio * exprel_of_power(ratio))
      linear = t * _inner(aw, step)
      value = linear + 0.5 * t * t * quad_step + barrier
      slack = 8 * eps * (jnp.abs(linear) + jnp.abs(barrier))
      return w + t * step, value <= _ARMIJO * t * slope + slack

    candidate, ok = _first_acceptable(trial, t_max)
    new_w = jnp.where(ok, candidate, w)
    moved = ok & jnp.any(new_w != w)
    return Loop(new_w, residual_of(system, new_w), s.iteration + 1, moved)

  out = jax.lax.while_loop(
      cond, body, Loop(start, residual_of(system, start),
                       jnp.zeros((), jnp.int32), jnp.ones((), bool)))
  weights = jnp.where(active, out.w, 0.0)
  return PositiveSolution(weights, residual_of(gram, out.w), out.iteration)
