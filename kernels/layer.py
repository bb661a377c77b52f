"""Triton kernels for one recurrent layer over a whole sequence, one or both directions in one launch (RNN tanh/relu,
GRU, LSTM).

Work split. Program ``(pb, ph, d)`` owns a tile of ``BLOCK_B`` sequences, a slice of ``BLOCK_H`` hidden units with
all of their gates, and direction ``d`` (``DIRS`` = 2 runs a bidirectional layer's two independent recurrences side
by side; direction 1 runs reversed). Per step it multiplies the whole ``h_{t-1}`` row of its batch tile by its slice
of ``W_hh``, adds the input part, applies the cell, and publishes its slice of ``h_t``; the programs that share a
batch tile exchange ``h`` through global memory.

Packed weights. The host permutes each weight once per call (:func:`rnnfast.backends.triton.pack_forward`) so that a
program's slice is one contiguous ``(K, N)`` operand with ``N = NGP * BLOCK_H`` columns ordered (unit, gate): one
``tl.dot`` produces every gate of the slice with the warps along N, and a reshape and two splits separate the gates.
``NGP`` is the gate count rounded up to a power of two: 1 (RNN) or 4. GRU's fourth column holds the input part of
``n``, which must stay apart from the hidden part ``W_hn h + b_hn`` that ``r`` multiplies: its ``W_hh`` slot 3 and
``W_ih`` slot 2 are zero, so ``h W_hh + x W_ih + b`` gives ``[r, z, W_hn h + b_hn, W_in x + b_in]`` in one sum. The
hoisted input product is the same packed GEMM for all steps (the biases folded in), read as one ``(BLOCK_B, N)``
tile per step. The backward's operand is ``W_hh``'s column slice, ``(NG*H, BLOCK_H)``, rows in the gate gradients'
order.

On chip. With ``NK > 0`` the slice is loaded before the time loop in ``NK`` chunks of ``BLOCK_K`` rows and stays on
chip for every step: the compiler keeps a loop-invariant dot operand in shared memory (a ``local_alloc`` before the
``scf.for``, a ``local_load`` per step; tests/test_triton_compile.py checks it), so each step reads it with
``ldmatrix`` instead of from L2. With ``NK == 0`` it streams from L2 in ``BLOCK_K`` tiles each step. The program's own ``h`` (and LSTM ``c``) slice stays in registers in
the compute dtype (fp32 for half types) across steps; only the exchange copy is rounded.

Schedules:

- ``persistent``: one launch runs all steps. With one program per batch tile (``BLOCK_H >= H``) a program needs
  only a CTA barrier between steps; with several it also waits on a per-tile counter (an in-kernel grid barrier),
  which needs every program resident at once: the launcher sizes such grids from the compiled kernel's occupancy
  and launches them cooperatively, so the driver refuses a grid that cannot be co-resident instead of hanging.
  The Triton interpreter runs programs one after another, so it can run the first form only.
- ``step``: one launch per step, the same step body; the launch boundary is the barrier, and the registers' state
  goes through ``carry`` between launches.

Buffers, per direction (stacked along a leading ``DIRS`` axis), indexed by time ``t``. "Layer dtype" is the
inputs' dtype, "compute dtype" fp32 for half inputs and else the same:

- ``hs (T, B, H)``, layer dtype: the state entering step ``t`` (``h0`` at the first step; carried unchanged over
  padded steps): the exchange between programs, and the operand of the ``dW_hh`` GEMM;
- ``cs (T, B, H)``, layer dtype: the same for the LSTM cell state (only the backward reads it);
- ``gates (T, B, GW*H)``, layer dtype: activated gates (RNN: ``h_t``; LSTM: ``i, f, g, o``; GRU: ``r, z, n`` and the
  hidden part of the ``n`` pre-activation, ``W_hn h + b_hn``);
- ``carry_h``, ``carry_c (B, H)``, compute dtype: the state between launches (``h0``, ``c0`` before the first);
- ``y (T, B, DIRS*H)``: direction ``d`` writes columns ``d*H ..``, the layout of a bidirectional layer's output.

The backward walks the steps in the opposite order. Step body: ``dh = pending + d_hid[t_prev] @ W_hh`` (the previous
backward step's gate gradients through the recurrent weights), then the local gate gradients, written as ``d_in``
(pre-activation gradients of the input part) and ``d_hid`` (of the hidden part; they differ only in GRU's ``n``
gate), both in the layer dtype: ``d_hid`` is the backward's exchange. ``pending`` is the part of ``dh_{t-1}`` that
does not pass through ``W_hh`` (GRU's ``dh*z``; the unchanged ``dh`` of a padded step). The weight, bias and input
gradients are GEMMs over all steps afterwards.

Per step and program (forward): read ``BLOCK_B x H`` of ``h`` (layer dtype) and a ``BLOCK_B x N`` fp32 tile of the
hoisted input from L2, plus ``K x N`` of ``W_hh`` when it streams; ``2 * BLOCK_B * K * N`` MMA flops; write
``BLOCK_B x BLOCK_H`` of ``h``, ``y`` and the gates; one barrier. The backward reads the ``BLOCK_B x G*H`` gate
gradients of the step before instead of ``h``.

**Predicted** µs/step on an H200 (``kernels/cost.py``, whose constants are assumptions; the plans are what
``python -m rnnfast.kernels.aot`` picks; **not measured on a GPU**):

=========================================  ========  ==================================  =========  ==========
anchor                                     kernel    plan                                 programs   predicted
=========================================  ========  ==================================  =========  ==========
(a) LSTM bf16 B=16 I=H=768                 forward   b16 h16, W_hh resident 3 x 256       48         2.2
(a)                                        backward  b16 h16, W_hh resident 3 x 1024      48         3.4
(b) LSTM fp32 (TF32) B=64 I=H=512          forward   b64 h8, streamed                     64         5.0
(b)                                        backward  b64 h16, streamed                    32         9.1
(c) GRU bf16 B=256 H=1024                  forward   b64 h32, streamed                    128        16.0
(c)                                        backward  b64 h64, streamed                    64         17.9
=========================================  ========  ==================================  =========  ==========

Measured: nothing yet.
"""

