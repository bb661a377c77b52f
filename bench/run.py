"""``python -m bench``: time every provider on the registry's configurations against torch.nn (cuDNN).

For each configuration all providers are measured in the same run, in both modes: each is first checked against a
float64 oracle (a wrong one is reported as wrong, with no time), then timed and its peak memory taken. Writes
``bench.json`` (stamped with GPU, driver, CUDA, cuDNN, torch and triton versions), ``bench.md`` (time, µs per
step, speedup against the baseline, per-step floor) and ``bench-speedup-<mode>.png`` into ``--out``; with
``--table PATH`` also the dispatch table ``backend="auto"`` reads (:mod:`rnnfast.dispatch`), from this run's
results. A packed configuration's rows carry the time of its padded twin, when that ran too, and the ratio. On a
GPU the cost of the CUDA backend's grid barrier is measured as well (in a child process, with a timeout).
Without a GPU it runs the small CPU grid (torch.nn on the CPU and the rnnfast reference) and says so.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import signal
import sys
import time
from pathlib import Path

import torch

from . import barrier
from . import configs as C
from . import floor as floor_model
from . import measure, providers as P, report
from .progress import Progress


def _split(values) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="groups: " + ", ".join(f"{k} ({len(v)})" for k, v in C.GROUPS.items()))
    ap.add_argument("--quick", action="store_true", help="a subset that finishes in a few minutes")
    ap.add_argument("--configs", action="append", metavar="LIST",
                    help="groups, ids (e.g. lstm-B64-T100-H512-fp32, registered or not) or globs, comma-separated")
    ap.add_argument("--cells", action="append", metavar="LIST", help=f"keep these cells ({', '.join(C.CELLS)})")
    ap.add_argument("--dtypes", action="append", metavar="LIST", help="keep these dtypes (float32, bf16, ...)")
    ap.add_argument("--providers", action="append", metavar="LIST",
                    help="keep these providers (names or globs, e.g. 'triton*'); the baseline is always kept")
    ap.add_argument("--exclude-providers", action="append", metavar="LIST",
                    help="leave out these providers (names or globs; one that matches nothing is no error); "
                         "never the baseline")
    ap.add_argument("--modes", default="inference,training", help="inference, training or both (default)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                    help="auto: the GPU when there is one")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default bench_out/)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed runs per measurement (default 0.3 on a GPU, 0.1 on the CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (compile, autotune)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--floor", default="measure", choices=("measure", "table", "none"),
                    help="floor model: measure peaks and bandwidth here (default), data-sheet table, or none")
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="start no new configuration after this many seconds; write what was measured")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--table", type=Path, default=None, metavar="PATH",
                    help="also write the dispatch table auto reads (rnnfast/dispatch_table.json's format) from this "
                         "run's single-layer, unpacked results")
    ap.add_argument("--list", action="store_true", help="print the selected configurations and exit")
    args = ap.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False on this machine")
    try:
        base = C.resolve(_split(args.configs)) if args.configs else C.GROUPS[C.default_group(args.device, args.quick)]
        args.selected = C.select(base, _split(args.cells), _split(args.dtypes))
    except ValueError as exc:
        ap.error(str(exc))
    if not args.selected:
        ap.error("the filters leave no configuration to run")
    args.modes = _split([args.modes])
    bad = [m for m in args.modes or [] if m not in measure.MODES]
    if bad or not args.modes:
        ap.error(f"--modes: expected inference and/or training, got {args.modes}")
    args.providers = _split(args.providers)
    args.exclude_providers = _split(args.exclude_providers)
    if args.budget is None:
        args.budget = 0.3 if args.device == "cuda" else 0.1
    if args.time_limit is not None and args.time_limit <= 0:
        ap.error(f"--time-limit must be positive, got {args.time_limit}")
    if args.budget <= 0 or args.warmup < 0 or args.min_reps < 1 or args.max_reps < args.min_reps:
        ap.error("need --budget > 0, --warmup >= 0, --min-reps >= 1 and --max-reps >= --min-reps")
    return args


def keep_providers(providers: list[P.Provider], patterns: list[str] | None) -> list[P.Provider]:
    """The baseline and the providers matching any of ``patterns`` (all when None)."""
    if not patterns:
        return providers
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(q.name, p) for q in providers)]
    if unknown:
        raise ValueError(f"--providers {unknown} match none of {[q.name for q in providers]}")
    return [q for q in providers if q.is_baseline or any(fnmatch.fnmatchcase(q.name, p) for p in patterns)]


def drop_providers(providers: list[P.Provider], patterns: list[str] | None) -> list[P.Provider]:
    """``providers`` less those matching any of ``patterns`` (the baseline always stays)."""
    return [q for q in providers
            if q.is_baseline or not any(fnmatch.fnmatchcase(q.name, p) for p in patterns or [])]


def _row(cfg: C.Config, prov: P.Provider, mode: str, **kw) -> dict:
    row = {"config": cfg.id, "cell": cfg.cell, "batch": cfg.batch, "seq_len": cfg.seq_len, "hidden": cfg.hidden,
           "input": cfg.input, "layers": cfg.layers, "bidirectional": cfg.bidirectional, "dtype": cfg.dtype,
           "anchor": C.anchor_name(cfg), "provider": prov.name, "baseline": prov.is_baseline, "mode": mode,
           "backend": None, "status": None, "reason": None, "check": None, "time_ms": None, "us_per_step": None,
           "speedup": None, "peak_mem_mb": None, "floor_us_per_step": None, "x_floor": None, "packed": cfg.packed}
    if cfg.packed:
        # steps: the real steps of all sequences; padded_*: the same provider on the padded twin (pair_packed).
        row.update(steps=sum(C.lengths(cfg)), padded_config=cfg.padded().id, padded_ms=None, packed_vs_padded=None)
    if cfg.published:
        row["published"] = cfg.published
    row.update(kw)
    return row


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def autograd_node(module, x) -> str:
    """The name of the autograd node of ``module``'s output for ``x`` (a tensor: its first step; or a
    ``PackedSequence``), which says which implementation torch.nn ran."""
    packed = isinstance(x, torch.nn.utils.rnn.PackedSequence)
    with torch.enable_grad():
        y = module(x if packed else x[:1])[0]
    node = (y.data if packed else y).grad_fn  # a PackedSequence's data; a tensor's .data would be detached
    return type(node).__name__ if node is not None else "no autograd node"


def _baseline_ran(module, x, device) -> str | None:
    """On a GPU, whether torch.nn really ran cuDNN (it leaves it for dtypes or shapes cuDNN does not take)."""
    if torch.device(device).type != "cuda":
        return None
    try:
        name = autograd_node(module, x)
    except Exception as exc:  # the real run reports the failure
        return f"unknown ({type(exc).__name__})"
    # cuDNN's autograd node is CudnnRnnBackward0
    return "cudnn" if "Cudnn" in name else f"torch.nn, not cuDNN ({name})"


class _Stopped(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring and write what there is. Not an Exception, so the
    per-provider error handling lets it through."""


