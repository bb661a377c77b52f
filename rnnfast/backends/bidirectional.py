"""Both directions of a bidirectional layer in one forward launch and one backward launch, for the kernel backends
that can (``triton``, ``cuda``): an autograd function over the backend module's ``forward_directions`` and
``backward_directions``, which run ``D`` directions of one layer in one launch. :mod:`rnnfast.nn` uses it in eager
mode; under ``torch.compile`` each direction stays one op node.
"""

from __future__ import annotations

import importlib

import torch

BACKENDS = ("triton", "cuda")


def _module(backend: str):
    return importlib.import_module(f"{__package__}.{backend}")


class BidirectionalLayer(torch.autograd.Function):
    """Arguments: ``backend, cell, fused, lengths, x, h0 (2, B, H), c0 (2, B, H) or None``, then per direction
    ``w_ih, w_hh, b_ih, b_hh`` (biases may be None). Returns ``y (T, B, 2H), h_n (2, B, H)`` and, for LSTM,
    ``c_n``, then the workspace.

    A double backward (``create_graph=True``) differentiates the same layer computed by the backend's per-direction
    ops, which are twice differentiable."""

    @staticmethod
    def forward(ctx, backend, cell, fused, lengths, x, h0, c0, *weights):
        w = [weights[4 * d:4 * d + 4] for d in range(2)]
        has_bias = w[0][2] is not None
        y, h_n, c_n, ws = _module(backend).forward_directions(
            cell, x, h0, c0, [w[d][0] for d in range(2)], [w[d][1] for d in range(2)],
            [w[d][2] for d in range(2)] if has_bias else None, [w[d][3] for d in range(2)] if has_bias else None,
            lengths, False, fused=fused)
        ctx.backend, ctx.cell, ctx.fused, ctx.lengths = backend, cell, fused, lengths
        ctx.has_bias, ctx.has_c = has_bias, c0 is not None
        ctx.save_for_backward(x, h0, c0, ws, *weights)
        ctx.mark_non_differentiable(ws)
        return (y, h_n, c_n, ws) if cell == "lstm" else (y, h_n, ws)

    @staticmethod
    def backward(ctx, gy, gh, *rest):
        x, h0, c0, ws, *weights = ctx.saved_tensors
        cell = ctx.cell
        gc = rest[0] if cell == "lstm" else None
        gy = torch.zeros(x.shape[0], x.shape[1], 2 * h0.shape[2], dtype=x.dtype, device=x.device) if gy is None else gy
        gh = torch.zeros_like(h0) if gh is None else gh
        if cell == "lstm" and gc is None:
            gc = torch.zeros_like(c0)
        if torch.is_grad_enabled():
            return (None, None, None, None) + _bidirectional_vjp(ctx, x, h0, c0, weights, (gy, gh, gc))
        w_ihs, w_hhs = [weights[0], weights[4]], [weights[1], weights[5]]
        dx, dh0, dc0, per_dir = _module(ctx.backend).backward_directions(
            cell, gy, gh, gc, x, w_ihs, w_hhs, ctx.has_bias, ctx.lengths, False, ws)
        grads = []
        for dw_ih, dw_hh, db_ih, db_hh in per_dir:
            grads += [dw_ih, dw_hh, db_ih, db_hh]
        return (None, None, None, None, dx, dh0, dc0 if ctx.has_c else None, *grads)


def _bidirectional_vjp(ctx, x, h0, c0, weights, upstream):
    """The layer's vector-Jacobian product, differentiable, through the per-direction ops of the backend."""
    from .. import ops

    backend = f"{ctx.backend}:{'fused' if ctx.fused else 'hoisted'}"
    with torch.enable_grad():
        ys, hs, cs = [], [], []
        for d in range(2):
            w_ih, w_hh, b_ih, b_hh = weights[4 * d:4 * d + 4]
            if ctx.cell == "lstm":
                y, h, c = ops.lstm(x, h0[d], c0[d], w_ih, w_hh, b_ih, b_hh, lengths=ctx.lengths, reverse=d == 1,
                                   backend=backend)
                cs.append(c)
            else:
                y, h = ops.LAYER_FUNCTIONS[ctx.cell](x, h0[d], w_ih, w_hh, b_ih, b_hh, lengths=ctx.lengths,
                                                     reverse=d == 1, backend=backend)
            ys.append(y)
            hs.append(h)
        outs = [torch.cat(ys, 2), torch.stack(hs)] + ([torch.stack(cs)] if cs else [])
        gy, gh, gc = upstream
        inputs = [x, h0] + ([c0] if c0 is not None else []) + [w for w in weights if w is not None]
        needs = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad(outs, needs, [gy, gh] + ([gc] if cs else []), create_graph=True,
                                       allow_unused=True))
    grads = [next(got) if t.requires_grad else None for t in inputs]
    dx, dh0 = grads[0], grads[1]
    dc0 = grads[2] if c0 is not None else None
    rest = iter(grads[3 if c0 is not None else 2:])
    return (dx, dh0, dc0) + tuple(next(rest) if w is not None else None for w in weights)


def bidirectional_layer(backend, cell, x, h0, c0, weights_fwd, weights_rev, lengths, *, fused: bool):
    """Run a bidirectional layer's two directions in one launch of ``backend`` ("triton" or "cuda"): ``(y (T, B,
    2H), h_n (2, B, H), c_n or None)``. ``weights_*``: ``(w_ih, w_hh, b_ih, b_hh)``, biases may be None."""
    if backend not in BACKENDS:
        raise ValueError(f"both directions in one launch need one of the backends {BACKENDS}, got {backend!r}")
    out = BidirectionalLayer.apply(backend, cell, fused, lengths, x, h0, c0, *weights_fwd, *weights_rev)
    return (out[0], out[1], out[2]) if cell == "lstm" else (out[0], out[1], None)
