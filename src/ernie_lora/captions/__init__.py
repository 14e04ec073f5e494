"""The layout language: structured captions, their renderings in three styles, and parsing."""

from .schema import STYLES, CaptionSchema, Element, parse, render, restyle

__all__ = ["STYLES", "CaptionSchema", "Element", "parse", "render", "restyle"]
