"""Closed-form Gram weightings: IMTL-G, Aligned-MTL and ConFIG.

Each method is a few ``K x K`` linear-algebra operations (a pseudo-inverse or
an eigendecomposition) on the scale-free Gram matrix: no iterative solver, no
parameter-sized copy, and the update is ``sum_i weights[i] g_i``. Small
eigenvalues are cut at ``K * eps * lambda_max`` of the working dtype, the
resolution of a Gram matrix in that precision, as ``torch.linalg.pinv`` does
by default in TorchJD.

Accuracy is that of XLA's ``eigh`` of the Gram matrix: near the cut (a
condition number around 1e12 in float64) IMTL-G's and Aligned-MTL's weights
are only good to about 5e-4 relative; in float32 gradients that nearly
colinear are cut as rank-deficient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import tree_math
from mtl_optax._src import validation
from mtl_optax._src.aggregators import WeightsState

__all__ = (
    "aligned_mtl",
    "aligned_mtl_weights",
    "config",
    "config_weights",
    "imtl_g",
    "imtl_g_weights",
)

SCALE_MODES = ("min", "median", "rmse")


def _kept_spectrum(matrix: jax.Array):
  """``eigh`` of a PSD matrix with the mask of the eigenvalues above
  ``K eps lambda_max`` (the resolution of a Gram matrix in its dtype)."""
  num_tasks = matrix.shape[0]
  eigenvalues, vectors = jnp.linalg.eigh(matrix)
  largest = jnp.maximum(jnp.max(eigenvalues), 0.0)
  keep = eigenvalues > num_tasks * jnp.finfo(matrix.dtype).eps * largest
  return eigenvalues, vectors, keep, largest


def _psd_pseudo_inverse(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pseudo-inverse of a PSD matrix and its largest eigenvalue."""
  eigenvalues, vectors, keep, largest = _kept_spectrum(matrix)
  inverse = jnp.where(keep, 1.0 / jnp.where(keep, eigenvalues, 1.0), 0.0)
  return (vectors * inverse) @ vectors.T, largest


def _gram_weighting(num_tasks: int, method: str, initial_weights,
                    layer_name: str, **hyper
                    ) -> optax.GradientTransformationExtraArgs:
  """A memoryless method, thin over ``mtl_optax.gram_weightings.<layer_name>``
  (called with ``hyper``); the state keeps the last weights
  (``initial_weights(dtype)`` before the first step)."""
  from mtl_optax import gram_weightings  # pylint: disable=g-import-not-at-top
  layer_fn = getattr(gram_weightings, layer_name)

  def rule(context, state):
    return layer_fn(tree_math.NormalizedGram(context.gram, context.rms_norm),
                    state, **hyper)

  return base.task_weighting_transformation(
      num_tasks, method, lambda dtype: WeightsState(initial_weights(dtype)),
      rule)


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  """IMTL-G's weights ``w = A^+ n / (1^T A^+ n)``, ``n_i = ||g_i||``.

  For a full-rank ``A`` this is the unique ``w`` with ``sum(w) = 1`` whose
  update ``d = sum_i w_i g_i`` has equal projections ``<g_i, d> / ||g_i||`` on
  every task (Liu et al., 2021, closed form); the pseudo-inverse extends
  it to linearly dependent gradients (Quinton & Rey, 2024). Scale-free. When
  ``|1^T A^+ n| <= sqrt(eps) sum_i |(A^+ n)_i|`` no such direction is
  resolvable in the working precision (e.g. exactly opposite gradients) and
  the weights are zero, like TorchJD's absolute ``1e-12`` test.
  """
  eps = jnp.finfo(gram.dtype).eps
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  pinv, _ = _psd_pseudo_inverse(gram)
  raw = pinv @ norms
  total = jnp.sum(raw)
  resolvable = jnp.abs(total) > jnp.sqrt(eps) * jnp.sum(jnp.abs(raw))
  return jnp.where(resolvable, raw / jnp.where(resolvable, total, 1.0), 0.0)