from __future__ import annotations

import triton
import triton.language as tl

CELL_IDS = {"rnn_tanh": 0, "rnn_relu": 1, "gru": 2, "lstm": 3}
# Globals a kernel reads must be constexpr objects.
RNN_TANH = tl.constexpr(CELL_IDS["rnn_tanh"])
RNN_RELU = tl.constexpr(CELL_IDS["rnn_relu"])
GRU = tl.constexpr(CELL_IDS["gru"])
LSTM = tl.constexpr(CELL_IDS["lstm"])


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only, so large |x| cannot overflow.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# The pointwise part of each cell, named and ordered as in rnnfast/reference.py, whose docstrings hold the equations.

@triton.jit
def _rnn_update(pre, RELU: tl.constexpr):
    """reference.rnn_update."""
    if RELU:
        return tl.where(pre < 0.0, 0.0, pre)  # NaN passes through, as torch.relu lets it
    return _tanh(pre)


@triton.jit
def _rnn_update_backward(dh, h_new, RELU: tl.constexpr):
    """reference.rnn_update_backward."""
    if RELU:
        return tl.where(h_new > 0.0, dh, 0.0)
    return dh * (1.0 - h_new * h_new)


@triton.jit
def _gru_update(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h):
    """reference.gru_update: ``(h', r, z, n)``."""
    r = _sigmoid(gx_r + gh_r)
    z = _sigmoid(gx_z + gh_z)
    n = _tanh(gx_n + r * gh_n)
    return (1.0 - z) * n + z * h, r, z, n


@triton.jit
def _gru_update_backward(dh, h, r, z, n, gh_n):
    """reference.gru_update_backward: ``(dr, dz, dn, dh_direct)``; d_hid's n plane is ``dn * r``."""
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dr = dn * gh_n * r * (1.0 - r)
    dz = dh * (h - n) * z * (1.0 - z)
    return dr, dz, dn, dh * z


@triton.jit
def _lstm_update(pre_i, pre_f, pre_g, pre_o, c):
    """reference.lstm_update: ``(h', c', i, f, g, o)``."""
    i = _sigmoid(pre_i)
    f = _sigmoid(pre_f)
    g = _tanh(pre_g)
    o = _sigmoid(pre_o)
    c_new = f * c + i * g
    return o * _tanh(c_new), c_new, i, f, g, o


