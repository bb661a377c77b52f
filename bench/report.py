"""What a run writes: the machine stamp, the JSON file, the markdown table and the speedup plots."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

import torch

from . import floor as floor_model
from .configs import PACKED_AIM

REPO = Path(__file__).resolve().parents[1]
MODE_TITLES = {"inference": "Inference: forward under no_grad", "training": "Training: forward + backward"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd=None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stamp(device) -> dict:
    """Where and with what a result was made (no host name)."""
    import rnnfast

    cuda = torch.device(device).type == "cuda"
    s = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cuda" if cuda else "cpu",
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "rnnfast": rnnfast.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git": _run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO),
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)),
    }
    if cuda:
        idx = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        s.update({
            "gpu": torch.cuda.get_device_name(idx),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(idx))),
            "sm_count": p.multi_processor_count,
            "gpu_memory_gib": round(p.total_memory / 2 ** 30, 1),
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={idx}"]),
            "cudnn_enabled": torch.backends.cudnn.enabled,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })
    else:
        s.update({"cpu": _cpu_name(), "threads": torch.get_num_threads()})
    return s


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, allow_nan=False, default=_jsonable) + "\n")


def _jsonable(obj):
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def clean_floats(obj):
    """NaN and infinity (a NaN error of a wrong provider) as strings, since JSON has no such numbers."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_floats(v) for v in obj]
    return obj


# -- markdown -----------------------------------------------------------------------------------------------------

def _g(x, digits=3) -> str:
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _check_cell(row: dict) -> str:
    c = row.get("check") or {}
    if row["status"] == "wrong":
        note = c.get("note") or f"{c.get('worst')} err {_g(c.get('error'), 2)} > {_g(c.get('bound'), 2)}"
        return f"**wrong**: {note}"
    if row["status"] in ("error", "oom"):
        return f"**{row['status']}**: {(row.get('reason') or '')[:100]}"
    if row.get("baseline"):
        return "baseline"
    return f"ok ({_g(c.get('ratio'), 2)} of bound)" if c else "ok"


