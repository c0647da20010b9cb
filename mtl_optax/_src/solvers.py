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
import optax


def project_to_simplex(x: jax.Array) -> jax.Array:
  """Euclidean projection onto ``{w >= 0, sum(w) = 1}`` (sort based).

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.solvers import project_to_simplex
    >>> print(project_to_simplex(jnp.array([0.5, 2.0, -1.0])))
    [0. 1. 0.]
  """
  return optax.projections.projection_simplex(x)


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


# After an accepted step the Lipschitz estimate is relaxed by this factor, so
# that steps can lengthen again where the curvature is lower.
RELAX = 0.9


def default_tolerance(dtype: jnp.dtype) -> float:
  """Stopping tolerance on the gradient mapping for unit-scale problems."""
  return 1e-5 if jnp.finfo(dtype).bits <= 32 else 1e-10


def _gradient_mapping(grad_fn, w, lipschitz):
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
  init = project_to_simplex(init)
  dtype = init.dtype
  tol = default_tolerance(dtype) if tol is None else tol
  eps = jnp.finfo(dtype).eps
  lipschitz = jnp.maximum(jnp.asarray(lipschitz, dtype), jnp.finfo(dtype).tiny)
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
      ok = f_p <= f_y + g_y @ d + 0.5 * lip * (d @ d) + slack
      return p, ok

    def bt_cond(c):
      _, ok, k, _ = c
      return (~ok) & (k < 40)

    def bt_body(c):
      _, _, k, lip = c
      lip = 2.0 * lip
      p, ok = candidate(lip)
      return p, ok, k + 1, lip

    p0, ok0 = candidate(s.lipschitz)
    p, _, _, lip = jax.lax.while_loop(
        bt_cond, bt_body, (p0, ok0, jnp.zeros((), jnp.int32), s.lipschitz))
    step_norm = jnp.linalg.norm(p - s.y)
    residual = lip * step_norm
    restart = (s.y - p) @ (p - s.x) > 0
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.t * s.t))
    momentum = jnp.where(restart, 0.0, (s.t - 1.0) / t_next)
    y = p + momentum * (p - s.x)
    return Loop(p, y, jnp.where(restart, jnp.ones_like(s.t), t_next),
                RELAX * lip, residual, step_norm, s.iteration + 1)

  one = jnp.ones((), dtype)
  inf = jnp.full((), jnp.inf, dtype)
  start = Loop(init, init, one, lipschitz, inf, inf, jnp.zeros((), jnp.int32))
  out = jax.lax.while_loop(cond, body, start)
  grad_fn = lambda w: value_and_grad_fn(w)[1]
  residual = _gradient_mapping(grad_fn, out.x, out.lipschitz / RELAX)
  return SimplexSolution(out.x, residual, out.iteration)


def largest_eigenvalue(gram: jax.Array, num_iterations: int = 8) -> jax.Array:
  """Power-iteration estimate of ``lambda_max`` of a PSD matrix (from below).

  Used as the starting Lipschitz estimate of quadratic objectives; the
  solvers' backtracking corrects an underestimate.
  """
  def step(v, _):
    v = gram @ v
    return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(gram.dtype).tiny), None
  start = jnp.ones((gram.shape[0],), gram.dtype) + 0.1 * jnp.arange(
      gram.shape[0], dtype=gram.dtype) / gram.shape[0]
  v, _ = jax.lax.scan(step, start / jnp.linalg.norm(start), None,
                      length=num_iterations)
  return jnp.maximum(v @ gram @ v, jnp.max(jnp.diagonal(gram)))


def min_norm_weights(gram: jax.Array, init: jax.Array | None = None,
                     max_iter: int = 500,
                     tol: float | None = None) -> SimplexSolution:
  """MGDA's weights: ``argmin_{w in simplex} w^T A w`` (min-norm hull point).

  Args:
    gram: ``(K, K)`` Gram matrix, ideally from
      :func:`~mtl_optax._src.tree_math.normalized_gram` (unit scale).
    init: warm start; uniform by default.
    max_iter: iteration cap.
    tol: stopping tolerance on the gradient mapping.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.solvers import min_norm_weights
    >>> print(min_norm_weights(jnp.array([[1., -1.], [-1., 4.]])).weights.round(4))
    [0.7143 0.2857]
  """
  num_tasks = gram.shape[0]
  if init is None:
    init = jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype)
  value_and_grad = lambda w: (0.5 * w @ gram @ w, gram @ w)
  lipschitz = largest_eigenvalue(gram)
  return minimize_on_simplex(value_and_grad, init, lipschitz, max_iter, tol)


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
  if init is None:
    init = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  if anchor is None:
    anchor = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  gram_b = gram @ anchor
  radius = jnp.asarray(c, dtype) * jnp.sqrt(jnp.maximum(anchor @ gram_b, 0.0))
  smooth = jnp.finfo(dtype).eps ** 2 * (jnp.trace(gram) / num_tasks + 1.0)

  def value_and_grad(w):
    gram_w = gram @ w
    norm_w = jnp.sqrt(jnp.maximum(w @ gram_w, 0.0) + smooth)
    return w @ gram_b + radius * norm_w, gram_b + radius * gram_w / norm_w

  # The Hessian of the norm term is bounded by radius * A / ||g_w||; start
  # from its value at the initial point and let backtracking adjust.
  start_norm = jnp.sqrt(jnp.maximum(init @ gram @ init, 0.0) + smooth)
  lipschitz = largest_eigenvalue(gram) * radius / start_norm
  return minimize_on_simplex(value_and_grad, init, lipschitz, max_iter, tol)
