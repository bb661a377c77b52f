"""``python -m bench.charlm``: a character-level language model trained with rnnfast and with torch.nn.

Embedding, a 2-layer LSTM and a linear head, built once from a seed; the rnnfast model is a deep copy converted
with :func:`rnnfast.convert`, so both start from the same weights and see the same batches in the same order.
The corpus is the help text that ships with every CPython (``pydoc_data.topics``, no download) or ``--text FILE``.
Prints and plots loss and perplexity per step for both, the largest difference between the two loss curves (after
a trailing mean over 1/20 of the run, it must stay within the dtype's noise, ``TOLERANCE``) and tokens per second
for each. Exits 1 if the curves disagree.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

# Largest |loss_rnnfast - loss_torch| (nats) over the run that counts as the same training: float32 differs
# only by summation order; the half types round every product and drift apart faster.
TOLERANCE = {"float32": 0.02, "bfloat16": 0.1, "float16": 0.05}


def default_corpus() -> str:
    """The pydoc topics shipped with CPython, in a fixed order (about 0.5 MB of English and code)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class CharLM(torch.nn.Module):
    """Embedding -> LSTM (time-first) -> linear head over the vocabulary."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed)
        self.lstm = torch.nn.LSTM(embed, hidden, num_layers=layers)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens):  # tokens (T, B)
        y, _ = self.lstm(self.embed(tokens))
        return self.head(y)


def batch_starts(n_chars: int, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Start offsets ``(steps, batch)`` of the training windows: drawn once, shared by both runs."""
    if n_chars < seq_len + 2:
        raise ValueError(f"the corpus has {n_chars} characters; it needs at least seq_len + 2 = {seq_len + 2}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_chars - seq_len - 1, (steps, batch), generator=g)


def train(model, data, starts, args, device) -> dict:
    """Train ``model`` on the windows ``starts``; returns the loss and the seconds of every step."""
    dtype = getattr(torch, args.dtype)
    amp = dtype != torch.float32
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    offsets = torch.arange(args.seq_len + 1)
    losses, seconds = [], []
    for row in starts:
        window = data[(row[:, None] + offsets).T].to(device)  # (T+1, B), time first
        inp, target = window[:-1], window[1:]
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = model(inp)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())  # .item() synchronises, so the step time is the GPU's too
        seconds.append(time.perf_counter() - t0)
    return {"loss": losses, "seconds": seconds}


