"""The layer ops: one cell, one layer, one direction, the whole sequence.

Each cell has a forward op ``torch.ops.rnnfast.<cell>`` and a backward op ``torch.ops.rnnfast.<cell>_backward``,
registered with :mod:`torch.library` (schema, fake kernel, autograd), so ``torch.compile(fullgraph=True)`` sees
one node per layer. Both take the backend by name and hand the work to it (:mod:`rnnfast.backends`); a kernel
backend plugs in by implementing :class:`rnnfast.backends.Backend`, never by changing this file.

The public functions here (:func:`rnn_tanh`, :func:`rnn_relu`, :func:`gru`, :func:`lstm`) validate their
arguments once, choose the backend and call the op. Shapes (``G`` gates: RNN 1, GRU 3, LSTM 4; ``H_out`` is
``proj_size`` for a projected LSTM, else ``H``):

======== ======================== =====================================================
x        ``(T, B, I)``            input sequence, time first
h0       ``(B, H_out)``           initial hidden state
c0       ``(B, H)``               initial cell state (LSTM only)
w_ih     ``(G*H, I)``             input weights, torch.nn's gate order
w_hh     ``(G*H, H_out)``         recurrent weights
b_ih     ``(G*H,)`` or None       input bias (``b_ih`` and ``b_hh`` are both given or both None)
b_hh     ``(G*H,)`` or None       recurrent bias
w_hr     ``(H_out, H)`` or None   LSTM projection
lengths  ``(B,)`` int or None     valid steps of each sequence, ``0 <= lengths[b] <= T``
reverse  bool                     run each sequence backwards within its own length
======== ======================== =====================================================

Outputs: ``y (T, B, H_out)`` with zeros at padded steps, ``h_n (B, H_out)`` and, for LSTM, ``c_n (B, H)``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import backends
from .reference import CELLS, GATES

_RNN_SCHEMA = ("(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, "
               "bool reverse, str backend) -> (Tensor, Tensor, Tensor)")
_RNN_BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, "
                        "Tensor? b_ih, Tensor? b_hh, Tensor? lengths, bool reverse, str backend, Tensor y, "
                        "Tensor h_n, Tensor workspace) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_LSTM_SCHEMA = ("(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
                "Tensor? w_hr, Tensor? lengths, bool reverse, str backend) -> (Tensor, Tensor, Tensor, Tensor)")
_LSTM_BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0, "
                         "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, "
                         "bool reverse, str backend, Tensor y, Tensor h_n, Tensor c_n, Tensor workspace) -> "
                         "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def layer_spec(cell: str, x: Tensor, w_hh: Tensor, w_hr: Tensor | None, b_ih: Tensor | None,
               lengths: Tensor | None) -> backends.LayerSpec:
    """The :class:`~rnnfast.backends.LayerSpec` of a layer call (shapes, dtype and device only)."""
    H = w_hh.shape[0] // GATES[cell]
    return backends.LayerSpec(cell=cell, device=x.device, dtype=x.dtype, seq_len=x.shape[0], batch=x.shape[1],
                              input_size=x.shape[2], hidden_size=H,
                              proj_size=w_hr.shape[0] if w_hr is not None else 0,
                              bias=b_ih is not None, has_lengths=lengths is not None)


def _backend(name, cell, x, w_hh, w_hr, b_ih, lengths) -> backends.Backend:
    return backends.get(backends.select(name, layer_spec(cell, x, w_hh, w_hr, b_ih, lengths)))


def _no_autocast(x: Tensor):
    # Autocast has no rule for these ops, so it would reach the matmuls inside a backend and lower their
    # precision; the caller (rnnfast.nn) has already cast the inputs to the dtype the layer runs in.
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else contextlib.nullcontext()


def _zeros_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    # Op outputs cannot be None: an absent bias gets an empty gradient, turned back into None by autograd.
    return like.new_empty(0) if t is None else t


def _none_if_empty_bias(g: Tensor, b: Tensor | None) -> Tensor | None:
    return None if b is None else g


def _define_rnn_like(cell: str):
    """Register ``rnnfast::<cell>`` and ``rnnfast::<cell>_backward`` for a cell without a cell state."""

    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, backend):
        be = _backend(backend, cell, x, w_hh, None, b_ih, lengths)
        with _no_autocast(x):
            y, h_n, _, ws = be.forward(cell, x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse)
        return y, h_n, ws

    def forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, backend):
        be = _backend(backend, cell, x, w_hh, None, b_ih, lengths)
        return (x.new_empty(x.shape[0], x.shape[1], h0.shape[1]), h0.new_empty(h0.shape),
                be.workspace(cell, x, h0, w_hh, None))

    def backward_impl(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, backend, y, h_n, ws):
        be = _backend(backend, cell, x, w_hh, None, b_ih, lengths)
        with _no_autocast(x):
            dx, dh0, _, dw_ih, dw_hh, db_ih, db_hh, _ = be.backward(
                cell, grad_y, grad_h_n, None, x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse, y, h_n,
                None, ws)
        return dx, dh0, dw_ih, dw_hh, _empty_if_none(db_ih, x), _empty_if_none(db_hh, x)

    def backward_fake(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, backend, y, h_n, ws):
        return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih), torch.empty_like(w_hh),
                torch.empty_like(b_ih) if b_ih is not None else x.new_empty(0),
                torch.empty_like(b_hh) if b_hh is not None else x.new_empty(0))

    fwd_op = torch.library.custom_op(f"rnnfast::{cell}", forward, mutates_args=(), schema=_RNN_SCHEMA)
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(f"rnnfast::{cell}_backward", backward_impl, mutates_args=(),
                                     schema=_RNN_BACKWARD_SCHEMA)
    bwd_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, backend = inputs
        y, h_n, ws = output
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, y, h_n, ws)
        ctx.reverse, ctx.backend = reverse, backend

    def backward(ctx, grad_y, grad_h_n, _grad_ws):
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, y, h_n, ws = ctx.saved_tensors
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = bwd_op(
            _zeros_if_none(grad_y, y), _zeros_if_none(grad_h_n, h_n), x, h0, w_ih, w_hh, b_ih, b_hh, lengths,
            ctx.reverse, ctx.backend, y, h_n, ws)
        return (dx, dh0, dw_ih, dw_hh, _none_if_empty_bias(db_ih, b_ih), _none_if_empty_bias(db_hh, b_hh),
                None, None, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op


def _define_lstm():
    cell = "lstm"

    def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, backend):
        be = _backend(backend, cell, x, w_hh, w_hr, b_ih, lengths)
        with _no_autocast(x):
            return be.forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)

    def forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, backend):
        be = _backend(backend, cell, x, w_hh, w_hr, b_ih, lengths)
        return (x.new_empty(x.shape[0], x.shape[1], h0.shape[1]), h0.new_empty(h0.shape),
                c0.new_empty(c0.shape), be.workspace(cell, x, h0, w_hh, w_hr))

    def backward_impl(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                      backend, y, h_n, c_n, ws):
        be = _backend(backend, cell, x, w_hh, w_hr, b_ih, lengths)
        with _no_autocast(x):
            grads = be.backward(cell, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                lengths, reverse, y, h_n, c_n, ws)
        return tuple(_empty_if_none(g, x) for g in grads)

    def backward_fake(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                      backend, y, h_n, c_n, ws):
        return tuple(torch.empty_like(t) if t is not None else x.new_empty(0)
                     for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))

    fwd_op = torch.library.custom_op("rnnfast::lstm", forward, mutates_args=(), schema=_LSTM_SCHEMA)
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op("rnnfast::lstm_backward", backward_impl, mutates_args=(),
                                     schema=_LSTM_BACKWARD_SCHEMA)
    bwd_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, backend = inputs
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, *output)
        ctx.reverse, ctx.backend = reverse, backend

    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_ws):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, h_n, c_n, ws = ctx.saved_tensors
        grads = bwd_op(_zeros_if_none(grad_y, y), _zeros_if_none(grad_h_n, h_n), _zeros_if_none(grad_c_n, c_n),
                       x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ctx.reverse, ctx.backend, y, h_n, c_n, ws)
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = grads
        return (dx, dh0, dc0, dw_ih, dw_hh, _none_if_empty_bias(db_ih, b_ih), _none_if_empty_bias(db_hh, b_hh),
                _none_if_empty_bias(dw_hr, w_hr), None, None, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op


OPS = {cell: _define_rnn_like(cell) for cell in CELLS if cell != "lstm"}
OPS["lstm"] = _define_lstm()


# ----------------------------------------------------------------------------------------------------------------
# Public functions: validation once, at the top.

def _check_layer_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths):
    if not isinstance(x, Tensor):
        raise TypeError(f"{cell}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise RuntimeError(f"{cell}: x must have 3 dimensions (T, B, I), got {x.dim()} (shape {list(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{cell}: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise RuntimeError(f"{cell}: expected sequence length to be larger than 0, got x of shape {list(x.shape)}")
    T, B, I = x.shape
    G = GATES[cell]
    if w_hh.dim() != 2 or w_hh.shape[0] % G != 0:
        raise RuntimeError(f"{cell}: w_hh must be 2-D with a multiple of {G} rows, got shape {list(w_hh.shape)}")
    H = w_hh.shape[0] // G
    H_out = w_hr.shape[0] if w_hr is not None else H
    if w_hr is not None and cell != "lstm":
        raise ValueError(f"{cell}: w_hr (projection) is only supported for lstm")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{cell}: b_ih and b_hh must both be given or both be None")
    expected = {"h0": (B, H_out), "w_ih": (G * H, I), "w_hh": (G * H, H_out)}
    given = {"h0": h0, "w_ih": w_ih, "w_hh": w_hh}
    if cell == "lstm":
        expected["c0"], given["c0"] = (B, H), c0
    elif c0 is not None:
        raise ValueError(f"{cell}: c0 is only used by lstm")
    if b_ih is not None:
        expected["b_ih"], given["b_ih"] = (G * H,), b_ih
        expected["b_hh"], given["b_hh"] = (G * H,), b_hh
    if w_hr is not None:
        expected["w_hr"], given["w_hr"] = (H_out, H), w_hr
    for name, shape in expected.items():
        t = given[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"{cell}: {name} must be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise RuntimeError(f"{cell}: expected {name} of shape {list(shape)}, got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{cell}: {name} has dtype {t.dtype} but x has dtype {x.dtype}; all tensors must "
                             "share one floating dtype")
        if t.device != x.device:
            raise RuntimeError(f"{cell}: {name} is on {t.device} but x is on {x.device}; all tensors must be on "
                               "one device")
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise RuntimeError(f"{cell}: lengths must have shape [{B}] (one per sequence), got {list(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"{cell}: lengths must be an integer tensor, got {lengths.dtype}")
        if not torch.compiler.is_compiling() and lengths.numel() > 0 and lengths.device.type != "meta":
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > T:
                raise ValueError(f"{cell}: lengths must lie in [0, {T}], got values in [{lo}, {hi}]")
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    return lengths


def _run(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, backend):
    lengths = _check_layer_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    name = backends.select(backend, layer_spec(cell, x, w_hh, w_hr, b_ih, lengths))
    fwd = OPS[cell][0]
    if cell == "lstm":
        y, h_n, c_n, _ = fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, bool(reverse), name)
        return y, h_n, c_n
    y, h_n, _ = fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, bool(reverse), name)
    return y, h_n


def rnn_tanh(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None, lengths: Tensor | None = None, reverse: bool = False,
             backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Elman RNN layer with tanh, ``h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``. Returns ``(y, h_n)``."""
    return _run("rnn_tanh", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse, backend)


