"""``python -m bench.summary OUT``: the short table of a benchmark run, the last thing ``bench/gpu_run.sh`` prints.

One line per configuration and mode, in the order they ran: the fastest rnnfast provider whose answer passed the
check, its µs per step and its speedup against the baseline (cuDNN on a GPU) measured in the same run, and a note
(packed / padded ratio, providers that were wrong or failed). ``OUT`` is the run's folder or its ``bench.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .configs import PACKED_AIM

BAD = ("wrong", "error", "oom")


def _num(x, digits: int = 3) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def lines(payload: dict) -> list[str]:
    """The table as text lines: a title, a header and one line per (configuration, mode)."""
    base = payload["baseline"]
    st = payload["stamp"]
    where = st.get("gpu") or f"CPU ({st.get('cpu')}): not kernel numbers"
    by_case: dict[tuple, list[dict]] = {}
    for r in payload["results"]:
        by_case.setdefault((r["config"], r["mode"]), []).append(r)
    out = []
    b = payload.get("grid_barrier") or {}
    if b:
        out.append("grid barrier, one block per SM: " + ", ".join(
            f"{k[:-3]} {_num(v)} µs" if v is not None else f"{k[:-3]} not measured"
            for k, v in b.items() if k.endswith("_us")))
    out += [f"fastest correct rnnfast provider per configuration and mode, against {base} in the same run, on {where}",
            f"{'config':<34} {'mode':<9} {'provider':<16} {'µs/step':>9} {'vs ' + base:>11} "
            f"{base + ' µs/step':>15}  note"]
    for cfg in payload["configs"]:
        for mode in payload["modes"]:
            rows = by_case.get((cfg, mode))
            if not rows:
                continue
            baseline = next((r for r in rows if r.get("baseline")), None)
            timed = [r for r in rows if not r.get("baseline") and r["status"] == "ok" and r.get("us_per_step")]
            best = min(timed, key=lambda r: r["us_per_step"]) if timed else None
            notes = []
            if best is not None and best.get("packed_vs_padded") is not None:
                ratio = best["packed_vs_padded"]
                notes.append(f"packed/padded {ratio:.2f}" + (f" (over {PACKED_AIM})" if ratio > PACKED_AIM else ""))
            bad = [f"{r['provider']} {r['status']}" for r in rows if r["status"] in BAD]
            notes += bad
            if baseline is None or baseline["status"] != "ok":
                notes.append(f"{base} {baseline['status'] if baseline else 'missing'}")
            out.append(f"{cfg:<34} {mode:<9} {best['provider'] if best else '(none)':<16} "
                       f"{_num(best['us_per_step'] if best else None):>9} "
                       f"{_num(best.get('speedup') if best else None, 2):>11} "
                       f"{_num(baseline.get('us_per_step') if baseline else None):>15}  {', '.join(notes)}".rstrip())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the run's folder (with bench.json) or the bench.json file")
    ap.add_argument("--write", type=Path, default=None, metavar="FILE", help="also append the table to FILE")
    args = ap.parse_args(argv)
    path = args.out / "bench.json" if args.out.is_dir() else args.out
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        text = [f"no benchmark results to summarise: {path}: {exc}"]
        rc = 1
    else:
        text, rc = lines(payload), 0
    if args.write is not None:
        with args.write.open("a") as f:
            f.write("\n".join(text) + "\n")
    print("\n".join(text))
    return rc


if __name__ == "__main__":
    sys.exit(main())
