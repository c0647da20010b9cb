"""Deprecated spellings of the public API, kept working for one release."""

from __future__ import annotations

import functools
import importlib
import sys
import types
import warnings


class _MovedModule(types.ModuleType):
  """A former public module, now private: attribute access warns once per
  name and forwards to the private module."""

  def __init__(self, old_name: str, new_name: str):
    super().__init__(old_name)
    self._new_name = new_name

  def __getattr__(self, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    warnings.warn(
        f"{self.__name__} is deprecated: import the public names from "
        f"mtl_optax (e.g. mtl_optax.{attr}).", DeprecationWarning,
        stacklevel=2)
    return getattr(importlib.import_module(self._new_name), attr)


def alias_moved_modules(package: str, names: tuple[str, ...]) -> None:
  """Keeps ``import {package}.{name}`` working for modules moved to _src."""
  for name in names:
    sys.modules.setdefault(f"{package}.{name}",
                           _MovedModule(f"{package}.{name}",
                                        f"{package}._src.{name}"))


def renamed_arguments(**renames):
  """Keeps old keyword-argument spellings of a factory working, with a warning.

  ``renames`` maps an old name to the new one, or to ``(new, convert)`` when
  the meaning changed too (e.g. an EMA weight of the new value becoming
  optax's ``decay``: ``beta=("decay", lambda b: 1 - b)``). Passing both the
  old and the new name is an error.

  Example:
    >>> import warnings
    >>> @renamed_arguments(optim_niter="max_iter")
    ... def solve(num_tasks, max_iter=20):
    ...   return max_iter
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   print(solve(2, optim_niter=5), caught[0].category.__name__)
    5 DeprecationWarning
  """
  table = {old: (new if isinstance(new, tuple) else (new, None))
           for old, new in renames.items()}

  def decorate(factory):
    @functools.wraps(factory)
    def wrapped(*args, **kwargs):
      for old, (new, convert) in table.items():
        if old not in kwargs:
          continue
        if new in kwargs:
          raise TypeError(f"{factory.__name__}: got both {old}= (deprecated) "
                          f"and {new}=; pass {new}= only.")
        value = kwargs.pop(old)
        warnings.warn(
            f"{factory.__name__}({old}=...) is deprecated: use {new}="
            + ("" if convert is None else " (see the docstring: the value's "
               "meaning changed)") + ".", DeprecationWarning, stacklevel=2)
        kwargs[new] = value if convert is None else convert(value)
      return factory(*args, **kwargs)
    wrapped.renamed_arguments = dict(renames)
    return wrapped
  return decorate


def renamed_field(new: str, old: str) -> property:
  """A read-only property ``old`` of a NamedTuple state, forwarding (with a
  DeprecationWarning) to the renamed field ``new``."""
  def get(self):
    warnings.warn(f"{type(self).__name__}.{old} is deprecated: use .{new}.",
                  DeprecationWarning, stacklevel=2)
    return getattr(self, new)
  return property(get, doc=f"Deprecated alias of ``{new}``.")