def rnn_relu(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None, lengths: Tensor | None = None, reverse: bool = False,
             backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Elman RNN layer with ReLU. Returns ``(y, h_n)``."""
    return _run("rnn_relu", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse, backend)


def gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None,
        lengths: Tensor | None = None, reverse: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """GRU layer, gates ``r, z, n`` as in torch.nn.GRU (``b_hn`` inside the ``r`` product). Returns ``(y, h_n)``."""
    return _run("gru", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse, backend)


def lstm(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
         b_hh: Tensor | None = None, w_hr: Tensor | None = None, lengths: Tensor | None = None,
         reverse: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """LSTM layer, gates ``i, f, g, o`` as in torch.nn.LSTM, optional projection ``w_hr``.

    Returns ``(y, h_n, c_n)``.
    """
    return _run("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, backend)


def rnn(nonlinearity: str, *args, **kwargs):
    """:func:`rnn_tanh` or :func:`rnn_relu` by name."""
    if nonlinearity == "tanh":
        return rnn_tanh(*args, **kwargs)
    if nonlinearity == "relu":
        return rnn_relu(*args, **kwargs)
    raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


LAYER_FUNCTIONS = {"rnn_tanh": rnn_tanh, "rnn_relu": rnn_relu, "gru": gru, "lstm": lstm}
