"""Curvature extensions: pure functions of the captures, stored as ``param.<savefield>``."""
from curvlib.extensions.base import Extension
from curvlib.extensions.kfac import KFAC

__all__ = ["Extension", "KFAC"]
