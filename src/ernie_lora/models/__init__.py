"""The ERNIE-Image model family: loading (hub id, folder, micro, tiny), module names, numerics, sizes.

Ask the family (``family_for(name)`` or ``ERNIE_IMAGE``) for anything ERNIE-specific.
"""

from .family import ERNIE_IMAGE, ERNIE_IMAGE_TURBO, ErnieImageFamily, family_for
from .loading import parse_dtype
from .tiny import build_tiny_pipeline

__all__ = ["ERNIE_IMAGE", "ERNIE_IMAGE_TURBO", "ErnieImageFamily", "build_tiny_pipeline", "family_for", "parse_dtype"]
