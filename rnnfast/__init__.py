"""rnnfast: whole-sequence RNN, GRU and LSTM layers for PyTorch in one kernel each, drop-in for torch.nn."""

from . import backends, dispatch, ops, reference
from . import nn
from .backends import BackendUnavailableError, LayerGrads, LayerInputs, LayerOutputs
from .dispatch import explain
from .nn import convert
from .tune import tune

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "LayerGrads", "LayerInputs", "LayerOutputs", "backends", "convert", "dispatch",
           "explain", "nn", "ops", "reference", "tune"]
