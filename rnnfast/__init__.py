"""rnnfast: fused whole-sequence RNN, GRU and LSTM layers for PyTorch, drop-in for torch.nn."""

from . import backends, ops, reference
from . import nn
from .backends import BackendUnavailableError
from .nn import convert

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "backends", "convert", "nn", "ops", "reference"]
