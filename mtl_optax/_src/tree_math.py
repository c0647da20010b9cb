"""Math over stacked per-task gradient trees, written once for every method.

A *stacked tree* has the structure of the parameters and every leaf carries a
leading task axis: ``(K, *param_shape)``. Gram-based methods read it twice:
once for the K x K Gram matrix (:func:`normalized_gram`) and once for the
weighted sum that forms the update (:func:`weighted_task_sum`). Neither
concatenates the large leaves into one flat vector. For the Gram pass, on one
device the small leaves (at most ``_SMALL_LEAF_ELEMENTS`` entries per task)
are read as one block, so a wide tree compiles to a handful of contractions,
not hundreds; the weighted sum stays leaf by leaf (see there why).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import eager

_HIGHEST = jax.lax.Precision.HIGHEST


def accumulation_dtype(tree: Any) -> jnp.dtype:
  """float32, or float64 when any leaf is float64 (with ``jax_enable_x64``)."""
  dtypes = [jnp.asarray(x).dtype for x in jax.tree.leaves(tree)]
  return jnp.result_type(jnp.float32, *dtypes) if dtypes else jnp.float32


def _replicated_out_sharding():
  """``P()`` under a mesh with explicit axes, else None (the compiler's pick).

  A contraction over an explicitly sharded axis must name where its result
  lives; the K x K Gram matrix is tiny, so it is replicated (one all-reduce).
  """
  mesh = jax.sharding.get_abstract_mesh()
  explicit = jax.sharding.AxisType.Explicit
  if mesh.empty or explicit not in getattr(mesh, "axis_types", ()):
    return None
  return jax.sharding.PartitionSpec()


def _contract_parameter_axes(left: jax.Array, right: jax.Array,
                             dtype: jnp.dtype, plain: bool = False
                             ) -> jax.Array:
  """``(K, *s) x (K', *s) -> (K, K')`` over every parameter axis at once.

  No reshape to ``(K, -1)``: merging axes would force a leaf sharded on a
  trailing axis to be gathered first. ``plain`` skips the CPU variants (one
  kernel instead of several: for the rarely taken rescaled pass, whose
  compile time counts and whose run time does not).
  """
  size = math.prod(left.shape[1:])
  if not plain and _use_pairwise_cpu_gram(left.shape[0], right.shape[0],
                                         size):
    return _pairwise_product(left, right, dtype)
  if not plain and _use_blocked_cpu_gram(left.shape[0], size):
    return _blocked_rows_product(jnp.reshape(left, (left.shape[0], size)),
                                 jnp.reshape(right, (right.shape[0], size)),
                                 dtype)
  axes = tuple(range(1, left.ndim))
  return jax.lax.dot_general(
      left, right, ((axes, axes), ((), ())), precision=_HIGHEST,
      preferred_element_type=dtype, out_sharding=_replicated_out_sharding())


# With its YNNPACK dot fusion (on by default) XLA:CPU contracts a long
# (K, P) x (P, K) product far below memory bandwidth (benchmarks/
# micro_gram.py: 2-8x slower than the same product accumulated over
# cache-sized blocks of P, on an AMD EPYC and an Intel Xeon; on the Xeon it
# runs on one thread, the same time under ``taskset -c 0``). With that
# fusion off (``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``) Eigen's
# multi-threaded contraction is faster than the blocks (Xeon, K = 10 and
# 40, P = 1e6: 6.6 and 30 ms against 8.5 and 43 ms), so the blocks are used
# only where the fusion takes dots. Only on a single CPU device:
# accelerators' matmuls do not need it, and slicing a sharded axis would
# gather it.
_CPU_BLOCK_ELEMENTS = 2 ** 19   # K x block float32 entries: 2 MiB per block


def _cpu_block_size(num_rows: int) -> int:
  return max(4096, (_CPU_BLOCK_ELEMENTS // max(num_rows, 1)) // 1024 * 1024)


def _ynn_takes_dots() -> bool:
  """Whether XLA:CPU's YNNPACK fusion handles dots in this process: unless
  ``XLA_FLAGS`` sets ``--xla_cpu_experimental_ynn_fusion_type`` to a list
  without ``dot`` (the flags are read once, when the backend starts)."""
  chosen = None
  for flag in os.environ.get("XLA_FLAGS", "").split():
    name, _, value = flag.partition("=")
    if name == "--xla_cpu_experimental_ynn_fusion_type":
      chosen = value
  return chosen is None or "dot" in chosen.split(",")


def _on_one_cpu_device() -> bool:
  return jax.default_backend() == "cpu" and _single_device()


def cpu_column_block(num_rows: int, size: int) -> int | None:
  """The block of :func:`sum_over_column_blocks` for ``(num_rows, size)``
  rows on a single CPU device; ``None`` where one pass is the better choice
  (rows under two blocks long, accelerators, sharded arrays)."""
  block = _cpu_block_size(num_rows)
  return block if size >= 2 * block and _on_one_cpu_device() else None


def _use_blocked_cpu_gram(num_rows: int, size: int) -> bool:
  return cpu_column_block(num_rows, size) is not None and _ynn_takes_dots()


# For two or three tasks and long leaves XLA:CPU's contraction of (K, P) by
# (P, K) runs at a third to a half of the speed of K(K+1)/2 fused
# multiply-and-sum reductions (benchmarks/micro_gram.py; K = 3, P = 1e6:
# 1.9 ms against 2.8 ms); from four tasks on, and below about 2**18 entries
# per task (K = 3, P = 1e5: 0.30 ms against 0.21 ms), the one contraction
# wins, and it compiles to one kernel where the pairs take K(K+1)/2. Without
# the YNNPACK dot fusion, Eigen's contraction with a 2 x 2 or 3 x 3 result is
# slower still, and the pairs win from 2**16 entries (Intel Xeon, K = 2: P =
# 1e5 0.32 against 0.50 ms, P = 1e6 1.9 against 4.6 ms).
_CPU_PAIRWISE_MAX_TASKS = 3
_CPU_PAIRWISE_MIN_ELEMENTS = 2 ** 18
_CPU_PAIRWISE_MIN_ELEMENTS_WITHOUT_YNN = 2 ** 16


def _use_pairwise_cpu_gram(num_rows: int, num_cols: int, size: int) -> bool:
  least = (_CPU_PAIRWISE_MIN_ELEMENTS if _ynn_takes_dots()
           else _CPU_PAIRWISE_MIN_ELEMENTS_WITHOUT_YNN)
  return (max(num_rows, num_cols) <= _CPU_PAIRWISE_MAX_TASKS
          and size >= least and _on_one_cpu_device())


def _pairwise_product(left: jax.Array, right: jax.Array,
                      dtype: jnp.dtype) -> jax.Array:
  """``(K, *s) x (K', *s) -> (K, K')`` as one reduction per pair of rows."""
  def dot(a, b):
    return jnp.sum(a.astype(dtype) * b.astype(dtype))

  symmetric = left is right
  entries = {}
  for i in range(left.shape[0]):
    for j in range(right.shape[0]):
      if symmetric and j < i:
        entries[i, j] = entries[j, i]
      else:
        entries[i, j] = dot(left[i], right[j])
  return jnp.stack([jnp.stack([entries[i, j] for j in range(right.shape[0])])
                    for i in range(left.shape[0])])


def sum_over_column_blocks(part: Callable[..., jax.Array],
                           arrays: list[jax.Array], block: int) -> jax.Array:
  """``sum_b part(*(a[..., b] for a in arrays))`` over consecutive blocks ``b``
  of ``block`` entries of the arrays' common last axis (and the remainder).

  A ``fori_loop`` over slices: each step's temporaries stay cache-sized,
  where XLA:CPU would otherwise write (and page in) ``(K, P)`` of them.
  """
  num_blocks, rest = divmod(arrays[0].shape[-1], block)

  def cut(start, length):
    return [jax.lax.dynamic_slice_in_dim(a, start, length, axis=a.ndim - 1)
            for a in arrays]

  shape = jax.eval_shape(part, *cut(0, block))
  total = jax.lax.fori_loop(
      0, num_blocks, lambda i, acc: acc + part(*cut(i * block, block)),
      jnp.zeros(shape.shape, shape.dtype))
  if rest:
    total = total + part(*cut(num_blocks * block, rest))
  return total


def _blocked_rows_product(left: jax.Array, right: jax.Array,
                          dtype: jnp.dtype) -> jax.Array:
  """``left @ right.T`` for ``(K, n)`` rows, accumulated block by block."""
  def product(a, b):
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), (((1,), (1,)), ((), ())),
        precision=_HIGHEST, preferred_element_type=dtype)

  return sum_over_column_blocks(product, [left, right],
                                _cpu_block_size(left.shape[0]))


def per_task_sum(leaf: jax.Array) -> jax.Array:
  """``(K, *s) -> (K,)``: sum over every parameter axis, without a reshape."""
  return jnp.sum(leaf, axis=tuple(range(1, jnp.ndim(leaf))))


def per_task_max_abs(leaf: jax.Array) -> jax.Array:
  """``(K, *s) -> (K,)``: largest magnitude per task (0 for empty leaves)."""
  return jnp.max(jnp.abs(leaf), axis=tuple(range(1, jnp.ndim(leaf))),
                 initial=0)


# Leaves of at most this many entries per task are contracted together: on a
# wide tree (biases, norms, heads) one contraction over their concatenation
# compiles in constant time where one per leaf grew with the leaf count, and
# copying them costs no more than reading them. Larger leaves are contracted
# in place.
_SMALL_LEAF_ELEMENTS = 2 ** 12


def _single_device() -> bool:
  return (jax.device_count() == 1
          and jax.sharding.get_abstract_mesh().empty)


def small_leaf_indices(leaves: list) -> list[int]:
  """Indices of the stacked leaves that are read as one ``(K, n)`` block.

  On one device, the non-empty leaves of at most ``_SMALL_LEAF_ELEMENTS``
  entries per task, when there are at least two; otherwise none (only a
  single device batches: concatenating sharded leaves would gather them).
  """
  if not _single_device():
    return []
  small = [i for i, x in enumerate(leaves) if jnp.size(x)
           and math.prod(jnp.shape(x)[1:]) <= _SMALL_LEAF_ELEMENTS]
  return small if len(small) > 1 else []


def join_task_rows(leaves: list, dtype: jnp.dtype) -> jax.Array:
  """Stacked leaves ``(K, *s_l)`` as one ``(K, sum_l prod(s_l))`` block."""
  return jnp.concatenate(
      [jnp.reshape(x, (jnp.shape(x)[0], -1)).astype(dtype) for x in leaves],
      axis=1)


def split_task_row(row: jax.Array, leaves: list) -> list[jax.Array]:
  """The inverse of :func:`join_task_rows` for one row: pieces shaped and
  typed like the per-task leaves ``x[0]`` of ``leaves``."""
  offsets = np.cumsum([math.prod(jnp.shape(x)[1:]) for x in leaves])
  return [jnp.reshape(part, jnp.shape(x)[1:]).astype(x.dtype)
          for x, part in zip(leaves, jnp.split(row, offsets[:-1]))]


def _task_blocks(leaves: list) -> list[jax.Array]:
  """Leaves as contraction operands: empty leaves dropped, and on one device
  every small leaf concatenated into one ``(K, n)`` block (first in the list).

  Trees of the same structure and per-task shapes give aligned blocks.
  """
  leaves = [jnp.asarray(x) for x in leaves]
  small = small_leaf_indices(leaves)
  rest = [x for i, x in enumerate(leaves) if x.size and i not in small]
  if not small:
    return rest
  picked = [leaves[i] for i in small]
  return [join_task_rows(picked, jnp.result_type(*picked))] + rest


# Leaves of at most this many entries in all join one flat operand of a
# whole-tree reduction (finiteness, largest magnitude): each separate
# reduction is a kernel of its own. The concatenation copies at most these
# small leaves, which the reduction reads anyway.
_SMALL_TREE_LEAF_ELEMENTS = 2 ** 16


def whole_tree_operands(tree: Any) -> list[jax.Array]:
  """The floating leaves of ``tree`` as operands of a whole-tree reduction.

  Empty and non-floating leaves are dropped; on one device every small leaf
  (any shape, stacked or not) is raveled into one vector in the leaves'
  common dtype (a widening, so no finite entry overflows), first in the
  list. On several devices the leaves are returned as they are:
  concatenating sharded leaves would gather them.
  """
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  leaves = [x for x in leaves
            if x.size and jnp.issubdtype(x.dtype, jnp.inexact)]
  small = [x for x in leaves if x.size <= _SMALL_TREE_LEAF_ELEMENTS]
  if len(small) < 2 or not _single_device():
    return leaves
  dtype = jnp.result_type(*small)
  return [jnp.concatenate([jnp.ravel(x).astype(dtype) for x in small])] + [
      x for x in leaves if x.size > _SMALL_TREE_LEAF_ELEMENTS]


def tree_max_abs(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """``max |x|`` over every floating entry of ``tree``, in ``dtype`` (0 for
  a tree without entries; NaN if any entry is NaN)."""
  peaks = [jnp.max(jnp.abs(x)).astype(dtype)
           for x in whole_tree_operands(tree)]
  return jnp.max(jnp.stack(peaks)) if peaks else jnp.zeros((), dtype)


def _blocks_gram(first: list, second: list, num_rows: int, num_cols: int,
                 dtype: jnp.dtype, symmetric: bool,
                 plain: bool = False) -> jax.Array:
  """Sum of the per-block contractions; zeros when there are no blocks."""
  total = jnp.zeros((num_rows, num_cols), dtype)
  for a, b in zip(first, second):
    # The same array on both sides lets the small-K path skip mirrored pairs.
    total = total + _contract_parameter_axes(a, a if symmetric else b, dtype,
                                             plain)
  return total


def _num_tasks(leaves: list) -> int:
  return jnp.shape(leaves[0])[0]


def cross_gram_matrix(first: Any, second: Any,
                      dtype: jnp.dtype | None = None) -> jax.Array:
  """``A[i, j] = <g_i, h_j>`` for two stacked trees of the same structure.

  Accumulates in float32 (or wider) whatever the leaves' dtype, so bf16 and
  f16 gradients are safe; uses the highest matmul precision so that GPUs and
  TPUs do not silently drop to TF32/bf16 passes. Each large leaf is
  contracted over all its parameter axes in place, so sharded leaves stay
  sharded and only the K x K result is reduced across devices; on one device
  the small leaves are contracted together. Empty leaves contribute zero.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.tree_math import cross_gram_matrix
    >>> g = {'w': jnp.array([[1., 0.], [1., 1.]])}
    >>> h = {'w': jnp.array([[2., 3.], [0., 1.]])}
    >>> print(cross_gram_matrix(g, h))
    [[2. 0.]
     [5. 1.]]
  """
  dtype = dtype or accumulation_dtype((first, second))
  first_leaves, second_leaves = jax.tree.leaves(first), jax.tree.leaves(second)
  if not first_leaves:
    raise ValueError("gram_matrix: the stacked gradient tree has no leaves.")
  symmetric = first is second
  first_blocks = _task_blocks(first_leaves)
  second_blocks = first_blocks if symmetric else _task_blocks(second_leaves)
  return _blocks_gram(first_blocks, second_blocks, _num_tasks(first_leaves),
                      _num_tasks(second_leaves), dtype, symmetric)


def gram_matrix(stacked: Any, dtype: jnp.dtype | None = None) -> jax.Array:
  """Raw Gram matrix ``A[i, j] = <g_i, g_j>`` summed over every leaf.

  See :func:`cross_gram_matrix` for the precision and sharding guarantees.

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
  return cross_gram_matrix(stacked, stacked, dtype)


def _lost_range(raw_peak: jax.Array, dtype) -> jax.Array:
  """True when a sum of products lost range: not finite, or within eps**2 of tiny.

  NaN counts as lost: finite gradients near the float limit give ``inf - inf``
  in an inner product of mixed signs (whether they do depends on the order
  XLA sums in). NaN input takes the second pass too, where it propagates.
  """
  finfo = jnp.finfo(dtype)
  return ~jnp.isfinite(raw_peak) | (
      (raw_peak < finfo.tiny / finfo.eps ** 2) & (raw_peak >= 0))


def scaled_cross_gram(first: Any, second: Any) -> tuple[jax.Array, jax.Array]:
  """``(A_hat, scale)`` with ``<g_i, h_j> = A_hat[i, j] * scale**2``.

  One pass when the raw products are representable; otherwise a second pass
  on both trees divided by their largest magnitude, so gradients from 1e-30
  to 1e30 give a finite ``A_hat``.
  """
  dtype = accumulation_dtype((first, second))
  first_leaves, second_leaves = jax.tree.leaves(first), jax.tree.leaves(second)
  if not first_leaves:
    raise ValueError("gram_matrix: the stacked gradient tree has no leaves.")
  shape = (_num_tasks(first_leaves), _num_tasks(second_leaves))
  symmetric = first is second
  first_blocks = _task_blocks(first_leaves)
  second_blocks = first_blocks if symmetric else _task_blocks(second_leaves)
  raw = _blocks_gram(first_blocks, second_blocks, *shape, dtype, symmetric)

  # Both branches see the blocks, not the leaves: the rescaled pass is
  # emitted once per block, not once per leaf.
  def rescaled(blocks):
    scale = _nonzero(tree_max_abs(blocks[0] + blocks[1], dtype))
    divide = lambda bs: [x.astype(dtype) / scale for x in bs]
    return _blocks_gram(divide(blocks[0]), divide(blocks[1]), *shape, dtype,
                        symmetric, plain=True), scale

  return jax.lax.cond(_lost_range(jnp.max(jnp.abs(raw)), dtype), rescaled,
                      lambda _: (raw, jnp.ones((), dtype)),
                      (first_blocks, second_blocks))


def _nonzero(scale: jax.Array) -> jax.Array:
  return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def task_norms(stacked: Any) -> jax.Array:
  """``||g_i||`` for each task of a stacked tree, finite from 1e-30 to 1e30.

  One pass in float32 (or wider); a second pass that first divides each task
  by its largest entry only when a sum of squares overflows or underflows.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.tree_math import task_norms
    >>> print(task_norms({'w': jnp.array([[3e30, 4e30], [0., 0.]])}))
    [5.e+30 0.e+00]
  """
  leaves = jax.tree.leaves(stacked)
  dtype = accumulation_dtype(stacked)
  blocks = _task_blocks(leaves)
  if not blocks:
    return jnp.zeros((_num_tasks(leaves),), dtype)
  squares = sum(per_task_sum(jnp.square(x.astype(dtype))) for x in blocks)
  # An all-zero task also takes the second pass, which is harmless.
  needs_rescale = jnp.any(_lost_range(squares, dtype))

  def rescaled(blocks):
    scale = _nonzero(jnp.max(jnp.stack(
        [per_task_max_abs(x).astype(dtype) for x in blocks]), axis=0))
    expand = lambda x: jnp.reshape(scale, (-1,) + (1,) * (x.ndim - 1))
    scaled = sum(per_task_sum(jnp.square(x.astype(dtype) / expand(x)))
                 for x in blocks)
    return scale * jnp.sqrt(scaled)

  return jax.lax.cond(needs_rescale, rescaled, lambda _: jnp.sqrt(squares),
                      blocks)


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


def _normalized_from_raw(raw: jax.Array, scale: jax.Array) -> NormalizedGram:
  """``raw`` divided by its mean diagonal; ``scale`` multiplies the RMS norm."""
  mean_sq = jnp.trace(raw) / raw.shape[0]
  zero = mean_sq == 0  # all task gradients zero; NaN stays NaN below
  gram = jnp.where(zero, jnp.zeros_like(raw),
                   raw / jnp.where(zero, 1.0, mean_sq))
  return NormalizedGram(gram, scale * jnp.sqrt(mean_sq))


def normalize_gram_matrix(gram: jax.Array) -> NormalizedGram:
  """:func:`normalized_gram` for a Gram matrix that is already computed.

  ``gram`` is a ``(K, K)`` raw Gram matrix ``A[i, j] = <g_i, g_j>``, in
  float32 or wider (narrower input is promoted). The fast path divides it by
  its mean diagonal, exactly as :func:`normalized_gram` does with the Gram
  matrix of the gradients; when that mean overflows or underflows (entries
  beyond roughly 1e38 or below 1e-24 in float32) the matrix is first divided
  by its largest magnitude, so any finite Gram matrix gives a finite result.
  Non-finite entries give a non-finite result.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax._src.tree_math import normalize_gram_matrix
    >>> out = normalize_gram_matrix(jnp.array([[9e-31, 0.], [0., 16e-31]]))
    >>> print(np.asarray(out.gram, np.float64).round(4), f"{out.rms_norm:.4e}")
    [[0.72 0.  ]
     [0.   1.28]] 1.1180e-15
  """
  gram = jnp.asarray(gram)
  raw = gram.astype(jnp.promote_types(gram.dtype, jnp.float32))
  mean_sq = jnp.trace(raw) / raw.shape[0]

  def rescaled(_):
    peak = jnp.max(jnp.abs(raw))
    scale = jnp.where(peak > 0, peak, 1.0)
    return _normalized_from_raw(raw / scale, jnp.sqrt(scale))

  return jax.lax.cond(
      _lost_range(mean_sq, raw.dtype), rescaled,
      lambda _: _normalized_from_raw(raw, jnp.ones((), raw.dtype)), None)


@eager.compiled_when_eager
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
  if not leaves:
    raise ValueError("gram_matrix: the stacked gradient tree has no leaves.")
  num_tasks = _num_tasks(leaves)
  blocks = _task_blocks(leaves)
  gram = lambda bs, plain=False: _blocks_gram(bs, bs, num_tasks, num_tasks,
                                              dtype, True, plain)

  from_gram = _normalized_from_raw

  raw = gram(blocks)
  needs_rescale = _lost_range(jnp.trace(raw) / num_tasks, dtype)

  # Both branches see the blocks, not the leaves: the rescaled pass is
  # emitted once per block (one for all small leaves), not once per leaf.
  # The normalisation follows the cond, so that it is emitted once.
  def rescaled(blocks):
    scale = _nonzero(tree_max_abs(blocks, dtype))
    return gram([x.astype(dtype) / scale for x in blocks], plain=True), scale

  def direct(_):
    return raw, jnp.ones((), dtype)

  return from_gram(*jax.lax.cond(needs_rescale, rescaled, direct, blocks))


def _task_combination(weights: jax.Array, leaf: jax.Array) -> jax.Array:
  """``sum_i weights[i] * leaf[i]``, accumulated in float32 or wider and cast
  back to the leaf's dtype."""
  acc = jnp.result_type(jnp.float32, leaf.dtype, weights.dtype)
  out = jnp.tensordot(weights.astype(acc), leaf.astype(acc), axes=1,
                      precision=_HIGHEST)
  return out.astype(leaf.dtype)


@eager.compiled_when_eager
def weighted_task_sum(weights: jax.Array, stacked: Any) -> Any:
  """``sum_i weights[i] * g_i`` for every leaf: the task axis is reduced.

  The product is accumulated in float32 (or wider) and cast back to each
  leaf's dtype, so the update has the parameters' dtypes.

  Leaf by leaf, unlike the Gram pass: slices of one combined row fuse into
  every per-leaf consumer of the sum (an optimizer, a normalisation, a state
  update) and those kernels compile several times slower than plain
  per-leaf ones (200 slices of a row: about 2 CPU s, against 0.3 s for 200
  per-leaf elementwise kernels; ``benchmarks/bench_compile.py``: M-ConFIG
  and MARIGOLD on the 200-leaf tree 19 -> 9 CPU s).

  Example:
    >>> import jax.numpy as jnp
    >>> from mtl_optax._src.tree_math import weighted_task_sum
    >>> grads = {'w': jnp.array([[1., 0.], [1., 1.]])}
    >>> print(weighted_task_sum(jnp.array([0.5, 2.0]), grads)['w'])
    [2.5 2. ]
  """
  return jax.tree.map(lambda x: _task_combination(weights, jnp.asarray(x)),
                      stacked)


def task_mean(stacked: Any) -> Any:
  """The mean gradient ``g0 = (1/K) sum_i g_i``, leaf by leaf."""
  num_tasks = jnp.shape(jax.tree.leaves(stacked)[0])[0]
  return weighted_task_sum(jnp.full((num_tasks,), 1.0 / num_tasks), stacked)
