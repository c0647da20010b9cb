"""Deprecated spellings of the public API, kept working for one release."""

from __future__ import annotations

import functools
import importlib
import inspect
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


class _NotGiven:
  """Default of a deprecated keyword in a factory's signature."""

  def __repr__(self):
    return "<deprecated>"


_NOT_GIVEN = _NotGiven()


def _new_spellings(name: str, table: dict, kwargs: dict,
                   stacklevel: int) -> dict:
  """``kwargs`` with each old spelling replaced by its new name (converted
  where the meaning changed), warning once per old name used."""
  kwargs = dict(kwargs)
  for old, (new, convert) in table.items():
    value = kwargs.pop(old, _NOT_GIVEN)
    if value is _NOT_GIVEN:
      continue
    if new in kwargs:
      raise TypeError(f"{name}: got both {old}= (deprecated) and {new}=; "
                      f"pass {new}= only.")
    warnings.warn(
        f"{name}({old}=...) is deprecated: use {new}="
        + ("" if convert is None else " (see the docstring: the value's "
           "meaning changed)") + ".", DeprecationWarning,
        stacklevel=stacklevel + 1)
    kwargs[new] = value if convert is None else convert(value)
  return kwargs


class _RenamingSignature(inspect.Signature):
  """The factory's signature plus its old spellings as keyword-only
  parameters. ``bind`` (as ``optax.inject_hyperparams`` uses it) maps an old
  spelling to the new name, so the bound (and injected) argument is the new
  one, holding the value given."""

  __slots__ = ("_factory_name", "_table", "_factory_signature")

  def bind(self, *args, **kwargs):
    if getattr(self, "_table", None) is None:  # a copy made by .replace()
      return super().bind(*args, **kwargs)
    kwargs = _new_spellings(self._factory_name, self._table, kwargs,
                            stacklevel=3)
    return self._factory_signature.bind(*args, **kwargs)


def _renaming_signature(factory, table: dict) -> inspect.Signature:
  signature = inspect.signature(factory)
  params = list(signature.parameters.values())
  var_keyword = [p for p in params if p.kind is p.VAR_KEYWORD]
  params = [p for p in params if p.kind is not p.VAR_KEYWORD]
  params += [inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY,
                               default=_NOT_GIVEN)
             for old in table if old not in signature.parameters]
  out = _RenamingSignature(params + var_keyword,
                           return_annotation=signature.return_annotation)
  out._factory_name = factory.__name__  # pylint: disable=protected-access
  out._table = table  # pylint: disable=protected-access
  out._factory_signature = signature  # pylint: disable=protected-access
  return out


def renamed_arguments(**renames):
  """Keeps old keyword-argument spellings of a factory working, with a warning.

  ``renames`` maps an old name to the new one, or to ``(new, convert)`` when
  the meaning changed too (e.g. an EMA weight of the new value becoming
  optax's ``decay``: ``beta=("decay", lambda b: 1 - b)``). Passing both the
  old and the new name is an error. The decorated factory's signature lists
  the old names as keyword-only parameters, and binding it maps them to the
  new ones: ``optax.inject_hyperparams(factory)(old=value)`` injects
  ``new=value`` (converted), with the same warning.

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
      return factory(*args, **_new_spellings(factory.__name__, table, kwargs,
                                             stacklevel=2))
    wrapped.__signature__ = _renaming_signature(factory, table)
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
