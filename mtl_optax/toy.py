"""The CAGrad 2-D toy problem (Liu et al., NeurIPS 2021, Sec. 5.1 and Fig. 1).

Two conflicting losses of ``theta = (x, y)``. Mean-gradient descent stalls on
a plateau from some starts; CAGrad reaches the minimum of the average loss
``L0`` at ``(0, -8.3551)``, ``L0 = -15.0916``. :func:`run_toy` runs any
library method followed by Adam from many starts at once, with ``lax.scan``
over the steps and ``vmap`` over the starts.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import grads as grads_lib
from mtl_optax._src import base
from mtl_optax._src import two_task

#: Starts of the reference table; (-8.5, -5) is the official
#: code's start, (-8.5, 5) the paper's printed one.
TOY_STARTS = ((-8.5, 7.5), (-8.5, -5.0), (-8.5, 5.0), (0.0, 0.0), (9.0, 9.0),
              (10.0, -8.0))
#: Starts used by the Nash-MTL / FAMO variant (``l1_scale=0.1``).
NASH_MTL_STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5),
                   (9.0, -1.0))
#: Starts from which descent on the mean loss stalls on a plateau (L0 > 0).
MEAN_GRADIENT_STUCK_STARTS = ((-8.5, 7.5), (-8.5, 5.0), (9.0, 9.0))
#: Minimiser and value of the average loss ``L0``.
L0_OPTIMUM = (0.0, -8.3551)
L0_MIN = -15.0916

_EPS = 5e-6


def toy_losses(theta: jax.Array, l1_scale: float = 1.0) -> jax.Array:
  """The two task losses ``(L1, L2)`` at ``theta = (x, y)``.

  ``l1_scale=0.1`` gives the Nash-MTL / FAMO variant of the problem.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax.toy import toy_losses
    >>> print(toy_losses(jnp.array([0.0, -8.3551])).round(4))
    [-15.0916 -15.0916]
  """
  x, y = theta[0], theta[1]
  f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x - 7) - jnp.tanh(-y)), _EPS)) + 6
  f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x + 3) + jnp.tanh(-y) + 2), _EPS)) + 6
  g1 = ((-x + 7) ** 2 + 0.1 * (-y - 8) ** 2) / 10 - 20
  g2 = ((-x - 7) ** 2 + 0.1 * (-y - 8) ** 2) / 10 - 20
  c1 = jnp.maximum(jnp.tanh(0.5 * y), 0)
  c2 = jnp.maximum(jnp.tanh(-0.5 * y), 0)
  return jnp.stack([l1_scale * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2])


class ToyRun(NamedTuple):
  """Result of :func:`run_toy`.

  Attributes:
    trajectories: ``(num_starts, num_records + 1, 2)`` points, the start
      first, then one every ``record_every`` steps.
    final: ``(num_starts, 2)`` end points.
    final_losses: ``(num_starts, 2)`` task losses at the end points.
    final_weights: ``(num_starts, 2)`` the method's last ``weights``.
  """
  trajectories: jax.Array
  final: jax.Array
  final_losses: jax.Array
  final_weights: jax.Array


def run_toy(method: optax.GradientTransformation,
            starts: Sequence[Sequence[float]] = TOY_STARTS,
            num_steps: int = 100_000, learning_rate: float = 1e-3,
            record_every: int = 500, l1_scale: float = 1.0,
            loss_offset: Sequence[float] | None = None) -> ToyRun:
  """Runs ``optax.chain(method, optax.adam(learning_rate))`` on the toy.

  As in the official ``toy.py``: the method combines the two task gradients,
  Adam (lr 1e-3) takes the step, 100 000 steps, float32. A loss weighting
  (a :class:`mtl_optax.LossWeightingTransformation`, e.g. ``mo.famo(2)``)
  gets the gradient of its one weighted loss instead
  (:func:`mtl_optax.value_and_weighted_grad`, one backward pass per step).
  Every method also receives ``task_losses`` and ``loss_fn``.

  Args:
    method: a 2-task method of this library (e.g. ``mo.cagrad(2, c=0.5,
      rescale=2)``).
    starts: initial points.
    num_steps: number of steps (a multiple of ``record_every``).
    learning_rate: Adam's learning rate.
    record_every: trajectory sampling period.
    l1_scale: 1.0 for the CAGrad toy, 0.1 for the Nash-MTL / FAMO variant.
    loss_offset: optional ``(2,)`` lower bounds subtracted from the losses the
      method sees (``task_losses``, ``loss_fn`` and the weighted loss); the
      toy's losses reach -20, and methods that take logarithms of losses need
      them positive. Gradients are unchanged.

  Returns:
    A :class:`ToyRun`.

  Example:
    >>> import numpy as np, mtl_optax as mo
    >>> from mtl_optax.toy import run_toy
    >>> run = run_toy(mo.cagrad(2, c=0.5, rescale=2), starts=[(9., 9.)],
    ...               num_steps=2000, record_every=1000)
    >>> print(run.trajectories.shape, np.asarray(run.final, np.float64).round(2))
    (1, 3, 2) [[6.76 5.83]]
  """
  if num_steps % record_every:
    raise ValueError("num_steps must be a multiple of record_every.")
  tx = optax.chain(method, optax.adam(learning_rate))
  offset = jnp.zeros(2) if loss_offset is None else jnp.asarray(
      loss_offset, jnp.float32)
  seen_losses = lambda theta: toy_losses(theta, l1_scale) - offset
  if isinstance(method, base.LossWeightingTransformation):
    weighted = grads_lib.value_and_weighted_grad(seen_losses, method)
    losses_and_grads = lambda theta, state: weighted(state[0], theta)
  else:
    task_grads = grads_lib.value_and_task_grads(seen_losses)
    losses_and_grads = lambda theta, state: task_grads(theta)

  def step(carry, _):
    theta, opt_state = carry
    losses, grads = losses_and_grads(theta, opt_state)
    updates, opt_state = tx.update(grads, opt_state, theta,
                                   task_losses=losses, loss_fn=seen_losses)
    return (optax.apply_updates(theta, updates), opt_state), None

  def run_one(start):
    def chunk(carry, _):
      carry, _ = jax.lax.scan(step, carry, None, length=record_every)
      return carry, carry[0]

    carry = (start, tx.init(start))
    (theta, opt_state), points = jax.lax.scan(
        chunk, carry, None, length=num_steps // record_every)
    weights = optax.tree.get(opt_state, "weights")
    return jnp.concatenate([start[None], points]), theta, weights

  starts = jnp.asarray(np.asarray(starts, np.float32))
  trajectories, final, weights = jax.jit(jax.vmap(run_one))(starts)
  final_losses = jax.vmap(lambda t: toy_losses(t, l1_scale))(final)
  return ToyRun(trajectories, final, final_losses, weights)


def pareto_residual(theta: jax.Array, l1_scale: float = 1.0) -> jax.Array:
  """Pareto-stationarity residual ``||d*|| / max_i ||g_i||`` at ``theta``.

  ``d*`` is the min-norm element of the convex hull of the two task
  gradients (MGDA's direction): zero exactly where no direction lowers both
  losses (the Pareto set), at most 1. Scale-free; 0 where both gradients
  vanish.

  Example (the Pareto set runs from ``(-7, -8.43)`` through ``(0, -8.3551)``
  to ``(7, -8.43)``):
    >>> import jax.numpy as jnp
    >>> from mtl_optax.toy import pareto_residual
    >>> on, off = pareto_residual(jnp.array([3.0, -8.3551])), pareto_residual(
    ...     jnp.array([3.0, 0.0]))
    >>> print(bool(on < 1e-3), bool(off > 0.1))
    True True
  """
  jac = jax.jacrev(lambda t: toy_losses(t, l1_scale))(theta)
  gram = jac @ jac.T
  weights, _ = two_task.min_norm_weights(gram)
  largest = jnp.sqrt(jnp.max(jnp.diagonal(gram)))
  return jnp.where(largest > 0, jnp.linalg.norm(weights @ jac)
                   / jnp.where(largest > 0, largest, 1.0), 0.0)


def default_methods() -> dict[str, Callable[[], optax.GradientTransformation]]:
  """The four update rules of the official ``toy.py``."""
  import mtl_optax as mo  # local: mtl_optax imports this module's siblings
  return {
      "mean gradient (Adam)": lambda: mo.linear_scalarization(2),
      "MGDA": lambda: mo.mgda(2),
      "PCGrad": lambda: mo.pcgrad(2),
      "CAGrad (c=0.5)": lambda: mo.cagrad(2, c=0.5, rescale=2),
  }
