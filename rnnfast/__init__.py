"""rnnfast: fused whole-sequence RNN, GRU and LSTM layers for PyTorch, drop-in for torch.nn."""

import importlib.util

from . import backends, ops, reference
from . import nn
from .backends import BackendUnavailableError
from .nn import convert

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "backends", "convert", "nn", "ops", "reference"]


def _load_kernel_backends() -> None:
    # Each kernel backend registers itself on import; one that cannot load is recorded with its reason so that
    # naming it explicitly says why, and `auto` skips it.
    try:
        from . import kernels  # noqa: F401  (Triton)
    except Exception as exc:  # pragma: no cover - depends on the machine
        backends.mark_unloadable("triton", f"importing rnnfast.kernels failed: {type(exc).__name__}: {exc}")
    if importlib.util.find_spec(f"{__name__}.cuda") is None:
        return  # this version has no CUDA backend; the registry says so when it is asked for
    try:
        from . import cuda  # noqa: F401  (CUDA C++ in csrc/, built on first use)
    except ImportError as exc:
        backends.mark_unloadable("cuda", f"importing rnnfast.cuda failed: {exc}")


_load_kernel_backends()
