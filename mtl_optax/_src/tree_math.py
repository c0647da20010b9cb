"""Math over stacked per-task gradient trees, written once for every method.

A *stacked tree* has the structure of the parameters and every leaf carries a
leading task axis: ``(K, *param_shape)``. Gram-based methods read it twice:
once for the K x K Gram matrix (:func:`normalized_gram`) and once for the
weighted sum that forms the update (:func:`weighted_task_sum`). Neither ever
concatenates the leaves into one flat vector.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def accumulation_dtype(tree: Any) -> jnp.dtype:
  """float32, or float64 when any leaf is float64 (with ``jax_enable_x64``)."""
  dtypes = [jnp.asarray(x).dtype for x in jax.tree.leaves(tree)]
  return jnp.result_type(jnp.float32, *dtypes) if dtypes else jnp.float32


def _task_rows(leaf: jax.Array) -> jax.Array:
  return jnp.reshape(leaf, (leaf.shape[0], -1))


def gram_matrix(stacked: Any, dtype: jnp.dtype | None = None) -> jax.Array:
  """Raw Gram matrix ``A[i, j] = <g_i, g_j>`` summed over every leaf.

  Accumulates in float32 (or wider) whatever the leaves' dtype, so bf16 and
  f16 gradients are safe; uses the highest matmul precision so that GPUs and
  TPUs do not silently drop to TF32/bf16 passes.

  Args:
    stacked: tree whose leaves are shaped ``(K, ...)``.
    dtype: accumulation dtype; by default :func:`accumulation_dtype`.

  Returns:
    A ``(K, K)`` symmetric positive semi-definite matrix.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.tree_math import gram_matrix
    >>> grads = {'w': jnp.array([[1., 0.], [1., 1.]]), 'b': jnp.array([[2.], [0.]])}
    >>> print(gram_matrix(grads))
    [[5. 1.]
     [1. 2.]]
  """
  dtype = dtype or accumulation_dtype(stacked)
  leaves = jax.tree.leaves(stacked)
  if not leaves:
    raise ValueError("gram_matrix: the stacked gradient tree has no leaves.")
  total = None
  for leaf in leaves:
    rows = _task_rows(jnp.asarray(leaf))
    part = jax.lax.dot_general(
        rows, rows, (((1,), (1,)), ((), ())), precision=_HIGHEST,
        preferred_element_type=dtype)
    total = part if total is None else total + part
  return total


class NormalizedGram(NamedTuple):
  """A Gram matrix divided by its mean diagonal, and that scale.

  Attributes:
    gram: ``A / rms**2``, so that ``trace(gram) == K`` (all zeros when every
      task gradient is zero).
    rms_norm: root mean square of the task-gradient norms,
      ``sqrt(trace(A) / K)``; finite whenever the gradients are, even when
      ``trace(A)`` itself would overflow or underflow.
  """
  gram: jax.Array
  rms_norm: jax.Array


def normalized_gram(stacked: Any) -> NormalizedGram:
  """Scale-free Gram matrix, safe for gradient magnitudes 1e-30 ... 1e30.

  Every weighting that is invariant to a common scale of the gradients (MGDA,
  CAGrad, PCGrad, IMTL-G, UPGrad, ...) solves on this matrix, so its solver
  tolerances are relative and behaviour does not change with the loss scale.
  The fast path is one pass over the gradients. Only when the raw trace
  overflows or underflows (``|g|`` beyond roughly 1e19 or below 1e-19 in
  float32) is a second pass taken that first divides by ``max |g|``.

  Non-finite gradients give a non-finite result, so the method's update is
  NaN and ``optax.apply_if_finite`` can skip the step.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax._src.tree_math import normalized_gram
    >>> g = jnp.array([[3e25, 0.], [0., 4e25]])
    >>> out = normalized_gram(g)
    >>> print(np.asarray(out.gram, np.float64).round(4), f"{out.rms_norm:.4e}")
    [[0.72 0.  ]
     [0.   1.28]] 3.5355e+25
  """
  dtype = accumulation_dtype(stacked)
  leaves = jax.tree.leaves(stacked)
  num_tasks = jnp.shape(leaves[0])[0]
  tiny = jnp.finfo(dtype).tiny

  def from_gram(raw: jax.Array, scale: jax.Array) -> NormalizedGram:
    mean_sq = jnp.trace(raw) / num_tasks
    zero = mean_sq == 0  # all task gradients zero; NaN stays NaN below
    gram = jnp.where(zero, jnp.zeros_like(raw),
                     raw / jnp.where(zero, 1.0, mean_sq))
    return NormalizedGram(gram, scale * jnp.sqrt(mean_sq))

  raw = gram_matrix(stacked, dtype)
  mean_sq = jnp.trace(raw) / num_tasks
  # Below ~1/eps**2 * tiny the trace has lost relative precision to underflow;
  # rescale then too. NaN compares False and is kept on the fast path.
  needs_rescale = jnp.isinf(mean_sq) | (
      (mean_sq < tiny / jnp.finfo(dtype).eps ** 2) & (mean_sq >= 0))

  def rescaled(_):
    peak = jnp.max(jnp.stack(
        [jnp.max(jnp.abs(x)).astype(dtype) for x in leaves]))
    scale = jnp.where(peak > 0, peak, 1.0)
    scaled = jax.tree.map(lambda x: (x.astype(dtype) / scale), stacked)
    return from_gram(gram_matrix(scaled, dtype), scale)

  def direct(_):
    return from_gram(raw, jnp.ones((), dtype))

  return jax.lax.cond(needs_rescale, rescaled, direct, None)


def weighted_task_sum(weights: jax.Array, stacked: Any) -> Any:
  """``sum_i weights[i] * g_i`` for every leaf: the task axis is reduced.

  The product is accumulated in float32 (or wider) and cast back to each
  leaf's dtype, so the update has the parameters' dtypes.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.tree_math import weighted_task_sum
    >>> grads = {'w': jnp.array([[1., 0.], [1., 1.]])}
    >>> print(weighted_task_sum(jnp.array([0.5, 2.0]), grads)['w'])
    [2.5 2. ]
  """
  def combine(leaf):
    leaf = jnp.asarray(leaf)
    acc = jnp.result_type(jnp.float32, leaf.dtype, weights.dtype)
    out = jnp.tensordot(weights.astype(acc), leaf.astype(acc), axes=1,
                        precision=_HIGHEST)
    return out.astype(leaf.dtype)
  return jax.tree.map(combine, stacked)


def task_mean(stacked: Any) -> Any:
  """The mean gradient ``g0 = (1/K) sum_i g_i``, leaf by leaf."""
  num_tasks = jnp.shape(jax.tree.leaves(stacked)[0])[0]
  return weighted_task_sum(jnp.full((num_tasks,), 1.0 / num_tasks), stacked)
