"""Gradient surgery beyond PCGrad: GradVac and GradDrop.

* :func:`gradvac` -- Gradient Vaccine: PCGrad-style corrections towards
  adaptive (EMA) cosine-similarity targets, run on the K x K Gram matrix.
* :func:`graddrop` -- Gradient Sign Dropout: a random per-coordinate choice of
  sign, kept with probability given by the sign purity of the task gradients.
  It works coordinate by coordinate, so it reads the gradients themselves and
  its ``weights`` are a summary, not the coefficients of its update.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import deprecation
from mtl_optax._src import eager
from mtl_optax._src import prng
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = [
    "graddrop",
    "GradDropState",
    "gradvac",
    "GradVacState",
]


class GradVacState(NamedTuple):
  """State of :func:`gradvac`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update (``d = sum_i w_i g_i``).
    targets: ``(K, K)`` EMA of the cosine similarities, ``targets[i, j]`` for
      the (corrected) gradient of task i against the gradient of task j; zero
      at the start, where GradVac reduces to PCGrad.
    key: PRNG key for the random visiting orders.
  """
  weights: jax.Array
  targets: jax.Array
  key: jax.Array


def gradvac_coefficients(gram: jax.Array, targets: jax.Array,
                         decay: jax.Array | float, key: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """GradVac's update ``mean_i g_i^PC`` as coefficients on the task gradients.

  As in :func:`mtl_optax._src.aggregators.pcgrad_coefficients`, each corrected
  gradient is tracked as ``g_i^PC = sum_k C[i, k] g_k``, so cosines and norms
  come from the Gram matrix: ``<g_i^PC, g_j> = C[i] G[:, j]`` and
  ``||g_i^PC||^2 = C[i] G C[i]``. Each task visits the others in its own
  random order, drawn exactly as PCGrad draws it, so that with zero targets
  both give the same result for the same key. Any positive rescaling of
  ``gram`` gives the same coefficients.

  Returns:
    ``(coefficients (K,), new_targets (K, K))``.
  """
  num_tasks = gram.shape[0]
  dtype = gram.dtype
  if num_tasks == 1:
    return jnp.ones((1,), dtype), targets.astype(dtype)
  decay = jnp.asarray(decay, dtype)
  eps = jnp.finfo(dtype).eps
  rows = jnp.arange(num_tasks)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  orders = prng.permutations(prng.split(key, num_tasks), num_tasks - 1)
  partners = orders + (orders >= rows[:, None])  # skip each task itself

  def visit(carry, partner):
    # projected[i, k] = <g_i^PC, g_k> = (C G)[i, k], kept up to date by the
    # rank-one corrections below: O(K^2) per round instead of a K^3 product.
    coeffs, projected, targets = carry
    dot = projected[rows, partner]
    norm_i = jnp.sqrt(jnp.maximum(jnp.sum(projected * coeffs, axis=1), 0.0))
    norm_j = norms[partner]
    denom = norm_i * norm_j
    # A zero gradient has no direction: its cosine counts as 0 (as TorchJD's
    # eps-guarded ratio gives) and it receives no correction.
    cos = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
    cos = jnp.clip(cos, -1.0, 1.0)
    target = targets[rows, partner]
    sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, 0.0))
    # A target of exactly +-1 would need an infinite step along g_j; floor
    # its sine at sqrt(eps) so the correction stays finite.
    sin_target = jnp.sqrt(jnp.maximum(1.0 - target * target, eps))
    step = norm_i * (target * sin - cos * sin_target) / (
        jnp.where(norm_j > 0, norm_j, 1.0) * sin_target)
    step = jnp.where((cos < target) & (norm_j > 0), step, 0.0)
    coeffs = coeffs.at[rows, partner].add(step)
    projected = projected + step[:, None] * gram[partner]
    targets = targets.at[rows, partner].set(decay * target + (1 - decay) * cos)
    return (coeffs, projected, targets), None

  (coeffs, _, targets), _ = jax.lax.scan(
      visit, (jnp.eye(num_tasks, dtype=dtype), gram, targets.astype(dtype)),
      partners.T)
  return jnp.mean(coeffs, axis=0), targets


def gradvac_initial_state(num_tasks: int, dtype, seed: int) -> GradVacState:
  """GradVac's initial state (of the factory and of the Gram-weighting
  layer): uniform weights, zero targets (PCGrad's first step) and
  ``PRNGKey(seed)``."""
  return GradVacState(base.uniform_weights(num_tasks, dtype),
                      jnp.zeros((num_tasks, num_tasks), dtype),
                      jax.random.PRNGKey(seed))


@deprecation.renamed_arguments(beta=("decay", lambda beta: 1 - beta))
def gradvac(num_tasks: int, decay: float = 0.5, seed: int = 0
            ) -> optax.GradientTransformationExtraArgs:
  """GradVac: move pairwise gradient similarities towards adaptive targets.

  Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving
  Multi-task Optimization in Massively Multilingual Models", ICLR 2021. For
  each task i, in a fresh random order of the other tasks j, with
  ``phi = cos(g_i^PC, g_j)`` and target ``t = targets[i, j]``: if
  ``phi < t``, ``g_i^PC += ||g_i^PC|| (t sqrt(1-phi^2) - phi sqrt(1-t^2)) /
  (||g_j|| sqrt(1-t^2)) g_j``; then ``targets[i, j] <- decay t + (1-decay) phi``.
  ``d = (1/K) sum_i g_i^PC`` (the scale of ``g0``, like :func:`mo.pcgrad
  <mtl_optax.pcgrad>`; LibMTL and TorchJD sum, i.e. K times larger). With the
  initial zero targets the correction is PCGrad's projection, so the first
  step equals ``mo.pcgrad(num_tasks, seed)`` exactly.

  .. math::

     g_i^{\\mathrm{PC}} &\\leftarrow g_i^{\\mathrm{PC}} + \\frac{\\|g_i^{\\mathrm{PC}}\\|
     \\big(t_{ij} \\sqrt{1 - \\phi_{ij}^2} - \\phi_{ij} \\sqrt{1 - t_{ij}^2}\\big)}
     {\\|g_j\\| \\sqrt{1 - t_{ij}^2}}\\, g_j \\quad \\text{if } \\phi_{ij} < t_{ij}, \\\\
     \\phi_{ij} &= \\cos(g_i^{\\mathrm{PC}}, g_j), \\qquad
     d = \\frac{1}{K} \\sum_i g_i^{\\mathrm{PC}}

  Everything runs on the K x K Gram matrix (as TorchJD's ``GradVacWeighting``)
  with a ``lax.scan`` over the K - 1 rounds: two reads of the gradients. This
  is GradVac's "whole model" granularity; for its per-layer variants give
  each group its own instance through ``optax.partition``.

  Args:
    num_tasks: number of tasks K.
    decay: EMA decay of the similarity targets, in [0, 1] (optax's meaning,
      the weight of the old target; paper, LibMTL and TorchJD: 0.5; the
      paper's 0.99 for its large-scale runs). Injectable. Formerly ``beta``
      = ``1 - decay``, the weight of the new cosine: a deprecated alias that
      converts.
    seed: seed of the PRNG key kept in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`GradVacState`.

  Example (TorchJD's test matrix; TorchJD sums, giving twice this):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.gradvac(2)
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(3)))
    >>> print(np.asarray(update, np.float64).round(4))
    [0.2924 1.9006 1.9006]
    >>> print(np.asarray(state.targets, np.float64).round(4))
    [[ 0.     -0.4206]
     [-0.4206  0.    ]]
  """
  method = "gradvac"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_probability(decay, "decay", method)
  validation.check_seed(seed, method)

  from mtl_optax import gram_weightings  # pylint: disable=g-import-not-at-top

  def rule(context, state):
    return gram_weightings.gradvac(tree_math.NormalizedGram(context.gram, context.rms_norm), state, decay=decay)

  return base.task_weighting_transformation(
      num_tasks, method,
      lambda dtype: gradvac_initial_state(num_tasks, dtype, seed), rule)


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    weights: ``(K,)`` summary of the last step, not coefficients of the update
      (the masks act coordinate by coordinate): ``weights[i] = (1/K)
      <m_i * g_i, g_i> / ||g_i||^2``, the least-squares coefficient of task
      i's masked gradient on ``g_i``, i.e. ``1/K`` times the share of
      ``||g_i||^2`` that was kept (``1/K`` when nothing is dropped or
      ``g_i = 0``).
    key: PRNG key of the next draw.
  """
  weights: jax.Array
  key: jax.Array
  weights_are_coefficients = False


def _group_uniforms(keys, leaves, group, dtype):
  """``U ~ Unif[0, 1)`` of each leaf of ``group`` (indices into ``leaves``),
  drawn from the leaf's own key in its parameter shape: that array for one
  leaf, raveled and concatenated in group order for several.

  A group of several leaves is drawn by one vectorised call, each key
  drawing as many values as the largest leaf and keeping its first ones:
  with JAX's partitionable Threefry (the default) the values of a draw do
  not depend on its length, so these are the per-leaf draws, for one
  random-bits kernel instead of one per leaf.
  """
  draw = lambda i: prng.uniform(keys[i], jnp.shape(leaves[i])[1:], dtype)
  if len(group) == 1:
    return draw(group[0])
  if not jax.config.jax_threefry_partitionable:
    return jnp.concatenate([jnp.ravel(draw(i)) for i in group])
  sizes = [math.prod(jnp.shape(leaves[i])[1:]) for i in group]
  rows = prng.uniform(keys[np.asarray(group)], (max(sizes),), dtype)
  # Each row's first values, by one gather (row slices are a kernel each).
  keep = np.concatenate([r * max(sizes) + np.arange(size)
                         for r, size in enumerate(sizes)])
  return jnp.ravel(rows)[keep]


def _chosen_signs(stacked, uniform):
  """GradDrop's per-coordinate choice on a ``(K, *s)`` block: where the
  positive entries are kept and where the negative ones, as ``(*s)`` 0/1
  arrays of the block's dtype.

  The task reductions are unrolled over the K rows: XLA:CPU reduces a
  leading axis of a ``(K, P)`` array an order of magnitude below memory
  bandwidth, while K elementwise rows fuse into one pass.
  """
  rows = [stacked[i] for i in range(stacked.shape[0])]
  peak = functools.reduce(jnp.maximum, [jnp.abs(r) for r in rows])
  peak = jnp.where(peak > 0, peak, 1.0)
  signed = functools.reduce(jnp.add, rows) / peak
  magnitude = functools.reduce(jnp.add, [jnp.abs(r) for r in rows]) / peak
  purity = 0.5 * (1.0 + signed / jnp.maximum(magnitude, 1.0))
  return ((purity > uniform).astype(stacked.dtype),
          (purity < uniform).astype(stacked.dtype))


def _kept_and_total(stacked, keep_positive, keep_negative, peaks):
  """``(2, K)``: each task's squared norm of ``stacked / peaks`` over the
  coordinates whose sign was kept, and over all of them (sums of
  non-negative terms: a task whose entries were all dropped gets exactly
  zero)."""
  scaled = stacked / jnp.reshape(
      peaks, (stacked.shape[0],) + (1,) * (stacked.ndim - 1))
  square = jnp.square(scaled)
  kept = jnp.where(scaled > 0, keep_positive, keep_negative) * square
  return jnp.stack([tree_math.per_task_sum(kept),
                    tree_math.per_task_sum(square)])


def _drop_block(stacked, uniform, peaks, leaks):
  """GradDrop on one ``(K, *s)`` block (a leaf, or the small leaves joined):
  the mean-scale update ``s`` and each task's kept and total squared norms
  (relative to ``peaks``). No reshape off a single CPU device: a sharded
  leaf stays as it is."""
  num_tasks = stacked.shape[0]
  rows = [stacked[i] for i in range(num_tasks)]
  keep_positive, keep_negative = _chosen_signs(stacked, uniform)

  def factor(i, row):
    kept = keep_positive * (row > 0) + keep_negative * (row < 0)
    return leaks[i] + (1.0 - leaks[i]) * kept

  # The update reads the choices row by row: XLA fuses the draw's hash into
  # its consumers, and one shaped (K, *s) would recompute it per task.
  # NaN/inf must reach the update, for optax.apply_if_finite: under jit
  # XLA rewrites ``mask * row`` as a select, which drops them.
  update = functools.reduce(jnp.add, [
      jnp.where(jnp.isfinite(row), factor(i, row) * row, jnp.nan)
      for i, row in enumerate(rows)]) / num_tasks
  size = math.prod(stacked.shape[1:])
  block = tree_math.cpu_column_block(num_tasks, size)
  if block is None:
    kept, total = _kept_and_total(stacked, keep_positive, keep_negative,
                                  peaks)
  else:
    # On one CPU device, block by block, slicing the choices computed once:
    # in one pass XLA:CPU writes the (K, *s) temporaries out (and pages
    # them in) on every step (GradDrop's state at K = 10, P = 1e6: 4x the
    # time of the blocks).
    kept, total = tree_math.sum_over_column_blocks(
        lambda *parts: _kept_and_total(*parts, peaks),
        [jnp.reshape(stacked, (num_tasks, size)),
         jnp.reshape(keep_positive, (size,)),
         jnp.reshape(keep_negative, (size,))], block)
  return update, leaks * total + (1.0 - leaks) * kept, total


@eager.compiled_when_eager
def _graddrop_update(updates, key, leak, num_tasks):
  """GradDrop's update of a stacked tree, its kept-norm weights and the
  next key (the step of :func:`graddrop`)."""
  key, subkey = prng.split(key)
  leaves, treedef = jax.tree.flatten(updates)
  keys = prng.split(subkey, len(leaves))
  acc = tree_math.accumulation_dtype(updates)
  leaks = jnp.broadcast_to(jnp.asarray(leak, acc), (num_tasks,))
  # The small leaves are drawn and dropped as one block: one set of
  # kernels for all of them, not one per leaf.
  small = tree_math.small_leaf_indices(leaves)
  groups = ([small] if small else []) + [
      [i] for i in range(len(leaves)) if i not in small]
  blocks = [tree_math.join_task_rows([leaves[i] for i in group], acc)
            if group is small else jnp.asarray(leaves[group[0]]).astype(acc)
            for group in groups]
  # Per-task peaks keep the squared norms of the weights summary finite for
  # gradients up to the dtype's range.
  peaks = jnp.max(jnp.stack([tree_math.per_task_max_abs(b)
                             for b in blocks]), axis=0)
  peaks = jnp.where(peaks > 0, peaks, 1.0)
  kept = total = jnp.zeros((num_tasks,), acc)
  outputs = [None] * len(leaves)
  for group, block in zip(groups, blocks):
    update, kept_here, total_here = _drop_block(
        block, _group_uniforms(keys, leaves, group, acc), peaks, leaks)
    kept, total = kept + kept_here, total + total_here
    if group is not small:
      outputs[group[0]] = update.astype(leaves[group[0]].dtype)
      continue
    picked = [leaves[i] for i in group]
    for i, part in zip(group, tree_math.split_task_row(update, picked)):
      outputs[i] = part
  weights = jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0),
                      1.0) / num_tasks
  return jax.tree.unflatten(treedef, outputs), weights, key


