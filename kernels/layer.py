"""Triton kernels for one recurrent layer in one direction over a whole sequence (RNN tanh/relu, GRU, LSTM).

Work split: program ``(pb, ph)`` owns a tile of ``BLOCK_B`` sequences and a slice of ``BLOCK_H`` hidden units with
all of their gates, so the activations and the state update stay in registers. Per step it multiplies the whole
``h_{t-1}`` of its batch tile by its slice of ``W_hh`` (every gate), adds the input part (``hoisted``: read from a
GEMM done before the loop; ``fused``: ``x_t`` times its slice of ``W_ih`` inside the step), and writes its slice
of ``h_t``. The programs that share a batch tile exchange ``h`` through global memory.

Schedules:

- ``persistent``: one launch runs all steps. With one program per batch tile (``BLOCK_H >= H``) a program needs
  only a CTA barrier between steps; with several it also waits on a per-tile counter (an in-kernel grid barrier),
  which needs every program resident at once: the launcher keeps such grids within the multiprocessor count.
  The Triton interpreter runs programs one after another, so it can run the first form only.
- ``step``: one launch per step, the same step body; the launch boundary is the barrier.

Workspace (compute dtype: float32 for half inputs, else the input dtype), all indexed by time ``t``:

- ``hs (T, B, H)``: the state entering step ``t`` (``h0`` at the first step; carried unchanged over padded steps),
  which is also the operand of the ``dW_hh`` GEMM;
- ``cs (T, B, H)``: the same for the LSTM cell state;
- ``gates (T, B, GW*H)``: activated gates (RNN: ``h_t``; LSTM: ``i, f, g, o``; GRU: ``r, z, n`` and the hidden
  part of the ``n`` pre-activation, ``W_hn h + b_hn``).

The backward walks the steps in the opposite order. Step body: ``dh = pending + dgates_hid[t_prev] @ W_hh`` (the
previous backward step's gate gradients through the recurrent weights), then the local gate gradients, written as
``d_in`` (pre-activation gradients of the input part) and ``d_hid`` (of the hidden part; they differ only in
GRU's ``n`` gate). ``pending`` is the part of ``dh_{t-1}`` that does not pass through ``W_hh`` (GRU's ``dh*z``;
the unchanged ``dh`` of a padded step). The weight, bias and input gradients are GEMMs over all steps afterwards.
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
    # .cg: other programs wrote these rows; read them from L2, never from a stale L1 line.
    return tl.load(base + offs_b[:, None] * stride + offs_k[None, :], mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _gate_tiles(w_ptr, stride_k, stride_h, gate_stride, k0, K, offs_h, mask_h, NG: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Per gate g < NG, the (BLOCK_K, BLOCK_H) tile at ``w_ptr + g*gate_stride + k*stride_k + h*stride_h``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_k < K)[:, None] & mask_h[None, :]
    p = w_ptr + offs_k[:, None] * stride_k + offs_h[None, :] * stride_h
    w0 = tl.load(p, mask=mask, other=0.0)
    w1 = w0
    w2 = w0
    w3 = w0
    if NG > 1:
        w1 = tl.load(p + gate_stride, mask=mask, other=0.0)
        w2 = tl.load(p + 2 * gate_stride, mask=mask, other=0.0)
    if NG > 3:
        w3 = tl.load(p + 3 * gate_stride, mask=mask, other=0.0)
    return w0, w1, w2, w3


@triton.jit
def _w_tiles(w_ptr, w_stride, k0, K, H, offs_h, mask_h, NG: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward operand: per gate, ``W[g*H + offs_h, k0:k0+BLOCK_K]^T`` of a row-major (NG*H, K) weight."""
    return _gate_tiles(w_ptr, 1, w_stride, H * w_stride, k0, K, offs_h, mask_h, NG, BLOCK_K)


