"""Preference-based scalarisations: COSMOS and PBI, one backward pass.

Both descend ONE scalar function ``s(L)`` of the task losses, steered by a
preference vector, so their gradient is the weighted-loss gradient
``sum_i c_i g_i`` with ``c = ds/dL`` at the current losses: they are loss
weightings (:class:`~mtl_optax.LossWeightingTransformation`), built by the
same shared builder as :func:`mtl_optax.gls`, with no memory. The formulas
follow TorchJD 0.18's ``scalarization.COSMOS`` and ``scalarization.PBI``.

To approximate a whole Pareto front rather than one trade-off, the papers
re-sample the preference every step (e.g. from a Dirichlet distribution):
build the method with ``optax.inject_hyperparams`` and set its
``pref_vector`` hyper-parameter, which may be traced.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base
from mtl_optax._src import validation
from mtl_optax._src.loss_weighting import _memoryless

__all__ = ("cosmos", "pbi")

# torch.nn.functional.cosine_similarity's default eps (COSMOS's cosine).
_COSINE_EPS = 1e-8
# Added under PBI's square root so that d2 is differentiable at d2 = 0
# (TorchJD's constant).
_PBI_EPS = 1e-12


def _scaled_norm(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x / ||x||, ||x||)`` without overflow or underflow of ``x . x``;
  the unit vector is 0 for ``x = 0``."""
  scale = jnp.max(jnp.abs(x))
  safe = jnp.where(scale > 0, scale, 1.0)
  rescaled = x / safe
  length = jnp.sqrt(jnp.sum(rescaled * rescaled))
  unit = jnp.where(length > 0, rescaled / jnp.where(length > 0, length, 1.0),
                   0.0)
  return unit, safe * length


def cosmos_weights(losses: jax.Array, pref: jax.Array,
                   lambda_: jax.Array | float) -> jax.Array:
  """COSMOS's loss weights ``c = r - lambda * d cos(r, L) / dL``.

  ``cos(r, L) = r.L / (max(||r||, eps) max(||L||, eps))`` with torch's
  ``eps = 1e-8``, so ``d cos / dL = (r_hat - (r_hat . u) u) / ||L||`` with
  ``u = L / ||L||`` (and ``r_hat / eps`` once ``||L|| < eps``).
  """
  r_unit, r_norm = _scaled_norm(pref)
  r_hat = r_unit * (r_norm / jnp.maximum(r_norm, _COSINE_EPS))
  l_unit, l_norm = _scaled_norm(losses)
  tangent = (r_hat - jnp.dot(r_hat, l_unit) * l_unit) / jnp.where(
      l_norm >= _COSINE_EPS, l_norm, 1.0)
  grad_cos = jnp.where(l_norm >= _COSINE_EPS, tangent, r_hat / _COSINE_EPS)
  return pref - jnp.asarray(lambda_, losses.dtype) * grad_cos


def cosmos(num_tasks: int, lambda_: float = 1.0,
           pref_vector: Optional[Sequence[float] | jax.Array] = None
           ) -> base.LossWeightingTransformation:
  """COSMOS: a preference-weighted loss sum with a cosine-alignment reward.

  Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
  Multi-Objective Learning", ICDM 2021 (arXiv:2103.13392). The model descends
  ``s(L) = r.L - lambda cos(r, L)``, so
  ``c = r - lambda (r_hat - (r_hat.u) u) / ||L||`` (``r_hat = r/||r||``,
  ``u = L/||L||``): the linear scalarisation by ``r`` plus a pull of the loss
  vector towards the preference ray. Same formula (and torch's ``1e-8`` in the
  cosine's norms) as TorchJD 0.18's ``scalarization.COSMOS``; the paper's
  other half, conditioning the model on ``r`` (input concatenation), is a
  modelling choice left to the user.

  .. math::

     s(L) &= r^\\top L - \\lambda \\cos(r, L), \\\\
     c &= \\nabla_L s = r - \\lambda \\frac{\\hat r - (\\hat r^\\top u)\\, u}{\\|L\\|},
     \\qquad d = \\sum_i c_i g_i

  Output scale: ``r`` is used as given, as in the paper and TorchJD, so the
  update is TorchJD's exactly. With ``r`` on the simplex (the default
  ``1/K``, or the paper's Dirichlet samples) it is the ``g0`` scale: at
  ``lambda = 0``, or losses on the preference ray, ``c = r`` and the default
  gives ``g0``; ``r = ones`` is the summed-loss scale, ``K`` times larger.

  Args:
    num_tasks: number of tasks K.
    lambda_: the cosine-reward coefficient (>= 0; 0 is the linear
      scalarisation by ``r``; the paper uses 0.01 to 8). Injectable.
    pref_vector: ``(K,)`` preference ``r``, non-negative; default ``1/K``
      everywhere. Injectable (e.g. a fresh Dirichlet draw every step).

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`~mtl_optax.LossWeightsState`.

  Example (losses on the preference ray keep ``c = r``; others are pulled
  towards it):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.cosmos(2, lambda_=1.0, pref_vector=[0.8, 0.2])
    >>> for losses in ([4., 1.], [1., 1.]):
    ...   c = tx.loss_weights(tx.init(jnp.zeros(1)), jnp.array(losses))
    ...   print(np.asarray(c, np.float64).round(4))
    [0.8 0.2]
    [0.5428 0.4572]
  """
  method = "cosmos"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(lambda_, "lambda_", method)
  pref = base.preference_vector(pref_vector, num_tasks, method,
                                1.0 / num_tasks)
  return _memoryless(num_tasks, method, lambda losses: cosmos_weights(
      losses, pref(losses.dtype), lambda_))


