"""bench/gpu_run.sh, the one command of a GPU lease, dry-run on the CPU (RNNFAST_DRY_RUN=1) from the very command
line the device tool gets, and the checks that a lease fits the device tool: the command's length, what travels,
what comes back, the per-test and per-phase time limits. Nothing here installs anything or needs a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import configs as C, lease, summary, watchdog  # noqa: E402

SCRIPT = REPO / "bench" / "gpu_run.sh"
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PHASES = ["env", "install", "imports", "cuda", "smoke", "bench"]
# Far above what the dry run takes (under a minute on 2 cores): only a hang guard.
HANG_GUARD_S = 300


def _script(out: Path, **env) -> subprocess.CompletedProcess:
    """The device command line, run by bash as the device tool runs it, in its CPU form."""
    full = {**os.environ, "PYTHON": sys.executable, "RNNFAST_DRY_RUN": "1", "OUT": str(out),
            **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", "-c", lease.command()], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def _phase_lines(stdout: str) -> list[str]:
    return re.findall(r"^== (\w+)", stdout, re.M)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lease") / "out"
    proc = _script(out)
    return proc, out


# -- the dry run --------------------------------------------------------------------------------------------------

def test_dry_run_passes_every_phase_in_order(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "DRY RUN on the CPU" in proc.stdout and "all phases passed" in proc.stdout
    assert _phase_lines(proc.stdout) == ["gpu_run", *PHASES, "results", "total"]
    for name in PHASES:
        assert re.search(rf"^   {name}: rc=0 after \d+ s$", proc.stdout, re.M), name
    log = (out / "run.log").read_text()
    assert re.findall(r"^===== (\w+)", log, re.M) == PHASES
    # The install phase checked what the offline install needs and installed nothing.
    assert f"the lease runs: {lease.INSTALL}" in log and "--no-deps --no-build-isolation" in lease.INSTALL
    assert lease.INSTALL.replace("python3", '"$PY"') in SCRIPT.read_text().replace(" \\\n            ", " ")
    assert "Successfully installed" not in log


def test_dry_run_smoke_tests_ran_the_cpu_cases(dry_run):
    _, out = dry_run
    log = (out / "run.log").read_text()
    m = re.search(r"bench\.watchdog: (\d+) passed, (\d+) skipped, (\d+) failed, (\d+) cut off", log)
    assert m, log[-3000:]
    passed, skipped, failed, cut = map(int, m.groups())
    # Under the interpreter the Triton float32 cases run: 4 cells x 2 modes; the GPU-only ones skip.
    assert passed >= 8 and failed == 0 and cut == 0 and skipped > 0
    assert "test_gpu_two_persistent_layers_on_two_streams" in log and "test_gpu_memcheck_small_layer" in log


def test_dry_run_files_all_come_back(dry_run):
    _, out = dry_run
    names = {p.name for p in out.rglob("*") if p.is_file()}
    expected = {"run.log", "summary.txt", "bench.json", "bench.md", "dispatch_table.json"}
    if HAVE_MPL:
        expected |= {"bench-speedup-inference.png", "bench-speedup-training.png"}
    assert names == expected
    assert len(names) <= lease.MAX_OUT_FILES and lease.out_problems(out) == []


def test_dry_run_results_schema(dry_run):
    _, out = dry_run
    payload = json.loads((out / "bench.json").read_text())
    for key in ("date", "device", "python", "torch", "triton", "cuda", "cudnn", "rnnfast", "git"):
        assert key in payload["stamp"], key
    assert payload["stamp"]["device"] == "cpu" and payload["baseline"] == "torch.nn"
    assert payload["configs"] == [c.id for c in C.GROUPS["cpu-lease"]]
    assert payload["not_run_time_limit"] == [] and payload["stopped_by"] is None
    assert not {"reference", "torch"} & set(payload["providers"])  # left out, as on the GPU
    rows = payload["results"]
    assert len(rows) == len(payload["configs"]) * len(payload["providers"]) * 2
    for r in rows:
        assert r["status"] in ("ok", "n/a"), r
        if r["status"] == "ok":
            assert r["check"]["ok"] or r["baseline"]
            assert r["us_per_step"] == pytest.approx(r["time_ms"]["median"] * 1e3 / r["seq_len"])
    packed = [r for r in rows if r["packed"] and r["status"] == "ok"]
    assert {r["cell"] for r in packed} == {"lstm", "gru"} and {r["dtype"] for r in packed} == {"bfloat16",
                                                                                                "float16"}
    times = {(r["config"], r["provider"], r["mode"]): r["time_ms"]["median"] for r in rows if r["status"] == "ok"}
    for r in packed:
        cfg = C.parse_id(r["config"])
        assert r["steps"] == sum(C.lengths(cfg)) and r["padded_config"] == cfg.padded().id
        padded = times[(r["padded_config"], r["provider"], r["mode"])]
        assert r["padded_ms"] == padded and r["packed_vs_padded"] == pytest.approx(r["time_ms"]["median"] / padded)
    md = (out / "bench.md").read_text()
    assert "## Packed sequences" in md and "| lstm-B4-T8-H16-packed-bf16 | torch.nn | inference |" in md


def test_dry_run_writes_the_dispatch_table_auto_reads(dry_run):
    from rnnfast import dispatch

    _, out = dry_run
    payload = json.loads((out / "bench.json").read_text())
    table = dispatch.read_table(out / "dispatch_table.json")
    assert table
    candidates: dict[tuple, list] = {}
    for r in payload["results"]:
        if r["status"] == "ok" and not r["packed"] and r["provider"] != "auto":
            sizes = ((r["batch"], dispatch.BATCH_EDGES), (r["hidden"], dispatch.HIDDEN_EDGES),
                     (r["seq_len"], dispatch.SEQ_EDGES))
            key = ("cpu", r["cell"], r["dtype"], r["mode"] == "training", *(dispatch.bucket(n, e) for n, e in sizes))
            name = "torch" if r["baseline"] else r["provider"]
            candidates.setdefault(key, []).append((r["us_per_step"], name))
    assert set(table) == set(candidates)
    for key, row in table.items():
        assert (row.us_per_step, row.backend) == min(candidates[key])  # the fastest correct provider, cuDNN included
        assert row.torch_us_per_step == next(t for t, n in candidates[key] if n == "torch")


def test_dry_run_ends_with_the_short_table(dry_run):
    proc, out = dry_run
    payload = json.loads((out / "bench.json").read_text())
    table = summary.lines(payload)
    assert proc.stdout.rstrip("\n").splitlines()[-len(table):] == table
    assert not table[0].startswith("grid barrier")  # measured on a GPU only
    header, body = table[1], table[2:]
    assert all(word in header for word in ("config", "provider", "µs/step", "vs torch.nn"))
    assert len(body) == len(payload["configs"]) * 2
    for line, (cfg, mode) in zip(body, [(c, m) for c in payload["configs"] for m in payload["modes"]]):
        fields = line.split()
        assert fields[:2] == [cfg, mode]
        rows = [r for r in payload["results"] if r["config"] == cfg and r["mode"] == mode and not r["baseline"]
                and r["status"] == "ok"]
        best = min(rows, key=lambda r: r["us_per_step"])
        assert fields[2] == best["provider"]
    assert (out / "summary.txt").read_text().rstrip("\n").splitlines()[-len(table):] == table


# -- the paths a GPU run may take that a clean dry run does not -----------------------------------------------------

def test_a_failed_cuda_build_leaves_cuda_out_and_a_slow_phase_is_stopped(tmp_path):
    smoke = tmp_path / "test_fake_smoke.py"
    seen = tmp_path / "backends.txt"
    smoke.write_text("import os, time\n\n"
                     "def test_backends():\n"
                     f"    open({str(seen)!r}, 'w').write(os.environ.get('RNNFAST_SMOKE_BACKENDS', '(unset)'))\n\n"
                     "def test_slow():\n"
                     "    time.sleep(600)\n")
    out = tmp_path / "out"
    # The budget leaves room for a slow machine; the smoke phase is stopped at its own 10 s limit.
    proc = _script(out, PHASES="cuda smoke bench", CUDA_LIB_CMD="false", SMOKE_ARGS=smoke, SMOKE_LIMIT=10,
                   CASE_TIMEOUT=600, RUN_BUDGET=90,
                   BENCH_ARGS="--configs lstm-B2-T3-H4-fp32 --device cpu --modes inference --budget 0.01 "
                              "--min-reps 2 --max-reps 2 --warmup 1 --no-plots")
    assert proc.returncode == 1
    assert "the smoke tests and the benchmark leave the cuda backend out" in proc.stdout
    assert seen.read_text() == "triton"
    assert re.search(r"^   smoke: stopped at its 10 s limit", proc.stdout, re.M)
    assert re.search(r"^FAILED: cuda\(rc=1\) smoke\(rc=124\)$", proc.stdout, re.M), proc.stdout[-3000:]
    payload = json.loads((out / "bench.json").read_text())
    assert payload["providers"] and not [p for p in payload["providers"] if p.startswith("cuda")]
    total = int(re.search(r"^== total (\d+) s of the 90 s budget$", proc.stdout, re.M).group(1))
    assert total <= 90
    assert proc.stdout.rstrip().splitlines()[-1].startswith("lstm-B2-T3-H4-fp32 ")  # the table still comes last


def test_no_time_left_skips_phases_and_still_reports(tmp_path):
    out = tmp_path / "out"
    proc = _script(out, RUN_BUDGET=5)
    assert proc.returncode == 1
    assert re.search(r"^== env: skipped, \d+ s left of the 5 s budget$", proc.stdout, re.M)
    assert "FAILED: env(no time) install(no time) imports(no time) cuda(no time) smoke(no time) bench(no time)" \
        in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("no benchmark results to summarise")
    assert {p.name for p in out.iterdir()} == {"run.log", "summary.txt"}


# -- the per-test time limit ----------------------------------------------------------------------------------------

def test_watchdog_cuts_a_hung_test_off_and_runs_the_rest(tmp_path):
    tests = tmp_path / "test_cases.py"
    tests.write_text("import time\nimport pytest\n\n"
                     "def test_a():\n    pass\n\n"
                     "def test_hangs():\n    time.sleep(600)\n\n"
                     "@pytest.mark.case_timeout(30)\n"
                     "def test_slow_but_allowed():\n    time.sleep(2.5)\n\n"
                     "def test_fails():\n    assert False\n\n"
                     "def test_z():\n    pass\n")
    journal = tmp_path / "journal"
    proc = subprocess.run([sys.executable, "-m", "bench.watchdog", "--case-timeout", "2", "--journal", str(journal),
                           "--", str(tests), "-q", "-p", "no:cacheprovider"], cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 1
    started, outcomes = watchdog.read_journal(journal)
    ids = {n.rsplit("::", 1)[1]: n for n in started}
    assert list(ids) == ["test_a", "test_hangs", "test_slow_but_allowed", "test_fails", "test_z"]  # once each
    assert {k: outcomes.get(v) for k, v in ids.items()} == {
        "test_a": "passed", "test_hangs": None, "test_slow_but_allowed": "passed", "test_fails": "failed",
        "test_z": "passed"}
    assert f"CUT OFF {ids['test_hangs']}" in proc.stdout
    assert "3 passed, 0 skipped, 1 failed, 1 cut off" in proc.stdout
    assert "test_hangs" in proc.stderr  # the hung test's traceback, from the watchdog thread


def test_watchdog_passes_a_clean_run(tmp_path):
    tests = tmp_path / "test_clean.py"
    tests.write_text("import pytest\n\ndef test_a():\n    pass\n\n"
                     "def test_b():\n    pytest.skip('not here')\n")
    proc = subprocess.run([sys.executable, "-m", "bench.watchdog", "--case-timeout", "30", "--", str(tests), "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 1 skipped, 0 failed, 0 cut off" in proc.stdout


# -- what the device tool takes and gives back ----------------------------------------------------------------------

def _readme_benchmarks() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("\n## Benchmarks", 1)[1].split("\n## ", 1)[0]


def test_command_fits_the_device_tool_and_the_readme_quotes_it():
    cmd = lease.command()
    assert len(cmd) <= lease.MAX_COMMAND_CHARS and "\n" not in cmd
    assert "bench/gpu_run.sh" in cmd and '"$OUT"' in cmd
    section = _readme_benchmarks()
    assert cmd in section and f"timeout_s={lease.TIMEOUT_S}" in section
    # The script's default budget is lease.py's, and it leaves the tool's per-command limit a margin.
    default = int(re.search(r"^RUN_BUDGET=\$\{RUN_BUDGET:-(\d+)\}$", SCRIPT.read_text(), re.M).group(1))
    assert default == lease.RUN_BUDGET_S < lease.TIMEOUT_S < lease.COMMAND_LIMIT_S
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_what_travels_fits_the_device_tool():
    files = lease.travelling_files()
    assert SCRIPT in files and REPO / "bench" / "gpu_command.txt" in files
    assert sum(f.stat().st_size for f in files) == lease.travelling_bytes() <= lease.MAX_TRAVEL_BYTES


def test_travelling_files_are_what_git_does_not_ignore_plus_the_carry(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("build/\n*.log\n")
    (tmp_path / "tracked.py").write_text("x")
    git("add", ".gitignore", "tracked.py")
    (tmp_path / "untracked.py").write_text("yy")
    (tmp_path / "noise.log").write_text("zzz")
    (tmp_path / "build" / "cuda").mkdir(parents=True)
    (tmp_path / "build" / "cuda" / "lib.so").write_text("1234")
    (tmp_path / "build" / "other.o").write_text("5")
    names = lambda files: sorted(str(f.relative_to(tmp_path)) for f in files)  # noqa: E731
    assert names(lease.travelling_files(tmp_path, carry=())) == [".gitignore", "tracked.py", "untracked.py"]
    assert names(lease.travelling_files(tmp_path, carry=("build/cuda",))) == \
        [".gitignore", "build/cuda/lib.so", "tracked.py", "untracked.py"]
    assert lease.travelling_bytes(tmp_path, carry=("build/cuda",)) == len("build/\n*.log\n") + 1 + 2 + 4


def test_out_problems_name_what_would_not_come_back(tmp_path):
    for i in range(lease.MAX_OUT_FILES):
        (tmp_path / f"f{i}.json").write_text("{}")
    assert lease.out_problems(tmp_path) == []
    (tmp_path / "one-too-many.log").write_text("")
    assert lease.out_problems(tmp_path) == [f"{lease.MAX_OUT_FILES + 1} files, over the {lease.MAX_OUT_FILES} that "
                                            "come back"]
    (tmp_path / "one-too-many.log").unlink()
    (tmp_path / "f0.json").unlink()
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x.txt").write_text("")
    assert lease.out_problems(tmp_path) == [f"a/b/c/x.txt: more than {lease.MAX_OUT_DEPTH} folders down"]
    (deep / "x.txt").rename(tmp_path / "a" / "b" / "x.txt")  # two folders down is allowed
    deep.rmdir()
    assert lease.out_problems(tmp_path) == []
    with open(tmp_path / "f1.json", "wb") as f:
        f.truncate(lease.MAX_OUT_FILE_BYTES + 1)
    (tmp_path / "f2.json").rename(tmp_path / "f 2.json")
    problems = lease.out_problems(tmp_path)
    assert any(p.startswith("f1.json: ") and "over" in p for p in problems)
    assert "f 2.json: a name with characters the device tool does not return" in problems and len(problems) == 2
