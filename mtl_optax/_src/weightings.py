"""Simple weightings: fixed weights, random weights, and EMA-smoothed weights.

* :func:`constant` -- a fixed combination ``sum_i w_i g_i`` (TorchJD's
  ``Constant``).
* :func:`random_weighting` -- Random Loss Weighting (RLW): fresh weights
  ``softmax(z)``, ``z ~ N(0, I)``, at every step.
* :func:`ema_weights` -- CR-MOGM: an exponential moving average over the
  weights of another weighting method.

Methods that are not plain functions of the Gram matrix (here and in
the surgery, stochastic and robust families)
build on ``base.guarded_transformation`` instead of
``base.task_weighting_transformation``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import aggregators
from mtl_optax._src import base
from mtl_optax._src import loss_weighting
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = [
    "constant",
    "ConstantState",
    "ema_weights",
    "EMAWeightsState",
    "random_weighting",
    "RandomWeightingState",
]


# The state of :func:`constant`: ``weights``, the fixed weights.
ConstantState = aggregators.WeightsState


def constant(num_tasks: int, weights: Sequence[float] | jax.Array
             ) -> optax.GradientTransformationExtraArgs:
  """A fixed, user-given combination of the task gradients.

  ``d = sum_i w_i g_i`` with ``w`` used exactly as given (not normalised,
  signs allowed), as TorchJD's ``Constant``. Output scale: whatever ``w``
  makes it; weights summing to 1 give the scale of ``g0``. The weights are
  injectable with ``optax.inject_hyperparams``. Reads the gradients once (no
  Gram matrix). :func:`mtl_optax.linear_scalarization` is the same map with
  the mean ``1/K`` as default.

  Args:
    num_tasks: number of tasks K.
    weights: ``(K,)`` task weights.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`ConstantState`.

  Example (TorchJD's ``Constant([1, 2])`` on J = [[-4, 1, 1], [6, 1, 1]]):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.constant(2, jnp.array([1., 2.]))
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(3)))
    >>> print(np.asarray(update, np.float64).round(4))
    [8. 3. 3.]
  """
  method = "constant"
  if weights is None:
    raise ValueError(f"{method}: weights (shape ({num_tasks},)) are required.")
  return aggregators.fixed_weighting(num_tasks, weights, method)


# RLW is one method on both paths (stacked gradients and the single-backward
# weighted loss): its one implementation lives with the loss weightings.
RandomWeightingState = loss_weighting.RandomWeightingState
random_weighting = loss_weighting.random_weighting


class EMAWeightsState(NamedTuple):
  """State of :func:`ema_weights`.

  Attributes:
    weights: ``(K,)`` the smoothed weights used by the last update.
    count: number of finite steps taken (the first step sets the average).
    inner_state: the wrapped method's state, held opaquely (its own
      ``weights`` field is hidden from ``optax.tree.get``, so that the smoothed
      ``weights`` above is the only one found); the wrapped state is
      ``inner_state.value``.
  """
  weights: jax.Array
  count: jax.Array
  inner_state: Any


def ema_weights(inner: optax.GradientTransformation, num_tasks: int,
                alpha: float = 0.9) -> optax.GradientTransformationExtraArgs:
  """CR-MOGM: exponential moving average over another method's task weights.

  Zhou, Zhang, Jiang, Tsang, Li & Yang, "On the Convergence of Stochastic
  Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022: the
  weights ``w_hat_k`` returned by the wrapped method at step ``k`` are
  smoothed as ``w_k = alpha w_{k-1} + (1 - alpha) w_hat_k`` with
  ``w_0 = w_hat_1`` (so the first step equals the wrapped method), and the
  update is ``d = sum_i w_k[i] g_i``. Output scale: that of the wrapped
  method's weights (e.g. convex weights of MGDA: ``g0`` scale). ``alpha = 0``
  reproduces the wrapped method; ``alpha = 1`` freezes the first weights.
  Defaults follow TorchJD's ``CRMOGMWeighting`` (``alpha = 0.9``); the paper's
  Corollary 1 lets ``alpha`` grow towards 1 as the learning rate decays: use
  ``optax.inject_hyperparams`` for a schedule.

  .. math::

     w_k = \\alpha\\, w_{k-1} + (1 - \\alpha)\\, \\hat w_k, \\qquad
     d = \\sum_i w_{k, i}\\, g_i

  The wrapped method must be a *weighting*: its state's ``weights`` field must
  be the coefficients of its update, ``update = sum_i weights[i] g_i`` (MGDA,
  CAGrad, PCGrad, GradVac, IMTL-G, MoDo, SDMGrad, ...). Methods whose
  ``weights`` are only summaries (GradDrop, trimmed mean, MoCo) are refused.
  The wrapped method's own update is never used, so under ``jit`` its
  weighted sum is dead code and costs nothing.

  Args:
    inner: the wrapped transformation, built for the same ``num_tasks``.
    num_tasks: number of tasks K.
    alpha: weight of the previous average, in [0, 1]. Injectable.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`EMAWeightsState`.

  Example (MGDA on two alternating batches):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.ema_weights(mo.mgda(2), 2, alpha=0.5)
    >>> state = tx.init(jnp.zeros(3))
    >>> for grads in ([[-4., 1., 1.], [6., 1., 1.]], [[1., 0., 0.], [0., 1., 0.]]):
    ...   update, state = tx.update(jnp.array(grads), state)
    ...   print(np.asarray(state.weights, np.float64).round(4))
    [0.6 0.4]
    [0.55 0.45]
  """
  method = "ema_weights"
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise TypeError(f"{method}: inner must be an optax transformation (e.g. "
                    f"mo.mgda(num_tasks)), got {type(inner).__name__}. Note "
                    "the argument order: ema_weights(inner, num_tasks).")
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_probability(alpha, "alpha", method)

  def inner_weights(inner_state):
    weights = optax.tree.get(inner_state, "weights")
    if weights is None or np.shape(weights) != (num_tasks,):
      found = "none" if weights is None else f"shape {np.shape(weights)}"
      raise ValueError(
          f"{method}: the wrapped method's state must have a `weights` field "
          f"of shape ({num_tasks},), found {found}; build it with "
          f"num_tasks={num_tasks}.")
    summaries = [type(node).__name__ for node in _named_tuples(inner_state)
                 if not getattr(type(node), "weights_are_coefficients", True)]
    if summaries:
      raise ValueError(
          f"{method}: the wrapped method ({summaries[0]}) is not a weighting: "
          "its `weights` are not the coefficients of its update.")
    return weights

  def init_fn(params):
    inner_state = inner.init(params)
    inner_weights(inner_state)
    return EMAWeightsState(
        base.uniform_weights(num_tasks, base.state_dtype(params)),
        jnp.zeros((), jnp.int32), base.Opaque(inner_state))

  def step(updates, state, params, extra_args):
    _, inner_state = inner.update(updates, state.inner_state.value, params,
                                  **extra_args)
    fresh = inner_weights(inner_state).astype(state.weights.dtype)
    a = jnp.asarray(alpha, state.weights.dtype)
    smoothed = jnp.where(state.count == 0, fresh,
                         a * state.weights + (1 - a) * fresh)
    return (tree_math.weighted_task_sum(smoothed, updates),
            EMAWeightsState(smoothed, state.count + 1, base.Opaque(inner_state)))

  return base.guarded_transformation(
      num_tasks, method, init_fn, base.finite_if_weights_and_update_are(step))


# --- private helpers shared with surgery.py, stochastic.py, robust.py ---


def _named_tuples(tree: Any) -> list:
  """Every NamedTuple node of ``tree``, at any depth."""
  found = []

  def visit(node):
    if hasattr(type(node), "_fields"):
      found.append(node)
    return False

  jax.tree.leaves(tree, is_leaf=visit)
  return found

