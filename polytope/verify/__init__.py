"""Verification: robust loss and certificates, attacks, the cascade of rungs, robust training, properties.

The package is callable: ``polytope.verify(net, prop, ...)`` is :func:`polytope.verify.property.verify`
(decide a VNN-LIB property), while ``polytope.verify.robust`` and the other modules stay reachable as
attributes.  (``polytope.verify`` names both, so the call is the package's own.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from polytope.verify.property import verify

        return verify(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """A submodule on first use (``polytope.verify.robust`` without importing it first)."""
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")


sys.modules[__name__].__class__ = _CallablePackage
