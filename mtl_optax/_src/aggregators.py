"""Gradient aggregators: stacked per-task gradients in, one update out.

Every factory takes ``num_tasks`` first and returns an
``optax.GradientTransformationExtraArgs`` whose ``update`` maps a tree of
stacked task gradients (leaves ``(K, *shape)``) to one update tree shaped like
the parameters. States are NamedTuples with a ``weights`` field holding the
per-task coefficients of the last update: ``update = sum_i weights[i] g_i``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import eager
from mtl_optax._src import prng
from mtl_optax._src import tree_math
from mtl_optax._src import validation


class WeightsState(NamedTuple):
  """State of methods with no memory beyond the last coefficients.

  Attributes:
    weights: ``(K,)`` coefficients of the last update.
  """
  weights: jax.Array


def linear_scalarization(
    num_tasks: int, weights: Optional[Sequence[float] | jax.Array] = None
) -> optax.GradientTransformationExtraArgs:
  """Linear scalarization: a fixed weighted sum of the task gradients.

  ``d = sum_i w_i g_i`` with ``w = 1/K`` by default, i.e. the mean gradient
  ``g0`` (the gradient of the mean loss). Reads the gradients once.

  .. math::

     d = \\sum_i w_i g_i, \\qquad w_i = \\frac{1}{K} \\text{ by default } (d = g_0)

  Args:
    num_tasks: number of tasks K.
    weights: optional ``(K,)`` task weights, used as given (not normalised).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> grads = {'w': jnp.array([[1., 2.], [3., -2.]])}
    >>> tx = mo.linear_scalarization(2)
    >>> update, state = tx.update(grads, tx.init({'w': jnp.zeros(2)}))
    >>> print(update['w'], state.weights)
    [2. 0.] [0.5 0.5]
  """
  return fixed_weighting(num_tasks, weights, "linear_scalarization")


def fixed_weighting(num_tasks: int, weights, method: str
                    ) -> optax.GradientTransformationExtraArgs:
  """``d = sum_i w_i g_i`` for given weights (1/K when None), as ``method``."""
  num_tasks = validation.check_num_tasks(num_tasks, method)
  if weights is not None and validation.is_concrete(weights) and (
      np.shape(weights) != (num_tasks,)):
    raise ValueError(f"{method}: weights has shape {np.shape(weights)}, "
                     f"expected ({num_tasks},).")
  if weights is not None:
    validation.check_finite(weights, "weights", method)

  def fixed(dtype):
    if weights is None:
      return base.uniform_weights(num_tasks, dtype)
    return jnp.asarray(weights, dtype)

  def rule(context, state):
    del state
    w = fixed(context.dtype)
    return w, WeightsState(w)

  return base.task_weighting_transformation(
      num_tasks, method, lambda dtype: WeightsState(fixed(dtype)), rule,
      needs_gram=False)


def task_sum(num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """Plain sum over the task axis: ``d = sum_i g_i``.

  .. math::

     d = \\sum_i g_i

  The rule for task-specific (head) parameters: each head only receives its
  own task's gradient, so the sum hands it through unchanged. Use it beside a
  balancing method inside ``optax.partition``. Given one ordinary gradient
  instead (shaped like ``params``: the heads' gradient from
  ``mo.value_and_task_grads(..., shared=...)``, the single-backward or the
  Gram-first path) it passes it through, so the same partition serves every
  path. Its state is a ``PassThroughState``, which ``mo.task_weights`` skips.

  Example:
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> heads = {'h': jnp.array([[1., 0.], [0., 3.]])}
    >>> tx = mo.task_sum(2)
    >>> print(tx.update(heads, tx.init({'h': jnp.zeros(2)}))[0]['h'])
    [1. 3.]
  """
  method = "task_sum"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  ones = lambda dtype: base.PassThroughState(jnp.ones((num_tasks,), dtype))
  return base.task_weighting_transformation(
      num_tasks, method, ones, lambda ctx, _: (ones(ctx.dtype).weights,
                                               ones(ctx.dtype)),
      needs_gram=False, passes_unstacked_through=True)


class MGDAState(NamedTuple):
  """State of :func:`mgda`.

  Attributes:
    weights: ``(K,)`` min-norm weights of the last step (on the simplex).
    residual: ``()`` gradient-mapping norm of the last solve (unit scale).
  """
  weights: jax.Array
  residual: jax.Array


def mgda(num_tasks: int, max_iter: int = 500, tol: Optional[float] = None,
         warm_start: bool = True) -> optax.GradientTransformationExtraArgs:
  """MGDA: the minimum-norm point of the convex hull of the task gradients.

  Desideri (2012); Sener & Koltun, "Multi-Task Learning as Multi-Objective
  Optimization", NeurIPS 2018. ``d = G w*``,
  ``w* = argmin_{w in simplex} ||sum_i w_i g_i||^2``, solved on the
  scale-free Gram matrix, not by a fixed small number of Frank-Wolfe steps:
  in closed form for K = 2, exactly over every support for K <= 6 (tasks
  with identical gradients share their weight equally), by accelerated
  projected gradient to ``tol`` beyond, warm-started from the previous
  weights. ``d`` is a convex combination of task gradients (the scale of
  ``g0``); it is zero at a Pareto-stationary point.

  .. math::

     d &= \\sum_i w^\\star_i g_i, \\\\
     w^\\star &= \\arg\\min_{w \\in \\Delta} \\Big\\| \\sum_i w_i g_i \\Big\\|^2

  Args:
    num_tasks: number of tasks K.
    max_iter: cap on solver iterations (K > 6).
    tol: solver tolerance on the gradient mapping (relative scale; K > 6);
      default 1e-5 in float32, 1e-10 in float64.
    warm_start: start the solve from the previous step's weights (K > 6).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`MGDAState`.

  Example (TorchJD's test matrix J = [[-4, 1, 1], [6, 1, 1]]):
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.mgda(2)
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(3)))
    >>> print(update.round(4), state.weights.round(4))
    [0. 1. 1.] [0.6 0.4]
  """
  method = "mgda"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_positive_int(max_iter, "max_iter", method)
  if tol is not None:
    validation.check_positive(tol, "tol", method)

  def init_state(dtype):
    return MGDAState(base.uniform_weights(num_tasks, dtype),
                     jnp.zeros((), dtype))

  from mtl_optax import gram_weightings  # pylint: disable=g-import-not-at-top

  def rule(context, state):
    return gram_weightings.mgda(tree_math.NormalizedGram(context.gram, context.rms_norm), state, max_iter=max_iter,
                                tol=tol, warm_start=warm_start)

  return base.task_weighting_transformation(num_tasks, method, init_state, rule)


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update (``d = sum_i w_i g_i``).
    key: PRNG key for the random projection order.
  """
  weights: jax.Array
  key: jax.Array


