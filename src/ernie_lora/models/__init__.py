"""The ERNIE-Image model family: loading (hub id, folder, micro, tiny), module names, numerics, sizes.

Ask the family (``family_for(name)`` or ``ERNIE_IMAGE``) for anything ERNIE-specific. The names below load
on first use (they bring torch and diffusers), so ``models.names`` alone stays plain Python.
"""

from __future__ import annotations

import importlib

_WHERE = {"ERNIE_IMAGE": "family", "ERNIE_IMAGE_TURBO": "family", "ErnieImageFamily": "family",
          "family_for": "family", "parse_dtype": "loading", "build_tiny_pipeline": "tiny"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
