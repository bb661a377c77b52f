"""The test rule of rnnfast, shared by the test suite, the benchmark's correctness gate and :func:`rnnfast.tune`.

One tolerance table, per dtype, for a computation compared with a float64 oracle of the same math; and, where
errors grow with the sequence length (every recurrence), the flash-attention rule: a kernel's error against the
float64 oracle is at most :data:`BASELINE_FACTOR` times the error of the same-precision PyTorch computation, plus
the dtype's atol. Never widen a tolerance to make something pass.
"""

from __future__ import annotations

import torch

# (atol, rtol) per dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
BASELINE_FACTOR = 2.0


def tol(dtype: torch.dtype) -> dict:
    """``{"atol": ..., "rtol": ...}`` of the table for ``dtype``."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual, expected, dtype=None, msg=""):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: ``actual``'s dtype)."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol(dtype), msg=msg or None, equal_nan=False)


def baseline_error(actual, oracle64, baseline) -> tuple[float, float, float]:
    """``(error, bound, baseline error)`` in the max norm: ``bound = BASELINE_FACTOR * |baseline - oracle| + atol``
    (NaN anywhere in ``actual`` makes the error NaN, which no bound admits)."""
    atol = TOLERANCES[actual.dtype][0]
    err = (actual.double() - oracle64).abs().max().item() if actual.numel() else 0.0
    base = (baseline.double() - oracle64).abs().max().item() if baseline.numel() else 0.0
    return err, BASELINE_FACTOR * base + atol, base


def within_baseline(actual, oracle64, baseline) -> bool:
    err, bound, _ = baseline_error(actual, oracle64, baseline)
    return err <= bound  # False for NaN


def assert_within_baseline(actual, oracle64, baseline, msg=""):
    """The flash-attention rule: ``|actual - oracle| <= BASELINE_FACTOR * |baseline - oracle| + atol``."""
    err, bound, base = baseline_error(actual, oracle64, baseline)
    assert err <= bound, f"{msg}: error {err:.3e} vs baseline {base:.3e} (bound {bound:.3e})"


def tf32_oracle(t: torch.Tensor) -> torch.Tensor:
    """float32 ``t`` rounded to TF32 (11 significant bits; below 2^-126 the fixed quantum 2^-136: float32's exponent
    range with 10 fraction bits), to nearest, ties away from zero. Computed in float64 from the exponent, not from
    the bits as :func:`rnnfast.reference.round_tf32` and the CUDA emulation do, so that it can check them."""
    v = t.double()
    _, e = torch.frexp(v)  # v = m 2^e, 0.5 <= |m| < 1
    quantum = torch.exp2(torch.clamp(e - 11, min=-136).double())
    out = torch.copysign(torch.floor(v.abs() / quantum + 0.5) * quantum, v)
    return torch.where(torch.isfinite(v), out, v).float()  # past the largest float: inf


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (or the integer maximum) so an element a kernel forgot to write fails the test."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(torch.iinfo(t.dtype).max)
    return t


def make_layer_inputs(cell, T, B, I, H, proj=0, bias=True, dtype=torch.float64, device="cpu", lengths=None,
                      requires_grad=False, scale=0.5, generator=None):
    """Random inputs of one layer op as a dict of keyword arguments of :mod:`rnnfast.ops` functions."""
    G = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}[cell]
    P = proj or H

    def r(*shape):
        t = (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    args = dict(x=r(T, B, I), h0=r(B, P), w_ih=r(G * H, I), w_hh=r(G * H, P))
    if cell == "lstm":
        args["c0"] = r(B, H)
        if proj:
            args["w_hr"] = r(P, H)
    if bias:
        args["b_ih"], args["b_hh"] = r(G * H), r(G * H)
    if lengths is not None:
        args["lengths"] = torch.as_tensor(lengths, dtype=torch.int64)
    return args


def layer_inputs(cell: str, a: dict, reverse: bool = False):
    """The :class:`~rnnfast.backends.LayerInputs` of the keyword arguments ``a`` (as :func:`make_layer_inputs`)."""
    from .backends import LayerInputs

    return LayerInputs(cell, a["x"], a["h0"], a.get("c0"), a["w_ih"], a["w_hh"], a.get("b_ih"), a.get("b_hh"),
                       a.get("w_hr"), a.get("lengths"), reverse)


def bidirectional_gradchecks(backend: str, cell: str, device) -> bool:
    """float64 ``gradcheck`` and ``gradgradcheck`` (fast mode) of both directions of a layer in one launch of
    ``backend`` (:func:`rnnfast.backends.bidirectional.bidirectional_layer`), unequal lengths, every input
    differentiable. True when both pass (each raises with the failing Jacobian otherwise)."""
    from .backends.bidirectional import bidirectional_layer

    g = torch.Generator().manual_seed(3)
    dirs = [make_layer_inputs(cell, 3, 2, 2, 3, generator=g) for _ in range(2)]
    x = dirs[0]["x"].to(device).requires_grad_()
    h0 = torch.stack([a["h0"] for a in dirs]).to(device).requires_grad_()
    c0 = torch.stack([a["c0"] for a in dirs]).to(device).requires_grad_() if cell == "lstm" else None
    ws = [tuple(a[k].to(device).requires_grad_() for k in ("w_ih", "w_hh", "b_ih", "b_hh")) for a in dirs]
    lengths = torch.tensor([3, 1])
    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(ws[0]) + list(ws[1])

    def f(*t):
        x_, h0_ = t[0], t[1]
        c0_ = t[2] if cell == "lstm" else None
        w = t[3:] if cell == "lstm" else t[2:]
        y, h, c = bidirectional_layer(backend, cell, x_, h0_, c0_, w[:4], w[4:], lengths, fused=False)
        return (y, h) + ((c,) if c is not None else ())

    return torch.autograd.gradcheck(f, leaves, fast_mode=True) and torch.autograd.gradgradcheck(f, leaves,
                                                                                                fast_mode=True)