def imtl_g(num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """IMTL-G: the update with equal projections on every task gradient.

  Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial
  Multi-task Learning", ICLR 2021. ``d = sum_i w_i g_i`` with ``sum_i w_i = 1``
  and ``<g_i, d> / ||g_i||`` equal for every i, in closed form
  ``w = A^+ n / (1^T A^+ n)`` (``A`` the Gram matrix, ``n_i = ||g_i||``).
  The pseudo-inverse is TorchJD's generalisation to linearly dependent
  gradients (Quinton & Rey, "Jacobian Descent for Multi-Objective
  Optimization", 2024); with a full-rank ``A`` it is the paper's solution.
  Weights sum to one, so the output is on the scale of ``g0`` (identical
  gradients give ``d = g``). See ``imtl_g_weights`` for the degenerate case.

  .. math::

     d = \\sum_i w_i g_i, \\qquad w = \\frac{A^+ n}{\\mathbf{1}^\\top A^+ n}, \\qquad
     n_i = \\|g_i\\|

  Args:
    num_tasks: number of tasks K.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`~mtl_optax.WeightsState`.

  Example (the update projects equally onto every unit gradient):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.imtl_g(2)
    >>> update, _ = tx.update(grads, tx.init(jnp.zeros(3)))
    >>> unit = grads / jnp.linalg.norm(grads, axis=1, keepdims=True)
    >>> print(np.asarray(unit @ update, np.float64).round(4))
    [0.3991 0.3991]
  """
  method = "imtl_g"
  num_tasks = validation.check_num_tasks(num_tasks, method)

  return _gram_weighting(
      num_tasks, method, lambda dtype: base.uniform_weights(num_tasks, dtype),
      "imtl_g")


def _aligned_scale(eigenvalues: jax.Array, keep: jax.Array, rank: jax.Array,
                   scale_mode: str) -> jax.Array:
  """The balance scale over the kept eigenvalues (ascending order)."""
  num_tasks = eigenvalues.shape[0]
  if scale_mode == "min":
    return jnp.min(jnp.where(keep, eigenvalues, jnp.inf))
  if scale_mode == "median":
    # Kept eigenvalues are the last ``rank`` ones; the lower median, as
    # torch.median (and so TorchJD) returns for an even count.
    index = num_tasks - rank + (rank - 1) // 2
    return eigenvalues[jnp.clip(index, 0, num_tasks - 1)]
  return jnp.sum(jnp.where(keep, eigenvalues, 0.0)) / jnp.maximum(rank, 1)


def aligned_mtl_weights(gram: jax.Array, pref: jax.Array,
                        scale_mode: str = "min") -> jax.Array:
  """Aligned-MTL's weights ``B p`` with ``B = sqrt(s) V L^(-1/2) V^T``.

  ``A = V L V^T`` restricted to eigenvalues above ``K eps lambda_max``; ``s``
  is the smallest, the (lower) median or the mean kept eigenvalue. With
  ``rank(A) = 0`` (all gradients zero) ``B = I``. Scale-free.
  """
  eigenvalues, vectors, keep, _ = _kept_spectrum(gram)
  rank = jnp.sum(keep)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, eigenvalues, 1.0)),
                       0.0)
  scale = jnp.where(rank > 0, _aligned_scale(eigenvalues, keep, rank,
                                             scale_mode), 1.0)
  balance = jnp.sqrt(scale) * (vectors * inv_sqrt) @ vectors.T
  return jnp.where(rank > 0, balance @ pref, pref)


