"""Triton kernels of rnnfast, installed as ``rnnfast.kernels``.

:mod:`.layer` holds the ``@triton.jit`` kernels of one layer over a whole sequence; :mod:`.backend` their launchers
and the ``triton`` backend, which registers itself with :mod:`rnnfast.backends` on import.
"""

from . import backend, layer  # noqa: F401
