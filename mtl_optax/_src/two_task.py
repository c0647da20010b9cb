"""Closed forms of the library's inner problems for two tasks.

With K = 2 every weight vector on the simplex is ``w = (t, 1 - t)`` and the
task-weight problems of MGDA and CAGrad are convex in the one variable
``t in [0, 1]``: their minimiser is a stationary point clipped to the
interval. The dual-cone QPs of UPGrad and DualProj have two variables and
four possible active sets, each with a one-line solution. These functions
replace the iterative solvers of :mod:`mtl_optax._src.solvers` when
``K == 2`` (a static shape, so the choice is made at trace time): no loop,
exact to rounding, and the same answers (the tests compare them to 1e-6).

Everything is a function of the 2 x 2 Gram matrix ``A`` (any positive
scale), finite for finite input, including zero, identical and exactly
opposite gradients; non-finite input gives NaN weights. Where the solution
is not unique (identical gradients, a constant objective) the uniform
weights are returned, the iterative solvers' answer from their default
start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pair(gram: jax.Array):
  return gram[0, 0], gram[0, 1], gram[1, 1]


def _poison(values: jax.Array, gram: jax.Array) -> jax.Array:
  return jnp.where(jnp.all(jnp.isfinite(gram)), values, jnp.nan)


def _simplex_residual(w: jax.Array, grad: jax.Array,
                      lipschitz: jax.Array) -> jax.Array:
  """``L ||w - P(w - grad / L)||``, ``P`` the projection onto the 2-simplex:
  the gradient mapping the iterative solvers report, at step ``1 / L``."""
  x = w - grad / lipschitz
  t = jnp.clip(0.5 * (x[0] - x[1] + 1.0), 0.0, 1.0)
  return lipschitz * jnp.linalg.norm(jnp.stack([t, 1.0 - t]) - w)


def min_norm_weights(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MGDA's ``argmin_{w in simplex} w^T A w`` for two tasks.

  ``t = clip((a22 - a12) / (a11 - 2 a12 + a22), 0, 1)`` (Sener & Koltun,
  2018, Algorithm 1's line search is this formula); the denominator is
  ``||g1 - g2||^2``, zero only for identical gradients, where every ``t``
  is optimal and 1/2 is returned.

  Returns:
    ``(weights (2,), residual ())``: the residual is the gradient mapping at
    step ``1 / tr A`` (zero at the optimum up to rounding).

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.two_task import min_norm_weights
    >>> print(min_norm_weights(jnp.array([[1., -1.], [-1., 4.]]))[0].round(4))
    [0.7143 0.2857]
  """
  a11, a12, a22 = _pair(gram)
  spread = a11 - 2.0 * a12 + a22
  # Not `spread > 0`: a NaN must reach the weights, not pick the fallback.
  degenerate = spread == 0
  t = jnp.clip((a22 - a12) / jnp.where(degenerate, 1.0, spread), 0.0, 1.0)
  t = jnp.where(degenerate, 0.5, t)
  w = _poison(jnp.stack([t, 1.0 - t]), gram)
  scale = jnp.maximum(a11 + a22, jnp.finfo(gram.dtype).tiny)
  return w, _simplex_residual(w, gram @ w, scale)


