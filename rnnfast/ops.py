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

from . import backends, reference
from .backends import LayerGrads, LayerInputs, LayerOutputs, native
from .reference import CELLS, GATES


def _names(cell: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(inputs, outputs)`` tensor names of a cell's forward op, in schema order."""
    if cell == "lstm":
        return ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"), ("y", "h_n", "c_n")
    return ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"), ("y", "h_n")


_OPTIONAL = ("b_ih", "b_hh", "w_hr")


def _schemas(cell: str) -> tuple[str, str]:
    ins, outs = _names(cell)
    args = ", ".join(f"Tensor{'?' if n in _OPTIONAL else ''} {n}" for n in ins)
    args += ", Tensor? lengths, bool reverse, str backend"
    fwd = f"({args}) -> ({', '.join(['Tensor'] * (len(outs) + 1))})"
    bwd_args = ", ".join(f"Tensor grad_{n}" for n in outs) + ", " + args + ", " + ", ".join(
        f"Tensor {n}" for n in outs) + ", Tensor workspace"
    return fwd, f"({bwd_args}) -> ({', '.join(['Tensor'] * len(ins))})"


def layer_spec(cell: str, x: Tensor, w_hh: Tensor, w_hr: Tensor | None, b_ih: Tensor | None,
               lengths: Tensor | None) -> backends.LayerSpec:
    """The :class:`~rnnfast.backends.LayerSpec` of a layer call (shapes, dtype and device only)."""
    return LayerInputs(cell, x, None, None, None, w_hh, b_ih=b_ih, w_hr=w_hr, lengths=lengths).spec()


def _backend(name: str, inputs: LayerInputs) -> backends.Backend:
    return backends.get(backends.select(name, inputs.spec()))


def _no_autocast(x: Tensor):
    # Autocast has no rule for these ops, so it would reach the matmuls inside a backend and lower their
    # precision; the caller (rnnfast.nn) has already cast the inputs to the dtype the layer runs in.
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else contextlib.nullcontext()


def _zeros_if_none(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    return torch.zeros_like(like) if g is None and like is not None else g


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    # Op outputs cannot be None: an absent input gets an empty gradient, turned back into None by autograd.
    return like.new_empty(0) if t is None else t


def _define(cell: str):
    """Register ``rnnfast::<cell>`` and ``rnnfast::<cell>_backward`` with their fake kernels and autograd; the
    backward op is differentiable too (second-order gradients), by differentiating the reference's explicit
    backward (:func:`rnnfast.reference.layer_backward`)."""
    ins, outs = _names(cell)
    n_in, n_out = len(ins), len(outs)
    fwd_schema, bwd_schema = _schemas(cell)

    def layer_inputs(args) -> tuple[LayerInputs, str]:
        kw = dict(zip(ins, args))
        lengths, reverse, backend = args[n_in:n_in + 3]
        return LayerInputs(cell, kw["x"], kw["h0"], kw.get("c0"), kw["w_ih"], kw["w_hh"], kw["b_ih"], kw["b_hh"],
                           kw.get("w_hr"), lengths, reverse), backend

    def layer_outputs(values, workspace=None) -> LayerOutputs:
        return LayerOutputs(values[0], values[1], values[2] if cell == "lstm" else None, workspace)

    def forward(*args):
        a, name = layer_inputs(args)
        with _no_autocast(a.x):
            out = _backend(name, a).forward(a)
        return (out.y, out.h_n) + ((out.c_n,) if cell == "lstm" else ()) + (out.workspace,)

    def forward_fake(*args):
        a, name = layer_inputs(args)
        T, B = a.x.shape[0], a.x.shape[1]
        shapes = {"y": (T, B, a.h0.shape[1]), "h_n": a.h0.shape, "c_n": a.c0.shape if a.c0 is not None else None}
        return tuple(a.x.new_empty(shapes[n]) for n in outs) + (_backend(name, a).workspace(a),)

    def backward_impl(*args):
        grads = layer_outputs(args[:n_out])
        a, name = layer_inputs(args[n_out:])
        rest = args[n_out + n_in + 3:]
        with _no_autocast(a.x):
            g = _backend(name, a).backward(a, layer_outputs(rest[:n_out], rest[n_out]), grads)
        return tuple(_empty_if_none(getattr(g, n), a.x) for n in ins)

    def backward_fake(*args):
        a, _ = layer_inputs(args[n_out:])
        return tuple(torch.empty_like(getattr(a, n)) if getattr(a, n) is not None else a.x.new_empty(0)
                     for n in ins)

    fwd_op = torch.library.custom_op(f"rnnfast::{cell}", forward, mutates_args=(), schema=fwd_schema)
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(f"rnnfast::{cell}_backward", backward_impl, mutates_args=(),
                                     schema=bwd_schema)
    bwd_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_in], inputs[n_in], *output)
        ctx.reverse, ctx.backend = inputs[n_in + 1], inputs[n_in + 2]

    def backward(ctx, *grad_outputs):
        saved = ctx.saved_tensors
        tensors, lengths, results = saved[:n_in], saved[n_in], saved[n_in + 1:]
        upstream = [_zeros_if_none(g, r) for g, r in zip(grad_outputs[:n_out], results[:n_out])]
        grads = bwd_op(*upstream, *tensors, lengths, ctx.reverse, ctx.backend, *results)
        return tuple(None if t is None else g for g, t in zip(grads, tensors)) + (None, None, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)

    def setup_backward_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_out + n_in + 1])
        ctx.reverse = inputs[n_out + n_in + 1]

    def backward_of_backward(ctx, *gg):
        # The backward op's outputs are the explicit BPTT of the reference; its gradient is that function's vector-
        # Jacobian product, by autograd on the reference (which recomputes the forward, so the saved outputs and
        # workspace get no gradient: their dependence on the inputs is already inside). Its inputs are detached
        # first: the engine carries each gradient on through the graph that made the input.
        if torch.is_grad_enabled():
            raise RuntimeError("rnnfast layers support first- and second-order gradients; a graph of the second-order "
                               "gradient (create_graph=True twice) is not supported")
        saved = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in saved]
        upstream, tensors, lengths = leaves[:n_out], leaves[n_out:n_out + n_in], saved[n_out + n_in]
        a = LayerInputs(cell, **dict(zip(ins, tensors)) | ({} if cell == "lstm" else {"c0": None}),
                        lengths=lengths, reverse=ctx.reverse)
        wrt = [t for t in (*upstream, *tensors) if t is not None and t.requires_grad]
        with torch.enable_grad():
            up = list(upstream) + ([None] if cell != "lstm" else [])
            named = dict(zip(LayerGrads.NAMES, reference.layer_backward(cell, *up, *a.reference_args())))
            pairs = [(named[n], g) for n, g in zip(ins, gg)
                     if named[n] is not None and named[n].requires_grad and g is not None and g.numel() > 0]
            got = (torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                   if pairs and wrt else [None] * len(wrt))
        by_id = {id(t): g for t, g in zip(wrt, got)}
        grads = [by_id.get(id(t)) if t is not None else None for t in (*upstream, *tensors)]
        return tuple(grads) + (None, None, None) + (None,) * (n_out + 1)

    bwd_op.register_autograd(backward_of_backward, setup_context=setup_backward_context)
    return fwd_op, bwd_op


OPS = {cell: _define(cell) for cell in CELLS}


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
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")  # torch's text
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
    a = LayerInputs(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, bool(reverse))
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    name = backends.select(backend, a.spec(), training=training)
    if name == "torch" and not torch.compiler.is_compiling():
        return _drop_c(cell, native.layer(a))  # torch's own autograd: nothing recomputed
    ins, _ = _names(cell)
    fwd = OPS[cell][0]
    out = fwd(*(getattr(a, n) for n in ins), lengths, a.reverse, name)
    return _drop_c(cell, out[:-1])


def _drop_c(cell, out):
    return tuple(out) if cell == "lstm" else (out[0], out[1])


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
