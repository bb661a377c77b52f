"""The pure-PyTorch reference: the specification every rnnfast kernel is tested against.

One layer, one direction, the whole sequence, written for clarity rather than speed. Each time step is the
concatenated product ``[x_t, h_{t-1}] @ [W_ih, W_hh]^T`` plus bias, the cell's activations and its state update,
with torch.nn's gate orders (LSTM ``i, f, g, o``; GRU ``r, z, n`` with ``b_hn`` inside the ``r`` product).

Variable lengths follow packed sequences: at step ``t`` a sequence ``b`` is active when ``t < lengths[b]``;
an inactive step writes zeros to the output and leaves the state unchanged. ``reverse=True`` walks from ``T-1``
down to ``0``, so each sequence is reversed within its own length (its state stays at ``h0`` until its last
valid step).

:func:`layer_forward` is differentiable by autograd; :func:`layer_backward` is the explicit back-propagation
through time that the kernel backends implement (gate gradients in reverse time, then the weight, bias and input
gradients as GEMMs over all steps). Low-precision inputs are computed in float32 and rounded at the end, which is
what the kernels do (fp32 accumulation and fp32 cell state).

``tf32=True`` (float32) rounds the operands of the recurrent products, ``h_{t-1}`` and ``W_hh`` forward and the
hidden-part gate gradients and ``W_hh`` backward, to TF32 (:func:`round_tf32`) before they are multiplied, as tensor
cores do under ``torch.backends.cudnn.allow_tf32``: the same-precision baseline of a kernel that runs those products
in TF32 and everything else in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float32 for half types, the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


def round_tf32(t: Tensor) -> Tensor:
    """float32 ``t`` rounded to TF32 (10 mantissa bits, float32's exponent) to nearest, ties away from zero, as
    PTX ``cvt.rna.tf32.f32`` does; inf and NaN unchanged. Other dtypes are returned as they are."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    # Sign and magnitude: adding half of the dropped part to the magnitude bits rounds ties away from zero, and a
    # carry into the exponent is the next binade (or inf).
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(t), rounded, t)


def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _active(t: int, lengths: Tensor | None, B: int, device) -> Tensor | None:
    """(B, 1) bool mask of the sequences that have a step ``t``, or None when all do."""
    if lengths is None:
        return None
    return (lengths.to(device) > t).view(B, 1)


# The pointwise part of every cell: what follows the gate product in a step, forward and backward. The kernels have
# helpers of the same names (kernels/layer.py) and cite these docstrings instead of writing the math again.

def rnn_update(pre: Tensor, relu: bool) -> Tensor:
    """Elman RNN: ``h' = tanh(pre)`` (or ``relu(pre)``), ``pre = x W_ih^T + b_ih + h W_hh^T + b_hh``."""
    return torch.relu(pre) if relu else torch.tanh(pre)


def rnn_update_backward(dh: Tensor, h_new: Tensor, relu: bool) -> Tensor:
    """``dpre = dh * (1 - h'^2)`` for tanh, ``dh * [h' > 0]`` for relu (the same for the input and hidden parts)."""
    return dh * (h_new > 0).to(dh.dtype) if relu else dh * (1 - h_new * h_new)


def gru_update(gx: Tensor, gh: Tensor, h: Tensor):
    """GRU, torch.nn's gate order ``r, z, n``, with ``gx = x W_ih^T + b_ih`` and ``gh = h W_hh^T + b_hh`` split
    in three (``b_hn`` stays inside ``gh_n``, which ``r`` scales)::

        r = sigmoid(gx_r + gh_r)    z = sigmoid(gx_z + gh_z)    n = tanh(gx_n + r * gh_n)
        h' = (1 - z) * n + z * h

    Returns ``(h', r, z, n, gh_n)``."""
    gx_r, gx_z, gx_n = gx.chunk(3, dim=-1)
    gh_r, gh_z, gh_n = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(gx_r + gh_r), torch.sigmoid(gx_z + gh_z)
    n = torch.tanh(gx_n + r * gh_n)
    return (1 - z) * n + z * h, r, z, n, gh_n


def gru_update_backward(dh: Tensor, h: Tensor, r: Tensor, z: Tensor, n: Tensor, gh_n: Tensor):
    """The gradients of :func:`gru_update` from ``dh = dL/dh'``::

        dn = dh (1 - z) (1 - n^2)      dr = dn gh_n r (1 - r)      dz = dh (h - n) z (1 - z)
        d_in = (dr, dz, dn)            d_hid = (dr, dz, dn r)      dh_direct = dh z

    ``d_in``/``d_hid``: with respect to the input and hidden parts of the pre-activations (they differ in the n gate,
    which r scales); ``dh_direct``: the part of ``dL/dh`` that does not go through ``W_hh``."""
    dn = dh * (1 - z) * (1 - n * n)
    dr = dn * gh_n * r * (1 - r)
    dz = dh * (h - n) * z * (1 - z)
    return torch.cat([dr, dz, dn], dim=-1), torch.cat([dr, dz, dn * r], dim=-1), dh * z