def markdown(payload: dict) -> str:
    """The results as a markdown page: stamp, floor model, one table per mode, what was not run."""
    st, rows, base = payload["stamp"], payload["results"], payload["baseline"]
    lines = ["# rnnfast benchmark", ""]
    if st["device"] == "cuda":
        lines.append(f"{st['gpu']} (sm {st['capability']}, {st['sm_count']} SMs), driver {st.get('driver')}, "
                     f"CUDA {st['cuda']}, cuDNN {st['cudnn']}, torch {st['torch']}, triton {st['triton']}, "
                     f"Python {st['python']}, rnnfast {st['rnnfast']} ({st['git']}"
                     f"{', dirty' if st['git_dirty'] else ''}), {st['date']}.")
    else:
        lines.append(f"**CPU only ({st['cpu']}, {st['threads']} threads): no kernel numbers. Kernel numbers need a "
                     f"GPU (`bench/gpu_run.sh`).** torch {st['torch']}, triton {st['triton']}, Python "
                     f"{st['python']}, rnnfast {st['rnnfast']} ({st['git']}), {st['date']}.")
    base_desc = "torch.nn with cuDNN" if base == "cudnn" else "torch.nn without cuDNN"
    lines += ["", f"Baseline: `{base}` ({base_desc}). Times are medians of CUDA-event (CPU: wall-clock) timings after "
              "warm-up, inputs rotated through more than twice the L2 cache; spread is the interquartile range. "
              "A provider is timed only after its outputs (and, training, its input and weight gradients) pass the "
              "check against a float64 oracle: error at most twice the baseline's error plus the dtype's atol.", ""]
    m = payload.get("machine")
    lines += ["## Floor model", "", floor_model.__doc__.split("\n\n", 1)[1].strip(), ""]
    if m:
        peaks = ", ".join(f"{d} {v / 1e12:.0f}" for d, v in m["peak_flops"].items())
        lines += [f"This machine: peak TFLOP/s {peaks} ({m['source'].get('peak_flops')}); HBM "
                  f"{m['bandwidth'] / 1e12:.2f} TB/s; sync {m['sync_s'] * 1e6:.2f} µs "
                  f"({m['source'].get('sync_s')}); on-chip {m['onchip_bytes'] / 2 ** 20:.1f} MiB.", ""]
    else:
        lines += ["No floor on this machine (the model is for GPUs).", ""]
    for mode in payload["modes"]:
        lines += [f"## {MODE_TITLES[mode]}", "",
                  f"| config | provider | ms | IQR ms | µs/step | vs {base} | floor µs/step | x floor | peak MiB "
                  "| check |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r["mode"] != mode or r["status"] == "n/a":
                continue
            t = r.get("time_ms") or {}
            iqr = f"{_g(t['q25'])}–{_g(t['q75'])}" if t else ""
            who = r["provider"] if r["backend"] in (None, r["provider"]) else f"{r['provider']} → {r['backend']}"
            cfg = r["config"] + (f" ({r['anchor']})" if r.get("anchor") else "")
            lines.append(f"| {cfg} | {who} | {_g(t.get('median'))} | {iqr} | {_g(r.get('us_per_step'))} | "
                         f"{_g(r.get('speedup'), 2)} | {_g(r.get('floor_us_per_step'))} | {_g(r.get('x_floor'), 2)} | "
                         f"{_g(r.get('peak_mem_mb'))} | {_check_cell(r)} |")
        lines.append("")
    lines += _packed(payload)
    lines += _barrier(payload)
    lines += _published(payload)
    lines += _not_run(payload)
    return "\n".join(lines).rstrip() + "\n"


def _packed(payload) -> list[str]:
    rows = [r for r in payload["results"] if r.get("packed") and r["status"] == "ok" and r.get("time_ms")]
    if not rows:
        return []
    out = ["## Packed sequences", "",
           f"The same provider fed a `PackedSequence` (lengths uniform on [1, T], seeded) and the padded batch of the "
           f"same shape (every sequence T long); the aim is packed <= {PACKED_AIM}x padded.", "",
           "| config | provider | mode | real steps | packed ms | padded ms | packed / padded |",
           "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r.get("packed_vs_padded")
        mark = "" if ratio is None or ratio <= PACKED_AIM else f" (over {PACKED_AIM})"
        out.append(f"| {r['config']} | {r['provider']} | {r['mode']} | {r.get('steps', '')} | "
                   f"{_g(r['time_ms']['median'])} | {_g(r.get('padded_ms'))} | {_g(ratio)}{mark} |")
    return out + [""]


def _barrier(payload) -> list[str]:
    b = payload.get("grid_barrier")
    if not b:
        return []
    parts = [f"{name} {_g(b.get(f'{name}_us'))} µs" if b.get(f"{name}_us") is not None
             else f"{name} not measured ({b.get('errors', {}).get(f'{name}_us', '?')})" for name in ("cuda", "cuda_counter", "cuda_flags", "triton")
             if f"{name}_us" in b]
    return ["## Grid barrier", "", "One grid-wide barrier with one block (program) per SM: " + "; ".join(parts) + ".",
            ""]


def _published(payload) -> list[str]:
    out = []
    for r in payload["results"]:
        if r.get("published") and r.get("baseline") and r.get("time_ms"):
            for who, ms in r["published"].items():
                out.append(f"- {r['config']} ({r['anchor']}), {r['mode']}: {payload['baseline']} here "
                           f"{_g(r['time_ms']['median'])} ms; published {who}: {ms[r['mode']]} ms")
    if not out:
        return []
    note = "Only a ratio measured in the same run counts; these come from another machine and software."
    return ["## Published numbers, for context", "", note, ""] + out + [""]


def _not_run(payload) -> list[str]:
    out = [f"- `{name}`: {why}" for name, why in payload.get("unloaded_backends", {}).items()]
    skipped = payload.get("not_run_time_limit") or []
    if skipped:
        why = f"stopped by {payload['stopped_by']}" if payload.get("stopped_by") else "the run reached its --time-limit"
        out.append(f"- {len(skipped)} configuration(s) not run or not finished, {why}: "
                   f"{', '.join(skipped[:10])}{', ...' if len(skipped) > 10 else ''}")
    reasons = defaultdict(set)
    for r in payload["results"]:
        if r["status"] == "n/a":
            reasons[(r["provider"], r["reason"])].add(r["config"])
    out += [f"- `{p}` on {len(cfgs)} configuration(s): {why}" for (p, why), cfgs in sorted(reasons.items())]
    return ["## Not run", ""] + out + [""] if out else []


# -- plots --------------------------------------------------------------------------------------------------------

def plots(payload: dict, out_dir: Path, log=print) -> list[Path]:
    """One PNG per mode: speedup against the baseline per cell (rows) and dtype (columns), across B and H."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plots written")
        return []
    rows = [r for r in payload["results"] if r["status"] == "ok" and r.get("speedup") and not r.get("baseline")
            and r["layers"] == 1 and not r["bidirectional"] and r["provider"] != "auto" and not r.get("anchor")
            and not r.get("packed")]
    kernels = {r["provider"] for r in rows} - {"reference"}
    if kernels:  # the Python-loop reference would squash the kernels' scale
        rows = [r for r in rows if r["provider"] in kernels]
    written = []
    for mode in payload["modes"]:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        cells = sorted({r["cell"] for r in mrows})
        dtypes = sorted({r["dtype"] for r in mrows})
        fig, axes = plt.subplots(len(cells), len(dtypes), figsize=(max(4.5 * len(dtypes), 7), 3.4 * len(cells)),
                                 squeeze=False, sharex=True)
        providers = sorted({r["provider"] for r in mrows})
        hiddens = sorted({r["hidden"] for r in mrows})
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = ["-", "--", ":", "-."]
        for i, cell in enumerate(cells):
            for j, dtype in enumerate(dtypes):
                ax = axes[i][j]
                here = [r for r in mrows if r["cell"] == cell and r["dtype"] == dtype]
                if not here:
                    ax.set_visible(False)
                    continue
                seqs = [r["seq_len"] for r in here]
                T = max(set(seqs), key=lambda t: (seqs.count(t), t))  # the sequence length most points share
                for pi, prov in enumerate(providers):
                    for hi, h in enumerate(hiddens):
                        pts = sorted((r["batch"], r["speedup"]) for r in here
                                     if r["provider"] == prov and r["hidden"] == h and r["seq_len"] == T)
                        if pts:
                            ax.plot(*zip(*pts), styles[pi % len(styles)], marker="o", ms=3,
                                    color=colors[hi % len(colors)], label=f"{prov} H={h}")
                ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log", base=2)  # 2x faster and 2x slower sit equally far from the line at 1
                ax.set_title(f"{cell} {dtype} T={T}", fontsize=9)
                ax.set_xlabel("batch B")
                ax.set_ylabel(f"speedup vs {payload['baseline']}")
                ax.grid(alpha=0.3)
        handles, labels = [], []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
        st = payload["stamp"]
        where = st.get("gpu") or f"CPU ({st.get('cpu')})"
        fig.suptitle(f"rnnfast {mode} speedup vs {payload['baseline']}\n{where}", fontsize=10)
        fig.tight_layout(rect=(0, 0.03 + 0.12 * ((len(labels) + 3) // 4) / len(cells), 1, 0.95))
        path = out_dir / f"bench-speedup-{mode}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written