def _on_sigterm(signum, frame):
    raise _Stopped(f"signal {signum}")


def bench_config(cfg: C.Config, providers: list[P.Provider], modes, device, machine=None, timing=None,
                 progress=None, sink: list | None = None, deadline: float | None = None) -> list[dict]:
    """Rows for every provider and mode of one configuration; ``providers[0]`` is the baseline.

    Rows are appended to ``sink`` as they are made (so an interrupted run keeps them). Past ``deadline``
    (a ``time.perf_counter()`` value) nothing more is measured: the remaining rows say so.
    """
    timing = timing or {}
    rows = sink if sink is not None else []
    ref = P.torch_module(cfg, device)
    oracle_module = P.torch_module(cfg, device, dtype=torch.float64)
    xs, g = measure.make_inputs(cfg, device)
    baseline_ran = _baseline_ran(ref, xs[0], device)
    for mode in modes:
        oracle = measure.Workload(oracle_module, [x.double() for x in xs[:1]], g.double(), mode).results()
        baseline_out, base_ms = None, None
        for prov in providers:
            label = f"{cfg.id} {prov.name} {mode}"
            backend, reason = prov.resolve(cfg, device)
            if deadline is not None and time.perf_counter() > deadline:
                backend, reason = None, "not measured: the run reached its --time-limit"
            if backend is None:
                rows.append(_row(cfg, prov, mode, status="n/a", reason=reason))
                if progress:
                    progress.update(label)
                continue
            row = _row(cfg, prov, mode, backend=baseline_ran if prov.is_baseline else backend)
            try:
                module = ref if prov.is_baseline else prov.build(ref, cfg)
                w = measure.Workload(module, xs, g, mode)
                out = w.results()
                if prov.is_baseline:
                    baseline_out = out
                elif baseline_out is None:
                    raise RuntimeError(f"cannot check {prov.name}: the baseline {providers[0].name} failed")
                verdict = measure.check(out, oracle, baseline_out, cfg.dtype)
                del out
                row["check"] = verdict
                if not verdict["ok"] and not prov.is_baseline:
                    row["status"] = "wrong"
                else:
                    times = measure.time_workload(w, device, warmup=timing.get("warmup", 2),
                                                  budget_s=timing.get("budget", 0.3),
                                                  min_reps=timing.get("min_reps", 5),
                                                  max_reps=timing.get("max_reps", 200), deadline=deadline)
                    t = measure.summarize(times)
                    row.update(status="ok", time_ms=t, us_per_step=t["median"] * 1e3 / cfg.seq_len,
                               peak_mem_mb=measure.peak_memory_mb(w, device))
                    if prov.is_baseline:
                        base_ms = t["median"]
                    if base_ms:
                        row["speedup"] = base_ms / t["median"]
                    if machine is not None:
                        f = floor_model.step_floor(cfg, mode, machine)
                        row["floor_us_per_step"] = f.floor_s * 1e6
                        row["x_floor"] = row["us_per_step"] / row["floor_us_per_step"]
                del w, module
            except torch.cuda.OutOfMemoryError as exc:
                row.update(status="oom", reason=_short(exc))
            except Exception as exc:  # one provider failing must not stop the others
                row.update(status="error", reason=_short(exc))
            rows.append(row)
            if progress:
                progress.update(label)
    del ref, oracle_module, xs, g
    if torch.device(device).type == "cuda":
        gc.collect()  # return the configuration's memory before the next one's peak is measured
        torch.cuda.empty_cache()
    return rows


