"""Per-task gradients, stacked on a leading task axis, and the
single-backward training step."""

from __future__ import annotations

from typing import Any, Callable, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base

from mtl_optax._src import validation


def normalize_argnums(argnums: int | Sequence[int]) -> tuple[tuple[int, ...], bool]:
  validation.check_argnums(argnums)
  if isinstance(argnums, int):
    return (argnums,), True
  argnums = tuple(argnums)
  if not argnums or not all(isinstance(a, int) for a in argnums):
    raise TypeError(f"argnums must be an int or a non-empty tuple of ints, "
                    f"got {argnums!r}.")
  return argnums, False


def split_args(args, argnums):
  for a in argnums:
    if not -len(args) <= a < len(args):
      raise ValueError(f"argnums {a} is out of range for {len(args)} "
                       "positional arguments.")
  argnums = tuple(a % len(args) for a in argnums)

  def rebuild(*diff):
    full = list(args)
    for a, value in zip(argnums, diff):
      full[a] = value
    return full

  return tuple(args[a] for a in argnums), rebuild


AUTO = "auto"

# Primitives that XLA:CPU runs several times slower inside a loop body than
# in straight-line code (benchmarks/bench_task_grads.py: a conv net's K
# backward passes take 20-35x longer in a ``lax.map`` than unrolled).
_SLOW_IN_CPU_LOOPS = frozenset({"conv_general_dilated"})


def check_chunking(chunk_size: int | str | None, unroll: bool) -> None:
  if not isinstance(unroll, bool):
    raise TypeError(f"unroll must be a bool, got {unroll!r}.")
  if chunk_size is None:
    if unroll:
      raise ValueError("unroll=True unrolls chunks: give a chunk_size too.")
    return
  if isinstance(chunk_size, str):
    if chunk_size != AUTO:
      raise ValueError(f"chunk_size must be 'auto', None or a positive int, "
                       f"got {chunk_size!r}.")
    return
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
    raise TypeError(f"chunk_size must be 'auto', None or a positive int, got "
                    f"{chunk_size!r}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")


