"""Printable methods: a transformation that shows its factory call.

``print(mo.cagrad(3, c=0.4))`` prints
``cagrad(num_tasks=3, c=0.4, rescale=1, ...)``, the factory's name and every
argument after defaults are applied, as TorchJD's aggregators print. The
returned object is the factory's own transformation re-created as an
instance of a subclass of its class that only adds ``__repr__``: it is still
an ``optax.GradientTransformationExtraArgs`` (a NamedTuple: ``init, update =
tx`` unpacks), with the same functions and attributes, so ``optax.chain``,
``optax.inject_hyperparams`` and ``jax.jit`` see no difference.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable

import numpy as np
import optax

_NAMED_CLASSES: dict[type, type] = {}


def _format(value: Any) -> str:
  if isinstance(value, (bool, int, float, str, type(None))):
    return repr(value)
  if isinstance(value, optax.GradientTransformation):
    return repr(value)  # a printable method, or optax's own repr
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    try:
      array = np.asarray(value)
    except Exception:  # pylint: disable=broad-except  (a tracer)
      return f"<traced {value.dtype}{list(value.shape)}>"
    if array.size <= 8:
      return np.array2string(array, separator=", ")
    return f"<array {array.dtype}{list(array.shape)}>"
  if isinstance(value, (tuple, list)):
    inner = ", ".join(_format(v) for v in value)
    return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else (
        f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
  if callable(value) and not isinstance(value, tuple):
    return getattr(value, "__name__", type(value).__name__)
  return repr(value)


def _named_class(cls: type) -> type:
  """A subclass of ``cls`` with a ``__repr__`` read from the instance."""
  if cls not in _NAMED_CLASSES:
    def __repr__(self):  # pylint: disable=invalid-name
      return self.__dict__.get("_call_repr") or cls.__repr__(self)
    _NAMED_CLASSES[cls] = type(cls.__name__, (cls,), {
        "__repr__": __repr__, "__module__": cls.__module__,
        "__doc__": cls.__doc__})
  return _NAMED_CLASSES[cls]


def with_repr(tx: Any, text: str) -> Any:
  """``tx`` re-created as a printable instance showing ``text``."""
  if not isinstance(tx, optax.GradientTransformation) or not hasattr(
      tx, "_fields"):
    return tx
  named = _named_class(type(tx))(*tx)
  named.__dict__.update(getattr(tx, "__dict__", {}))
  named.__dict__["_call_repr"] = text
  return named


def printable(factory: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a public factory so that its transformation prints its call.

  Example:
    >>> import mtl_optax as mo
    >>> print(mo.mgda(2))
    mgda(num_tasks=2, max_iter=500, tol=None, warm_start=True)
  """
  signature = inspect.signature(factory)

  @functools.wraps(factory)
  def wrapped(*args, **kwargs):
    tx = factory(*args, **kwargs)
    try:
      with warnings.catch_warnings():  # the factory warned already
        warnings.simplefilter("ignore", DeprecationWarning)
        bound = signature.bind(*args, **kwargs)
    except TypeError:
      return tx
    bound.apply_defaults()
    parts = []
    for name, value in bound.arguments.items():
      kind = signature.parameters[name].kind
      if kind is inspect.Parameter.VAR_KEYWORD:
        parts.extend(f"{k}={_format(v)}" for k, v in value.items())
      elif kind is inspect.Parameter.VAR_POSITIONAL:
        parts.extend(_format(v) for v in value)
      else:
        parts.append(f"{name}={_format(value)}")
    return with_repr(tx, f"{factory.__name__}({', '.join(parts)})")

  return wrapped


def make_printable(namespace: dict, names) -> None:
  """Replaces each factory ``namespace[name]`` by :func:`printable` of it."""
  for name in names:
    namespace[name] = printable(namespace[name])


def is_factory(value: Any) -> bool:
  """A public method factory: a function taking ``num_tasks``."""
  return inspect.isfunction(value) and (
      "num_tasks" in inspect.signature(value).parameters)
