"""curvlib: curvature from one backward pass, and the solvers that use it.

``extend`` and ``curvature`` are the engine's entry points; quantities live in
:mod:`curvlib.extensions`, linear algebra in :mod:`curvlib.solvers`, optimizers in
:mod:`curvlib.optim`.
"""
from curvlib.engine import curvature, extend

__version__ = "0.1.0"
__all__ = ["extend", "curvature", "__version__"]
