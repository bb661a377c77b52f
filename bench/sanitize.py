"""``python -m bench.sanitize``: run each kernel backend once, forward and backward, on small GPU problems.

Meant to run under ``compute-sanitizer --tool racecheck`` (or ``memcheck``), which then has every kernel of every
cell to look at. Odd sizes, so an out-of-bounds tile shows. A backend that cannot run a problem (its reason is
printed) is skipped; one that raises is a failure (exit status 1).
"""

from __future__ import annotations

import argparse
import sys

import torch

from rnnfast import backends, ops

from .configs import CELLS
from .providers import discover


def exercise(backend: str, cell: str, dtype: torch.dtype, device, T=5, B=3, I=19, H=37) -> str:
    """Run ``cell`` forward and backward with ``backend`` once; returns "ok" or "skipped: <reason>"."""
    spec = backends.LayerSpec(cell=cell, device=torch.device(device), dtype=dtype, seq_len=T, batch=B, input_size=I,
                              hidden_size=H, proj_size=0, bias=True, has_lengths=False)
    reason = backends.why_unavailable(backend, spec)
    if reason is not None:
        return f"skipped: {reason}"
    G = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}[cell]
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=gen) * 0.5).to(device=device, dtype=dtype).requires_grad_()

    args = dict(x=r(T, B, I), h0=r(B, H), w_ih=r(G * H, I), w_hh=r(G * H, H), b_ih=r(G * H), b_hh=r(G * H))
    if cell == "lstm":
        args["c0"] = r(B, H)
    out = ops.LAYER_FUNCTIONS[cell](**args, backend=backend)
    sum(o.float().sum() for o in out).backward()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    bad = [k for k, v in args.items() if v.grad is None or not torch.isfinite(v.grad).all()]
    if bad or not all(torch.isfinite(o).all() for o in out):
        raise RuntimeError(f"non-finite or missing results ({', '.join(bad) or 'outputs'})")
    return "ok"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sanitize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--backends", help="comma-separated backend names (default: every loaded kernel backend)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated cells (default: {','.join(CELLS)})")
    args = ap.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells or any(c not in CELLS for c in cells):
        ap.error(f"--cells {args.cells!r}: expected some of {','.join(CELLS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.sanitize: no CUDA GPU here, nothing to sanitize")
        return 0
    try:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        if not all(isinstance(d, torch.dtype) for d in dtypes):
            raise AttributeError
    except AttributeError:
        ap.error(f"--dtypes {args.dtypes!r}: expected torch dtype names such as float32,bfloat16")
    if args.backends:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
        for n in names:
            try:
                backends.check_name(n)
            except ValueError as exc:
                ap.error(str(exc))
    else:  # every mode of every kernel backend (not torch's own implementation, not the reference)
        kernel = getattr(backends, "KERNEL_BACKENDS", ("triton", "cuda"))
        names = [p.backend for p in discover(args.device)[0]
                 if p.backend not in (None, "auto") and backends.split_name(p.backend)[0] in kernel]
    if not names:
        print("bench.sanitize: no kernel backend is loaded, nothing to sanitize")
        return 0
    failed = 0
    for name in names:
        for cell in cells:
            for dtype in dtypes:
                try:
                    status = exercise(name, cell, dtype, args.device)
                except Exception as exc:  # report every failure, not just the first
                    status, failed = f"FAILED: {type(exc).__name__}: {exc}", failed + 1
                print(f"{name:>16} {cell:>8} {str(dtype).removeprefix('torch.'):>9}: {status}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