def lstm_update(pre: Tensor, c: Tensor):
    """LSTM, torch.nn's gate order ``i, f, g, o``, ``pre = x W_ih^T + b_ih + h W_hh^T + b_hh`` split in four::

        i = sigmoid(pre_i)   f = sigmoid(pre_f)   g = tanh(pre_g)   o = sigmoid(pre_o)
        c' = f c + i g       h' = o tanh(c')      (then h' W_hr^T with a projection)

    Returns ``(h', c', i, f, g, o)``."""
    i, f, g, o = pre.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new, i, f, g, o


def lstm_update_backward(dh: Tensor, dc: Tensor, c: Tensor, i: Tensor, f: Tensor, g: Tensor, o: Tensor):
    """The gradients of :func:`lstm_update` from ``dh = dL/dh'`` (before the projection) and ``dc = dL/dc'``::

        tc = tanh(c')                  dct = dc + dh o (1 - tc^2)
        d = (dct g i (1 - i), dct c f (1 - f), dct i (1 - g^2), dh tc o (1 - o))
        dc_prev = dct f

    ``d`` is the gradient of all four pre-activations (input and hidden parts alike)."""
    tc = torch.tanh(f * c + i * g)
    dct = dc + dh * o * (1 - tc * tc)
    d = torch.cat([dct * g * i * (1 - i), dct * c * f * (1 - f), dct * i * (1 - g * g), dh * tc * o * (1 - o)],
                  dim=-1)
    return d, dct * f


def cell_step(cell: str, x: Tensor, h: Tensor, c: Tensor | None, w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None, b_hh: Tensor | None, w_hr: Tensor | None = None, tf32: bool = False):
    """One time step of ``cell`` for a batch. Returns ``(h_new, c_new, gates)``.

    ``gates`` holds what the backward needs: the activated gates (RNN: ``h_new``; GRU: ``r, z, n`` and the hidden
    part of the ``n`` pre-activation; LSTM: ``i, f, g, o``), laid out along the last dimension. ``tf32``: the
    recurrent product's operands rounded to TF32 (see the module docstring).
    """
    hr, w_hhr = (round_tf32(h), round_tf32(w_hh)) if tf32 else (h, w_hh)
    if cell == "gru":
        gx, gh = x @ w_ih.t(), hr @ w_hhr.t()
        if b_ih is not None:
            gx, gh = gx + b_ih, gh + b_hh
        h_new, r, z, n, gh_n = gru_update(gx, gh, h)
        return h_new, None, torch.cat([r, z, n, gh_n], dim=1)

    pre = torch.cat([x, hr], dim=1) @ torch.cat([w_ih, w_hhr], dim=1).t()
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    if cell in ("rnn_tanh", "rnn_relu"):
        h_new = rnn_update(pre, relu=cell == "rnn_relu")
        return h_new, None, h_new
    if cell == "lstm":
        h_new, c_new, i, f, g, o = lstm_update(pre, c)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        return h_new, c_new, torch.cat([i, f, g, o], dim=1)
    raise ValueError(f"unknown cell {cell!r}; expected one of {CELLS}")


