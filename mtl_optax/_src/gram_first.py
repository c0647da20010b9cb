"""Gram-first training: the K x K Gram matrix without holding K gradients.

Every Gram weighting's update is ``sum_i c_i g_i = grad sum_i c_i L_i`` with
``c`` a function of the Gram matrix ``G = J J^T`` of the task gradients (and
the method's state). :func:`value_and_gram` computes ``G`` holding at most
``chunk_size`` per-task gradients at once; :func:`value_and_gram_weighted_grad`
turns it into ``c`` with the transformation's own method and returns the
gradient of ``sum_i c_i L_i`` from one more backward pass.

The formulation. One ``jax.linearize`` of the loss vector stores the forward
pass once; its linear map is ``v -> J v`` (forward mode) and its transpose
``u -> J^T u`` (reverse mode, ``jax.linear_transpose``), so both products and
the final weighted gradient reuse the same linearisation. For each chunk of
tasks, their gradients ``g_j = J^T e_j`` come from the transpose (one-hot
cotangents, vmapped over the chunk); ``J g_j`` for ALL K tasks at once is one
forward-mode product per gradient, i.e. the Gram column ``G[:, j]``. Cost:
K reverse and K forward passes over the linearisation, the memory of
``chunk_size`` gradients (plus one forward pass's residuals).

Scale and symmetry. Each gradient is divided by its largest magnitude before
the forward product (the tangent has entries in [-1, 1]), and the columns
are recombined relative to the largest of those magnitudes, so the result
is the scale-free :class:`~mtl_optax._src.tree_math.NormalizedGram` the
stacked path solves on, finite for gradients from 1e-30 to 1e30; the
columns are accumulated in float32 (or float64). Forward and reverse mode
round differently, so ``G[i, j]`` and ``G[j, i]`` can differ in the last
bits: the result is symmetrised, ``(G + G^T) / 2`` (the solvers assume a
symmetric matrix; the error is of the order of the rounding either way).

Limits: forward mode must be defined for the loss (functions with a
``jax.custom_vjp`` and no JVP rule cannot be linearised); the forward
product runs in the model's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import grads as grads_lib
from mtl_optax._src import tree_math

__all__ = ("value_and_gram", "value_and_gram_weighted_grad")


def _gram_columns(jvp_fn, vjp_fn, cotangents, masks, dtype):
  """``(J t_j, p_j)`` for the tasks of one chunk: ``t_j = g_j / p_j``,
  ``p_j = max |g_j|`` over the shared leaves (1 for a zero gradient)."""
  rows = jax.vmap(vjp_fn)(cotangents)      # tuple of trees, leaves (c, ...)
  tangents = tuple(
      jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g), mask, tree)
      for mask, tree in zip(masks, rows))
  shared = [x for mask, tree in zip(masks, tangents)
            for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(tree)) if m]
  if not shared:
    raise ValueError("value_and_gram: shared selects no leaf.")
  peak = jnp.max(jnp.stack([tree_math.per_task_max_abs(x).astype(dtype)
                            for x in shared]), axis=0)
  scale = jnp.where(peak > 0, peak, 1.0)
  tangents = jax.tree.map(
      lambda g: (g / jnp.reshape(scale, (-1,) + (1,) * (g.ndim - 1)).astype(
          g.dtype)), tangents)
  columns = jax.vmap(lambda *t: jvp_fn(*t))(*tangents)   # (c, K)
  return columns.astype(dtype), scale


def _linearized_gram(partial, diff, masks, chunk_size, has_aux, what):
  """Losses, aux, the normalised Gram matrix and the pull-back ``u -> J^T u``."""
  out = jax.linearize(partial, *diff, has_aux=has_aux)
  losses, jvp_fn = out[0], out[1]
  aux = out[2] if has_aux else None
  grads_lib.check_loss_vector(losses, what)
  vjp_fn = jax.linear_transpose(jvp_fn, *diff)
  num_tasks = losses.shape[0]
  dtype = tree_math.accumulation_dtype((losses, diff))
  size = num_tasks if chunk_size is None else min(chunk_size, num_tasks)
  num_chunks = math.ceil(num_tasks / size)
  # Rows past K (a chunk size that does not divide K) are zero cotangents:
  # zero gradients, whose columns are sliced off below.
  basis = jnp.eye(num_chunks * size, num_tasks, dtype=losses.dtype)
  chunk = lambda cot: _gram_columns(jvp_fn, vjp_fn, cot, masks, dtype)
  chunks = jnp.reshape(basis, (num_chunks, size, num_tasks))
  if num_chunks == 1:
    columns, scales = chunk(basis)
  elif grads_lib.slow_in_cpu_loops(jvp_fn, *diff):
    # Convolutions on a CPU: unrolled chunks (in a loop: 20-30x slower).
    columns, scales = (jnp.concatenate(part) for part in
                       zip(*(chunk(cotangents) for cotangents in chunks)))
  else:
    columns, scales = jax.lax.map(chunk, chunks)
    columns = jnp.reshape(columns, (-1, num_tasks))
    scales = jnp.reshape(scales, (-1,))
  columns, scales = columns[:num_tasks], scales[:num_tasks]
  # G[i, j] = scales[j] * columns[j, i]; kept relative to the largest scale.
  peak = jnp.max(scales)
  relative = (columns.T / peak) * (scales / peak)[None, :]
  relative = 0.5 * (relative + relative.T)
  mean_sq = jnp.trace(relative) / num_tasks
  zero = mean_sq == 0
  gram = jnp.where(zero, jnp.zeros_like(relative),
                   relative / jnp.where(zero, 1.0, mean_sq))
  normalized = tree_math.NormalizedGram(gram, peak * jnp.sqrt(mean_sq))
  return losses, aux, normalized, vjp_fn


def _gram_chunk_size(chunk_size):
  """``"auto"`` (the default of :func:`mtl_optax.value_and_task_grads`, so
  one setting serves both paths) is one gradient at a time on every backend:
  this path exists to bound memory, and on a CPU one at a time is also the
  per-task rule there."""
  grads_lib.check_chunking(chunk_size, False)
  return 1 if isinstance(chunk_size, str) else chunk_size


def _prepare(fn, argnums, shared, what):
  argnums_t, single = grads_lib.normalize_argnums(argnums)

  def split(args, kwargs):
    diff, rebuild = grads_lib.split_args(args, argnums_t)
    partial = lambda *d: fn(*rebuild(*d), **kwargs)
    masks = (tuple(jax.tree.map(lambda _: True, d) for d in diff)
             if shared is None
             else grads_lib.shared_mask(shared, diff, single, what))
    return diff, partial, masks

  return single, split


def value_and_gram(
    fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
    has_aux: bool = False, *, shared: Any = None,
    chunk_size: int | str | None = 1) -> Callable[..., tuple[Any, jax.Array]]:
  """Task losses and the K x K Gram matrix of their gradients, chunk by chunk.

  ``wrapped(*args)`` returns ``(losses, gram)`` (``((losses, aux), gram)``
  with ``has_aux``): ``gram[i, j] = <grad L_i, grad L_j>`` over the
  differentiated parameters (the shared leaves only with ``shared=``, the
  mask of :func:`mtl_optax.value_and_task_grads`), in float32 or wider. It
  never holds more than ``chunk_size`` per-task gradients (default 1: the
  memory of one gradient whatever K is; ``None``: all K at once, as much
  memory as the stacked path): for each chunk, their gradients by reverse
  mode, then their Gram columns ``J g_j`` for all K tasks by forward mode,
  both from one ``jax.linearize`` (see the module docstring for the
  formulation, its scale safety and symmetrisation). Equal to the stacked
  path's ``tree_math.gram_matrix`` to float tolerance.

  Args:
    fn: function returning the ``(K,)`` task losses.
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    shared: optional mask of the shared leaves (Python bools, or
      ``params -> mask``).
    chunk_size: number of per-task gradients alive at once (any positive
      int, need not divide K; ``None`` for all K). The default 1, on every
      backend, keeps the step's memory flat in K
      (``benchmarks/bench_gram_first.py``): memory is why this path exists,
      and on a CPU one task at a time is also what
      :func:`mtl_optax.value_and_task_grads`' default ``"auto"`` does for
      dense models (accepted here, it means 1). Larger chunks vmap that
      many passes, for parallelism on accelerators. The chunks run in a
      ``lax.map`` loop, which XLA:CPU runs slowly for convolutions: there,
      if K gradients fit, ``None`` is faster.

  Returns:
    The wrapped function.

  Example:
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> fn = lambda w: jnp.stack([w[0] + 2 * w[1], 3 * w[1], w[0]])
    >>> losses, gram = mo.value_and_gram(fn, chunk_size=2)(jnp.ones(2))
    >>> print(gram)
    [[5. 6. 1.]
     [6. 9. 0.]
     [1. 0. 1.]]
  """
  what = "value_and_gram"
  chunk_size = _gram_chunk_size(chunk_size)
  _, split = _prepare(fn, argnums, shared, what)

  def wrapped(*args, **kwargs):
    diff, partial, masks = split(args, kwargs)
    losses, aux, normalized, _ = _linearized_gram(
        partial, diff, masks, chunk_size, has_aux, what)
    gram = normalized.gram * jnp.square(normalized.rms_norm)
    return ((losses, aux) if has_aux else losses), gram

  return wrapped


def value_and_gram_weighted_grad(
    fn: Callable[..., Any], tx: Any, argnums: int | Sequence[int] = 0,
    has_aux: bool = False, *, shared: Any = None,
    chunk_size: int | str | None = 1) -> Callable[..., tuple[Any, Any]]:
  """The Gram-first training step: Gram matrix, coefficients, one backward.

  ``wrapped(opt_state, params, *args)`` returns ``((losses, gram), grads)``
  (``(((losses, aux), gram), grads)`` with ``has_aux``): the Gram matrix of
  :func:`value_and_gram` (as a normalised ``NormalizedGram``, scale-safe),
  and ``grads = grad sum_i c_i L_i`` with ``c`` the coefficients that the
  Gram weighting in ``tx`` (the WHOLE transformation: any nesting of
  ``optax.chain``, ``optax.partition``, ``optax.inject_hyperparams``) takes
  from that Gram matrix, from the same linearisation (one more reverse
  pass). Then::

      updates, opt_state = tx.update(grads, opt_state, params,
                                     task_losses=losses, gram=gram)

  Given ``gram=``, every Gram weighting (mgda, cagrad, upgrad, dualproj,
  imtl_g, aligned_mtl, config, nash_mtl, fairgrad, pcgrad, gradvac, krum,
  ... every method of the shared builder) takes its coefficients from it,
  advancing its state (warm starts, EMAs, keys) exactly as on the stacked
  path, and returns ``grads`` as the update: the same update as the stacked
  path to float tolerance. ``c`` is found as on the single-backward path
  (:func:`mtl_optax.value_and_weighted_grad`): one probe of ``tx.update``
  with the Gram matrix, whose method state records ``c``, so the ``c`` of
  the gradient is the one ``update`` records.

  Trunk and heads: ``shared=`` the trunk's mask; the Gram matrix is over
  the trunk, the heads get ``grad sum_i L_i`` (as with
  ``value_and_task_grads(shared=)``), and ``tx = optax.partition({'shared':
  method, 'head': mo.task_sum(K)}, labels)``: the same partition as on the
  stacked path.

  Args:
    fn: function returning the ``(K,)`` task losses.
    tx: the whole transformation; exactly one balancing method in it.
    argnums: which positional argument(s) of ``fn`` to differentiate.
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    shared: optional mask of the shared leaves.
    chunk_size: per-task gradients alive at once (:func:`value_and_gram`).

  Returns:
    The wrapped function.

  Example:
    >>> import jax.numpy as jnp, optax, mtl_optax as mo
    >>> fn = lambda w: jnp.stack([(w[0] - 1.) ** 2, (w[1] + 1.) ** 2 + w[0]])
    >>> tx = optax.chain(mo.mgda(2), optax.sgd(0.1))
    >>> w = jnp.zeros(2)
    >>> opt_state = tx.init(w)
    >>> (losses, gram), grads = mo.value_and_gram_weighted_grad(fn, tx)(
    ...     opt_state, w)
    >>> updates, opt_state = tx.update(grads, opt_state, w,
    ...                                task_losses=losses, gram=gram)
    >>> _, stacked = mo.value_and_task_grads(fn)(w)
    >>> ref = optax.chain(mo.mgda(2), optax.sgd(0.1))
    >>> ref_updates, _ = ref.update(stacked, ref.init(w), w)
    >>> print(bool(jnp.allclose(updates, ref_updates, atol=1e-6)))
    True
  """
  what = "value_and_gram_weighted_grad"
  chunk_size = _gram_chunk_size(chunk_size)
  single, split = _prepare(fn, argnums, shared, what)

  def wrapped(opt_state, *args, **kwargs):
    diff, partial, masks = split(args, kwargs)
    losses, aux, normalized, vjp_fn = _linearized_gram(
        partial, diff, masks, chunk_size, has_aux, what)
    params = diff[0] if single else diff
    coefficients = grads_lib.probe_coefficients(
        tx, opt_state, params, jax.lax.stop_gradient(losses), what,
        lambda node: True, **{base.GRAM_ARG: normalized})
    grads = grads_lib.weighted_backward(
        vjp_fn, coefficients, losses, None if shared is None else masks)
    grads = grads[0] if single else grads
    value = (losses, aux) if has_aux else losses
    return (value, normalized), grads

  return wrapped