@eager.compiled_when_eager
def pcgrad_coefficients(gram: jax.Array, key: jax.Array) -> jax.Array:
  """PCGrad's update ``mean_i g_i^PC`` as coefficients on the task gradients.

  Each projected gradient is tracked as ``g_i^PC = sum_k C[i, k] g_k``; a
  projection onto the normal plane of ``g_j`` subtracts from ``C[i, j]``, so
  the whole procedure runs on the K x K Gram matrix. Each task gets its own
  random order of the other K - 1 tasks (the CAGrad repository's version of
  Yu et al.'s algorithm).
  """
  num_tasks = gram.shape[0]
  if num_tasks == 1:
    return jnp.ones((1,), gram.dtype)
  rows = jnp.arange(num_tasks)
  sq_norms = jnp.diagonal(gram)
  inv_norm = jnp.where(sq_norms > 0, jax.lax.rsqrt(
      jnp.where(sq_norms > 0, sq_norms, 1.0)), 0.0)
  orders = prng.permutations(prng.split(key, num_tasks), num_tasks - 1)
  partners = orders + (orders >= rows[:, None])  # skip each task itself

  def project(coeffs, partner):
    # <g_i^PC, g_j> for every row i and its partner j in this round.
    dots = jnp.sum(coeffs * gram[partner], axis=1) * inv_norm[partner]
    shrink = jnp.minimum(dots, 0.0) * inv_norm[partner]
    return coeffs.at[rows, partner].add(-shrink), None

  coeffs, _ = jax.lax.scan(project, jnp.eye(num_tasks, dtype=gram.dtype),
                           partners.T)
  return jnp.mean(coeffs, axis=0)


def pcgrad_initial_state(num_tasks: int, dtype, seed: int) -> PCGradState:
  """PCGrad's initial state (of the factory and of the Gram-weighting
  layer): uniform weights and ``PRNGKey(seed)``."""
  return PCGradState(base.uniform_weights(num_tasks, dtype),
                     jax.random.PRNGKey(seed))


def pcgrad(num_tasks: int, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """PCGrad: project away conflicting components, then average.

  Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020. For
  each task i, in a fresh random order of the other tasks j:
  ``g_i <- g_i - min(<g_i, g_j>, 0) / ||g_j||^2 g_j`` (``g_j`` the original
  gradients); ``d = (1/K) sum_i g_i`` (the scale of ``g0``). Computed on the
  Gram matrix: two reads of the gradients whatever K is.

  .. math::

     g_i^{\\mathrm{PC}} &\\leftarrow g_i^{\\mathrm{PC}}
     - \\frac{\\min(\\langle g_i^{\\mathrm{PC}}, g_j \\rangle, 0)}{\\|g_j\\|^2}\\, g_j
     \\quad (j \\ne i \\text{, random order}), \\\\
     d &= \\frac{1}{K} \\sum_i g_i^{\\mathrm{PC}}

  Args:
    num_tasks: number of tasks K.
    seed: seed of the PRNG key kept in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`PCGradState`.

  Example (two tasks: the order is deterministic):
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> grads = jnp.array([[1., 0.], [-1., 1.]])
    >>> tx = mo.pcgrad(2)
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(2)))
    >>> print(update.round(4), state.weights.round(4))
    [0.25 0.75] [1.   0.75]
  """
  method = "pcgrad"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_seed(seed, method)

  from mtl_optax import gram_weightings  # pylint: disable=g-import-not-at-top

  def rule(context, state):
    return gram_weightings.pcgrad(tree_math.NormalizedGram(context.gram, context.rms_norm), state)

  return base.task_weighting_transformation(
      num_tasks, method,
      lambda dtype: pcgrad_initial_state(num_tasks, dtype, seed), rule)