def layer_forward(cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None,
                  lengths: Tensor | None = None, reverse: bool = False, tf32: bool = False):
    """Run one layer of ``cell`` in one direction over a whole sequence.

    Args:
        x: ``(T, B, I)`` input; h0: ``(B, H_out)``; c0: ``(B, H)`` for LSTM, else None.
        w_ih: ``(G*H, I)``; w_hh: ``(G*H, H_out)``; b_ih, b_hh: ``(G*H,)`` or None; w_hr: ``(H_out, H)`` or None.
        lengths: ``(B,)`` integer valid lengths, or None for all ``T``.
        reverse: process each sequence from its last valid step to its first.
        tf32: the recurrent products in TF32 (float32 only; see the module docstring).

    Returns ``(y, h_n, c_n)``: ``y`` is ``(T, B, H_out)`` with zeros at padded steps, ``c_n`` is None unless LSTM.
    """
    out_dtype = x.dtype
    ct = compute_dtype(out_dtype)
    x, h, w_ih, w_hh = x.to(ct), h0.to(ct), w_ih.to(ct), w_hh.to(ct)
    c = c0.to(ct) if c0 is not None else None
    b_ih = b_ih.to(ct) if b_ih is not None else None
    b_hh = b_hh.to(ct) if b_hh is not None else None
    w_hr = w_hr.to(ct) if w_hr is not None else None
    T, B = x.shape[0], x.shape[1]
    ys = [None] * T
    for t in _steps(T, reverse):
        h_new, c_new, _ = cell_step(cell, x[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr, tf32)
        m = _active(t, lengths, B, x.device)
        if m is None:
            ys[t], h, c = h_new, h_new, c_new
        else:
            ys[t] = torch.where(m, h_new, torch.zeros_like(h_new))
            h = torch.where(m, h_new, h)
            if c is not None:
                c = torch.where(m, c_new, c)
    y = torch.stack(ys) if T > 0 else x.new_zeros(0, B, h.shape[1])
    return y.to(out_dtype), h.to(out_dtype), (c.to(out_dtype) if c is not None else None)


def _step_backward(cell: str, dh: Tensor, dc: Tensor | None, h: Tensor, c: Tensor | None, gates: Tensor,
                   w_hh: Tensor, w_hr: Tensor | None):
    """Back-propagate one step from ``(dh_new, dc_new)``.

    Returns ``(d_in, d_hid, dh_direct, dc_prev, dw_hr)``: the gate gradients with respect to the pre-activations of
    the input part and the hidden part (they differ only for GRU's n gate), the part of ``dh_prev`` that does not
    go through ``W_hh``, the cell state's gradient (LSTM) and the projection's gradient (LSTM with ``w_hr``).
    """
    if cell in ("rnn_tanh", "rnn_relu"):
        dpre = rnn_update_backward(dh, gates, relu=cell == "rnn_relu")
        return dpre, dpre, None, None, None
    if cell == "gru":
        r, z, n, gh_n = gates.chunk(4, dim=1)
        d_in, d_hid, dh_direct = gru_update_backward(dh, h, r, z, n, gh_n)
        return d_in, d_hid, dh_direct, None, None
    if cell == "lstm":
        i, f, g, o = gates.chunk(4, dim=1)
        dw_hr = None
        if w_hr is not None:
            dw_hr = dh.t() @ (o * torch.tanh(f * c + i * g))
            dh = dh @ w_hr
        d, dc_prev = lstm_update_backward(dh, dc, c, i, f, g, o)
        return d, d, None, dc_prev, dw_hr
    raise ValueError(f"unknown cell {cell!r}; expected one of {CELLS}")


def layer_backward(cell: str, grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor | None, x: Tensor, h0: Tensor,
                   c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                   b_hh: Tensor | None = None, w_hr: Tensor | None = None, lengths: Tensor | None = None,
                   reverse: bool = False, tf32: bool = False):
    """Explicit back-propagation through time for :func:`layer_forward`.

    Recomputes the forward states, then walks the steps in the opposite order, carrying ``dh`` (and ``dc``)
    through ``W_hh``. The input, weight and bias gradients are GEMMs over all steps once the gate gradients are
    known. Returns ``(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)`` with None where the input was None.
    """
    out_dtype = x.dtype
    ct = compute_dtype(out_dtype)
    f = lambda t: t.to(ct) if t is not None else None  # noqa: E731
    x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr = map(f, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    grad_y, dh, dc = f(grad_y), f(grad_h_n), f(grad_c_n)
    T, B = x.shape[0], x.shape[1]
    G = w_hh.shape[0]
    order = list(_steps(T, reverse))

    # Forward again, keeping the state before each step and the step's gates.
    saved = {}
    for t in order:
        h_new, c_new, gates = cell_step(cell, x[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr, tf32)
        saved[t] = (h, c, gates)
        m = _active(t, lengths, B, x.device)
        h = h_new if m is None else torch.where(m, h_new, h)
        if c is not None:
            c = c_new if m is None else torch.where(m, c_new, c)

    d_in = x.new_zeros(T, B, G)
    d_hid = x.new_zeros(T, B, G)
    h_prev_all = x.new_zeros(T, B, h.shape[1])
    dw_hr = torch.zeros_like(w_hr) if w_hr is not None else None
    if dc is None and c is not None:
        dc = torch.zeros_like(c)
    for t in reversed(order):
        h_prev, c_prev, gates = saved[t]
        h_prev_all[t] = h_prev
        m = _active(t, lengths, B, x.device)
        dh_t = dh + grad_y[t]
        if m is not None:
            dh_t = torch.where(m, dh_t, torch.zeros_like(dh_t))
        di, dhid, dh_direct, dc_prev, dwr = _step_backward(
            cell, dh_t, None if dc is None else (dc if m is None else torch.where(m, dc, torch.zeros_like(dc))),
            h_prev, c_prev, gates, w_hh, w_hr)
        d_in[t], d_hid[t] = di, dhid
        if dwr is not None:
            dw_hr += dwr
        dh_prev = round_tf32(dhid) @ round_tf32(w_hh) if tf32 else dhid @ w_hh
        if dh_direct is not None:
            dh_prev = dh_prev + dh_direct
        if m is None:
            dh = dh_prev
            dc = dc_prev if dc_prev is not None else dc
        else:
            # A padded step passes the state, and so its gradient, through unchanged.
            dh = torch.where(m, dh_prev, dh)
            if dc_prev is not None:
                dc = torch.where(m, dc_prev, dc)

    flat_in, flat_hid = d_in.reshape(T * B, G), d_hid.reshape(T * B, G)
    dx = (flat_in @ w_ih).view(T, B, x.shape[2])  # sizes spelled out: B may be 0
    dw_ih = flat_in.t() @ x.reshape(T * B, x.shape[2])
    dw_hh = flat_hid.t() @ h_prev_all.reshape(T * B, h_prev_all.shape[2])
    db_ih = flat_in.sum(0) if b_ih is not None else None
    db_hh = flat_hid.sum(0) if b_hh is not None else None
    dc0 = dc if c is not None else None
    g = lambda t: t.to(out_dtype) if t is not None else None  # noqa: E731
    return tuple(map(g, (dx, dh, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)))
