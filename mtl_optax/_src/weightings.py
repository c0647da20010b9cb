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
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import aggregators
from mtl_optax._src import base
from mtl_optax._src import deprecation
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


# The state of the deprecated :func:`constant` (that of
# :func:`mtl_optax.linear_scalarization`), kept importable.
ConstantState = aggregators.WeightsState


def constant(num_tasks: int, weights: Sequence[float] | jax.Array
             ) -> optax.GradientTransformationExtraArgs:
  """Deprecated alias of :func:`mtl_optax.linear_scalarization` with given
  weights: ``constant(K, w)`` is ``linear_scalarization(K, w)``."""
  warnings.warn("mo.constant(num_tasks, weights) is deprecated: use "
                "mo.linear_scalarization(num_tasks, weights).",
                DeprecationWarning, stacklevel=2)
  if weights is None:
    raise ValueError(f"constant: weights (shape ({num_tasks},)) are required.")
  return aggregators.linear_scalarization(num_tasks, weights)


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


def _is_transformation(value: Any) -> bool:
  return hasattr(value, "init") and hasattr(value, "update")


@deprecation.renamed_arguments(alpha="decay")
def ema_weights(num_tasks: int, inner: optax.GradientTransformation,
                decay: float = 0.9) -> optax.GradientTransformationExtraArgs:
  """CR-MOGM: exponential moving average over another method's task weights.

  Zhou, Zhang, Jiang, Tsang, Li & Yang, "On the Convergence of Stochastic
  Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022: the
  weights ``w_hat_k`` returned by the wrapped method at step ``k`` are
  smoothed as ``w_k = decay w_{k-1} + (1 - decay) w_hat_k`` with
  ``w_0 = w_hat_1`` (so the first step equals the wrapped method), and the
  update is ``d = sum_i w_k[i] g_i``. Output scale: that of the wrapped
  method's weights (e.g. convex weights of MGDA: ``g0`` scale). ``decay = 0``
  reproduces the wrapped method; ``decay = 1`` freezes the first weights.
  Defaults follow TorchJD's ``CRMOGMWeighting`` (its ``alpha = 0.9``); the
  paper's Corollary 1 lets ``decay`` grow towards 1 as the learning rate decays: use
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
    num_tasks: number of tasks K.
    inner: the wrapped transformation, built for the same ``num_tasks``.
      The former order ``ema_weights(inner, num_tasks)`` still works, with a
      DeprecationWarning.
    decay: weight of the previous average (optax's EMA ``decay``), in
      [0, 1]. Injectable. Formerly ``alpha`` (same meaning), a deprecated
      alias.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`EMAWeightsState`.

  Example (MGDA on two alternating batches):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.ema_weights(2, mo.mgda(2), decay=0.5)
    >>> state = tx.init(jnp.zeros(3))
    >>> for grads in ([[-4., 1., 1.], [6., 1., 1.]], [[1., 0., 0.], [0., 1., 0.]]):
    ...   update, state = tx.update(jnp.array(grads), state)
    ...   print(np.asarray(state.weights, np.float64).round(4))
    [0.6 0.4]
    [0.55 0.45]
  """
  method = "ema_weights"
  if _is_transformation(num_tasks) and not _is_transformation(inner):
    warnings.warn("ema_weights(inner, num_tasks) is deprecated: use "
                  "ema_weights(num_tasks, inner) (num_tasks first).",
                  DeprecationWarning, stacklevel=2)
    num_tasks, inner = inner, num_tasks
  if not _is_transformation(inner):
    raise TypeError(f"{method}: inner must be an optax transformation (e.g. "
                    f"mo.mgda(num_tasks)), got {type(inner).__name__}. Note "
                    "the argument order: ema_weights(num_tasks, inner).")
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_probability(decay, "decay", method)

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
    a = jnp.asarray(decay, state.weights.dtype)
    smoothed = jnp.where(state.count == 0, fresh,
                         a * state.weights + (1 - a) * fresh)
    return (tree_math.weighted_task_sum(smoothed, updates),
            EMAWeightsState(smoothed, state.count + 1, base.Opaque(inner_state)))

  return base.guarded_transformation(
      num_tasks, method, init_fn, step)


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

