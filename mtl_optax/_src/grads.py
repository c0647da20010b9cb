"""Per-task gradients, stacked on a leading task axis."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mtl_optax._src import validation


def _normalize_argnums(argnums: int | Sequence[int]) -> tuple[tuple[int, ...], bool]:
  validation.check_argnums(argnums)
  if isinstance(argnums, int):
    return (argnums,), True
  argnums = tuple(argnums)
  if not argnums or not all(isinstance(a, int) for a in argnums):
    raise TypeError(f"argnums must be an int or a non-empty tuple of ints, "
                    f"got {argnums!r}.")
  return argnums, False


def _split_args(args, argnums):
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


def _check_chunking(chunk_size: int | None, unroll: bool) -> None:
  if not isinstance(unroll, bool):
    raise TypeError(f"unroll must be a bool, got {unroll!r}.")
  if chunk_size is None:
    if unroll:
      raise ValueError("unroll=True unrolls chunks: give a chunk_size too.")
    return
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
    raise TypeError(f"chunk_size must be None or a positive int, got "
                    f"{chunk_size!r}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")


def _task_rows(vjp_fn: Callable[[jax.Array], Any], basis: jax.Array,
               chunk_size: int | None, unroll: bool) -> Any:
  """``vjp_fn`` applied to every row of ``basis``, stacked on axis 0.

  One vmap over all rows, or rows ``chunk_size`` at a time: in a loop
  (``lax.map``) or unrolled into the program.
  """
  num_rows = basis.shape[0]
  if chunk_size is None or chunk_size >= num_rows:
    return jax.vmap(vjp_fn)(basis)
  if not unroll:
    # batch_size=1 would still vmap a size-1 axis; the plain map is cheaper.
    return jax.lax.map(vjp_fn, basis,
                       batch_size=None if chunk_size == 1 else chunk_size)
  chunks = []
  for start in range(0, num_rows, chunk_size):
    if chunk_size == 1:
      chunks.append(jax.tree.map(lambda g: g[None], vjp_fn(basis[start])))
    else:
      chunks.append(jax.vmap(vjp_fn)(basis[start:start + chunk_size]))
  return jax.tree.map(lambda *rows: jnp.concatenate(rows), *chunks)


def value_and_task_grads(
    fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
    has_aux: bool = False, *, chunk_size: int | None = None,
    unroll: bool = False) -> Callable[..., tuple[Any, Any]]:
  """Per-task losses and gradients for a vector of losses on a shared batch.

  ``fn(*args)`` returns the ``(K,)`` task losses (``(losses, aux)`` with
  ``has_aux``). The wrapped function returns ``(losses, grads)`` (or
  ``((losses, aux), grads)``) exactly like ``jax.value_and_grad``, except
  that every gradient leaf carries a leading task axis: ``(K, *leaf.shape)``,
  row ``i`` being ``d losses[i] / d params``. Costs one forward pass and K
  vmapped backward passes (a reverse-mode Jacobian).

  By default the K backward passes run as one ``jax.vmap``. With
  ``chunk_size=c`` they run ``c`` tasks at a time (TorchJD's
  ``parallel_chunk_size``): fewer backward intermediates alive at once, and
  on a CPU often faster. Measured on a 2-core CPU, K = 2 to 40
  (``benchmarks/bench_task_grads.py``): for dense layers with Flax's
  ``(in, out)`` kernels, whose vmapped weight gradient XLA computes
  transposed and then copies, ``chunk_size=1`` takes 0.72-0.83x the vmap's
  time (with torch's ``(out, in)`` kernels there is no gain); a conv net is
  ~10x slower in the loop (XLA:CPU runs convolutions slowly inside loops)
  but ``chunk_size=1, unroll=True`` takes 0.33-0.81x the vmap's time, at a
  longer compile. On accelerators keep the default.

  ``fn`` may also return a Python list or tuple of K scalar losses (the
  TorchJD habit); they are stacked into the ``(K,)`` vector for you.

  Args:
    fn: function returning a 1-D array of K task losses (or a list/tuple of
      K scalars).
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    chunk_size: None (all K backward passes in one vmap) or the number of
      tasks back-propagated together; the results are identical.
    unroll: unroll the chunks into the program instead of a ``lax.map``
      loop (compile time grows with K / chunk_size); needs ``chunk_size``.

  Returns:
    The wrapped function.

  Example:
    >>> import jax.numpy as jnp, mtl_optax as mo
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
  argnums_t, single = _normalize_argnums(argnums)
  _check_chunking(chunk_size, unroll)

  def wrapped(*args, **kwargs):
    diff, rebuild = _split_args(args, argnums_t)
    partial = lambda *d: validation.as_loss_vector(
        fn(*rebuild(*d), **kwargs), has_aux, "value_and_task_grads")
    if has_aux:
      losses, vjp_fn, aux = jax.vjp(partial, *diff, has_aux=True)
    else:
      losses, vjp_fn = jax.vjp(partial, *diff)
    if jnp.ndim(losses) != 1:
      raise ValueError(
          "value_and_task_grads: fn must return a 1-D vector of task losses, "
          f"got shape {jnp.shape(losses)}. For a scalar loss per task batch use "
          "mo.value_and_task_grads_from_batches.")
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    grads = _task_rows(vjp_fn, basis, chunk_size, unroll)
    grads = grads[0] if single else grads
    return ((losses, aux) if has_aux else losses), grads

  return wrapped


def value_and_task_grads_from_batches(
    task_loss: Callable[..., Any], argnums: int = 0, batch_argnum: int = 1,
    has_aux: bool = False, num_tasks: int | None = None
) -> Callable[..., tuple[Any, Any]]:
  """Per-task gradients when every task has its own batch.

  For multi-task RL or multi-input data sets: ``task_loss(params, batch)``
  returns ONE scalar loss for one task's batch; the argument at
  ``batch_argnum`` carries a leading task axis (each leaf ``(K, ...)``) and
  is ``jax.vmap``-ed over, with the parameters shared. Returns
  ``(losses (K,), grads)`` like :func:`value_and_task_grads`. To use a
  different function per task, dispatch on a task index stored in the batch
  (``jax.lax.switch``).

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
  grad_fn = jax.value_and_grad(task_loss, argnums=argnums, has_aux=has_aux)

  def wrapped(*args, **kwargs):
    args = validation.task_batches(args, batch_argnum, num_tasks,
                                   "value_and_task_grads_from_batches")
    in_axes = [None] * len(args)
    in_axes[batch_argnum] = 0
    return jax.vmap(lambda *a: grad_fn(*a, **kwargs), in_axes=in_axes)(*args)

  return wrapped


def value_and_weighted_grad(
    fn: Callable[..., Any], method: Any, argnums: int | Sequence[int] = 0,
    has_aux: bool = False) -> Callable[..., tuple[Any, Any]]:
  """Task losses and the gradient of ONE weighted loss: the single-backward path.

  For methods that never need per-task gradients (MARIGOLD, FAMO, the loss
  weightings): ``method`` is such a transformation (a
  ``LossWeightingTransformation``); its ``loss_weights(state, losses)`` gives
  the coefficients ``c`` and the wrapped function returns
  ``(losses, grad sum_i c_i L_i)``: one forward and one backward pass,
  whatever K is. The coefficients are constants of the backward pass.

  The wrapped function takes the method's own state first, then ``fn``'s
  arguments: ``wrapped(method_state, *args)``. In
  ``optax.chain(method, optax.adam(...))`` the method's state is
  ``opt_state[0]``.

  Args:
    fn: function returning the ``(K,)`` task losses (``(losses, aux)`` with
      ``has_aux``).
    method: the transformation whose ``loss_weights`` gives the weights.
    argnums: which positional argument(s) of ``fn`` to differentiate.
    has_aux: whether ``fn`` returns ``(losses, aux)``.

  Example:
    >>> import jax.numpy as jnp, optax, mtl_optax as mo
    >>> from mtl_optax._src.base import loss_weighting_transformation
    >>> fixed = loss_weighting_transformation(
    ...     lambda p: (), lambda u, s, p=None, **kw: (u, s),
    ...     lambda state, losses: jnp.array([0.25, 0.75]))
    >>> losses_fn = lambda w: jnp.stack([w[0] ** 2, 3 * w[1]])
    >>> losses, grads = mo.value_and_weighted_grad(losses_fn, fixed)(
    ...     (), jnp.array([2., 1.]))
    >>> print(losses, grads)
    [4. 3.] [1.   2.25]
  """
  weights_fn = getattr(method, "loss_weights", None)
  if weights_fn is None:
    raise TypeError(
        "value_and_weighted_grad: method has no loss_weights rule; it must be a "
        "single-backward method (e.g. mo.famo, mo.marigold), not a stacked-"
        "gradient aggregator (use mo.value_and_task_grads for those).")
  argnums_t, single = _normalize_argnums(argnums)

  def wrapped(method_state, *args, **kwargs):
    diff, rebuild = _split_args(args, argnums_t)
    partial = lambda *d: fn(*rebuild(*d), **kwargs)
    if has_aux:
      losses, vjp_fn, aux = jax.vjp(partial, *diff, has_aux=True)
    else:
      losses, vjp_fn = jax.vjp(partial, *diff)
    if jnp.ndim(losses) != 1:
      raise ValueError("value_and_weighted_grad: fn must return a 1-D vector "
                       f"of task losses, got shape {jnp.shape(losses)}.")
    weights = jax.lax.stop_gradient(weights_fn(method_state, losses))
    grads = vjp_fn(weights.astype(losses.dtype))
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
  update. Heads get the plain gradient of the summed losses.

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
