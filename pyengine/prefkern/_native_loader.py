"""Loads the compiled extension ``prefkern._native`` once and remembers why it could not be loaded."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def native() -> Optional[ModuleType]:
    """The compiled extension, or None when it is not built or does not import (see ``native_error``)."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("prefkern._native")
        except ImportError as exc:  # not built (source checkout) or built for another Python
            _error = f"prefkern._native did not import: {exc}"
    return _module


def native_error() -> Optional[str]:
    native()
    return _error