def cagrad_dual_weights(gram: jax.Array, c, anchor: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  """CAGrad's dual ``argmin_w w^T A b + c sqrt(b^T A b) sqrt(w^T A w)``, K = 2.

  On ``w = (t, 1 - t)``: ``g_w = g2 + t u`` with ``u = g1 - g2``, so
  ``F(t) = const + beta t + r sqrt(q(t))`` with ``beta = <u, g_b>``,
  ``r = c ||g_b||`` and ``q(t) = ||g_w||^2 = s (t - t0)^2 + D``,
  ``s = ||u||^2``, ``t0 = -<g2, u> / s``, ``D`` the squared distance from
  the origin to the line through ``g1`` and ``g2``. ``F' = 0`` gives
  ``t = t0 - beta sqrt(D / (s (s r^2 - beta^2)))`` when
  ``|beta| < r sqrt(s)``; otherwise ``F`` is monotone and ``t`` is 0 or 1.
  The convex ``F`` is minimised on ``[0, 1]`` by that point clipped.

  Args:
    gram: ``(2, 2)`` Gram matrix.
    c: CAGrad's radius.
    anchor: ``b``, the coefficients of ``g0``; default ``(1/2, 1/2)``.

  Returns:
    ``(weights (2,), residual ())``: an exact solution; the residual is 0
    (non-finite for non-finite input).

  Example (orthogonal unit gradients: the dual splits evenly):
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.two_task import cagrad_dual_weights
    >>> print(cagrad_dual_weights(jnp.eye(2), 0.4)[0])
    [0.5 0.5]
  """
  dtype = gram.dtype
  a11, a12, a22 = _pair(gram)
  if anchor is None:
    anchor = jnp.full((2,), 0.5, dtype)
  gram_b = gram @ anchor
  r = jnp.asarray(c, dtype) * jnp.sqrt(jnp.maximum(anchor @ gram_b, 0.0))
  beta = gram_b[0] - gram_b[1]
  s = a11 - 2.0 * a12 + a22
  s_pos = s > 0
  s_safe = jnp.where(s_pos, s, 1.0)
  t0 = (a22 - a12) / s_safe
  distance2 = jnp.maximum(a22 - (a22 - a12) ** 2 / s_safe, 0.0)
  slope_bound = r * jnp.sqrt(jnp.maximum(s, 0.0))
  interior = s_pos & (jnp.abs(beta) < slope_bound)
  gap = jnp.where(interior, slope_bound ** 2 - beta ** 2, 1.0)
  t_interior = t0 - beta * jnp.sqrt(distance2 / (s_safe * gap))
  # Monotone F: beta < 0 decreases towards t = 1, beta > 0 towards t = 0;
  # a constant F (beta = 0 without an interior point) keeps 1/2.
  t_edge = jnp.where(beta < 0, 1.0, jnp.where(beta > 0, 0.0, 0.5))
  t = jnp.clip(jnp.where(interior, t_interior, t_edge), 0.0, 1.0)
  w = _poison(jnp.stack([t, 1.0 - t]), gram)
  residual = _poison(jnp.zeros((), dtype), gram)
  return w, residual


def lower_bounded_qp(quad: jax.Array, lower: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """``argmin_v 1/2 v^T Q v  s.t.  v >= lower`` for a 2 x 2 PSD ``Q``.

  Rows of ``lower`` (shape ``(2,)`` or ``(B, 2)``) are separate problems.
  With ``Q`` floored by ``eps * max(diag Q) I`` as the iterative solver
  does (a unique, bounded solution for singular ``Q``), the optimum has
  either the first bound active, ``v = (l1, max(l2, -q12 l1 / q22))``, which
  is optimal iff ``(Q v)_1 >= 0``; or the second, symmetrically; or none,
  ``v = 0`` (then ``lower <= 0``). Variables with a zero row of ``Q``
  (zero gradients) take their bound, as in the iterative solver.

  Returns:
    ``(solution, residual)``: ``solution`` shaped like ``lower``;
    ``residual`` the largest relative fixed-point residual over the rows,
    ``max_i |x_i - max(0, x_i - (Q v)_i)| / max |lower|`` with
    ``x = v - lower`` (the iterative solver's definition).

  Example (the min-norm element of ``{J^T v : v >= (1/2, 0)}``):
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.two_task import lower_bounded_qp
    >>> q = jnp.array([[1., -1.], [-1., 2.]])
    >>> print(lower_bounded_qp(q, jnp.array([0.5, 0.]))[0])
    [0.5  0.25]
  """
  dtype = quad.dtype
  lower = jnp.asarray(lower, dtype)
  eps = jnp.finfo(dtype).eps
  q_max = jnp.maximum(jnp.max(jnp.diagonal(quad)), jnp.finfo(dtype).tiny)
  q = quad + eps * q_max * jnp.eye(2, dtype=dtype)
  q11, q12, q22 = _pair(q)
  l1, l2 = lower[..., 0], lower[..., 1]
  first_active = jnp.stack([l1, jnp.maximum(l2, -q12 * l1 / q22)], -1)
  second_active = jnp.stack([jnp.maximum(l1, -q12 * l2 / q11), l2], -1)
  first_ok = (first_active @ q[0]) >= 0
  second_ok = (second_active @ q[1]) >= 0
  v = jnp.where(first_ok[..., None], first_active,
                jnp.where(second_ok[..., None], second_active,
                          jnp.zeros_like(lower)))
  v = jnp.where(jnp.diagonal(quad) > 0, v, lower)
  v = _poison(v, quad)
  x = v - lower
  grad = v @ quad
  largest = jnp.max(jnp.abs(lower))
  scale = jnp.where(largest > 0, largest, 1.0)
  residual = jnp.max(jnp.abs(x - jnp.maximum(0.0, x - grad))) / scale
  return v, residual