def aligned_mtl(num_tasks: int, scale_mode: str = "min",
                pref_vector: base.PrefVector = None
                ) -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL: align the principal components of the task gradients.

  Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
  for Multi-Task Learning", CVPR 2023, Algorithm 1. With the Gram matrix
  ``A = V L V^T`` (rank r), the balance transformation
  ``B = sqrt(s) V L^(-1/2) V^T`` makes the aligned gradients ``B J`` have r
  equal singular values ``sqrt(s)`` (condition number one), and
  ``d = (B J)^T p = sum_i (B p)_i g_i``. ``s`` is the smallest kept
  eigenvalue (``scale_mode='min'``, TorchJD's default), their lower median
  (``'median'``) or their mean (``'rmse'``, the original code). Eigenvalues
  below ``K eps lambda_max`` are dropped, as in TorchJD.

  .. math::

     d &= \\sum_i (B p)_i\\, g_i, \\\\
     B &= \\sqrt{s}\\, V \\Lambda^{-1/2} V^\\top, \\qquad
     A = J J^\\top = V \\Lambda V^\\top

  Output scale: with the default ``p = 1/K``, ``d`` is the aligned mean
  gradient, on the scale of ``g0`` times ``sqrt(s / lambda)`` factors (at
  most ``g0``'s norm for ``'min'``); TorchJD's values are reproduced.

  Args:
    num_tasks: number of tasks K.
    scale_mode: ``'min'``, ``'median'`` or ``'rmse'`` (static).
    pref_vector: optional ``(K,)`` preference ``p``; default ``1/K``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`~mtl_optax.WeightsState`.

  Example (orthogonal gradients of norms 3 and 1, both rescaled to the
  smallest, 1, with ``scale_mode='min'``):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.aligned_mtl(2, scale_mode="min")
    >>> update, state = tx.update(jnp.diag(jnp.array([3., 1.])),
    ...                           tx.init(jnp.zeros(2)))
    >>> print(np.asarray(update, np.float64).round(4),
    ...       np.asarray(state.weights, np.float64).round(4))
    [0.5 0.5] [0.1667 0.5   ]
  """
  method = "aligned_mtl"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  if scale_mode not in SCALE_MODES:
    raise ValueError(f"{method}: scale_mode must be one of {SCALE_MODES}, "
                     f"got {scale_mode!r}.")
  pref = base.preference_vector(pref_vector, num_tasks, method,
                                1.0 / num_tasks)

  return _gram_weighting(num_tasks, method, pref, "aligned_mtl",
                         scale_mode=scale_mode, pref_vector=pref_vector)


def config_weights(gram: jax.Array, pref: jax.Array) -> jax.Array:
  """ConFIG's update as mean-scale coefficients on the task gradients.

  With unit gradients ``u_i = g_i / ||g_i||`` (zero for zero gradients) and
  their Gram (cosine) matrix ``C``, the paper's direction ``U^+ p`` is
  ``U^T C^+ p = J^T c`` with ``c = D^-1 C^+ p``, so only ``K x K`` matrices
  are inverted. Its length is the mean projection
  ``(1/K) sum_i <g_i, d_hat>``. When ``p`` is (numerically) orthogonal to the
  range of ``C`` (e.g. unit vectors summing to zero) the direction is
  undefined and the coefficients are zero.
  """
  num_tasks = gram.shape[0]
  eps = jnp.finfo(gram.dtype).eps
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  active = norms > 0
  inv_norm = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
  cosines = inv_norm[:, None] * gram * inv_norm[None, :]
  pinv, largest = _psd_pseudo_inverse(cosines)
  direction = inv_norm * (pinv @ pref)
  norm_sq = direction @ gram @ direction
  total_projection = jnp.sum(gram @ direction)
  # norm_sq = p^T C^+ p >= |p_range|^2 / lambda_max: compare to p's size.
  resolvable = norm_sq * largest > num_tasks * eps * (pref @ pref)
  scale = total_projection / (num_tasks * jnp.where(resolvable, norm_sq, 1.0))
  return jnp.where(resolvable, scale * direction, 0.0)


def config(num_tasks: int, pref_vector: base.PrefVector = None
           ) -> optax.GradientTransformationExtraArgs:
  """ConFIG: the conflict-free direction with equal cosine to every task.

  Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics
  Informed Neural Networks", ICLR 2025 (arXiv:2408.11104), Eq. 2:
  ``d_hat = U^+ p / ||U^+ p||`` with ``U`` the matrix of unit task
  gradients, so that ``cos(g_i, d_hat)`` is proportional to ``p_i`` (equal
  for the default ``p``), and ``d = (1/K) sum_i <g_i, d_hat> d_hat``.
  Computed from the Gram matrix (``U^+ p = U^T C^+ p`` with ``C = U U^T``),
  never by a pseudo-inverse of the ``K x P`` matrix ``U``; in float32 this
  resolves singular values of ``U`` down to ``sqrt(K eps)`` of the largest.

  .. math::

     d &= \\frac{1}{K} \\sum_i \\langle g_i, \\hat d \\rangle\\, \\hat d, \\qquad
     \\hat d = \\frac{U^+ p}{\\|U^+ p\\|}, \\\\
     U &= \\big[ g_1 / \\|g_1\\|, \\dots, g_K / \\|g_K\\| \\big]^\\top

  Output scale: the paper (and TorchJD) use the sum of projections
  ``sum_i <g_i, d_hat>``; here it is divided by K, the scale of ``g0``
  (chain ``optax.scale(num_tasks)`` for the paper's). Only the direction of
  ``p`` matters.

  Args:
    num_tasks: number of tasks K.
    pref_vector: optional ``(K,)`` preference ``p``; default all ones.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`~mtl_optax.WeightsState` (``d = sum_i weights[i] g_i``).

  Example (the update makes the same angle with both gradients):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[1., 0.], [-0.5, 1.]])
    >>> update, _ = mo.config(2).update(grads, mo.config(2).init(grads[0]))
    >>> cosines = (grads @ update / jnp.linalg.norm(update)
    ...            / jnp.linalg.norm(grads, axis=1))
    >>> print(np.asarray(cosines, np.float64).round(4))
    [0.5257 0.5257]
  """
  method = "config"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  base.preference_vector(pref_vector, num_tasks, method, 1.0)  # the shape

  return _gram_weighting(
      num_tasks, method, lambda dtype: base.uniform_weights(num_tasks, dtype),
      "config", pref_vector=pref_vector)
