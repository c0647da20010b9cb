"""Flax glue: per-task gradients of NNX modules, train steps, Linen TrainState.

Everything here is a thin layer over the functional API of the library
(:func:`mtl_optax.value_and_task_grads`,
:func:`mtl_optax.value_and_weighted_grad`), so Flax models get exactly the
same methods as plain parameter trees.

Flax NNX
  * :func:`nnx_value_and_task_grads`: ``(model, *args) -> (losses, grads)``,
    ``grads`` an ``nnx.State`` shaped like the model's parameters with a
    leading task axis on every leaf.
  * :func:`nnx_value_and_weighted_grad`: the single-backward path
    (loss-weighting methods, FAMO, MARIGOLD) for NNX modules.
  * :func:`nnx_value_and_gram_weighted_grad`: the Gram-first path.
  * :func:`nnx_loss_fn`: the ``params -> (K,)`` closure on the current batch
    that look-ahead methods take as ``loss_fn``.
  * :func:`nnx_train_step`: a jitted multi-task train step around
    ``nnx.Optimizer``. ``nnx.Optimizer.update(model, grads, **kwargs)``
    forwards its keyword arguments to ``tx.update`` (flax >= 0.11), so
    ``task_losses`` and ``loss_fn`` reach the method.

Flax Linen
  * :func:`apply_task_gradients`: what ``TrainState.apply_gradients`` cannot
    do: its keyword arguments replace dataclass fields and never reach
    ``tx.update``.

Both
  * :func:`label_by_path`: labels parameter leaves by path (shared trunk vs
    task heads, or per block) for ``optax.partition``.

Flax is imported lazily, on the first call.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Hashable, Mapping, Sequence
import warnings

import jax
import optax

from mtl_optax._src import grads as grads_lib
from mtl_optax._src import base

__all__ = ("apply_task_gradients", "label_by_path", "nnx_loss_fn",
           "nnx_train_step", "nnx_value_and_gram_weighted_grad",
           "nnx_value_and_task_grads", "nnx_value_and_weighted_grad")


def _nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx


def _param_filter(wrt):
  return _nnx().Param if wrt is None else wrt


# ---------------------------------------------------------------------------
# Labelling by path, for optax.partition.
# ---------------------------------------------------------------------------

_GLOB_CHARS = frozenset("*?[")


def _key_name(key: Any) -> str:
  tu = jax.tree_util
  if isinstance(key, tu.DictKey):
    return str(key.key)
  if isinstance(key, tu.SequenceKey):
    return str(key.idx)
  if isinstance(key, tu.GetAttrKey):
    return key.name
  if isinstance(key, tu.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _path_names(path: Sequence[Any]) -> tuple[str, ...]:
  names = tuple(_key_name(k) for k in path)
  # nnx.Variable nodes add a trailing ``.value``; it is not part of the name.
  if names and names[-1] == "value" and isinstance(
      path[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return names


def label_by_path(
    rules: Mapping[str, Hashable] | Sequence[tuple[str, Hashable]],
    default: Hashable | None = None) -> Callable[[Any], Any]:
  """Labels parameter leaves by their path, for ``optax.partition``.

  A leaf's path is the ``/``-joined sequence of its keys: ``trunk/kernel``,
  ``heads/0/bias`` (a Linen ``params`` dict, an ``nnx.State``, any pytree;
  the ``.value`` of NNX variables is dropped). A rule ``pattern -> label``
  matches when ``pattern`` is a prefix of the path made of whole components
  (``"heads"`` matches ``heads/0/bias``, not ``heads_extra/w``), or, if the
  pattern contains ``*``, ``?`` or ``[``, when it matches the whole path as a
  shell glob (``"*/head_*"``). The first matching rule wins (rules are tried
  in order); leaves that match none get ``default``, or raise a
  ``ValueError`` naming the leaf when ``default`` is None.

  The result is a function ``tree -> labels`` (same structure), which
  ``optax.partition`` calls on the parameters at ``init`` and on the stacked
  task gradients at ``update``: since it reads only paths it labels both
  alike, and it works for the ``nnx.State`` of ``nnx.Optimizer``.

  Args:
    rules: mapping (or sequence of pairs) from path pattern to label.
    default: label of leaves that match no rule.

  Returns:
    A function mapping a pytree to the same tree of labels.

  Example (the method on the shared trunk, a plain task sum on the heads):
    >>> import jax.numpy as jnp, optax, mtl_optax as mo
    >>> params = {'trunk': {'w': jnp.ones(3)},
    ...           'heads': [{'w': jnp.ones(3)}, {'w': jnp.ones(3)}]}
    >>> labels = mo.label_by_path({'trunk': 'shared', 'heads': 'head'})
    >>> print(labels(params))
    {'heads': [{'w': 'head'}, {'w': 'head'}], 'trunk': {'w': 'shared'}}
    >>> tx = optax.partition({'shared': mo.cagrad(2, c=0.4),
    ...                       'head': mo.task_sum(2)}, labels)
  """
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  compiled = []
  for pattern, label in items:
    if not isinstance(pattern, str):
      raise TypeError(f"label_by_path: patterns must be strings, got "
                      f"{pattern!r}.")
    if _GLOB_CHARS & set(pattern):
      compiled.append((True, pattern, label))
    else:
      compiled.append((False, tuple(p for p in pattern.split("/") if p),
                       label))

  def label_of(path):
    names = _path_names(path)
    joined = "/".join(names)
    for is_glob, pattern, label in compiled:
      if is_glob:
        if fnmatch.fnmatchcase(joined, pattern):
          return label
      elif names[:len(pattern)] == pattern:
        return label
    if default is None:
      raise ValueError(
          f"label_by_path: leaf '{joined}' matches no rule "
          f"({[p for p, _ in items]}) and no default label was given.")
    return default

  def labeller(tree):
    return jax.tree_util.tree_map_with_path(lambda p, _: label_of(p), tree)

  return labeller


# ---------------------------------------------------------------------------
# Flax NNX.
# ---------------------------------------------------------------------------


def _fresh(state):
  """A copy of an ``nnx.State`` with new variable objects, same values."""
  return jax.tree.map(lambda x: x, state)


def _split_model(model, wrt):
  nnx = _nnx()
  return nnx.split(model, _param_filter(wrt), ...)


def _pure_losses(fn, graphdef, rest, wrt, has_aux, args, kwargs):
  """``params -> (losses, (aux, new_rest))`` for the differentiation.

  The module is rebuilt from ``params`` with fresh copies of its other
  variables (the model's own cannot be mutated from inside the
  differentiation's trace); their new values come back in ``new_rest`` and
  are written to the model afterwards, as ``nnx.grad`` does.
  """
  nnx = _nnx()

  def pure(params):
    m = nnx.merge(graphdef, params, _fresh(rest))
    out = fn(m, *args, **kwargs)
    losses, aux = out if has_aux else (out, None)
    _, _, new_rest = _split_model(m, wrt)
    return losses, (aux, new_rest)

  return pure


def nnx_value_and_task_grads(
    fn: Callable[..., Any], wrt: Any = None,
    has_aux: bool = False, *, chunk_size: int | str | None = "auto",
    unroll: bool = False, shared: Any = None
) -> Callable[..., tuple[Any, Any]]:
  """Per-task losses and gradients of an ``nnx.Module``.

  ``fn(model, *args, **kwargs)`` returns the ``(K,)`` task losses (or
  ``(losses, aux)`` with ``has_aux``). The wrapped function
  ``wrapped(model, *args, **kwargs)`` returns ``(losses, grads)``, where
  ``grads`` is an ``nnx.State`` of the variables selected by ``wrt`` (the
  structure ``nnx.grad`` returns), every leaf with a leading task axis
  ``(K, *shape)``: row ``i`` is ``d losses[i] / d params``. One forward pass
  and K vmapped backward passes (:func:`mtl_optax.value_and_task_grads`).

  Like ``nnx.grad``, changes the forward pass makes to the model's other
  state (BatchNorm statistics, RNG counters, counters) are written back to
  ``model``. Works eagerly, under ``nnx.jit``, and inside ``jax.jit`` /
  ``lax.scan`` on a module rebuilt there with ``nnx.merge`` (a functional
  training loop).

  Args:
    fn: ``(model, *args) -> (K,)`` task losses.
    wrt: an NNX filter of the variables to differentiate (default
      ``nnx.Param``), as in ``nnx.grad`` and ``nnx.Optimizer(wrt=...)``.
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    chunk_size, unroll: how the K backward passes are batched, as in
      :func:`mtl_optax.value_and_task_grads` (default ``"auto"``: one task
      at a time on a CPU, where ``nnx.Linear``'s ``(in, out)`` kernels make
      the vmap slower; the vmap on accelerators; ``None``: the vmap).
    shared: the mask of the shared leaves (a function of the parameters'
      ``nnx.State``, e.g. from :func:`label_by_path`): only they get
      per-task gradients, the heads the gradient of the summed loss
      (:func:`mtl_optax.value_and_task_grads`).

  Returns:
    The wrapped function.

  Example:
    >>> import jax.numpy as jnp, mtl_optax as mo
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    >>> fn = lambda m, x: jnp.sum(m(x) ** 2, axis=0)   # one loss per output
    >>> losses, grads = mo.nnx_value_and_task_grads(fn)(model, jnp.ones((4, 2)))
    >>> print(losses.shape, grads['kernel'].shape, grads['bias'].shape)
    (2,) (2, 2, 2) (2, 2)
  """

  def wrapped(model, *args, **kwargs):
    nnx = _nnx()
    graphdef, params, rest = _split_model(model, wrt)
    pure = _pure_losses(fn, graphdef, rest, wrt, has_aux, args, kwargs)
    (losses, (aux, new_rest)), grads = grads_lib.value_and_task_grads(
        pure, has_aux=True, chunk_size=chunk_size, unroll=unroll,
        shared=shared)(params)
    nnx.update(model, new_rest)
    return ((losses, aux) if has_aux else losses), grads

  return wrapped


def nnx_value_and_weighted_grad(
    fn: Callable[..., Any], tx: Any = None, wrt: Any = None,
    has_aux: bool = False, *, shared: Any = None,
    method: Any = None) -> Callable[..., tuple[Any, Any]]:
  """The single-backward path for an ``nnx.Module``.

  ``wrapped(opt_state, model, *args)`` returns ``(losses, grads)`` with
  ``grads`` the gradient (an ``nnx.State`` like ``nnx.grad``'s, no task
  axis) of ONE weighted loss ``sum_i c_i L_i``: ``tx`` is the optimizer's
  whole transformation (``optimizer.tx``) and ``opt_state`` its whole state
  (``optimizer.opt_state``, variables or pure); the loss weighting inside
  it is found and probed as in :func:`mtl_optax.value_and_weighted_grad`, so
  ``c`` is exactly what ``optimizer.update(model, grads,
  task_losses=losses)`` records. One forward and one backward pass.

  Args:
    fn: ``(model, *args) -> (K,)`` task losses.
    tx: the whole transformation of the ``nnx.Optimizer``.
    wrt: NNX filter of the differentiated variables (default ``nnx.Param``).
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    shared: optional mask of the shared leaves (the heads then get the
      gradient of the summed loss).
    method: deprecated keyword alias of ``tx``.

  Returns:
    The wrapped function.

  Example:
    >>> import jax.numpy as jnp, optax, mtl_optax as mo
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    >>> fn = lambda m, x: jnp.sum(m(x) ** 2, axis=0)
    >>> opt = nnx.Optimizer(model, optax.chain(mo.gls(2), optax.sgd(0.1)),
    ...                     wrt=nnx.Param)
    >>> losses, grads = mo.nnx_value_and_weighted_grad(fn, opt.tx)(
    ...     opt.opt_state, model, jnp.ones((4, 2)))
    >>> _ = opt.update(model, grads, task_losses=losses)
    >>> print(losses.shape, grads['kernel'].shape, mo.task_weights(
    ...     opt.opt_state).shape)
    (2,) (2, 2) (2,)
  """
  tx = grads_lib.deprecated_method_form(tx, method,
                                        "nnx_value_and_weighted_grad")

  def wrapped(opt_state, model, *args, **kwargs):
    nnx = _nnx()
    graphdef, params, rest = _split_model(model, wrt)
    pure = _pure_losses(fn, graphdef, rest, wrt, has_aux, args, kwargs)
    (losses, (aux, new_rest)), grads = grads_lib.value_and_weighted_grad(
        pure, tx, has_aux=True, shared=shared)(nnx.as_pure(opt_state),
                                               params)
    nnx.update(model, new_rest)
    return ((losses, aux) if has_aux else losses), grads

  return wrapped


def nnx_value_and_gram_weighted_grad(
    fn: Callable[..., Any], tx: Any, wrt: Any = None, has_aux: bool = False,
    *, shared: Any = None, chunk_size: int | None = 1
) -> Callable[..., tuple[Any, Any]]:
  """The Gram-first path for an ``nnx.Module``.

  ``wrapped(opt_state, model, *args)`` returns ``((losses, gram), grads)``
  as :func:`mtl_optax.value_and_gram_weighted_grad` does, for
  ``optimizer.update(model, grads, task_losses=losses, gram=gram)``:
  ``tx`` and ``opt_state`` are the optimizer's whole transformation and
  state, and at most ``chunk_size`` per-task gradients are alive at once.

  Args:
    fn, tx, wrt, has_aux: as in :func:`nnx_value_and_weighted_grad` (the
      ``(K,)`` task losses of ``(model, *args)``, the optimizer's whole
      transformation, the NNX filter of the differentiated variables).
    shared: optional mask of the shared leaves (the Gram matrix is over
      them; the heads get the gradient of the summed loss).
    chunk_size: per-task gradients alive at once (default 1: the memory of
      one gradient; ``None``: all K at once).

  Returns:
    The wrapped function.
  """
  from mtl_optax._src import gram_first  # pylint: disable=g-import-not-at-top

  def wrapped(opt_state, model, *args, **kwargs):
    nnx = _nnx()
    graphdef, params, rest = _split_model(model, wrt)
    pure = _pure_losses(fn, graphdef, rest, wrt, has_aux, args, kwargs)
    ((losses, (aux, new_rest)), gram), grads = (
        gram_first.value_and_gram_weighted_grad(
            pure, tx, has_aux=True, shared=shared, chunk_size=chunk_size)(
                nnx.as_pure(opt_state), params))
    nnx.update(model, new_rest)
    return (((losses, aux) if has_aux else losses), gram), grads

  return wrapped


def nnx_loss_fn(fn: Callable[..., Any], model: Any, *args: Any,
                wrt: Any = None, has_aux: bool = False,
                **kwargs: Any) -> Callable[[Any], Any]:
  """The ``loss_fn`` extra argument for an NNX model on the current batch.

  Returns ``loss_fn(params) -> (K,)``: ``fn(model', *args)`` where ``model'``
  is ``model`` with its ``wrt`` variables replaced by ``params``, which may
  be the pure ``nnx.State`` that ``nnx.Optimizer`` passes to ``tx.update``
  or a state of variables. Inside ``optax.partition`` a look-ahead method
  (``mo.it_mtl``, ``mo.track_affinity``, ...) passes ``optax.MaskedNode`` for
  the leaves outside its partition: those keep their current values (e.g.
  the heads stay fixed while the shared trunk looks ahead). The model's other
  state is read as it is now; whatever the look-ahead forward passes change
  in it is discarded.

  Args:
    fn: ``(model, *args) -> (K,)`` task losses (``(losses, aux)`` with
      ``has_aux``; the aux is dropped).
    model: the ``nnx.Module``.
    *args: ``fn``'s other arguments (the batch).
    wrt: NNX filter of the parameters (default ``nnx.Param``).
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    **kwargs: ``fn``'s keyword arguments.

  Returns:
    ``params -> (K,)`` losses.
  """
  nnx = _nnx()
  graphdef, current, rest = _split_model(model, wrt)
  current = nnx.as_pure(current)

  def loss_fn(params):
    out = fn(nnx.merge(graphdef, params, _fresh(rest)), *args, **kwargs)
    return out[0] if has_aux else out

  # Inside optax.partition a method sees its own leaves only; the others
  # arrive as MaskedNode and keep their current values.
  return base.masked_loss_fn(loss_fn, current)


_PATHS = ("stacked", "weighted", "gram")


def nnx_train_step(
    fn: Callable[..., Any], *, path: str | None = None, wrt: Any = None,
    has_aux: bool = False, pass_loss_fn: bool = True, shared: Any = None,
    jit: bool = True, chunk_size: int | str | None = "auto",
    unroll: bool = False, method: Any = None,
    method_state: Callable[[Any], Any] | None = None) -> Callable[..., Any]:
  """A multi-task train step for an ``nnx.Module`` and an ``nnx.Optimizer``.

  ``step(model, optimizer, *args, **kwargs)`` computes the task losses
  ``fn(model, *args, **kwargs)`` and the gradients for ``optimizer.tx``,
  then calls ``optimizer.update(model, grads, task_losses=losses,
  loss_fn=loss_fn)``, which forwards the keyword arguments to ``tx.update``
  (``loss_fn`` is :func:`nnx_loss_fn` on the same batch; ``pass_loss_fn=
  False`` leaves it out). It updates ``model`` and ``optimizer`` in place
  and returns the losses (``(losses, aux)`` with ``has_aux``); the weights
  the method used are ``mo.task_weights(optimizer.opt_state)``.

  Gradients (``path``), one contract for the three training paths:
    * ``"stacked"`` (default): per-task gradients
      (:func:`nnx_value_and_task_grads`), for every method.
    * ``"weighted"``: the single-backward path
      (:func:`nnx_value_and_weighted_grad`): the loss weighting inside
      ``optimizer.tx`` (FAMO, MARIGOLD, ...) is found by itself.
    * ``"gram"``: the Gram-first path
      (:func:`nnx_value_and_gram_weighted_grad`) for Gram weightings, at the
      memory of ``chunk_size`` gradients; ``gram`` is passed to the update.

  Trunk and heads: build the optimizer on ``optax.partition({'shared':
  method, 'head': mo.task_sum(K)}, labels)`` and pass ``shared=`` the mask
  of the trunk (e.g. ``lambda p: jax.tree.map(lambda l: l == 'shared',
  labels(p))``): the heads' gradient is then never stacked, on every path.

  Args:
    fn: ``(model, *args) -> (K,)`` task losses.
    path: ``"stacked"``, ``"weighted"`` or ``"gram"``.
    wrt: NNX filter of the trained variables (default ``nnx.Param``); must
      match the optimizer's ``wrt``.
    has_aux: whether ``fn`` returns ``(losses, aux)``.
    pass_loss_fn: whether to pass ``loss_fn`` (look-ahead methods need it;
      tracing a closure costs nothing when the method ignores it).
    shared: optional mask of the shared leaves.
    jit: wrap the step in ``nnx.jit``.
    chunk_size, unroll: batching of the K backward passes (stacked path,
      default ``"auto"``: by backend, :func:`mtl_optax.value_and_task_grads`;
      ``chunk_size`` also bounds the Gram-first path's gradients, one at a
      time by default).
    method, method_state: deprecated (the old single-backward form):
      ``method=`` means ``path="weighted"``; the method and its state are
      now found in the optimizer.

  Returns:
    ``step(model, optimizer, *args, **kwargs) -> losses``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, mtl_optax as mo
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, optax.chain(mo.mgda(2), optax.sgd(0.1)), wrt=nnx.Param)
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> y = jnp.stack([x[:, 0], x[:, 1]], axis=1)
    >>> fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2, axis=0)
    >>> step = mo.nnx_train_step(fn)
    >>> first = step(model, optimizer, x, y)
    >>> for _ in range(20):
    ...   last = step(model, optimizer, x, y)
    >>> print(bool(jax.numpy.all(last < first)), int(optimizer.step[...]))
    True 21
  """
  if method is not None or method_state is not None:
    warnings.warn(
        "nnx_train_step(fn, method=...) is deprecated: use nnx_train_step("
        "fn, path='weighted'); the loss weighting and its state are found in "
        "optimizer.tx and optimizer.opt_state.", DeprecationWarning,
        stacklevel=2)
    path = path or "weighted"
  path = path or "stacked"
  if path not in _PATHS:
    raise ValueError(f"nnx_train_step: path must be one of {_PATHS}, got "
                     f"{path!r}.")

  def step(model, optimizer, *args, **kwargs):
    extra = {}
    if path == "stacked":
      out, grads = nnx_value_and_task_grads(
          fn, wrt=wrt, has_aux=has_aux, chunk_size=chunk_size,
          unroll=unroll, shared=shared)(model, *args, **kwargs)
    elif path == "weighted":
      out, grads = nnx_value_and_weighted_grad(
          fn, optimizer.tx, wrt=wrt, has_aux=has_aux, shared=shared)(
              optimizer.opt_state, model, *args, **kwargs)
    else:
      (out, extra["gram"]), grads = nnx_value_and_gram_weighted_grad(
          fn, optimizer.tx, wrt=wrt, has_aux=has_aux, shared=shared,
          chunk_size=1 if chunk_size is None else chunk_size)(
              optimizer.opt_state, model, *args, **kwargs)
    losses = out[0] if has_aux else out
    extra["task_losses"] = losses
    if pass_loss_fn:
      extra["loss_fn"] = nnx_loss_fn(fn, model, *args, wrt=wrt,
                                     has_aux=has_aux, **kwargs)
    optimizer.update(model, grads, **extra)
    return out

  return _nnx().jit(step) if jit else step


# ---------------------------------------------------------------------------
# Flax Linen.
# ---------------------------------------------------------------------------


def apply_task_gradients(state: Any, grads: Any, *, task_losses: Any = None,
                         loss_fn: Callable[[Any], Any] | None = None,
                         **extra_args: Any) -> Any:
  """``TrainState.apply_gradients`` for multi-task methods (Flax Linen).

  ``flax.training.train_state.TrainState.apply_gradients(grads=...,
  **kwargs)`` uses its keyword arguments to ``.replace()`` dataclass fields
  and calls ``tx.update(grads, opt_state, params)`` with nothing else, so a
  method never sees ``task_losses`` or ``loss_fn``. This helper calls
  ``state.tx.update(grads, state.opt_state, state.params,
  task_losses=..., loss_fn=..., **extra_args)`` (only the arguments given),
  applies the updates, and returns ``state.replace(step=step + 1,
  params=..., opt_state=...)``. It works for any TrainState subclass (or
  any dataclass with ``step``, ``params``, ``tx``, ``opt_state`` and
  ``replace``) and under ``jax.jit``.

  ``grads`` are the stacked per-task gradients of ``state.params``
  (``mo.value_and_task_grads(lambda p: task_losses(p, batch))(state.params)``)
  or, for single-backward methods, the gradient of
  ``mo.value_and_weighted_grad(fn, state.tx)(state.opt_state,
  state.params, batch)``. Heads not stacked (Linen): label the params for
  ``optax.partition({'shared': method, 'head': mo.task_sum(K)}, labels)``
  and pass the same mask to ``value_and_task_grads(fn, shared=mask)``. ``loss_fn`` is
  ``lambda p: task_losses(p, batch)``: the params it receives have the
  structure of ``state.params``.

  Args:
    state: a Linen ``TrainState``.
    grads: gradients for ``state.tx``.
    task_losses: ``(K,)`` task losses, forwarded when given.
    loss_fn: ``params -> (K,)`` losses on the current batch, forwarded when
      given.
    **extra_args: other keyword arguments for ``tx.update``.

  Returns:
    The new state.

  Example:
    >>> import jax, jax.numpy as jnp, optax, mtl_optax as mo
    >>> import flax.linen as nn
    >>> from flax.training import train_state
    >>> module = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> y = jnp.stack([x[:, 0], x[:, 1]], axis=1)
    >>> state = train_state.TrainState.create(
    ...     apply_fn=module.apply,
    ...     params=module.init(jax.random.key(1), x)['params'],
    ...     tx=optax.chain(mo.cagrad(2, c=0.4), optax.sgd(0.1)))
    >>> fn = lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2, 0)
    >>> losses, grads = mo.value_and_task_grads(fn)(state.params)
    >>> state = mo.apply_task_gradients(state, grads, task_losses=losses,
    ...                                 loss_fn=fn)
    >>> print(int(state.step), bool(jnp.all(fn(state.params) < losses)))
    1 True
  """
  if task_losses is not None:
    extra_args["task_losses"] = task_losses
  if loss_fn is not None:
    extra_args["loss_fn"] = loss_fn
  updates, new_opt_state = state.tx.update(grads, state.opt_state,
                                           state.params, **extra_args)
  new_params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=new_params,
                       opt_state=new_opt_state)
