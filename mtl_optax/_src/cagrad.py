"""CAGrad: Conflict-Averse Gradient descent, with its dual solved on device."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import prng
from mtl_optax._src import solvers
from mtl_optax._src import tree_math
from mtl_optax._src import validation


class CAGradState(NamedTuple):
  """State of :func:`cagrad`.

  Attributes:
    weights: ``(K,)`` effective coefficients of the last update,
      ``(1/K + lambda w*_i) / rescale``, so that ``d = sum_i weights[i] g_i``.
    dual_weights: ``(K,)`` the dual solution ``w*`` on the simplex (also the
      warm start of the next solve). With CAGrad-Fast, the surrogate tasks'
      dual weights mapped back onto the K tasks.
    residual: ``()`` gradient-mapping norm of the last dual solve.
    key: PRNG key of CAGrad-Fast's task sampling (unused otherwise).
  """
  weights: jax.Array
  dual_weights: jax.Array
  residual: jax.Array
  key: jax.Array


def rescale_divisor(rescale: int | jax.Array, c: jax.Array) -> jax.Array:
  """CAGrad's output divisor ``s``: 1, ``1 + c**2`` or ``1 + c`` for
  ``rescale`` = 0, 1, 2 (traced ``rescale`` values are fine)."""
  rescale = jnp.asarray(rescale)
  return jnp.where(rescale == 1, 1.0 + c * c,
                   jnp.where(rescale == 2, 1.0 + c, 1.0))


def cagrad_multiplier(c: jax.Array, mean_norm: jax.Array,
                      dual_norm: jax.Array, floor: jax.Array) -> jax.Array:
  """CAGrad's ``lambda = c ||g0|| / ||g_w||``, and 0 where ``||g_w|| <=
  floor``: a vanishing ``g_w`` (a zero task gradient, a Pareto-stationary
  point) has no direction, so the correction vanishes (as in the official
  code) instead of ``c ||g0|| / floor`` on the vanished direction."""
  resolved = dual_norm > floor
  return jnp.where(resolved, c * mean_norm / jnp.where(resolved, dual_norm,
                                                       1.0), 0.0)


def cagrad_coefficients(gram: jax.Array, c: jax.Array | float,
                        rescale: int | jax.Array = 1,
                        init: Optional[jax.Array] = None, max_iter: int = 500,
                        tol: Optional[float] = None,
                        anchor: Optional[jax.Array] = None):
  """CAGrad's update as coefficients on the task gradients.

  ``d = (g0 + lambda g_w*) / s`` with ``lambda = c ||g0|| / ||g_w*||``
  (0 when ``||g_w*||`` is below ``sqrt(eps)`` of the mean task norm) and
  ``s`` = 1, ``1 + c**2`` or ``1 + c`` for ``rescale`` = 0, 1, 2, i.e.
  ``d = sum_i (1/K + lambda w*_i) / s * g_i``. Everything is a function of the
  Gram matrix, so any positive rescaling of ``gram`` gives the same result.
  With ``anchor`` (CAGrad-Fast), ``g0 = sum_j anchor_j g_j`` replaces the
  uniform mean.

  Returns:
    ``(coefficients, dual_solution)`` where ``dual_solution`` is a
    :class:`~mtl_optax._src.solvers.SimplexSolution`.
  """
  num_tasks = gram.shape[0]
  dtype = gram.dtype
  c = jnp.asarray(c, dtype)
  if anchor is None:
    anchor = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  sol = solvers.cagrad_dual_weights(gram, c, init, max_iter, tol, anchor)
  w = sol.weights
  mean_norm = jnp.sqrt(jnp.maximum(anchor @ gram @ anchor, 0.0))
  dual_norm = jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))
  floor = jnp.sqrt(jnp.finfo(dtype).eps) * (
      jnp.trace(gram) / num_tasks) + jnp.finfo(dtype).tiny
  lam = cagrad_multiplier(c, mean_norm, dual_norm, floor)
  coefficients = (anchor + lam * w) / rescale_divisor(rescale, c)
  return coefficients, sol


def sampled_task_matrix(key: jax.Array, num_tasks: int,
                        num_sampled: int) -> jax.Array:
  """CAGrad-Fast's surrogate tasks as a ``(k + 1, K)`` mixing matrix.

  Rows ``0..k-1`` pick ``k`` tasks drawn without replacement; the last row is
  the mean of the ``K - k`` unsampled tasks,
  ``g_hat = (K g0 - sum_{i in S} g_i) / (K - |S|)`` (Liu et al., 2021, §3.3).
  """
  order = prng.permutations(key, num_tasks)
  picked = jax.nn.one_hot(order[:num_sampled], num_tasks)
  rest = jnp.ones((num_tasks,)) - picked.sum(0)
  return jnp.concatenate([picked, rest[None] / (num_tasks - num_sampled)])


def cagrad(num_tasks: int, c: float = 0.4, rescale: int = 1,
           max_iter: int = 500, tol: Optional[float] = None,
           warm_start: bool = True, num_sampled_tasks: Optional[int] = None,
           seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """CAGrad: Conflict-Averse Gradient descent.

  Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for
  Multi-task Learning", NeurIPS 2021 (arXiv:2110.14048). The update maximises
  the worst task's improvement in a ball around the mean gradient ``g0``:
  ``d* = argmax_d min_i <g_i, d>  s.t.  ||d - g0|| <= c ||g0||``, through its
  dual ``w* = argmin_{w in simplex} g_w^T g0 + c ||g0|| ||g_w||`` and
  ``d* = g0 + c ||g0|| / ||g_w*|| * g_w*``.

  .. math::

     d &= \\frac{1}{s} \\Big( g_0 + \\frac{c \\|g_0\\|}{\\|g_{w^\\star}\\|}\\, g_{w^\\star}
     \\Big), \\qquad s = 1 + c^2 \\;(\\texttt{rescale=1}), \\\\
     w^\\star &= \\arg\\min_{w \\in \\Delta}\\, g_w^\\top g_0 + c \\|g_0\\| \\|g_w\\|,
     \\qquad g_w = \\sum_i w_i g_i

  The dual is solved on the K x K Gram matrix by a jitted accelerated
  projected-gradient loop with a tolerance and an iteration cap (no scipy, no
  host round trip), warm-started from the previous step's ``w*``. The final
  residual is kept in the state.

  Output scale: ``rescale=1`` (the official supervised setting) divides by
  ``1 + c**2``, ``rescale=2`` (official toy and CAGrad-Fast) by ``1 + c``,
  ``rescale=0`` returns ``d*``. ``c = 0`` returns ``g0`` exactly; large ``c``
  approaches the MGDA direction. The official trainers multiply the result by
  K to match a summed loss; chain ``optax.scale(num_tasks)`` for that.

  Args:
    num_tasks: number of tasks K.
    c: radius of the search ball relative to ``||g0||`` (paper: 0.4 on NYUv2
      and CityScapes, 0.5 on the toy). Injectable.
    rescale: 0, 1 or 2 as above.
    max_iter: cap on dual-solver iterations.
    tol: dual-solver tolerance (relative scale); default 1e-5 in float32,
      1e-10 in float64.
    warm_start: start each solve from the previous ``w*``.
    num_sampled_tasks: ``k`` for CAGrad-Fast (paper §3.3, "CAGrad-Fast"):
      each step samples ``k < K`` tasks and replaces the others by their mean
      ``g_hat`` as one extra task, ``max_d min(<g_hat, d>, min_{i in S}
      <g_i, d>)`` in the same ball around ``g0``; the dual has ``k + 1``
      variables and is solved cold (the tasks change every step). We follow
      the paper's formula; the official ``cagrad_fastk`` divides the leftover
      sum by ``K - k + 1`` over ``idx[k:]`` and drops task ``idx[k - 1]``
      (an off-by-one we do not reproduce); its ``cagrad_fast{k+1}`` option
      corresponds to ``num_sampled_tasks=k``. The compute saving of the paper
      comes from back-propagating only the ``k + 1`` surrogate losses: build
      them with ``sampled_task_matrix`` and a ``task_losses`` of
      ``k + 1`` entries if you need it; given all K gradients, this option
      only shrinks the dual.
    seed: PRNG seed for CAGrad-Fast's task sampling.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`CAGradState`.

  Example (the CAGrad reference's test vector for c = 0.4):
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> grads = jnp.array([[1., 0., 0.], [0., 1., 0.], [-0.5, -0.2, 0.3]])
    >>> tx = mo.cagrad(3, c=0.4)
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(3)))
    >>> print(update.round(5), state.dual_weights.round(3))
    [0.05138 0.19297 0.14158] [0. 0. 1.]
  """
  method = "cagrad"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(c, "c", method)
  validation.check_finite(c, "c", method)
  validation.check_seed(seed, method)
  if validation.is_concrete(rescale) and int(rescale) not in (0, 1, 2):
    raise ValueError(f"{method}: rescale must be 0, 1 or 2, got {rescale!r}.")

  if num_sampled_tasks is not None and not (
      1 <= int(num_sampled_tasks) < num_tasks):
    raise ValueError(f"{method}: num_sampled_tasks must be in [1, num_tasks), "
                     f"got {num_sampled_tasks} with num_tasks={num_tasks}.")

  def init_state(dtype):
    uniform = base.uniform_weights(num_tasks, dtype)
    return CAGradState(uniform, uniform, jnp.zeros((), dtype),
                       jax.random.PRNGKey(seed))

  from mtl_optax import gram_weightings  # pylint: disable=g-import-not-at-top

  def rule(context, state):
    return gram_weightings.cagrad(
        tree_math.NormalizedGram(context.gram, context.rms_norm), state, c=c,
        rescale=rescale, max_iter=max_iter, tol=tol, warm_start=warm_start,
        num_sampled_tasks=num_sampled_tasks)

  return base.task_weighting_transformation(num_tasks, method, init_state, rule)
