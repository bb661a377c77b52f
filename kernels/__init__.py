"""Triton device code of rnnfast, installed as ``rnnfast.kernels``.

:mod:`.layer` holds the ``@triton.jit`` kernels of one layer over a whole sequence; their host side (plans,
launchers, the ``triton`` backend) is :mod:`rnnfast.backends.triton`, and :mod:`.aot` compiles them without a GPU.
"""

from . import layer  # noqa: F401