@triton.jit
def _lstm_update_backward(dh, dc, c, i, f, g, o):
    """reference.lstm_update_backward: ``(di, df, dg, do, dc_prev)``."""
    tc = _tanh(f * c + i * g)
    dct = dc + dh * o * (1.0 - tc * tc)
    return dct * g * i * (1.0 - i), dct * c * f * (1.0 - f), dct * i * (1.0 - g * g), dh * tc * o * (1.0 - o), dct * f


@triton.jit
def _row_tile(base, stride, offs_b, mask_b, k0, K, BLOCK_K: tl.constexpr):
    """(BLOCK_B, BLOCK_K) tile of a row-major (rows, K) operand, columns k0.. (zeros past K or the batch)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = mask_b[:, None] & (offs_k < K)[None, :]
    # Other programs stored these rows last step. .cg keeps them out of L1 where it compiles to ld.global.cg; where
    # the compiler turns it into cp.async.ca (vectors under 16 bytes) they are still fresh only because the acquire
    # in _sync invalidates L1 first. Both orders rest on that acquire, not on the modifier.
    return tl.load(base + offs_b[:, None] * stride + offs_k[None, :], mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _w_chunk(w_base, k0, N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows ``k0 .. k0+BLOCK_K`` of a packed ``(K_pad, N)`` slice (zero-padded on the host: no mask)."""
    return tl.load(w_base + (k0 + tl.arange(0, BLOCK_K))[:, None] * N + tl.arange(0, N)[None, :])


