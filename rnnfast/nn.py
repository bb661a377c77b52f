"""Drop-in replacements for ``torch.nn.RNN/GRU/LSTM`` and their Cell classes.

Same constructor arguments and defaults, same parameter names, shapes, registration order and initialisation, so
``state_dict`` loads both ways; same forward signature, shapes, ``PackedSequence`` handling and errors. The extra
keyword ``backend`` picks the implementation (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``, ``"reference"``;
see :mod:`rnnfast.backends`); ``auto`` chooses per call by measurement (:mod:`rnnfast.dispatch`), and where it
chooses ``torch`` a module makes the very call torch.nn makes.

The classes do not subclass ``torch.nn.RNNBase``: dynamo graph-breaks on RNNBase modules (its ``allow_rnn``
setting), so a subclass would split every compiled graph at the layer.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter, init
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backends, dispatch, ops
from .backends import native
from .reference import GATES

_MODE_CELL = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "GRU": "gru", "LSTM": "lstm"}


# What ``backend=None`` (the default) means; a test suite may point it elsewhere to run every module on one backend.
DEFAULT_BACKEND = "auto"


def _check_backend(backend) -> str:
    return backends.check_name(DEFAULT_BACKEND if backend is None else backend)


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``t``'s device, or None. Under autocast the whole layer runs in it, as
    torch.nn's cuDNN path does (weights, input and state cast, outputs in the autocast dtype)."""
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _cast(t, dtype):
    return t if (t is None or dtype is None) else t.to(dtype)


def _check_hx_tensor(name: str, hx: Tensor, like: Tensor) -> None:
    if hx.device != like.device:  # torch's text
        raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at "
                           f"{like.device} and hidden tensor at {hx.device}")
    if hx.dtype != like.dtype and _autocast_dtype(like) is None:
        raise RuntimeError(f"{name} dtype ({hx.dtype}) does not match input dtype ({like.dtype})")


