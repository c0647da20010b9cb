"""Deprecated spellings of the public API, kept working for one release."""

from __future__ import annotations

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