@triton.jit
def _wt_tiles(w_ptr, k0, H, offs_h, mask_h, NG: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward operand (W_hh^T): per gate, ``W_hh[g*H + k0 + k, offs_h]`` of the (NG*H, H) weight."""
    return _gate_tiles(w_ptr, H, 1, H * H, k0, H, offs_h, mask_h, NG, BLOCK_K)


@triton.jit
def _dot4(acc0, acc1, acc2, acc3, a, w0, w1, w2, w3, NG: tl.constexpr, PRECISION: tl.constexpr):
    """acc_g += a @ w_g for each gate g < NG (operands in the weights' dtype, accumulation in acc's)."""
    a = a.to(w0.dtype)
    acc0 = tl.dot(a, w0, acc0, input_precision=PRECISION)
    if NG > 1:
        acc1 = tl.dot(a, w1, acc1, input_precision=PRECISION)
        acc2 = tl.dot(a, w2, acc2, input_precision=PRECISION)
    if NG > 3:
        acc3 = tl.dot(a, w3, acc3, input_precision=PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gates_dot(acc0, acc1, acc2, acc3, a_base, offs_b, mask_b, K, w_ptr, H, offs_h, mask_h,
               NG: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc_g += A[offs_b, :K] @ W[g*H + offs_h, :K]^T, streaming both operands over K (A and W row-major, K wide)."""
    for k0 in range(0, K, BLOCK_K):
        a = _row_tile(a_base, K, offs_b, mask_b, k0, K, BLOCK_K)
        w0, w1, w2, w3 = _w_tiles(w_ptr, K, k0, K, H, offs_h, mask_h, NG, BLOCK_K)
        acc0, acc1, acc2, acc3 = _dot4(acc0, acc1, acc2, acc3, a, w0, w1, w2, w3, NG, PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def _program_tile(len_ptr, T, B, H, NG: tl.constexpr, GW: tl.constexpr, HAS_LEN: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's sequences and hidden units, their masks, the tile's offsets in (B, H), (B, NG*H) and
    (B, GW*H) planes (gate 0), and each sequence's length."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    bh = offs_b[:, None] * H + offs_h[None, :]
    bg = offs_b[:, None] * (NG * H) + offs_h[None, :]
    bw = offs_b[:, None] * (GW * H) + offs_h[None, :]
    seq_len = tl.zeros((BLOCK_B,), dtype=tl.int32) + T
    if HAS_LEN:
        seq_len = tl.load(len_ptr + offs_b, mask=mask_b, other=0).to(tl.int32)
    return offs_b, offs_h, mask_b, mask_h, mask_bh, bh, bg, bw, seq_len


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
        x_ptr, gx_ptr, w_ih_ptr, w_hh_ptr, b_ptr, b_hn_ptr, len_ptr,
        hs_ptr, cs_ptr, gates_ptr, y_ptr, hn_ptr, cn_ptr, sync_ptr,
        T, B, I, H, s_begin, n_steps,
        CELL: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr, FUSED: tl.constexpr, REVERSE: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, W_RESIDENT: tl.constexpr, PERSISTENT: tl.constexpr,
        SYNC: tl.constexpr, PRECISION: tl.constexpr):
    """Forward steps ``s_begin .. s_begin + n_steps - 1`` (step s runs time ``t = s``, or ``T-1-s`` reversed).

    ``gx (T, B, NG*H)``: hoisted input part with the biases folded in (GRU's n gate: ``b_in`` only); ``b (NG*H)``:
    the same biases for the fused mode; ``b_hn (H)``: GRU's hidden bias of n, which r multiplies.
    """
    pid_b = tl.program_id(0)
    offs_b, offs_h, mask_b, mask_h, mask_bh, bh, bg, bw, seq_len = _program_tile(
        len_ptr, T, B, H, NG, GW, HAS_LEN, BLOCK_B, BLOCK_H)
    ct = hs_ptr.dtype.element_ty

    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=ct)
    bias0 = zero
    bias1 = zero
    bias2 = zero
    bias3 = zero
    b_hn = zero
    if HAS_BIAS:
        if FUSED:
            bias0 += tl.load(b_ptr + offs_h, mask=mask_h, other=0.0)[None, :]
            if NG > 1:
                bias1 += tl.load(b_ptr + H + offs_h, mask=mask_h, other=0.0)[None, :]
                bias2 += tl.load(b_ptr + 2 * H + offs_h, mask=mask_h, other=0.0)[None, :]
            if NG > 3:
                bias3 += tl.load(b_ptr + 3 * H + offs_h, mask=mask_h, other=0.0)[None, :]
        if CELL == GRU:
            b_hn += tl.load(b_hn_ptr + offs_h, mask=mask_h, other=0.0)[None, :]
    if W_RESIDENT:
        # The whole K extent fits one tile: load this program's W_hh slice once and keep it for every step.
        wr0, wr1, wr2, wr3 = _w_tiles(w_hh_ptr, H, 0, H, H, offs_h, mask_h, NG, BLOCK_K)

    for k in range(0, n_steps):
        s = s_begin + k
        if REVERSE:
            t = T - 1 - s
            t_next = t - 1
        else:
            t = s
            t_next = t + 1
        plane = t.to(tl.int64) * B * H

        # Recurrent part: h_{t-1} of the whole batch tile times this program's W_hh slice, every gate.
        acc0 = zero
        acc1 = zero
        acc2 = zero
        acc3 = zero
        if W_RESIDENT:
            a = _row_tile(hs_ptr + plane, H, offs_b, mask_b, 0, H, BLOCK_K)
            acc0, acc1, acc2, acc3 = _dot4(acc0, acc1, acc2, acc3, a, wr0, wr1, wr2, wr3, NG, PRECISION)
        else:
            acc0, acc1, acc2, acc3 = _gates_dot(acc0, acc1, acc2, acc3, hs_ptr + plane, offs_b, mask_b, H,
                                                w_hh_ptr, H, offs_h, mask_h, NG, BLOCK_K, PRECISION)

        # Input part.
        if FUSED:
            in0 = bias0
            in1 = bias1
            in2 = bias2
            in3 = bias3
            in0, in1, in2, in3 = _gates_dot(in0, in1, in2, in3, x_ptr + t.to(tl.int64) * B * I, offs_b, mask_b, I,
                                            w_ih_ptr, H, offs_h, mask_h, NG, BLOCK_I, PRECISION)
        else:
            gx = gx_ptr + t.to(tl.int64) * B * (NG * H) + bg
            in0 = tl.load(gx, mask=mask_bh, other=0.0).to(ct)
            in1 = zero
            in2 = zero
            in3 = zero
            if NG > 1:
                in1 = tl.load(gx + H, mask=mask_bh, other=0.0).to(ct)
                in2 = tl.load(gx + 2 * H, mask=mask_bh, other=0.0).to(ct)
            if NG > 3:
                in3 = tl.load(gx + 3 * H, mask=mask_bh, other=0.0).to(ct)

        h_old = tl.load(hs_ptr + plane + bh, mask=mask_bh, other=0.0)
        gates = gates_ptr + t.to(tl.int64) * B * (GW * H) + bw
        if CELL == LSTM:
            c_old = tl.load(cs_ptr + plane + bh, mask=mask_bh, other=0.0)
            h_new, c_new, i, f, g, o = _lstm_update(acc0 + in0, acc1 + in1, acc2 + in2, acc3 + in3, c_old)
            tl.store(gates, i, mask=mask_bh)
            tl.store(gates + H, f, mask=mask_bh)
            tl.store(gates + 2 * H, g, mask=mask_bh)
            tl.store(gates + 3 * H, o, mask=mask_bh)
        elif CELL == GRU:
            gh_n = acc2 + b_hn
            h_new, r, z, n = _gru_update(in0, in1, in2, acc0, acc1, gh_n, h_old)
            tl.store(gates, r, mask=mask_bh)
            tl.store(gates + H, z, mask=mask_bh)
            tl.store(gates + 2 * H, n, mask=mask_bh)
            tl.store(gates + 3 * H, gh_n, mask=mask_bh)
        else:
            h_new = _rnn_update(acc0 + in0, CELL == RNN_RELU)
            tl.store(gates, h_new, mask=mask_bh)

        # A padded step (t >= length) outputs zeros and carries the state unchanged, as packed sequences do.
        active = (t < seq_len)[:, None] & mask_bh
        tl.store(y_ptr + plane + bh, tl.where(active, h_new, 0.0), mask=mask_bh)
        h_keep = tl.where(active, h_new, h_old)
        last = s == T - 1
        next_plane = t_next.to(tl.int64) * B * H
        tl.store(hs_ptr + next_plane + bh, h_keep, mask=mask_bh & (s < T - 1))
        tl.store(hn_ptr + bh, h_keep, mask=mask_bh & last)
        if CELL == LSTM:
            c_keep = tl.where(active, c_new, c_old)
            tl.store(cs_ptr + next_plane + bh, c_keep, mask=mask_bh & (s < T - 1))
            tl.store(cn_ptr + bh, c_keep, mask=mask_bh & last)
        _sync(sync_ptr + pid_b, (k + 1) * tl.num_programs(1), PERSISTENT, SYNC)


@triton.jit
def layer_backward_kernel(
        grad_y_ptr, w_hh_ptr, len_ptr, hs_ptr, cs_ptr, gates_ptr, d_in_ptr, d_hid_ptr, dh_ptr, dc_ptr, sync_ptr,
        T, B, H, r_begin, n_steps,
        CELL: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, W_RESIDENT: tl.constexpr,
        PERSISTENT: tl.constexpr, SYNC: tl.constexpr, PRECISION: tl.constexpr):
    """Backward steps ``r_begin .. r_begin + n_steps - 1``; backward step r undoes forward step ``T-1-r``.

    ``dh (B, H)`` and ``dc (B, H)`` hold the pending state gradients between launches: ``grad_h_n``/``grad_c_n``
    before the first step; after the last, the part of ``dh0`` that does not pass through ``W_hh`` and ``dc0``.
    ``d_hid`` is ``d_in`` itself except for GRU.
    """
    pid_b = tl.program_id(0)
    offs_b, offs_h, mask_b, mask_h, mask_bh, bh, bg, bw, seq_len = _program_tile(
        len_ptr, T, B, H, NG, GW, HAS_LEN, BLOCK_B, BLOCK_H)
    ct = hs_ptr.dtype.element_ty
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=ct)
    pending = tl.load(dh_ptr + bh, mask=mask_bh, other=0.0)
    dc = zero
    if CELL == LSTM:
        dc = tl.load(dc_ptr + bh, mask=mask_bh, other=0.0)
    if W_RESIDENT:
        wr0, wr1, wr2, wr3 = _wt_tiles(w_hh_ptr, 0, H, offs_h, mask_h, NG, BLOCK_K)

    for k in range(0, n_steps):
        r = r_begin + k
        s = T - 1 - r
        if REVERSE:
            t = T - 1 - s
            t_done = t - 1  # the time of forward step s + 1, undone by the previous backward step
        else:
            t = s
            t_done = t + 1
        plane = t.to(tl.int64) * B * H

        # dh entering step t: pending + d_hid[t_done] @ W_hh, summed over every gate of every hidden unit.
        d_prev = d_hid_ptr + t_done.to(tl.int64) * B * (NG * H)
        mask_prev = mask_b & (r > 0)  # nothing was undone before the first backward step
        acc = zero
        for gi in tl.static_range(NG):
            for k0 in range(0, H, BLOCK_K):
                a = _row_tile(d_prev + gi * H, NG * H, offs_b, mask_prev, k0, H, BLOCK_K)
                if W_RESIDENT:
                    if gi == 0:
                        w = wr0
                    elif gi == 1:
                        w = wr1
                    elif gi == 2:
                        w = wr2
                    else:
                        w = wr3
                else:
                    w0, w1, w2, w3 = _wt_tiles(w_hh_ptr + gi * H * H, k0, H, offs_h, mask_h, 1, BLOCK_K)
                    w = w0
                acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION)
        dh_in = pending + acc

        active = (t < seq_len)[:, None] & mask_bh
        dh = tl.where(active, dh_in + tl.load(grad_y_ptr + plane + bh, mask=mask_bh, other=0.0).to(ct), 0.0)
        gates = gates_ptr + t.to(tl.int64) * B * (GW * H) + bw
        d_in = d_in_ptr + t.to(tl.int64) * B * (NG * H) + bg
        if CELL == LSTM:
            i = tl.load(gates, mask=mask_bh, other=0.0)
            f = tl.load(gates + H, mask=mask_bh, other=0.0)
            g = tl.load(gates + 2 * H, mask=mask_bh, other=0.0)
            o = tl.load(gates + 3 * H, mask=mask_bh, other=0.0)
            c_old = tl.load(cs_ptr + plane + bh, mask=mask_bh, other=0.0)
            # dh is zero at a padded step; dc is masked too, so that step's gate gradients are zero.
            di, df, dg, do, dc_prev = _lstm_update_backward(dh, tl.where(active, dc, 0.0), c_old, i, f, g, o)
            tl.store(d_in, di, mask=mask_bh)
            tl.store(d_in + H, df, mask=mask_bh)
            tl.store(d_in + 2 * H, dg, mask=mask_bh)
            tl.store(d_in + 3 * H, do, mask=mask_bh)
            pending = tl.where(active, 0.0, dh_in)
            dc = tl.where(active, dc_prev, dc)
        elif CELL == GRU:
            r_ = tl.load(gates, mask=mask_bh, other=0.0)
            z = tl.load(gates + H, mask=mask_bh, other=0.0)
            n = tl.load(gates + 2 * H, mask=mask_bh, other=0.0)
            gh_n = tl.load(gates + 3 * H, mask=mask_bh, other=0.0)
            h_old = tl.load(hs_ptr + plane + bh, mask=mask_bh, other=0.0)
            dr, dz, dn, dh_direct = _gru_update_backward(dh, h_old, r_, z, n, gh_n)
            tl.store(d_in, dr, mask=mask_bh)
            tl.store(d_in + H, dz, mask=mask_bh)
            tl.store(d_in + 2 * H, dn, mask=mask_bh)
            d_hid = d_hid_ptr + t.to(tl.int64) * B * (NG * H) + bg
            tl.store(d_hid, dr, mask=mask_bh)
            tl.store(d_hid + H, dz, mask=mask_bh)
            tl.store(d_hid + 2 * H, dn * r_, mask=mask_bh)
            pending = tl.where(active, dh_direct, dh_in)
        else:
            h_new = tl.load(gates, mask=mask_bh, other=0.0)
            tl.store(d_in, _rnn_update_backward(dh, h_new, CELL == RNN_RELU), mask=mask_bh)
            pending = tl.where(active, 0.0, dh_in)
        _sync(sync_ptr + pid_b, (k + 1) * tl.num_programs(1), PERSISTENT, SYNC)

    tl.store(dh_ptr + bh, pending, mask=mask_bh)
    if CELL == LSTM:
        tl.store(dc_ptr + bh, dc, mask=mask_bh)