def pair_packed(rows: list[dict]) -> None:
    """Give each timed packed row the same provider's time on the padded twin (same mode) and packed / padded."""
    padded = {(r["config"], r["provider"], r["mode"]): r["time_ms"]["median"] for r in rows
              if not r.get("packed") and r["status"] == "ok" and r.get("time_ms")}
    for r in rows:
        if r.get("packed") and r["status"] == "ok" and r.get("time_ms"):
            ms = padded.get((r["padded_config"], r["provider"], r["mode"]))
            if ms:
                r.update(padded_ms=ms, packed_vs_padded=r["time_ms"]["median"] / ms)


def table_rows(payload: dict) -> list:
    """The dispatch table rows (:func:`rnnfast.dispatch.rows_from_results`) of a run: one layer, one direction,
    unpacked cases only, since a table key holds no layer count, direction or lengths."""
    from rnnfast import dispatch

    st = payload["stamp"]
    results = [dict(provider=r["provider"], cell=r["cell"], dtype=r["dtype"], mode=r["mode"], batch=r["batch"],
                    hidden=r["hidden"], seq_len=r["seq_len"], ok=r["status"] == "ok", us_per_step=r["us_per_step"])
               for r in payload["results"] if r["layers"] == 1 and not r["bidirectional"] and not r.get("packed")]
    dirty = ", dirty" if st["git_dirty"] else ""
    source = f"python -m bench, {st['date']}, rnnfast {st['rnnfast']} ({st['git']}{dirty})"
    return dispatch.rows_from_results(results, capability=st.get("capability") or st["device"],
                                      gpu=st.get("gpu") or st.get("cpu") or "", source=source,
                                      baseline=payload["baseline"])


def write_table(path: Path, payload: dict, log=print) -> int:
    """Write the dispatch table of ``payload`` to ``path``; the number of rows."""
    from rnnfast import dispatch

    rows = table_rows(payload)
    st = payload["stamp"]
    where = st.get("gpu") or f"CPU ({st.get('cpu')}), where auto never reads it"
    dispatch.write_table(path, rows, about=f"written by python -m bench --table from a run on {where}, "
                                           f"{st['date']}: the fastest correct provider per case")
    log(f"wrote {path}: {len(rows)} dispatch table rows")
    return len(rows)


