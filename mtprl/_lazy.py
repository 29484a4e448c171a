"""Lazy package exports: a package names what it offers, and each name's module is imported on first use.

Used where importing a package must stay cheap (the CLI's `--help` imports no torch or matplotlib).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level `__getattr__` and `__dir__` for `package`, exporting `name -> module that defines it`."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