def _records_grad(*tensors) -> bool:
    """A backward may follow: grad mode is on and something requires grad (what auto calls training)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _RNNBase(torch.nn.Module):
    """Shared body of :class:`RNN`, :class:`GRU` and :class:`LSTM` (torch.nn.RNNBase's contract)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: str | None = None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=3)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode not in _MODE_CELL:
            raise ValueError("Unrecognized RNN mode: " + mode)

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = _check_backend(backend)

        gate_size = GATES[_MODE_CELL[mode]] * hidden_size
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        num_directions = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                suffix = "_reverse" if direction == 1 else ""
                # Registration order is torch.nn's: it fixes reset_parameters' RNG use and state_dict order.
                shapes = [("weight_ih", (gate_size, layer_input_size)), ("weight_hh", (gate_size, real_hidden_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for stem, shape in shapes:
                    name = f"{stem}_l{layer}{suffix}"
                    setattr(self, name, Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """Kept for torch.nn compatibility; rnnfast reads the parameters in place and needs no flat buffer."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.backend != "auto":
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    # -- forward ---------------------------------------------------------------------------------------------

    def _check_input(self, input: Tensor, batch_sizes) -> None:
        w = getattr(self, self._flat_weights_names[0])
        if input.dtype != w.dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                             f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})")
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")
        if input.device != w.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{input.device} and parameter tensor at {w.device}")

    def _expected_hidden_size(self, batch: int, cell_state: bool = False) -> tuple[int, int, int]:
        num_directions = 2 if self.bidirectional else 1
        size = self.hidden_size if (cell_state or self.proj_size == 0) else self.proj_size
        return (self.num_layers * num_directions, batch, size)

    @staticmethod
    def _check_hidden_size(hx: Tensor, expected, msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected:
            raise RuntimeError(msg.format(expected, list(hx.size())))

    def forward(self, input, hx=None):
        is_lstm = self.mode == "LSTM"
        name = {"RNN_TANH": "RNN", "RNN_RELU": "RNN", "GRU": "GRU", "LSTM": "LSTM"}[self.mode]
        num_directions = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        is_batched = True
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_input(data, batch_sizes)
            x, lengths = data, None  # padded below if a kernel backend runs it
            T, B = batch_sizes.numel(), int(batch_sizes[0]) if batch_sizes.numel() else 0
            if hx is not None and sorted_indices is not None:
                hx = (tuple(h.index_select(1, sorted_indices) for h in hx) if is_lstm
                      else hx.index_select(1, sorted_indices))
        else:
            lengths = None
            if input.dim() not in (2, 3):
                tensor = " tensor" if name == "RNN" else ""
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            is_batched = input.dim() == 3
            x = input
            if not is_batched:
                x = x.unsqueeze(1 if not self.batch_first else 0)
            if hx is not None:
                want = 3 if is_batched else 2
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                if is_lstm:
                    if hx[0].dim() != want or hx[1].dim() != want:
                        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                           f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    if not is_batched:
                        hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                else:
                    if hx.dim() != want:
                        raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                                           f"{hx.dim()}-D tensor")
                    if not is_batched:
                        hx = hx.unsqueeze(1)
            self._check_input(x, None)
            if self.batch_first:
                x = x.transpose(0, 1)
            T, B = x.size(0), x.size(1)

        if hx is None:
            h0 = x.new_zeros(self._expected_hidden_size(B))  # in x's dtype, as torch.nn
            c0 = x.new_zeros(self._expected_hidden_size(B, cell_state=True)) if is_lstm else None
        elif is_lstm:
            h0, c0 = hx
            self._check_hidden_size(h0, self._expected_hidden_size(B), "Expected hidden[0] size {}, got {}")
            self._check_hidden_size(c0, self._expected_hidden_size(B, True), "Expected hidden[1] size {}, got {}")
            _check_hx_tensor("hx[0]", h0, x)
            _check_hx_tensor("hx[1]", c0, x)
        else:
            h0, c0 = hx, None
            self._check_hidden_size(h0, self._expected_hidden_size(B))
            _check_hx_tensor("hx", h0, x)

        cell = _MODE_CELL[self.mode]
        amp = _autocast_dtype(x)
        weights = self._flat_weights
        backend = self._choose(x, h0, c0, amp, T, B, packed, weights)
        if backend == "torch" and not torch.compiler.is_compiling():
            # torch.nn's own single call, on the input as torch.nn gets it (a packed one stays packed).
            if packed:
                out_data, hidden = native.module_forward(
                    self.mode, data, batch_sizes, (h0, c0) if is_lstm else h0, weights, bias=self.bias,
                    num_layers=self.num_layers, dropout=self.dropout, training=self.training,
                    bidirectional=self.bidirectional, batch_first=False)
                return self._packed_result(out_data, hidden, batch_sizes, sorted_indices, unsorted_indices)
            output, hidden = native.module_forward(
                self.mode, x.transpose(0, 1) if self.batch_first else x, None, (h0, c0) if is_lstm else h0,
                weights, bias=self.bias, num_layers=self.num_layers, dropout=self.dropout,
                training=self.training, bidirectional=self.bidirectional, batch_first=self.batch_first)
            h_n, c_n = hidden if is_lstm else (hidden, None)
            return self._padded_result(output, h_n, c_n, is_batched)
        if packed:
            # The layers run on a padded, time-major batch in the packed (sorted) order.
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        if amp is not None:
            x, h0, c0 = _cast(x, amp), _cast(h0, amp), _cast(c0, amp)
        layer_fn = ops.LAYER_FUNCTIONS[cell]
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            if num_directions == 2 and self._one_launch(backend, cell, layer_input, lengths):
                # Both directions in one launch (eager only: under torch.compile each direction is one op node).
                ws = [[_cast(getattr(self, n), amp) for n in self._all_weights[2 * layer + d]] for d in range(2)]
                ws = [tuple(w[:4]) if self.bias else (w[0], w[1], None, None) for w in ws]
                from .backends.bidirectional import bidirectional_layer

                kind, mode = backends.split_name(backend)
                y, h, c = bidirectional_layer(
                    kind, cell, layer_input, h0[2 * layer:2 * layer + 2],
                    None if c0 is None else c0[2 * layer:2 * layer + 2], ws[0], ws[1], lengths, fused=mode == "fused")
                h_n += [h[0], h[1]]
                if is_lstm:
                    c_n += [c[0], c[1]]
                layer_input = y
                if self.dropout != 0 and self.training and layer < self.num_layers - 1:
                    layer_input = F.dropout(layer_input, self.dropout, True)
                continue
            for direction in range(num_directions):
                idx = layer * num_directions + direction
                w = [_cast(getattr(self, n), amp) for n in self._all_weights[idx]]
                w_ih, w_hh = w[0], w[1]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                w_hr = w[-1] if self.proj_size > 0 else None
                reverse = direction == 1
                if is_lstm:
                    y, h, c = layer_fn(layer_input, h0[idx], c0[idx], w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                       reverse, backend)
                    c_n.append(c)
                else:
                    y, h = layer_fn(layer_input, h0[idx], w_ih, w_hh, b_ih, b_hh, lengths, reverse, backend)
                outputs.append(y)
                h_n.append(h)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout != 0 and self.training and layer < self.num_layers - 1:
                # torch.nn draws the same mask from the same RNG state on the CPU (at::dropout on the layer output).
                layer_input = F.dropout(layer_input, self.dropout, True)
        output = layer_input
        h_n = torch.stack(h_n)
        c_n = torch.stack(c_n) if is_lstm else None

        if packed:
            out_data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
            return self._packed_result(out_data, (h_n, c_n) if is_lstm else h_n, batch_sizes, sorted_indices,
                                       unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        return self._padded_result(output, h_n, c_n, is_batched)

    def _one_launch(self, backend: str, cell: str, x: Tensor, lengths: Tensor | None) -> bool:
        """A bidirectional layer whose directions run on the Triton or the CUDA kernels, in eager mode: one launch
        for both (CUDA: when the layer's W_hh fits on half the multiprocessors, each direction taking half)."""
        kind = backends.split_name(backend)[0]
        if kind not in ("triton", "cuda") or self.proj_size or torch.compiler.is_compiling():
            return False
        w_hh = getattr(self, self._all_weights[0][1])
        spec = ops.layer_spec(cell, x, w_hh, None, None, lengths)
        if backends.why_unavailable(backend, spec) is not None:
            return False
        if kind == "cuda":
            from .backends import cuda

            return cuda.plan(cell, self.hidden_size, x.dtype, x.device, dirs=2)[1] is None
        return True

    def _choose(self, x: Tensor, h0: Tensor, c0: Tensor | None, amp: torch.dtype | None, T: int, B: int,
                has_lengths: bool, weights: list[Tensor]) -> str:
        """The backend this call runs on: ``self.backend``, or what ``auto`` chooses for it."""
        if self.backend != "auto":
            return self.backend
        if not dispatch.measured_device(x.device):
            return dispatch.FALLBACK  # nothing to look up: keep the call as cheap as torch.nn's
        return dispatch.choose_name(
            _MODE_CELL[self.mode], str(x.device), dispatch.dtype_name(amp or x.dtype),
            _records_grad(x, h0, c0, *weights), T, B, self.input_size, self.hidden_size,
            self.proj_size, self.num_layers, self.bidirectional, self.bias, has_lengths)

    def _packed_result(self, out_data, hidden, batch_sizes, sorted_indices, unsorted_indices):
        out = PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            hidden = (tuple(h.index_select(1, unsorted_indices) for h in hidden) if self.mode == "LSTM"
                      else hidden.index_select(1, unsorted_indices))
        return out, hidden

    def _padded_result(self, output, h_n, c_n, is_batched):
        is_lstm = self.mode == "LSTM"
        if not is_batched:
            output = output.squeeze(1 if not self.batch_first else 0)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if is_lstm else None
        return output, ((h_n, c_n) if is_lstm else h_n)


class RNN(_RNNBase):
    """Drop-in for :class:`torch.nn.RNN` (Elman RNN, ``tanh`` or ``relu``); extra keyword ``backend``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str | None = None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"RNN got unexpected keyword arguments {sorted(kwargs)}")
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, backend=backend)
        # torch.nn.Module.__init__ ran after the attribute was set; set it again so it survives.
        self.nonlinearity = nonlinearity


class GRU(_RNNBase):
    """Drop-in for :class:`torch.nn.GRU`; extra keyword ``backend``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, backend: str | None = None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"GRU got unexpected keyword arguments {sorted(kwargs)}")
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, backend=backend)


class LSTM(_RNNBase):
    """Drop-in for :class:`torch.nn.LSTM` (with ``proj_size``); extra keyword ``backend``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# Cells: one step, run through the same layer ops with T = 1.

class _CellBase(torch.nn.Module):
    _name = ""
    _cell = ""

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int, device=None, dtype=None,
                 *, backend: str | None = None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = _check_backend(backend)
        self.weight_ih = Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory_kwargs))
        self.weight_hh = Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += ", nonlinearity={nonlinearity}"
        if self.backend != "auto":
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def _weights(self, input: Tensor):
        """(w_ih, w_hh, b_ih, b_hh), cast to the autocast dtype when autocast is on."""
        amp = _autocast_dtype(input)
        return tuple(_cast(w, amp) for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh))

    def _check(self, input: Tensor, states: list[Tensor]) -> None:
        # torch's order: every size first (input, then each state's batch and hidden size), then dtypes, devices.
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for i, h in enumerate(states):
            if input.size(0) != h.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{i} batch size "
                                   f"{h.size(0)}")
            if h.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {h.size(1)}, expected "
                                   f"{self.hidden_size}")
        if input.dtype != self.weight_ih.dtype and _autocast_dtype(input) is None:
            raise RuntimeError(f"{self._name}: input dtype ({input.dtype}) does not match weight dtype "
                               f"({self.weight_ih.dtype})")
        if input.device != self.weight_ih.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{input.device} and parameter tensor at {self.weight_ih.device}")
        for i, h in enumerate(states):
            _check_hx_tensor(f"hidden{i}", h, input)

    def _run(self, cell: str, input: Tensor, hx):
        """One step: ``h``, or ``(h, c)`` for LSTM; ``input`` and ``hx`` batched and checked."""
        states = list(hx) if cell == "lstm" else [hx]
        name = self.backend
        if name == "auto" and not dispatch.measured_device(input.device):
            name = dispatch.FALLBACK
        elif name == "auto":
            name = dispatch.choose_name(cell, str(input.device), dispatch.dtype_name(
                _autocast_dtype(input) or input.dtype), _records_grad(input, *states, *self.parameters()), 1,
                input.size(0), self.input_size, self.hidden_size, 0, 1, False, self.bias, False)
        if name == "torch" and not torch.compiler.is_compiling():
            return native.cell_forward(cell, input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        amp = _autocast_dtype(input)
        out = ops.LAYER_FUNCTIONS[cell](_cast(input, amp).unsqueeze(0), *(_cast(h, amp) for h in states),
                                        *self._weights(input), backend=name)
        return (out[1], out[2]) if cell == "lstm" else out[1]

    def _prepare(self, input: Tensor, hx):
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        return input, is_batched


class RNNCell(_CellBase):
    """Drop-in for :class:`torch.nn.RNNCell`; extra keyword ``backend``."""

    _name = "RNNCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype, backend=backend)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        input, is_batched = self._prepare(input, hx)
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        if hx is None:
            hx = input.new_zeros(input.size(0), self.hidden_size)
        elif not is_batched:
            hx = hx.unsqueeze(0)
        self._check(input, [hx])
        h = self._run(f"rnn_{self.nonlinearity}", input, hx)
        return h if is_batched else h.squeeze(0)


class GRUCell(_CellBase):
    """Drop-in for :class:`torch.nn.GRUCell`; extra keyword ``backend``."""

    _name = "GRUCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype, backend=backend)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        input, is_batched = self._prepare(input, hx)
        if hx is None:
            hx = input.new_zeros(input.size(0), self.hidden_size)
        elif not is_batched:
            hx = hx.unsqueeze(0)
        self._check(input, [hx])
        h = self._run("gru", input, hx)
        return h if is_batched else h.squeeze(0)


class LSTMCell(_CellBase):
    """Drop-in for :class:`torch.nn.LSTMCell`; extra keyword ``backend``."""

    _name = "LSTMCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype, backend=backend)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        input, is_batched = self._prepare(input, hx)
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        self._check(input, list(hx))
        h, c = self._run("lstm", input, hx)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


# ----------------------------------------------------------------------------------------------------------------
# convert(): swap torch.nn modules for rnnfast ones, keeping the very Parameter objects.

_CONVERSIONS = {torch.nn.RNN: RNN, torch.nn.GRU: GRU, torch.nn.LSTM: LSTM,
                torch.nn.RNNCell: RNNCell, torch.nn.GRUCell: GRUCell, torch.nn.LSTMCell: LSTMCell}


def _convert_one(old: torch.nn.Module, backend: str) -> torch.nn.Module:
    cls = _CONVERSIONS[type(old)]
    first = next(old.parameters())
    kw = dict(device="meta", dtype=first.dtype, backend=backend)
    if isinstance(old, torch.nn.RNNBase):
        args = dict(num_layers=old.num_layers, bias=old.bias, batch_first=old.batch_first, dropout=old.dropout,
                    bidirectional=old.bidirectional)
        if cls is RNN:
            args["nonlinearity"] = old.nonlinearity
        if cls is LSTM:
            args["proj_size"] = old.proj_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.nn already warned about dropout with one layer
            new = cls(old.input_size, old.hidden_size, **args, **kw)
    else:
        args = dict(bias=old.bias)
        if cls is RNNCell:
            args["nonlinearity"] = old.nonlinearity
        new = cls(old.input_size, old.hidden_size, **args, **kw)
    # Reuse the Parameter objects themselves: weights, device, dtype and any optimizer that holds them carry over.
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    new.train(old.training)
    return new


def convert(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """Replace every torch.nn RNN/GRU/LSTM (and Cell) inside ``model`` with its rnnfast twin, in place.

    The new modules hold the same Parameter objects, so weights, device, dtype, ``requires_grad`` and optimizer
    state are unchanged. Returns ``model`` (or the converted module, when ``model`` itself is one of those
    classes). Subclasses of the torch.nn classes are left alone: their ``forward`` may differ.
    """
    _check_backend(backend)
    if type(model) in _CONVERSIONS:
        return _convert_one(model, backend)
    for name, child in model.named_children():
        new = convert(child, backend)
        if new is not child:
            setattr(model, name, new)
    return model


__all__ = ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "convert"]
