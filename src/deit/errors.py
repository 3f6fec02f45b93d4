"""The base of every error that describes a user's input rather than a fault in deit.

The command line prints a ``DeitError`` as one line naming the file, key or
value at fault and exits with code 2; anything else is a bug, and keeps its
traceback. Each error also derives from the built-in it refines (mostly
``ValueError``), so library users who catch that keep working.
"""

from __future__ import annotations


class DeitError(Exception):
    """Bad input or settings: the message names the file, key or value, and what would be right."""


class ModelError(DeitError, ValueError):
    """A model that cannot be built as asked: unknown name, impossible shape, missing weights."""