@triton.jit
def _chunked_dot(acc, a_base, a_stride, offs_b, mask_b, K, w0, w1, w2, w3, w_base, K_pad,
                 N: tl.constexpr, NK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += A[offs_b, :K] @ W_slice``: with ``NK`` > 0 the slice is the on-chip chunks ``w0..w3``, with
    ``NK == 0`` it streams from ``w_base`` in ``BLOCK_K`` tiles."""
    wt = w_base.dtype.element_ty
    if NK == 0:
        for k0 in range(0, K_pad, BLOCK_K):
            a = _row_tile(a_base, a_stride, offs_b, mask_b, k0, K, BLOCK_K)
            acc = tl.dot(a.to(wt), _w_chunk(w_base, k0, N, BLOCK_K), acc, input_precision=PRECISION)
    else:
        # One accumulator per chunk: NK independent chains of BLOCK_K/16 dependent MMAs instead of one chain of
        # K/16, so the tensor cores overlap them; summed at the end.
        a = _row_tile(a_base, a_stride, offs_b, mask_b, 0, K, BLOCK_K)
        acc = tl.dot(a.to(wt), w0, acc, input_precision=PRECISION)
        if NK > 1:
            a = _row_tile(a_base, a_stride, offs_b, mask_b, BLOCK_K, K, BLOCK_K)
            acc1 = tl.dot(a.to(wt), w1, input_precision=PRECISION, out_dtype=acc.dtype)
            if NK > 2:
                a = _row_tile(a_base, a_stride, offs_b, mask_b, 2 * BLOCK_K, K, BLOCK_K)
                acc2 = tl.dot(a.to(wt), w2, input_precision=PRECISION, out_dtype=acc.dtype)
                if NK > 3:
                    a = _row_tile(a_base, a_stride, offs_b, mask_b, 3 * BLOCK_K, K, BLOCK_K)
                    acc2 += tl.dot(a.to(wt), w3, input_precision=PRECISION, out_dtype=acc.dtype)
                acc1 += acc2
            acc += acc1
    return acc


@triton.jit
def _resident(w_base, N: tl.constexpr, NK: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``NK`` chunks of a packed slice, loaded once (with ``NK == 0``, nothing: zeros that are never used)."""
    if NK > 0:
        w0 = _w_chunk(w_base, 0, N, BLOCK_K)
    else:
        w0 = tl.zeros((BLOCK_K, N), dtype=w_base.dtype.element_ty)
    w1 = w0
    w2 = w0
    w3 = w0
    if NK > 1:
        w1 = _w_chunk(w_base, BLOCK_K, N, BLOCK_K)
    if NK > 2:
        w2 = _w_chunk(w_base, 2 * BLOCK_K, N, BLOCK_K)
    if NK > 3:
        w3 = _w_chunk(w_base, 3 * BLOCK_K, N, BLOCK_K)
    return w0, w1, w2, w3


@triton.jit
def _split_gates(acc, NGP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The gate planes ``(BLOCK_B, BLOCK_H)`` of a product whose columns are ``unit * NGP + gate``."""
    if NGP == 1:
        g0 = acc
        g1 = acc
        g2 = acc
        g3 = acc
    else:
        # gate = 2p + q: split q first (gates 0, 2 | 1, 3), then p.
        even, odd = tl.split(tl.reshape(acc, (BLOCK_B, BLOCK_H, 2, 2)))
        g0, g2 = tl.split(even)
        g1, g3 = tl.split(odd)
    return g0, g1, g2, g3


@triton.jit
def _direction_planes(hs_ptr, cs_ptr, gates_ptr, d, T, B, H, GW: tl.constexpr):
    """Direction ``d``'s hs, cs and gates in the workspace, whose parts are stacked along a leading direction axis;
    and ``plane_n``, the elements of one direction's ``(T, B, H)`` plane."""
    plane_n = (T * B).to(tl.int64) * H
    return hs_ptr + d * plane_n, cs_ptr + d * plane_n, gates_ptr + d * plane_n * GW, plane_n


@triton.jit
def _program_tile(len_ptr, T, B, H, HAS_LEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's sequences and hidden units, their masks, the tile's offsets in a (B, H) plane, and each
    sequence's length."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    bh = offs_b[:, None] * H + offs_h[None, :]
    seq_len = tl.zeros((BLOCK_B,), dtype=tl.int32) + T
    if HAS_LEN:
        seq_len = tl.load(len_ptr + offs_b, mask=mask_b, other=0).to(tl.int32)
    return offs_b, offs_h, mask_b, mask_h, mask_bh, bh, seq_len


@triton.jit
def _time(s, T, rev):
    """Step ``s`` runs time ``t``; the step after it runs ``t_next``."""
    t = tl.where(rev, T - 1 - s, s)
    return t, tl.where(rev, t - 1, t + 1)


@triton.jit
def _sync(sync_ptr, target, PERSISTENT: tl.constexpr, SYNC: tl.constexpr):
    """End of a step: make this program's stores visible to the programs of its batch tile, then wait for them."""
    if PERSISTENT:
        # Threads of this program read, next step, what other threads of it stored this step.
        tl.debug_barrier()
        if SYNC:
            # Grid barrier of the batch tile: a counter that grows by one per program per step. Release publishes
            # this program's stores; acquire makes the others' visible before the next step's loads.
            tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
            seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
            while seen < target:
                seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()


@triton.jit
def layer_forward_kernel(
        x_ptr, gx_ptr, wi_ptr, wh_ptr, b_ptr, len_ptr,
        hs_ptr, cs_ptr, gates_ptr, y_ptr, hn_ptr, cn_ptr, carry_h_ptr, carry_c_ptr, sync_ptr,
        T, B, I, H, K_pad, I_pad, s_begin, n_steps,
        CELL: tl.constexpr, NGP: tl.constexpr, GW: tl.constexpr, FUSED: tl.constexpr, REVERSE: tl.constexpr,
        DIRS: tl.constexpr, HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NK: tl.constexpr, BLOCK_I: tl.constexpr,
        PERSISTENT: tl.constexpr, SYNC: tl.constexpr, PRECISION: tl.constexpr):
    """Forward steps ``s_begin .. s_begin + n_steps - 1``.

    Packed operands (per direction): ``wh (n_slices, K_pad, N)`` with ``K_pad = NK*BLOCK_K`` when resident, else
    a multiple of ``BLOCK_K``; ``wi (n_slices, I_pad, N)`` (fused); ``b (n_slices*N)`` the folded biases (fused);
    ``gx (T, B, DIRS*n_slices*N)`` the hoisted input part of both directions, the biases folded in.
    """
    N: tl.constexpr = NGP * BLOCK_H
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    d = tl.program_id(2)
    offs_b, offs_h, mask_b, mask_h, mask_bh, bh, seq_len = _program_tile(len_ptr, T, B, H, HAS_LEN, BLOCK_B, BLOCK_H)
    ct = carry_h_ptr.dtype.element_ty
    st = hs_ptr.dtype.element_ty
    n_slices = tl.num_programs(1)
    rev = (d == 1) | REVERSE

    # Per-direction bases: every buffer is stacked along a leading direction axis.
    hs_ptr, cs_ptr, gates_ptr, plane_n = _direction_planes(hs_ptr, cs_ptr, gates_ptr, d, T, B, H, GW)
    hn_ptr += d * B * H
    cn_ptr += d * B * H
    carry_h_ptr += d * B * H
    carry_c_ptr += d * B * H
    sync_ptr += d * tl.num_programs(0) + pid_b
    wh_base = wh_ptr + (d * n_slices + pid_h).to(tl.int64) * K_pad * N
    wi_base = wi_ptr + (d * n_slices + pid_h).to(tl.int64) * I_pad * N
    offs_n = tl.arange(0, N)
    gx_cols = (d * n_slices + pid_h) * N + offs_n  # gx (T, B, DIRS * n_slices * N): one GEMM for both
    y_cols = d * H + offs_h  # y (T, B, DIRS*H)

    bias = tl.zeros((BLOCK_B, N), dtype=ct)
    if FUSED and HAS_BIAS:
        bias += tl.load(b_ptr + (d * n_slices + pid_h) * N + offs_n)[None, :]
    w0, w1, w2, w3 = _resident(wh_base, N, NK, BLOCK_K)
    h_own = tl.load(carry_h_ptr + bh, mask=mask_bh, other=0.0)
    c_own = h_own
    if CELL == LSTM:
        c_own = tl.load(carry_c_ptr + bh, mask=mask_bh, other=0.0)

    for k in range(0, n_steps):
        s = s_begin + k
        t, t_next = _time(s, T, rev)
        plane = t.to(tl.int64) * B * H

        # Every gate of the slice: h_{t-1} (the whole row of the batch tile) times the packed W_hh slice, plus the
        # input part.
        acc = bias
        if FUSED:
            acc = _chunked_dot(acc, x_ptr + t.to(tl.int64) * B * I, I, offs_b, mask_b, I, w0, w0, w0, w0, wi_base,
                               I_pad, N, 0, BLOCK_I, PRECISION)
        else:
            gx_row = DIRS * n_slices * N
            gx = gx_ptr + t.to(tl.int64) * B * gx_row + offs_b[:, None] * gx_row + gx_cols[None, :]
            acc += tl.load(gx, mask=mask_b[:, None] & (offs_n < N)[None, :], other=0.0).to(ct)
        acc = _chunked_dot(acc, hs_ptr + plane, H, offs_b, mask_b, H, w0, w1, w2, w3, wh_base, K_pad, N, NK,
                           BLOCK_K, PRECISION)
        p0, p1, p2, p3 = _split_gates(acc, NGP, BLOCK_B, BLOCK_H)

        gates = gates_ptr + t.to(tl.int64) * B * (GW * H) + offs_b[:, None] * (GW * H) + offs_h[None, :]
        if CELL == LSTM:
            h_new, c_new, i, f, g, o = _lstm_update(p0, p1, p2, p3, c_own)
            tl.store(gates, i.to(st), mask=mask_bh)
            tl.store(gates + H, f.to(st), mask=mask_bh)
            tl.store(gates + 2 * H, g.to(st), mask=mask_bh)
            tl.store(gates + 3 * H, o.to(st), mask=mask_bh)
        elif CELL == GRU:
            # p2 = W_hn h + b_hn, p3 = W_in x + b_in (the packing's slot order).
            h_new, r, z, n = _gru_update(p0, p1, p3, 0.0, 0.0, p2, h_own)
            tl.store(gates, r.to(st), mask=mask_bh)
            tl.store(gates + H, z.to(st), mask=mask_bh)
            tl.store(gates + 2 * H, n.to(st), mask=mask_bh)
            tl.store(gates + 3 * H, p2.to(st), mask=mask_bh)
        else:
            h_new = _rnn_update(p0, CELL == RNN_RELU)
            tl.store(gates, h_new.to(st), mask=mask_bh)

        # A padded step (t >= length) outputs zeros and carries the state unchanged, as packed sequences do.
        active = (t < seq_len)[:, None] & mask_bh
        tl.store(y_ptr + t.to(tl.int64) * B * (DIRS * H) + offs_b[:, None] * (DIRS * H) + y_cols[None, :],
                 tl.where(active, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=mask_bh)
        h_own = tl.where(active, h_new, h_own)
        last = s == T - 1
        next_plane = t_next.to(tl.int64) * B * H
        tl.store(hs_ptr + next_plane + bh, h_own.to(st), mask=mask_bh & (s < T - 1))
        tl.store(hn_ptr + bh, h_own.to(hn_ptr.dtype.element_ty), mask=mask_bh & last)
        if CELL == LSTM:
            c_own = tl.where(active, c_new, c_own)
            tl.store(cs_ptr + next_plane + bh, c_own.to(st), mask=mask_bh & (s < T - 1))
            tl.store(cn_ptr + bh, c_own.to(cn_ptr.dtype.element_ty), mask=mask_bh & last)
        _sync(sync_ptr, (k + 1) * n_slices, PERSISTENT, SYNC)

    if not PERSISTENT:
        tl.store(carry_h_ptr + bh, h_own, mask=mask_bh)
        if CELL == LSTM:
            tl.store(carry_c_ptr + bh, c_own, mask=mask_bh)


@triton.jit
def layer_backward_kernel(
        grad_y_ptr, wt_ptr, len_ptr, hs_ptr, cs_ptr, gates_ptr, d_in_ptr, d_hid_ptr, dh_ptr, dc_ptr, sync_ptr,
        T, B, H, K_pad, r_begin, n_steps,
        CELL: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr, REVERSE: tl.constexpr, DIRS: tl.constexpr,
        HAS_LEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        NK: tl.constexpr, PERSISTENT: tl.constexpr, SYNC: tl.constexpr, PRECISION: tl.constexpr):
    """Backward steps ``r_begin .. r_begin + n_steps - 1``; backward step r undoes forward step ``T-1-r``.

    ``wt (n_slices, K_pad, BLOCK_H)``: the packed column slices of ``W_hh`` (rows ``g*H + u``, the order of
    ``d_hid``'s columns). ``dh (B, H)`` and ``dc (B, H)`` hold the pending state gradients between launches:
    ``grad_h_n``/``grad_c_n`` before the first step; after the last, the part of ``dh0`` that does not pass through
    ``W_hh`` and ``dc0``. ``d_hid`` is ``d_in`` itself except for GRU.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    d = tl.program_id(2)
    offs_b, offs_h, mask_b, mask_h, mask_bh, bh, seq_len = _program_tile(len_ptr, T, B, H, HAS_LEN, BLOCK_B, BLOCK_H)
    ct = dh_ptr.dtype.element_ty
    st = d_in_ptr.dtype.element_ty
    n_slices = tl.num_programs(1)
    rev = (d == 1) | REVERSE
    KG = NG * H

    hs_ptr, cs_ptr, gates_ptr, plane_n = _direction_planes(hs_ptr, cs_ptr, gates_ptr, d, T, B, H, GW)
    d_in_ptr += d * plane_n * NG
    d_hid_ptr += d * plane_n * NG
    dh_ptr += d * B * H
    dc_ptr += d * B * H
    sync_ptr += d * tl.num_programs(0) + pid_b
    wt_base = wt_ptr + (d * n_slices + pid_h).to(tl.int64) * K_pad * BLOCK_H
    gy_cols = d * H + offs_h  # grad_y (T, B, DIRS*H)

    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=ct)
    pending = tl.load(dh_ptr + bh, mask=mask_bh, other=0.0)
    dc = zero
    if CELL == LSTM:
        dc = tl.load(dc_ptr + bh, mask=mask_bh, other=0.0)
    w0, w1, w2, w3 = _resident(wt_base, BLOCK_H, NK, BLOCK_K)

    for k in range(0, n_steps):
        r = r_begin + k
        # t_done: the time of forward step s + 1, undone by the previous backward step.
        t, t_done = _time(T - 1 - r, T, rev)
        plane = t.to(tl.int64) * B * H

        # dh entering step t: pending + d_hid[t_done] @ W_hh, over every gate of every hidden unit.
        mask_prev = mask_b & (r > 0)  # nothing was undone before the first backward step
        acc = _chunked_dot(zero, d_hid_ptr + t_done.to(tl.int64) * B * KG, KG, offs_b, mask_prev, KG,
                           w0, w1, w2, w3, wt_base, K_pad, BLOCK_H, NK, BLOCK_K, PRECISION)
        dh_in = pending + acc

        active = (t < seq_len)[:, None] & mask_bh
        gy = grad_y_ptr + t.to(tl.int64) * B * (DIRS * H) + offs_b[:, None] * (DIRS * H) + gy_cols[None, :]
        dh = tl.where(active, dh_in + tl.load(gy, mask=mask_bh, other=0.0).to(ct), 0.0)
        gates = gates_ptr + t.to(tl.int64) * B * (GW * H) + offs_b[:, None] * (GW * H) + offs_h[None, :]
        d_in = d_in_ptr + t.to(tl.int64) * B * KG + offs_b[:, None] * KG + offs_h[None, :]
        if CELL == LSTM:
            i = tl.load(gates, mask=mask_bh, other=0.0).to(ct)
            f = tl.load(gates + H, mask=mask_bh, other=0.0).to(ct)
            g = tl.load(gates + 2 * H, mask=mask_bh, other=0.0).to(ct)
            o = tl.load(gates + 3 * H, mask=mask_bh, other=0.0).to(ct)
            c_old = tl.load(cs_ptr + plane + bh, mask=mask_bh, other=0.0).to(ct)
            # dh is zero at a padded step; dc is masked too, so that step's gate gradients are zero.
            di, df, dg, do, dc_prev = _lstm_update_backward(dh, tl.where(active, dc, 0.0), c_old, i, f, g, o)
            tl.store(d_in, di.to(st), mask=mask_bh)
            tl.store(d_in + H, df.to(st), mask=mask_bh)
            tl.store(d_in + 2 * H, dg.to(st), mask=mask_bh)
            tl.store(d_in + 3 * H, do.to(st), mask=mask_bh)
            pending = tl.where(active, 0.0, dh_in)
            dc = tl.where(active, dc_prev, dc)
        elif CELL == GRU:
            r_ = tl.load(gates, mask=mask_bh, other=0.0).to(ct)
            z = tl.load(gates + H, mask=mask_bh, other=0.0).to(ct)
            n = tl.load(gates + 2 * H, mask=mask_bh, other=0.0).to(ct)
            gh_n = tl.load(gates + 3 * H, mask=mask_bh, other=0.0).to(ct)
            h_old = tl.load(hs_ptr + plane + bh, mask=mask_bh, other=0.0).to(ct)
            dr, dz, dn, dh_direct = _gru_update_backward(dh, h_old, r_, z, n, gh_n)
            tl.store(d_in, dr.to(st), mask=mask_bh)
            tl.store(d_in + H, dz.to(st), mask=mask_bh)
            tl.store(d_in + 2 * H, dn.to(st), mask=mask_bh)
            d_hid = d_hid_ptr + t.to(tl.int64) * B * KG + offs_b[:, None] * KG + offs_h[None, :]
            tl.store(d_hid, dr.to(st), mask=mask_bh)
            tl.store(d_hid + H, dz.to(st), mask=mask_bh)
            tl.store(d_hid + 2 * H, (dn * r_).to(st), mask=mask_bh)
            pending = tl.where(active, dh_direct, dh_in)
        else:
            h_new = tl.load(gates, mask=mask_bh, other=0.0).to(ct)
            tl.store(d_in, _rnn_update_backward(dh, h_new, CELL == RNN_RELU).to(st), mask=mask_bh)
            pending = tl.where(active, 0.0, dh_in)
        _sync(sync_ptr, (k + 1) * n_slices, PERSISTENT, SYNC)

    tl.store(dh_ptr + bh, pending, mask=mask_bh)
    if CELL == LSTM:
        tl.store(dc_ptr + bh, dc, mask=mask_bh)