def _primitive_names(jaxpr: Any) -> set[str]:
  """Every primitive in ``jaxpr`` and its sub-jaxprs (loops, conds, ...)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)     # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          names |= _primitive_names(sub)
  return names


def resolve_chunking(chunk_size: int | str | None, unroll: bool,
                     vjp_fn: Callable[[jax.Array], Any],
                     basis: jax.Array) -> tuple[int | None, bool]:
  """The ``(chunk_size, unroll)`` that ``chunk_size="auto"`` means here.

  On accelerators, one vmap of the K backward passes (wide batched
  kernels). On a CPU, one task at a time (``chunk_size=1``): in a loop, or
  unrolled when the backward pass holds a convolution (slow in XLA:CPU
  loops) or ``unroll=True``. Decided at trace time from
  ``jax.default_backend()``; an explicit ``chunk_size`` is kept as given.
  """
  if not isinstance(chunk_size, str):
    return chunk_size, unroll
  if jax.default_backend() != "cpu" or _num_rows(basis) == 1:
    return None, False
  return 1, unroll or slow_in_cpu_loops(vjp_fn, _row(basis, 0))


def _num_rows(rows: Any) -> int:
  return jnp.shape(jax.tree.leaves(rows)[0])[0]


def _row(rows: Any, index: int) -> Any:
  return jax.tree.map(lambda x: x[index], rows)


def slow_in_cpu_loops(fn: Callable[..., Any], *example: Any) -> bool:
  """Whether ``fn(*example)`` (traced, not run) holds a primitive that
  XLA:CPU runs slowly inside a loop body, on the CPU backend."""
  if jax.default_backend() != "cpu":
    return False
  return bool(_primitive_names(jax.make_jaxpr(fn)(*example).jaxpr)
              & _SLOW_IN_CPU_LOOPS)


def _task_rows(vjp_fn: Callable[[Any], Any], basis: Any,
               chunk_size: int | str | None, unroll: bool) -> Any:
  """``vjp_fn`` applied to every row of ``basis`` (an array, or a tree whose
  leaves share a leading axis), stacked on axis 0.

  One vmap over all rows, or rows ``chunk_size`` at a time: in a loop
  (``lax.map``) or unrolled into the program; ``"auto"`` picks one by
  backend (:func:`resolve_chunking`).
  """
  chunk_size, unroll = resolve_chunking(chunk_size, unroll, vjp_fn, basis)
  num_rows = _num_rows(basis)
  if chunk_size is None or chunk_size >= num_rows:
    return jax.vmap(vjp_fn)(basis)
  if not unroll:
    # batch_size=1 would still vmap a size-1 axis; the plain map is cheaper.
    return jax.lax.map(vjp_fn, basis,
                       batch_size=None if chunk_size == 1 else chunk_size)
  chunks = []
  for start in range(0, num_rows, chunk_size):
    if chunk_size == 1:
      chunks.append(jax.tree.map(lambda g: g[None],
                                 vjp_fn(_row(basis, start))))
    else:
      chunks.append(jax.vmap(vjp_fn)(jax.tree.map(
          lambda x: x[start:start + chunk_size], basis)))
  return jax.tree.map(lambda *rows: jnp.concatenate(rows), *chunks)


def shared_mask(shared: Any, diff: tuple[Any, ...], single: bool,
                what: str) -> tuple[Any, ...]:
  """``shared`` (a bool tree or ``params -> bool tree``) as one full tree of
  Python bools per differentiated argument; trace-time errors name the leaf.

  A mask may be a prefix of the parameters (``{'trunk': True, 'heads':
  False}``).
  """
  if callable(shared):
    shared = shared(diff[0] if single else diff)
  masks = (shared,) if single else tuple(shared)
  if len(masks) != len(diff):
    raise ValueError(f"{what}: shared has {len(masks)} masks for "
                     f"{len(diff)} differentiated arguments.")

  def expand(mask, tree):
    def one(path, flag, sub):
      if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(
            f"{what}: shared must hold Python bools (True = shared, one "
            f"gradient per task), got {flag!r} at "
            f"{jax.tree_util.keystr(path) or '<root>'}. From optax.partition "
            "labels: shared=lambda p: jax.tree.map(lambda l: l == 'shared', "
            "labels(p)).")
      return jax.tree.map(lambda _: bool(flag), sub)
    return jax.tree_util.tree_map_with_path(one, mask, tree)

  return tuple(expand(m, t) for m, t in zip(masks, diff))


def select(mask: Any, tree: Any, keep: bool) -> Any:
  """The leaves of ``tree`` where ``mask == keep``, others ``None``."""
  return jax.tree.map(lambda m, x: x if m == keep else None, mask, tree)


def merge(mask: Any, shared_part: Any, other_part: Any) -> Any:
  """Reassembles a tree split by :func:`select` (``None`` marks the gaps)."""
  return jax.tree.map(lambda m, a, b: a if m else b, mask, shared_part,
                      other_part, is_leaf=lambda x: x is None)


def check_loss_vector(losses: Any, what: str) -> None:
  if jnp.ndim(losses) != 1:
    raise ValueError(
        f"{what}: fn must return a 1-D vector of task losses, got shape "
        f"{jnp.shape(losses)}. For a scalar loss per task batch use "
        "mo.value_and_task_grads_from_batches.")


def value_and_task_grads(
    fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
    has_aux: bool = False, *, chunk_size: int | str | None = AUTO,
    unroll: bool = False, shared: Any = None
) -> Callable[..., tuple[Any, Any]]:
  """Per-task losses and gradients for a vector of losses on a shared batch.

  ``fn(*args)`` returns the ``(K,)`` task losses (``(losses, aux)`` with
  ``has_aux``). The wrapped function returns ``(losses, grads)`` (or
  ``((losses, aux), grads)``) exactly like ``jax.value_and_grad``, except
  that every gradient leaf carries a leading task axis: ``(K, *leaf.shape)``,
  row ``i`` being ``d losses[i] / d params``. Costs one forward pass and K
  backward passes (a reverse-mode Jacobian).

  How the K backward passes run (``chunk_size``; the results are the same
  up to float rounding). The default ``"auto"`` picks by backend at trace
  time (``jax.default_backend()``): on GPU and TPU one ``jax.vmap`` of all K
  (wide batched kernels); on a CPU one task at a time, ``chunk_size=1``, in
  a ``lax.map`` loop, or unrolled into the program when the backward pass
  holds a convolution (XLA:CPU runs convolutions 12-18x slower inside
  loops). Measured on a 2-core CPU, K = 2 to 40, medians of three loaded
  runs (``benchmarks/bench_task_grads.py``): for dense layers with Flax's
  ``(in, out)`` kernels, whose vmapped weight gradient XLA computes
  transposed and then copies, the loop takes 0.66-0.90x the vmap's time
  (torch's ``(out, in)`` kernels: 0.84-1.07x); unrolling them instead is
  no faster and compiles in 1.4-2.6x the loop's time at K = 40. A conv net
  unrolled takes 0.34-0.60x the vmap's time and compiles faster. An
  explicit ``chunk_size`` is used on every backend: ``None`` for the vmap,
  ``c`` for ``c`` tasks at a time (TorchJD's ``parallel_chunk_size``: fewer
  backward intermediates alive at once), ``unroll=True`` to unroll the
  chunks.

  Heads not stacked: with ``shared=`` (a tree of Python bools shaped like
  the parameters or a prefix of them, ``True`` for the shared trunk, or a
  function ``params -> mask``) only the shared leaves get the ``(K, ...)``
  per-task gradients; every other leaf gets the ordinary gradient of the
  summed loss ``sum_i L_i`` (one more backward pass of the same forward).
  Under ``jit`` the K task rows of the head leaves are never computed (XLA
  removes them: ``benchmarks/bench_shared_heads.py`` measures the memory).
  Compose with ``optax.partition``: the method on the shared label,
  ``mo.task_sum(K)`` or ``optax.identity()`` on the heads (both pass an
  ordinary gradient through), the same partition as on the single-backward
  and Gram-first paths. From the partition's labels:
  ``shared=lambda p: jax.tree.map(lambda l: l == 'shared', labels(p))``.

  ``fn`` may also return a Python list or tuple of K scalar losses (the
  TorchJD habit); they are stacked into the ``(K,)`` vector for you.

  Args:
    fn: function returning a 1-D array of K task losses (or a list/tuple of
      K scalars).
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    chunk_size: ``"auto"`` (default: by backend, see above), ``None`` (all
      K backward passes in one vmap) or the number of tasks back-propagated
      together; the results are identical up to float rounding.
    unroll: unroll the chunks into the program instead of a ``lax.map``
      loop (compile time grows with K / chunk_size); needs a ``chunk_size``
      (with ``"auto"``: unroll wherever the rule takes one task at a time).
    shared: None (every leaf stacked) or the mask of the shared leaves
      (a tuple of masks when ``argnums`` is a tuple).

  Returns:
    The wrapped function.

  Example:
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> params = {'trunk': jnp.array([1., 2.]), 'heads': jnp.array([3., 4.])}
    >>> fn = lambda p: p['heads'] * jnp.sum(p['trunk'])
    >>> _, grads = mo.value_and_task_grads(
    ...     fn, shared={'trunk': True, 'heads': False})(params)
    >>> print(grads['trunk'], grads['heads'])
    [[3. 3.]
     [4. 4.]] [3. 3.]
    >>> def task_losses(params, x):
    ...   return jnp.stack([(params['w'] @ x) ** 2, jnp.sum(params['w'])])
    >>> losses, grads = mo.value_and_task_grads(task_losses)(
    ...     {'w': jnp.array([1., 2.])}, jnp.array([1., 1.]))
    >>> print(losses, grads['w'])
    [9. 3.] [[6. 6.]
     [1. 1.]]
    >>> _, one_at_a_time = mo.value_and_task_grads(task_losses, chunk_size=1)(
    ...     {'w': jnp.array([1., 2.])}, jnp.array([1., 1.]))
    >>> print(one_at_a_time['w'])
    [[6. 6.]
     [1. 1.]]
  """
  argnums_t, single = normalize_argnums(argnums)
  check_chunking(chunk_size, unroll)

  def wrapped(*args, **kwargs):
    diff, rebuild = split_args(args, argnums_t)
    partial = lambda *d: validation.as_loss_vector(
        fn(*rebuild(*d), **kwargs), has_aux, "value_and_task_grads")
    if has_aux:
      losses, vjp_fn, aux = jax.vjp(partial, *diff, has_aux=True)
    else:
      losses, vjp_fn = jax.vjp(partial, *diff)
    check_loss_vector(losses, "value_and_task_grads")
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    if shared is None:
      grads = _task_rows(vjp_fn, basis, chunk_size, unroll)
    else:
      masks = shared_mask(shared, diff, single, "value_and_task_grads")
      keep = lambda trees, flag: tuple(
          select(m, t, flag) for m, t in zip(masks, trees))
      rows = _task_rows(lambda ct: keep(vjp_fn(ct), True), basis,
                        chunk_size, unroll)
      summed = keep(vjp_fn(jnp.ones_like(losses)), False)
      grads = tuple(merge(m, r, h) for m, r, h in zip(masks, rows, summed))
    grads = grads[0] if single else grads
    return ((losses, aux) if has_aux else losses), grads

  return wrapped


def value_and_task_grads_from_batches(
    task_loss: Callable[..., Any], argnums: int = 0, batch_argnum: int = 1,
    has_aux: bool = False, num_tasks: int | None = None, *,
    chunk_size: int | str | None = None, unroll: bool = False
) -> Callable[..., tuple[Any, Any]]:
  """Per-task gradients when every task has its own batch.

  For multi-task RL or multi-input data sets: ``task_loss(params, batch)``
  returns ONE scalar loss for one task's batch; the argument at
  ``batch_argnum`` carries a leading task axis (each leaf ``(K, ...)``) and
  is mapped over, with the parameters shared. Returns
  ``(losses (K,), grads)`` like :func:`value_and_task_grads`. By default
  one ``jax.vmap`` of the K tasks, on every backend: each task has its own
  inputs, so the per-task weight gradients are batched matrix products, not
  the transposed copy that makes the shared-batch vmap slow on a CPU (an
  MLP of 0.8M parameters, 64 examples per task, 2-core CPU: the vmap takes
  15.0 ms at K = 10 where one task at a time takes 19.6 ms). ``chunk_size``
  bounds the memory instead: ``c`` tasks at a time, in a ``lax.map`` loop
  or unrolled; ``"auto"`` applies :func:`value_and_task_grads`'s rule.
  To use a different function per task, dispatch on a task index stored in
  the batch (``jax.lax.switch``).

  Args:
    task_loss: scalar loss of one task's batch (``(loss, aux)`` with
      ``has_aux``).
    argnums: the positional argument to differentiate (the parameters).
    batch_argnum: the positional argument holding the per-task batches:
      leaves with one leading task axis, or a Python list of K per-task
      batches of one structure (stacked for you; a tuple or dict is a batch
      pytree, not a list of tasks).
    has_aux: whether ``task_loss`` returns ``(loss, aux)``; aux is stacked.
    num_tasks: optional K; the batches' leading axis is then checked
      against it (without it, only its agreement across leaves).
    chunk_size: ``None`` (default: one vmap of all K tasks), the number of
      tasks mapped together, or ``"auto"`` (by backend, as in
      :func:`value_and_task_grads`); the results are the same up to float
      rounding.
    unroll: unroll the chunks into the program (needs a ``chunk_size``).

  Example:
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> loss = lambda w, batch: jnp.mean((batch['x'] @ w - batch['y']) ** 2)
    >>> batches = {'x': jnp.ones((2, 3, 1)), 'y': jnp.array([[1.] * 3, [3.] * 3])}
    >>> losses, grads = mo.value_and_task_grads_from_batches(loss)(
    ...     jnp.array([2.]), batches)
    >>> print(losses, grads.ravel())
    [1. 1.] [ 2. -2.]
  """
  if argnums == batch_argnum:
    raise ValueError("argnums and batch_argnum must differ.")
  check_chunking(chunk_size, unroll)
  grad_fn = jax.value_and_grad(task_loss, argnums=argnums, has_aux=has_aux)

  def wrapped(*args, **kwargs):
    args = validation.task_batches(args, batch_argnum, num_tasks,
                                   "value_and_task_grads_from_batches")

    at = batch_argnum % len(args)

    def one_task(batch):
      return grad_fn(*args[:at], batch, *args[at + 1:], **kwargs)

    return _task_rows(one_task, args[batch_argnum], chunk_size, unroll)

  return wrapped


def probe_coefficients(tx: Any, opt_state: Any, params: Any,
                       losses: jax.Array, what: str,
                       select: Callable[[Any], bool],
                       **extra_args: Any) -> jax.Array:
  """The coefficients ``c`` the balancing method in ``tx`` uses this step.

  Calls ``tx.update`` once on a zero gradient shaped like ``params`` with
  ``task_losses``, ``weighting_probe=True`` and ``extra_args``: every method
  of the library in the chain records the coefficients its real ``update``
  on the same state uses in its ``weights`` (Gram weightings advance their
  state from ``extra_args['gram']`` exactly as the real call does), without
  any other effect. The balancing state kept by ``select`` is read from the
  returned state; the rest of the probe is discarded (dead code under jit).
  """
  params = base.pure_tree(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  try:
    _, probed = tx.update(zeros, opt_state, params, task_losses=losses,
                          **{base.PROBE_ARG: True}, **extra_args)
  except (ValueError, TypeError) as err:
    raise type(err)(
        f"{what}: tx.update with one ordinary gradient (the probe that reads "
        f"the coefficients) failed: {err} Every leaf's transformation must "
        "accept an ordinary gradient: the balancing method on the shared "
        "leaves, mo.task_sum(K) or optax.identity() on the heads "
        "(optax.partition).") from err
  found = base.method_states(probed, select)
  if not found:
    raise TypeError(
        f"{what}: tx contains no method of the right kind ("
        + ("a loss weighting such as mo.famo, mo.uncertainty_weighting or "
           "mo.marigold" if select is base.is_loss_weighting_state else
           "a Gram weighting such as mo.mgda or mo.cagrad, or a loss "
           "weighting") + "); for stacked-gradient aggregators use "
        "mo.value_and_task_grads.")
  if len(found) > 1:
    raise ValueError(
        f"{what}: tx contains {len(found)} balancing methods "
        f"({[label for label, _ in found]}); one gradient of sum_i c_i L_i "
        "has one c: balance one partition, give the others mo.task_sum(K) "
        "or optax.identity().")
  return jax.lax.stop_gradient(found[0][1].weights)


def deprecated_method_form(tx: Any, method: Any, what: str) -> Any:
  if method is not None:
    if tx is not None:
      raise TypeError(f"{what}: give tx, not both tx and method=.")
    tx = method
  # The positional old form, (fn, method)(method_state, ...), is the new form
  # with tx = the method: the probe reads the method's own state just as
  # well, so it keeps working without a warning.
  if method is not None:
    warnings.warn(
        f"{what}(fn, method)(method_state, params, ...) is deprecated: pass "
        f"the whole transformation and its whole state, {what}(fn, tx)"
        "(opt_state, params, ...); the method is found inside it.",
        DeprecationWarning, stacklevel=3)
  if tx is None:
    raise TypeError(f"{what}: the transformation tx is required.")
  return tx


def weighted_backward(vjp_fn: Callable[[jax.Array], Any],
                      coefficients: jax.Array, losses: jax.Array,
                      masks: tuple[Any, ...] | None) -> tuple[Any, ...]:
  """``grad sum_i c_i L_i``; with ``masks``, the non-shared leaves get
  ``grad sum_i L_i`` instead (as ``value_and_task_grads(shared=)`` gives
  them), from a second pull-back of the same forward pass."""
  grads = vjp_fn(coefficients.astype(losses.dtype))
  if masks is None:
    return grads
  summed = vjp_fn(jnp.ones_like(losses))
  return tuple(merge(m, select(m, g, True), select(m, h, False))
               for m, g, h in zip(masks, grads, summed))


def value_and_weighted_grad(
    fn: Callable[..., Any], tx: Any = None, argnums: int | Sequence[int] = 0,
    has_aux: bool = False, *, shared: Any = None, method: Any = None
) -> Callable[..., tuple[Any, Any]]:
  """Task losses and the gradient of ONE weighted loss: the single-backward path.

  For the loss weightings (FAMO, MARIGOLD, uncertainty weighting, ...),
  which never need per-task gradients: ``wrapped(opt_state, params, *args)``
  returns ``(losses, grad sum_i c_i L_i)``, one forward and one backward
  pass whatever K is, where ``tx`` is the WHOLE transformation (any nesting
  of ``optax.chain``, ``optax.partition``, ``optax.inject_hyperparams``,
  ``optax.apply_if_finite``) and ``opt_state`` its whole state. Then the
  usual ``tx.update(grads, opt_state, params, task_losses=losses)``.

  How ``c`` is found (no attribute on ``tx``, so wrappers lose nothing): one
  probe ``tx.update(zeros, opt_state, params, task_losses=losses,
  weighting_probe=True)``; the loss weighting in the chain answers it with
  its state's ``weights`` set to the coefficients its real ``update`` uses on
  this state and these losses, advancing nothing else
  (:class:`~mtl_optax.LossWeightingTransformation`). That state is read
  back (:func:`mtl_optax.task_weights`' traversal) and the rest of the probe
  is discarded: under ``jit`` the chain's other transformations on the zero
  gradient are dead code. The probe runs inside ``tx``, so injected
  hyper-parameters are the ones used, and the real ``update`` recomputes the
  coefficients with the same code on the same inputs: the ``c`` of the
  gradient IS the ``c`` it records in ``weights`` (K numbers of work, which
  XLA may merge with the probe's under ``jit``; FAMO's pending logit step
  is taken once per call). ``c`` is a constant of the backward pass.

  Trunk-only balancing: ``optax.partition({'shared': mo.famo(K), 'head':
  mo.task_sum(K)}, labels)`` (or ``optax.identity()`` on the heads), the
  same partition as on the stacked path; by default the heads then receive
  ``grad sum_i c_i L_i`` like every leaf (head i scaled by ``c_i``). With
  ``shared=`` (the mask of :func:`value_and_task_grads`) the other leaves
  get ``grad sum_i L_i`` instead, as on the stacked path, from a second
  pull-back of the same forward pass (under jit, only the heads' part).

  Args:
    fn: function returning the ``(K,)`` task losses (``(losses, aux)`` with
      ``has_aux``).
    tx: the whole transformation; exactly one balancing method in it.
    argnums: which positional argument(s) of ``fn`` to differentiate (the
      parameters ``tx`` updates).
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    shared: optional mask of the shared leaves (see above).
    method: deprecated keyword alias of ``tx`` (``DeprecationWarning``).
      The old positional form ``(fn, method)(opt_state[0], params, ...)``
      still works unchanged: it is this form with ``tx`` the method alone.

  Example:
    >>> import jax, jax.numpy as jnp, optax, mtl_optax as mo
    >>> tx = optax.chain(optax.inject_hyperparams(mo.famo, static_args=(
    ...     'num_tasks',))(num_tasks=2, learning_rate=0.5), optax.sgd(0.1))
    >>> losses_fn = lambda w: jnp.stack([w[0] ** 2, 3 * w[1] ** 2])
    >>> w = jnp.array([2., 1.])
    >>> opt_state = tx.init(w)
    >>> for _ in range(3):
    ...   w_used = w
    ...   losses, grads = mo.value_and_weighted_grad(losses_fn, tx)(
    ...       opt_state, w)
    ...   updates, opt_state = tx.update(grads, opt_state, w,
    ...                                  task_losses=losses)
    ...   w = optax.apply_updates(w, updates)
    >>> c = mo.task_weights(opt_state)      # what the last update recorded
    >>> per_task = jnp.array([2 * w_used[0], 6 * w_used[1]])
    >>> print(bool(jnp.allclose(grads, c * per_task, rtol=1e-6)))
    True
  """
  what = "value_and_weighted_grad"
  tx = deprecated_method_form(tx, method, what)
  argnums_t, single = normalize_argnums(argnums)

  def wrapped(opt_state, *args, **kwargs):
    diff, rebuild = split_args(args, argnums_t)
    partial = lambda *d: fn(*rebuild(*d), **kwargs)
    if has_aux:
      losses, vjp_fn, aux = jax.vjp(partial, *diff, has_aux=True)
    else:
      losses, vjp_fn = jax.vjp(partial, *diff)
    check_loss_vector(losses, what)
    params = diff[0] if single else diff
    coefficients = probe_coefficients(
        tx, opt_state, params, jax.lax.stop_gradient(losses), what,
        base.is_loss_weighting_state)
    masks = (None if shared is None
             else shared_mask(shared, diff, single, what))
    grads = weighted_backward(vjp_fn, coefficients, losses, masks)
    grads = grads[0] if single else grads
    return ((losses, aux) if has_aux else losses), grads

  return wrapped


def value_and_representation_grads(
    encode: Callable[..., Any], task_losses_from_features: Callable[..., Any]
) -> Callable[..., tuple[Any, Any, Any, Callable[[Any], Any]]]:
  """Per-task gradients w.r.t. a shared representation, not the parameters.

  The cheap variant of gradient balancing (MGDA-UB, Sener & Koltun 2018;
  LibMTL's ``rep_grad``; TorchJD's ``mtl_backward(features=...)``): the K
  backward passes stop at the shared features ``z = encode(trunk, x)``, a
  method combines the stacked feature gradients ``dL_i/dz`` into one
  cotangent, and ONE backward pass through the encoder gives the trunk's
  update. Heads get the plain gradient of the summed losses. LibMTL's
  GradNorm sums its ``rep_grad`` over the batch before taking norms:
  ``feature_grads`` summed over the batch axis (``rep.sum(1)``) reproduces it.

  ``wrapped(trunk_params, head_params, encoder_input, *head_args)`` returns
  ``(losses, feature_grads, head_grads, encoder_vjp)``:

  * ``feature_grads``: the features' tree, every leaf ``(K, *z.shape)``;
  * ``head_grads``: ``d sum_i L_i / d head_params``;
  * ``encoder_vjp(feature_update) -> trunk_grads``: back-propagates the
    combined feature update through the encoder.

  Args:
    encode: ``(trunk_params, encoder_input) -> features``.
    task_losses_from_features: ``(head_params, features, *head_args) -> (K,)``.

  Example (with the mean as the method this is just the mean loss's
  gradient):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> encode = lambda w, x: jnp.tanh(x @ w)
    >>> heads = lambda h, z: jnp.stack([jnp.sum(z * h[0]), jnp.sum(z * h[1])])
    >>> losses, z_grads, h_grads, encoder_vjp = mo.value_and_representation_grads(
    ...     encode, heads)(jnp.eye(2), jnp.array([[1., 0.], [0., 1.]]),
    ...                    jnp.array([[0.5, -0.5]]))
    >>> mean = mo.linear_scalarization(2)
    >>> z_update, _ = mean.update(z_grads, mean.init(None))
    >>> print(z_grads.shape, np.asarray(encoder_vjp(z_update), np.float64).round(3))
    (2, 1, 2) [[ 0.197  0.197]
     [-0.197 -0.197]]
  """
  def wrapped(trunk_params, head_params, encoder_input, *head_args):
    features, encoder_vjp = jax.vjp(lambda t: encode(t, encoder_input),
                                    trunk_params)
    heads_fn = lambda h, z: task_losses_from_features(h, z, *head_args)
    losses, head_vjp = jax.vjp(heads_fn, head_params, features)
    if jnp.ndim(losses) != 1:
      raise ValueError("value_and_representation_grads: the heads must return "
                       f"a 1-D vector of task losses, got {jnp.shape(losses)}.")
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    head_rows, feature_grads = jax.vmap(head_vjp)(basis)
    head_grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), head_rows)
    return losses, feature_grads, head_grads, lambda u: encoder_vjp(u)[0]

  return wrapped