def run(args, providers=None, log=print) -> dict:
    """Benchmark ``args.selected`` and write the results into ``args.out``; returns the JSON payload."""
    device = args.device
    found, unloaded = P.discover(device)
    providers = drop_providers(keep_providers(providers or found, args.providers),
                               getattr(args, "exclude_providers", None))
    if device == "cpu":
        log("No CUDA GPU here: running the CPU grid (torch.nn on the CPU and the rnnfast backends that run there). "
            "These are not kernel numbers: kernel numbers need a GPU (run bench/gpu_run.sh on one).")
    log(f"{len(args.selected)} configurations x {len(providers)} providers ({', '.join(p.name for p in providers)}) "
        f"x {len(args.modes)} modes on {device}")
    for name, why in unloaded.items():
        log(f"  not benchmarked: {why}")
    t0 = time.perf_counter()  # --time-limit counts the floor measurements too
    machine = None
    if device == "cuda" and args.floor != "none":
        machine = floor_model.gpu_machine(sorted({c.dtype for c in args.selected}), measure=args.floor == "measure",
                                          log=log)
    grid_barrier = None
    if device == "cuda":
        # The CUDA backend's cooperative barrier, only when that backend is benchmarked (else it would be built here).
        cuda_run = any(p.backend and p.backend.split(":")[0] == "cuda" for p in providers)
        grid_barrier = barrier.costs(machine, cuda=cuda_run, log=log)
    timing = {"warmup": args.warmup, "budget": args.budget, "min_reps": args.min_reps, "max_reps": args.max_reps}
    deadline = None if args.time_limit is None else t0 + args.time_limit
    rows, not_run, stopped = [], [], None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: no handler, the run just cannot be stopped gracefully
        previous = None
    finished = 0
    try:
        with Progress(len(args.selected) * len(providers) * len(args.modes)) as progress:
            for finished, cfg in enumerate(args.selected):
                if deadline is not None and time.perf_counter() > deadline:
                    not_run.append(cfg.id)
                    continue
                try:
                    bench_config(cfg, providers, args.modes, device, machine, timing, progress, sink=rows,
                                 deadline=deadline)
                except Exception as exc:  # the setup (weights, inputs, float64 oracle) failed: record it, go on
                    reason = f"setting up the configuration failed: {_short(exc)}"
                    done = {(r["provider"], r["mode"]) for r in rows if r["config"] == cfg.id}
                    rows += [_row(cfg, prov, mode, status="error", reason=reason)
                             for mode in args.modes for prov in providers if (prov.name, mode) not in done]
                    log(f"{cfg.id}: {reason}")
                    if device == "cuda":
                        gc.collect()
                        torch.cuda.empty_cache()
            finished = len(args.selected)
    except _Stopped as exc:
        stopped = str(exc)
        not_run += [c.id for c in args.selected[finished:]]  # the one in progress counts as not run
        log(f"stopped by {stopped}: writing what was measured")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not_run:
        log(f"{len(not_run)} configurations not run: " + (stopped or f"--time-limit {args.time_limit} s reached"))
    pair_packed(rows)
    payload = {
        "stamp": report.stamp(device),
        "baseline": providers[0].name,
        "providers": [p.name for p in providers],
        "unloaded_backends": unloaded,
        "modes": args.modes,
        "machine": machine.to_json() if machine else None,
        "grid_barrier": grid_barrier,
        "floor_model": floor_model.__doc__.split("\n\n", 1)[1].strip(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "selected"},
        "configs": [c.id for c in args.selected],
        "not_run_time_limit": not_run,
        "stopped_by": stopped,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": rows,
    }
    payload = report.clean_floats(payload)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "bench.json", payload)
    (args.out / "bench.md").write_text(report.markdown(payload))
    written = [] if args.no_plots else report.plots(payload, args.out, log=log)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "wrong", "error", "oom", "n/a")}
    log(f"done in {payload['seconds']} s: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    log(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'}" + "".join(f", {p}" for p in written))
    if getattr(args, "table", None) is not None:
        try:  # after the results are written, so a failure here cannot cost them
            write_table(args.table, payload, log=log)
        except Exception as exc:  # noqa: BLE001  (reported, and main exits 1)
            payload["table_error"] = _short(exc)
            log(f"writing the dispatch table {args.table} failed: {payload['table_error']}")
    return payload


def main(argv=None, providers=None) -> int:
    """Entry point; returns 1 when a provider was wrong or failed or the run was stopped by a signal, else 0.
    ``providers`` overrides discovery."""
    args = parse_args(argv)
    if args.list:
        for c in args.selected:
            print(c.id)
        return 0
    try:
        payload = run(args, providers=providers)
    except ValueError as exc:  # bad --providers
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2
    bad = [r for r in payload["results"] if r["status"] in ("wrong", "error", "oom")]
    return 1 if bad or payload["stopped_by"] or payload.get("table_error") else 0
