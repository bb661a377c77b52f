"""What the kernel backends (``triton``, ``cuda``) share about a layer: the forward's workspace, bias folding, the
hoisted input product and the gradient GEMMs.

Workspace: one byte tensor, its parts on 256-byte boundaries, each stacked along a leading direction axis and
indexed by time: ``gates (T, B, GW*H)`` the activated gates (GRU adds a fourth plane, ``W_hn h + b_hn``, which the
``r`` gradient needs) and ``hs (T, B, H)`` the state entering each step (``h0`` at the first step; carried over
padded steps), which is also what the ``W_hh`` gradient multiplies and what the blocks or programs exchange, both in
the layer dtype (16 bits for half types); for LSTM ``cs (T, B, H)``, the same for the cell state, also in the layer
dtype (the kernels carry each unit's own state unrounded; only the backward reads ``cs``).
"""

from __future__ import annotations

import torch

from .reference import GATES


def gate_planes(cell: str) -> int:
    """Planes per hidden unit of the workspace's ``gates``."""
    return 4 if cell == "gru" else GATES[cell]


def _parts(cell: str, dirs: int, T: int, B: int, H: int, dt: torch.dtype):
    parts = [("gates", (dirs, T, B, gate_planes(cell) * H), dt), ("hs", (dirs, T, B, H), dt)]
    if cell == "lstm":
        parts.append(("cs", (dirs, T, B, H), dt))
    return parts


def _nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _align(n: int) -> int:
    return (n + 255) // 256 * 256  # every part on a 256-byte boundary: every pointer is 16-byte divisible


def _layout(cell: str, dirs: int, T: int, B: int, H: int, dt: torch.dtype):
    """``(name, shape, dtype, offset, bytes)`` of each part; each starts on a 256-byte boundary."""
    off = 0
    for name, shape, d in _parts(cell, dirs, T, B, H, dt):
        n = _nbytes(shape, d)
        yield name, shape, d, off, n
        off += _align(n)


def workspace_bytes(cell: str, dirs: int, T: int, B: int, H: int, dt: torch.dtype) -> int:
    return sum(_align(n) for *_, n in _layout(cell, dirs, T, B, H, dt))


def split_workspace(cell: str, ws: torch.Tensor, dirs: int, T: int, B: int, H: int, dt: torch.dtype):
    """Views ``(gates, hs, cs)`` of a byte workspace, each ``(dirs, ...)``; ``cs`` is None except for LSTM."""
    views = {name: ws[off:off + n].view(d).view(shape) for name, shape, d, off, n in _layout(cell, dirs, T, B, H, dt)}
    return views["gates"], views["hs"], views.get("cs")


def zero_gaps(cell: str, ws: torch.Tensor, dirs: int, T: int, B: int, H: int, dt: torch.dtype) -> None:
    """Zero the alignment padding between the parts, so that the whole workspace is defined (it is an op's output)."""
    for *_, off, n in _layout(cell, dirs, T, B, H, dt):
        if _align(n) > n:
            ws[off + n:off + _align(n)].zero_()


def fold_biases(cell: str, b_ih, b_hh, H: int, ct: torch.dtype):
    """``(b, b_hn)`` in the compute dtype: the biases summed per gate, except GRU's n gate, which gets ``b_in``
    only because ``r`` multiplies ``W_hn h + b_hn``; and GRU's ``b_hn`` (else None). ``(None, None)`` without bias."""
    if b_ih is None:
        return None, None
    b = b_ih.to(ct) + b_hh.to(ct)
    if cell == "gru":
        b[2 * H:] = b_ih[2 * H:]
        return b, b_hh[2 * H:].to(ct).contiguous()
    return b, None


def widened_addmm(b: torch.Tensor | None, a: torch.Tensor, w: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """``a @ w (+ b)`` in the compute dtype ``ct``: half operands multiplied with fp32 accumulation and rounded once,
    to ``ct`` (never to the layer dtype first). On a GPU one GEMM (``addmm``'s ``out_dtype``); elsewhere, or on a
    torch without it, the same products with the operands widened first."""
    if ct == a.dtype:
        return a @ w if b is None else torch.addmm(b, a, w)
    if a.device.type == "cuda":
        try:
            return torch.addmm(b if b is not None else a.new_zeros(w.shape[1], dtype=ct), a, w, out_dtype=ct)
        except (TypeError, RuntimeError):
            pass
    out = a.to(ct) @ w.to(ct)
    return out if b is None else out.add_(b)


def hoisted_input(x: torch.Tensor, w_ih: torch.Tensor, b: torch.Tensor | None, ct: torch.dtype) -> torch.Tensor:
    """``x @ W_ih^T + b`` for every step as one GEMM, ``(T, B, G*H)`` in the compute dtype (:func:`widened_addmm`)."""
    T, B, I = x.shape
    return widened_addmm(b, x.reshape(T * B, I), w_ih.t(), ct).view(T, B, w_ih.shape[0])


def input_and_weight_grads(d_in: torch.Tensor, d_hid: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor,
                           hs: torch.Tensor, has_bias: bool):
    """``(dx, dw_ih, dw_hh, db_ih, db_hh)`` from the gate gradients of every step, ``d_in``/``d_hid`` ``(T, B, G*H)``
    in the compute dtype (the same tensor except for GRU), as GEMMs over all steps: operands in the layer's dtype,
    fp32 accumulation; the bias sums in the compute dtype."""
    T, B, I = x.shape
    dt = x.dtype
    GH, H = d_in.shape[2], hs.shape[2]
    flat_in, flat_hid = d_in.reshape(T * B, GH), d_hid.reshape(T * B, GH)
    lo_in = flat_in.to(dt)
    lo_hid = lo_in if d_hid is d_in else flat_hid.to(dt)
    dx = (lo_in @ w_ih).view(T, B, I)
    dw_ih = lo_in.t() @ x.reshape(T * B, I)
    dw_hh = lo_hid.t() @ hs.reshape(T * B, H).to(dt)
    db_ih = flat_in.sum(0).to(dt) if has_bias else None
    db_hh = flat_hid.sum(0).to(dt) if has_bias else None
    return dx, dw_ih, dw_hh, db_ih, db_hh