def graddrop(num_tasks: int, seed: int = 0, leak: float | jax.Array = 0.0
             ) -> optax.GradientTransformationExtraArgs:
  """GradDrop: keep one sign per coordinate, chosen by sign purity.

  Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign:
  Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020,
  Algorithm 1, applied per parameter coordinate as in the CAGrad
  repository's baseline and TorchJD: ``P = (1 + sum_i g_i / sum_i |g_i|) / 2``,
  ``U ~ Unif[0, 1)`` per coordinate, mask ``M_i = [P > U][g_i > 0] +
  [P < U][g_i < 0]``, and ``d = (1/K) sum_i (l_i + (1 - l_i) M_i) * g_i``.

  .. math::

     d &= \\frac{1}{K} \\sum_i \\big(l_i + (1 - l_i) M_i\\big) \\odot g_i, \\\\
     M_i &= [P > U][g_i > 0] + [P < U][g_i < 0], \\qquad
     P = \\frac{1}{2} \\Big( 1 + \\frac{\\sum_i g_i}{\\sum_i |g_i|} \\Big)

  Output scale: ``(1/K)`` times the sum, the scale of ``g0`` (a coordinate
  where every task agrees in sign gives exactly ``g0`` there). The CAGrad
  repository's ``mean * K``, TorchJD's ``GradDrop`` and LibMTL return the sum:
  K times this; chain ``optax.scale(num_tasks)`` to match them.

  The purity is computed as ``sum(g / a) / sum(|g| / a)`` with ``a = max_i
  |g_i|`` per coordinate, so it neither overflows nor divides by zero
  (coordinates where every task is zero give zero). Each step splits the key
  in the state, ``key, sub = split(key)``, then one key per leaf,
  ``split(sub, num_leaves)``, and draws ``U`` of the leaf's parameter shape in
  float32 (float64 for float64 gradients). NaN in any task at a coordinate
  gives NaN there. The paper applies GradDrop to activations; pass
  representation gradients (``rep_grad``-style) to do the same.

  Args:
    num_tasks: number of tasks K.
    seed: seed of the PRNG key kept in the state.
    leak: leak ``l`` in [0, 1], a scalar or one per task: the fraction of
      each task's gradient that bypasses the mask (paper and LibMTL default:
      0). Injectable.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`GradDropState`.

  Example (TorchJD's test matrix; here U < 0.6 at the first coordinate, so the
  positive sign survives; TorchJD's sum is [6, 2, 2]):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.graddrop(2, seed=0)
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(3)))
    >>> print(np.asarray(update, np.float64).round(4))
    [3. 1. 1.]
    >>> print(np.asarray(state.weights, np.float64).round(4))
    [0.0556 0.5   ]
  """
  method = "graddrop"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_seed(seed, method)
  if validation.is_concrete(leak) and np.shape(leak) not in ((), (num_tasks,)):
    raise ValueError(f"{method}: leak must be a scalar or have shape "
                     f"({num_tasks},), got shape {np.shape(leak)}.")
  validation.check_probability(leak, "leak", method)

  def init_fn(params):
    return GradDropState(
        base.uniform_weights(num_tasks, base.state_dtype(params)),
        jax.random.PRNGKey(seed))

  def step(updates, state, params, extra_args):
    del params, extra_args
    update, weights, key = _graddrop_update(updates, state.key, leak,
                                            num_tasks)
    return update, GradDropState(weights.astype(state.weights.dtype), key)

  return base.guarded_transformation(
      num_tasks, method, init_fn, step)