def pbi_weights(losses: jax.Array, pref: jax.Array, theta: jax.Array | float,
                reference: jax.Array) -> jax.Array:
  """PBI's ``ds/dL = w_hat + theta p / d2``, divided by ``sum_i w_hat_i``.

  ``f = L - z``, ``w_hat = w / ||w||``, ``p = f - (f.w_hat) w_hat`` and
  ``d2 = sqrt(p.p + 1e-12)``; ``p / d2`` is evaluated on ``p / max|p|`` so
  that huge or tiny losses neither overflow nor underflow.
  """
  w_hat, _ = _scaled_norm(pref)
  shifted = losses - reference
  perpendicular = shifted - jnp.dot(shifted, w_hat) * w_hat
  scale = jnp.max(jnp.abs(perpendicular))
  safe = jnp.where(scale > 0, scale, 1.0)
  rescaled = perpendicular / safe
  # sqrt(p.p + eps) / safe, written so that eps / safe^2 cannot overflow.
  eps_term = jnp.where(scale > 0, _PBI_EPS / safe / safe, 1.0)
  unit_p = rescaled / jnp.sqrt(jnp.sum(rescaled * rescaled) + eps_term)
  grad = w_hat + jnp.asarray(theta, losses.dtype) * unit_p
  total = jnp.sum(w_hat)
  return grad / jnp.where(total > 0, total, 1.0)


def pbi(num_tasks: int, theta: float = 5.0,
        pref_vector: Optional[Sequence[float] | jax.Array] = None,
        reference: Optional[Sequence[float] | jax.Array] = None
        ) -> base.LossWeightingTransformation:
  """PBI: penalty-based boundary intersection along a preference ray.

  Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on
  Decomposition", IEEE TEVC 2007, as a differentiable scalarisation (TorchJD
  0.18's ``scalarization.PBI``). With ``f = L - z`` (``z`` the reference
  point), ``w_hat = w/||w||``, ``d1 = f.w_hat`` (progress along the ray) and
  ``d2 = sqrt(||f - d1 w_hat||^2 + 1e-12)`` (distance to it), the model
  descends ``s = d1 + theta d2``: ``ds/dL = w_hat + theta p / d2``, ``p`` the
  perpendicular component, and ``c = (ds/dL) / sum_i w_hat_i``.

  .. math::

     s &= d_1 + \\theta d_2, \\qquad d_1 = f^\\top \\hat w, \\qquad
     d_2 = \\|f - d_1 \\hat w\\|, \\qquad f = L - z, \\\\
     c &= \\frac{\\partial s / \\partial L}{\\sum_i \\hat w_i}, \\qquad
     d = \\sum_i c_i g_i

  Output scale: dividing by ``sum_i w_hat_i = ||w||_1 / ||w||_2`` puts the
  ray term ``w / sum(w)`` on the simplex, so losses on the ray (or
  ``theta = 0``) give ``g0`` for the default ``w``; TorchJD's and the paper's
  ``ds/dL`` is ``optax.scale(||w||_1 / ||w||_2)`` away (``sqrt(K)`` for equal
  preferences). The ``1e-12`` under the root (TorchJD's) keeps ``d2``
  differentiable on the ray, where the penalty's gradient is 0; close to the
  ray (within ``~1e-6``, e.g. float32 rounding of a loss vector on it) the
  penalty's gradient ``theta p / d2`` is damped but not zero, as in TorchJD.

  Args:
    num_tasks: number of tasks K.
    theta: penalty on the distance to the ray (>= 0; the paper uses 5).
      Injectable.
    pref_vector: ``(K,)`` preference direction ``w``, non-negative; default
      all equal. Injectable.
    reference: ``(K,)`` reference (ideal) point ``z``, a lower bound of the
      losses; default 0 (non-negative losses). Injectable.

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`~mtl_optax.LossWeightsState`.

  Example (the loss vector (2, 1) lies below the ray of w = (1, 1): task 0
  is pulled down, task 1 pushed up):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.pbi(2, theta=5.0)
    >>> c = tx.loss_weights(tx.init(jnp.zeros(1)), jnp.array([2., 1.]))
    >>> print(np.asarray(c, np.float64).round(4))
    [ 3. -2.]
  """
  method = "pbi"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(theta, "theta", method)
  if reference is not None and np.shape(reference) != (num_tasks,):
    raise ValueError(f"{method}: reference has shape {np.shape(reference)}, "
                     f"expected ({num_tasks},) (one value per task).")
  pref = base.preference_vector(pref_vector, num_tasks, method, 1.0)
  ref = base.preference_vector(reference, num_tasks, method, 0.0)
  return _memoryless(num_tasks, method, lambda losses: pbi_weights(
      losses, pref(losses.dtype), theta, ref(losses.dtype)))
