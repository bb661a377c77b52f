"""The ``torch`` backend: torch's own implementation (cuDNN on CUDA, the native/oneDNN kernels on the CPU).

Every cell, dtype, ``proj_size``, packed input, dropout and direction, because it is torch's code. Three entry
points, each the same call torch.nn makes:

- :func:`module_forward`: a whole RNN/GRU/LSTM module, all layers and directions at once, with the weights as torch
  keeps them (``_VF.lstm(input, hx, flat_weights, ...)``), so its speed and numbers are torch.nn's;
- :func:`cell_forward`: one step of a Cell module (``_VF.lstm_cell``);
- :func:`layer`: one layer in one direction with ``lengths`` and ``reverse`` (the layer ops): a packed sequence for
  ``lengths``, each sequence reversed within its own length for ``reverse``.

In eager mode these run under torch's autograd, double backward included where torch has it. Under
``torch.compile`` a layer runs through the ``rnnfast`` custom ops instead (one opaque node, no unrolled time loop):
:class:`TorchBackend` is that path, whose backward recomputes the layer under autograd (one more forward).

(The module is ``native``: a submodule called ``torch`` would replace the name ``torch`` in its package.)
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, _VF
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import Backend, LayerGrads, LayerInputs, LayerOutputs, register

_MODULE_CALL = {"RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu, "GRU": _VF.gru, "LSTM": _VF.lstm}
_LAYER_CALL = {"rnn_tanh": _VF.rnn_tanh, "rnn_relu": _VF.rnn_relu, "gru": _VF.gru, "lstm": _VF.lstm}
_CELL_CALL = {"rnn_tanh": _VF.rnn_tanh_cell, "rnn_relu": _VF.rnn_relu_cell, "gru": _VF.gru_cell,
              "lstm": _VF.lstm_cell}


def module_forward(mode: str, input: Tensor, batch_sizes: Tensor | None, hx, flat_weights: list[Tensor], *,
                   bias: bool, num_layers: int, dropout: float, training: bool, bidirectional: bool,
                   batch_first: bool):
    """torch.nn.RNNBase's one call for ``mode`` (``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ``"RNN_RELU"``): ``input``
    is the padded batch, or a PackedSequence's data with its ``batch_sizes``. Returns ``(output, h_n)`` or
    ``(output, (h_n, c_n))``."""
    fn = _MODULE_CALL[mode]
    if batch_sizes is None:
        result = fn(input, hx, flat_weights, bias, num_layers, dropout, training, bidirectional, batch_first)
    else:
        result = fn(input, batch_sizes, hx, flat_weights, bias, num_layers, dropout, training, bidirectional)
    return (result[0], (result[1], result[2])) if mode == "LSTM" else (result[0], result[1])


def cell_forward(cell: str, input: Tensor, hx, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                 b_hh: Tensor | None):
    """torch.nn's Cell call: ``h`` (RNN, GRU) or ``(h, c)`` (LSTM)."""
    return _CELL_CALL[cell](input, hx, w_ih, w_hh, b_ih, b_hh)


def _within_lengths(lengths: Tensor, T: int) -> Tensor:
    """``(T, B)`` time index that reverses each sequence within its length and leaves padded steps in place."""
    t = torch.arange(T, device=lengths.device).view(T, 1)
    return torch.where(t < lengths.view(1, -1), lengths.view(1, -1) - 1 - t, t)


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(0, index.unsqueeze(-1).expand_as(x))


def layer(inputs: LayerInputs) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer in one direction, ``(y, h_n, c_n)`` as :func:`rnnfast.reference.layer_forward`, by torch."""
    a = inputs
    x, lengths = a.x, a.lengths
    T = x.shape[0]
    params = [a.w_ih, a.w_hh] + ([a.b_ih, a.b_hh] if a.b_ih is not None else []) + (
        [a.w_hr] if a.w_hr is not None else [])
    is_lstm = a.cell == "lstm"
    hx = (a.h0.unsqueeze(0), a.c0.unsqueeze(0)) if is_lstm else a.h0.unsqueeze(0)
    fn = _LAYER_CALL[a.cell]
    if lengths is None:
        out = fn(x.flip(0) if a.reverse else x, hx, params, a.b_ih is not None, 1, 0.0, False, False, False)
        y = out[0].flip(0) if a.reverse else out[0]
        return y, out[1][0].clone(), (out[2][0].clone() if is_lstm else None)
    lengths = lengths.to(device=x.device, dtype=torch.int64)
    index = _within_lengths(lengths, T) if a.reverse else None
    if index is not None:
        x = _gather_time(x, index)
    # A packed sequence has no empty sequence: run those one step, then keep their state and zero their output.
    packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), enforce_sorted=False)
    order = packed.sorted_indices
    hx_sorted = tuple(h.index_select(1, order) for h in hx) if is_lstm else hx.index_select(1, order)
    out = fn(packed.data, packed.batch_sizes, hx_sorted, params, a.b_ih is not None, 1, 0.0, False, False)
    y, _ = pad_packed_sequence(PackedSequence(out[0], packed.batch_sizes, order, packed.unsorted_indices),
                               total_length=T)
    active = (torch.arange(T, device=x.device).view(T, 1) < lengths.view(1, -1)).unsqueeze(-1)
    y = torch.where(active, y, torch.zeros((), dtype=y.dtype, device=y.device))
    if index is not None:
        y = _gather_time(y, index)
    empty = (lengths == 0).view(-1, 1)
    h_n = torch.where(empty, a.h0, out[1][0].index_select(0, packed.unsorted_indices))
    c_n = torch.where(empty, a.c0, out[2][0].index_select(0, packed.unsorted_indices)) if is_lstm else None
    return y, h_n, c_n


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd for the recompute inside a custom op's kernel, which runs with the autograd dispatch keys excluded
    (torch.library calls kernels below autograd): those keys are taken off the thread's exclude set again."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
    for k in ("AutogradCPU", "AutogradCUDA", "AutogradOther"):
        keys = keys | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, k))
    include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - keys), torch.enable_grad():
        yield


class TorchBackend(Backend):
    """``torch`` through the ``rnnfast`` ops (under ``torch.compile``; eager calls go to :func:`layer` directly)."""

    name = "torch"

    def unavailable(self, spec):
        return None  # whatever torch cannot run, it says so itself, as torch.nn would

    def forward(self, inputs):
        with torch.no_grad():
            y, h_n, c_n = layer(inputs)
        return LayerOutputs(y, h_n, c_n, self.workspace(inputs))

    def workspace(self, inputs):
        return inputs.x.new_empty(0)  # the backward recomputes the layer

    def backward(self, inputs, outputs, grads):
        names = LayerGrads.NAMES
        leaves = {n: getattr(inputs, n).detach().requires_grad_() for n in names if getattr(inputs, n) is not None}
        with _autograd_inside_op():
            y, h_n, c_n = layer(LayerInputs(inputs.cell, **{n: leaves.get(n) for n in names},
                                            lengths=inputs.lengths, reverse=inputs.reverse))
            outs = [(y, grads.y), (h_n, grads.h_n)] + ([(c_n, grads.c_n)] if c_n is not None else [])
            got = torch.autograd.grad([o for o, _ in outs], list(leaves.values()), [g for _, g in outs],
                                      allow_unused=True)
        got = {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(leaves, got)}
        return LayerGrads(**{n: got.get(n) for n in names})


register(TorchBackend())