def tokens_per_second(seconds: list[float], tokens: int) -> float:
    """Tokens per second at the median step time, leaving out the first step (compilation, autotuning)."""
    return tokens / statistics.median(seconds[1:] or seconds)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.charlm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, help="train on this UTF-8 text file instead of pydoc_data.topics")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--dtype", default=None, choices=tuple(TOLERANCE),
                    help="float32, or autocast to bfloat16/float16 (default: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 300 on a GPU, 3 on the CPU)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 64 GPU, 8 CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="characters per sequence (default: 128 GPU, 32 CPU)")
    ap.add_argument("--hidden", type=int, default=None, help="LSTM hidden size (default: 512 GPU, 64 CPU)")
    ap.add_argument("--embed", type=int, default=None, help="embedding size (default: hidden)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="rnnfast backend (auto, reference, triton, cuda, ...)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="writes charlm.json and charlm.png here")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False on this machine")
    gpu = args.device == "cuda"
    defaults = {"dtype": "bfloat16" if gpu else "float32", "steps": 300 if gpu else 3, "batch": 64 if gpu else 8,
                "seq_len": 128 if gpu else 32, "hidden": 512 if gpu else 64}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.embed = args.embed or args.hidden
    for k in ("steps", "batch", "seq_len", "hidden", "embed", "layers"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    if not args.lr > 0:
        ap.error(f"--lr must be positive, got {args.lr}")
    if args.text is not None and not args.text.is_file():
        ap.error(f"--text {args.text}: no such file")
    try:
        import rnnfast

        rnnfast.backends.check_name(args.backend)
    except ValueError as exc:
        ap.error(f"--backend: {exc}")
    return args


def run(args, log=print) -> dict:
    import rnnfast

    from . import report

    text = args.text.read_text(encoding="utf-8", errors="replace") if args.text else default_corpus()
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    starts = batch_starts(len(data), args.steps, args.batch, args.seq_len, args.seed)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    reference = CharLM(len(vocab), args.embed, args.hidden, args.layers).to(device)
    fast = rnnfast.convert(copy.deepcopy(reference), backend=args.backend)
    log(f"charlm: {len(text)} characters, vocabulary {len(vocab)}, {args.layers}-layer LSTM H={args.hidden}, "
        f"B={args.batch}, T={args.seq_len}, {args.steps} steps, {args.dtype} on {device}, rnnfast backend "
        f"{args.backend!r}")
    runs = {}
    for name, model in (("torch.nn", reference), ("rnnfast", fast)):
        runs[name] = train(model, data, starts, args, device)
        runs[name]["tokens_per_s"] = tokens_per_second(runs[name]["seconds"], args.batch * args.seq_len)
    a, b = runs["torch.nn"]["loss"], runs["rnnfast"]["loss"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    max_diff = max(diffs)
    every = max(1, args.steps // 20)
    # The curves are compared after a trailing mean over `every` steps: the batch-to-batch jitter of two
    # trajectories that drift apart by rounding is noise, a systematic gap is not.
    curve_diff = max(abs(x - y) for x, y in zip(smooth(a, every), smooth(b, every)))
    # max() skips a NaN that is not first, so a diverged run is caught here.
    agree = all(math.isfinite(v) for v in a + b) and curve_diff <= TOLERANCE[args.dtype]
    log(f"{'step':>6} {'loss torch.nn':>14} {'loss rnnfast':>13} {'ppl torch.nn':>13} {'ppl rnnfast':>12} "
        f"{'|diff|':>9}")
    for i in range(0, args.steps, every):
        log(f"{i + 1:>6} {a[i]:>14.4f} {b[i]:>13.4f} {_ppl(a[i]):>13.2f} {_ppl(b[i]):>12.2f} {diffs[i]:>9.2e}")
    for name, r in runs.items():
        step_ms = statistics.median(r["seconds"]) * 1e3
        log(f"{name:>9}: {r['tokens_per_s']:,.0f} tokens/s (median step {step_ms:.2f} ms)")
    log(f"largest loss difference {max_diff:.3e}; of the curves (mean over {every} steps) {curve_diff:.3e}, "
        f"tolerance for {args.dtype} {TOLERANCE[args.dtype]}: "
        + ("the curves agree" if agree else "THE CURVES DISAGREE"))
    used = _backend_used(fast)
    if device.type == "cpu":
        log(f"CPU run: rnnfast ran its {used!r} backend; tokens/s here say nothing about the kernels.")
    payload = report.clean_floats({
        "stamp": report.stamp(device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": str(args.text) if args.text else "pydoc_data.topics",
        "characters": len(text), "vocabulary": len(vocab),
        "backend_used": used,
        "max_abs_loss_diff": max_diff, "smoothing_steps": every, "max_abs_curve_diff": curve_diff,
        "tolerance": TOLERANCE[args.dtype], "agree": agree,
        "runs": runs,
    })
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "charlm.json", payload)
    if not args.no_plots:
        plot(payload, args.out / "charlm.png", log)
    return payload


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _backend_used(model) -> str | None:
    """What ``auto`` resolves to for the model's first LSTM layer (None when it cannot be told)."""
    from rnnfast import backends, ops

    lstm = model.lstm
    w = lstm.weight_hh_l0
    try:
        x = w.new_empty(1, 1, lstm.input_size)
        return backends.select(lstm.backend, ops.layer_spec("lstm", x, w, None, lstm.bias_ih_l0, None))
    except Exception as exc:  # report, never fail the run for it
        return f"unknown ({type(exc).__name__})"


def plot(payload: dict, path: Path, log=print) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return
    runs = payload["runs"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    for name, r in runs.items():
        ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=f"{name} ({r['tokens_per_s']:,.0f} tok/s)")
    ax.set_ylabel("loss (nats/char)")
    # Clipped so the axis transform never sees log(0) or an overflowing exp while matplotlib probes limits.
    ppl = ax.secondary_yaxis("right", functions=(lambda v: np.exp(np.clip(v, -50, 50)),
                                                 lambda v: np.log(np.clip(v, 1e-20, None))))
    ppl.set_ylabel("perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    a, b = runs["torch.nn"]["loss"], runs["rnnfast"]["loss"]
    ax2.plot(range(1, len(a) + 1), [abs(x - y) for x, y in zip(a, b)], color="gray")
    ax2.axhline(payload["tolerance"], color="red", lw=0.8, ls="--", label="tolerance")
    ax2.set_ylabel("|loss difference|")
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.grid(alpha=0.3)
    st = payload["stamp"]
    fig.suptitle(f"char LM, {payload['args']['dtype']}, {st.get('gpu') or 'CPU'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        payload = run(args)
    except ValueError as exc:
        print(f"python -m bench.charlm: error: {exc}", file=sys.stderr)
        return 2
    return 0 if payload["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
