"""The benchmark package (bench/): registry, filters, the runner on the CPU, the correctness gate, the floor
model's arithmetic and the end-to-end character LM. CPU only and small; no speed is asserted."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# bench/ is a folder of the repository, not an installed package: make it importable however pytest was started.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import charlm, configs as C, floor, measure, providers as P, run, sanitize  # noqa: E402
from bench.progress import Progress  # noqa: E402

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
TINY = ["--budget", "0.01", "--min-reps", "2", "--max-reps", "3", "--warmup", "1"]


# -- registry and filters -----------------------------------------------------------------------------------------

def test_grid_has_the_issue_sizes():
    grid = C.GROUPS["grid"]
    single = {(c.cell, c.batch, c.hidden, c.seq_len, c.dtype) for c in grid
              if c.layers == 1 and not c.bidirectional and C.anchor_name(c) is None}
    expected = set(itertools.product(("rnn_tanh", "gru", "lstm"), (1, 16, 64, 256), (128, 256, 512, 1024),
                                     (256, 1024), ("float32", "bfloat16", "float16")))
    assert single == expected
    assert all(c.input == c.hidden for c in grid if C.anchor_name(c) is None)
    assert any(c.layers == 2 and c.bidirectional for c in grid)


def test_anchors():
    (fast,) = C.GROUPS["fastrnns"]
    assert (fast.cell, fast.seq_len, fast.batch, fast.input, fast.hidden, fast.dtype) == \
        ("lstm", 100, 64, 512, 512, "float32")
    flash = C.GROUPS["flashrnn-h768"]
    assert sorted(c.dtype for c in flash) == ["bfloat16", "float16"]
    for c in flash:
        assert (c.cell, c.batch, c.seq_len, c.input, c.hidden) == ("lstm", 16, 1024, 768, 768)
        (pub,) = c.published.values()
        assert pub == {"inference": 2.01, "training": 5.19}
    grid_ids = {c.id for c in C.GROUPS["grid"]}
    assert {c.id for c in C.GROUPS["anchors"]} <= grid_ids
    quick = C.GROUPS["quick"]
    assert {c.id for c in quick} <= grid_ids and len(quick) <= 20
    assert {c.id for c in C.GROUPS["anchors"]} <= {c.id for c in quick}


def test_ids_round_trip():
    for c in C.REGISTRY.values():
        assert C.parse_id(c.id) == c
    c = C.parse_id("gru-B3-T17-H37-I5-L2-bi-bf16")
    assert (c.cell, c.batch, c.seq_len, c.hidden, c.input, c.layers, c.bidirectional, c.dtype) == \
        ("gru", 3, 17, 37, 5, 2, True, "bfloat16")
    assert c.layer_inputs() == [5, 74]
    for bad in ("lstm-B0-T4-H8-fp32", "lstm-B2-T4-fp32", "cnn-B2-T4-H8-fp32", "lstm-B2-T4-H8-int8"):
        with pytest.raises(ValueError):
            C.parse_id(bad)


def test_filters():
    got = C.select(C.GROUPS["grid"], cells=["lstm"], dtypes=["bf16"])
    assert got and all(c.cell == "lstm" and c.dtype == "bfloat16" for c in got)
    assert len(C.select(C.GROUPS["grid"], cells=["rnn"])) == 4 * 4 * 2 * 3
    assert [c.id for c in C.resolve(["fastrnns"])] == ["lstm-B64-T100-H512-fp32"]
    assert {c.dtype for c in C.resolve(["flashrnn-h768"])} == {"bfloat16", "float16"}
    globbed = C.resolve(["gru-B256-*-fp16"])
    assert len(globbed) == 8 and all(c.cell == "gru" and c.batch == 256 for c in globbed)
    assert C.resolve(["lstm-B3-T5-H7-fp32"])[0].hidden == 7  # not registered: parsed
    assert len(C.resolve(["fastrnns", "lstm-B64-T100-H512-fp32"])) == 1  # no duplicates
    for bad in (["nope"], ["zzz-*"]):
        with pytest.raises(ValueError):
            C.resolve(bad)
    with pytest.raises(ValueError):
        C.select(C.GROUPS["grid"], cells=["cnn"])


@pytest.mark.parametrize("argv", [["--configs", "nope"], ["--cells", "cnn"], ["--dtypes", "int8"],
                                  ["--modes", "speed"], ["--budget", "0"], ["--configs", "cpu", "--cells", "rnn_relu"],
                                  ["--time-limit", "-1"]])
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_default_is_the_cpu_grid_here():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = run.parse_args([])
    assert args.device == "cpu" and args.selected == C.GROUPS["cpu"]
    assert run.parse_args(["--quick"]).selected == C.GROUPS["cpu-quick"]


# -- the runner ---------------------------------------------------------------------------------------------------

def test_main_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "out"
    rc = run.main(["--configs", "lstm-B2-T4-H8-fp32,gru-B3-T5-H6-I4-fp32", "--device", "cpu",
                   "--providers", "reference", "--out", str(out), *TINY])
    assert rc == 0
    assert "kernel numbers need a GPU" in capsys.readouterr().out
    payload = json.loads((out / "bench.json").read_text())
    for key in ("date", "python", "torch", "triton", "cuda", "cudnn", "rnnfast", "device"):
        assert key in payload["stamp"]
    assert payload["baseline"] == "torch.nn"
    assert payload["providers"] == ["torch.nn", "reference"]
    rows = payload["results"]
    assert len(rows) == 2 * 2 * 2  # configs x providers x modes, all in the one run
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:
        t = r["time_ms"]
        assert 0 < t["min"] <= t["q25"] <= t["median"] <= t["q75"] <= t["max"] and t["reps"] >= 2
        assert r["us_per_step"] == pytest.approx(t["median"] * 1e3 / r["seq_len"])
        assert r["floor_us_per_step"] is None  # no floor on the CPU
    base = {(r["config"], r["mode"]): r["time_ms"]["median"] for r in rows if r["baseline"]}
    for r in rows:
        assert r["speedup"] == pytest.approx(base[(r["config"], r["mode"])] / r["time_ms"]["median"])
    md = (out / "bench.md").read_text()
    assert "kernel numbers need a GPU" in md.lower() or "Kernel numbers need a GPU" in md
    assert "| lstm-B2-T4-H8-fp32 | reference |" in md and "µs/step" in md and "## Floor model" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == (["bench-speedup-inference.png", "bench-speedup-training.png"] if HAVE_MPL else [])


class _Scaled(P.Provider):
    """A torch.nn copy whose output is multiplied by ``scale``: wrong unless the scale is 1."""

    def __init__(self, name, scale):
        super().__init__(name, backend="reference")
        self.scale = scale

    def resolve(self, cfg, device):
        return "fake", None

    def build(self, reference, cfg):
        m = P.Provider("torch.nn", None).build(reference, cfg)
        m.register_forward_hook(lambda mod, inp, out: (out[0] * self.scale, out[1]))
        return m


def test_a_wrong_provider_is_reported_wrong_with_no_time(tmp_path):
    out = tmp_path / "out"
    provs = [P.Provider("torch.nn", None), _Scaled("fake-ok", 1.0), _Scaled("fake-wrong", 1.001)]
    rc = run.main(["--configs", "rnn_tanh-B3-T6-H5-fp32", "--device", "cpu", "--out", str(out), "--no-plots",
                   *TINY], providers=provs)
    assert rc == 1
    rows = {(r["provider"], r["mode"]): r for r in json.loads((out / "bench.json").read_text())["results"]}
    for mode in measure.MODES:
        wrong, ok = rows[("fake-wrong", mode)], rows[("fake-ok", mode)]
        assert wrong["status"] == "wrong" and wrong["time_ms"] is None and wrong["speedup"] is None
        assert wrong["check"]["error"] > wrong["check"]["bound"]
        assert ok["status"] == "ok" and ok["time_ms"]["median"] > 0
    md = (out / "bench.md").read_text()
    assert md.count("**wrong**") == 2


def test_a_failing_setup_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = P.torch_module

    def flaky(cfg, *args, **kwargs):
        if cfg.cell == "gru":
            raise RuntimeError("no memory for this one")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(P, "torch_module", flaky)
    out = tmp_path / "out"
    rc = run.main(["--configs", "gru-B2-T3-H4-fp32,lstm-B2-T3-H4-fp32", "--device", "cpu", "--providers", "reference",
                   "--out", str(out), "--no-plots", *TINY])
    assert rc == 1
    rows = json.loads((out / "bench.json").read_text())["results"]
    assert {(r["cell"], r["status"]) for r in rows} == {("gru", "error"), ("lstm", "ok")}
    assert all("no memory for this one" in r["reason"] for r in rows if r["cell"] == "gru")


class _Terminating(P.Provider):
    """Sends the process SIGTERM when built, as `timeout` would in the middle of a run."""

    def __init__(self):
        super().__init__("terminating", backend="reference")

    def build(self, reference, cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        return super().build(reference, cfg)


def test_sigterm_writes_what_was_measured(tmp_path):
    out = tmp_path / "out"
    provs = [P.Provider("torch.nn", None), _Terminating()]
    before = signal.getsignal(signal.SIGTERM)
    rc = run.main(["--configs", "gru-B2-T3-H4-fp32,lstm-B2-T3-H4-fp32", "--device", "cpu", "--modes", "inference",
                   "--out", str(out), "--no-plots", *TINY], providers=provs)
    assert rc == 1
    payload = json.loads((out / "bench.json").read_text())
    assert payload["stopped_by"] and payload["not_run_time_limit"] == ["gru-B2-T3-H4-fp32", "lstm-B2-T3-H4-fp32"]
    assert [(r["config"], r["provider"], r["status"]) for r in payload["results"]] == \
        [("gru-B2-T3-H4-fp32", "torch.nn", "ok")]
    assert signal.getsignal(signal.SIGTERM) is before  # the runner's handler is gone again


def test_time_limit(tmp_path):
    out = tmp_path / "out"
    rc = run.main(["--configs", "gru-B2-T3-H4-fp32,lstm-B2-T3-H4-fp32", "--device", "cpu", "--providers", "reference",
                   "--time-limit", "1e-9", "--out", str(out), "--no-plots", *TINY])
    assert rc == 0
    payload = json.loads((out / "bench.json").read_text())
    assert payload["not_run_time_limit"] == ["gru-B2-T3-H4-fp32", "lstm-B2-T3-H4-fp32"] and payload["results"] == []
    assert "--time-limit" in (out / "bench.md").read_text()


def test_check_rule():
    o = {"y": torch.zeros(3, dtype=torch.float64)}
    base = {"y": torch.tensor([0.0, 1e-3, 0.0])}
    assert measure.check({"y": torch.tensor([0.0, 0.0, 2e-3])}, o, base, "float32")["ok"]
    assert not measure.check({"y": torch.tensor([0.0, 0.0, 2.1e-3])}, o, base, "float32")["ok"]
    assert not measure.check({"y": torch.tensor([0.0, float("nan"), 0.0])}, o, base, "float32")["ok"]
    assert not measure.check({}, o, base, "float32")["ok"]


# -- the floor model ----------------------------------------------------------------------------------------------

def _machine(onchip):
    return floor.Machine(name="test", peak_flops={"float32": 500e12, "bfloat16": 1000e12}, bandwidth=2e12,
                         sync_s=2e-6, onchip_bytes=onchip)


def test_floor_by_hand():
    lstm = C.Config("lstm", batch=64, hidden=512, input=512, seq_len=100)
    # 2*64*(512+512)*4*512 = 268,435,456 FLOP at 500 TFLOP/s; 4 B*64*(512+512) = 262,144 B at 2 TB/s.
    f = floor.step_floor(lstm, "inference", _machine(onchip=50e6))
    assert f.weights_on_chip and f.compute_s == pytest.approx(5.36870912e-7)
    assert f.memory_s == pytest.approx(1.31072e-7)
    assert f.floor_s == pytest.approx(5.36870912e-7 + 2e-6)
    # W_hh = 4 B*4*512*512 = 4,194,304 B does not fit in 1 MB: it moves every step and memory dominates.
    f = floor.step_floor(lstm, "inference", _machine(onchip=1e6))
    assert not f.weights_on_chip
    assert f.floor_s == pytest.approx((262_144 + 4_194_304) / 2e12 + 2e-6)
    # Training: forward also writes the gates (4*64*2048 B); backward: twice the FLOPs, 4*64*(2048+512+512) B.
    f = floor.step_floor(lstm, "training", _machine(onchip=50e6))
    fwd = max(5.36870912e-7, (262_144 + 524_288) / 2e12) + 2e-6
    bwd = max(2 * 5.36870912e-7, 786_432 / 2e12) + 2e-6
    assert f.floor_s == pytest.approx(fwd + bwd)
    # Two bidirectional bfloat16 RNN layers, B=1: layer inputs 64, 64, 256, 256; tiny, so memory-bound.
    rnn = C.Config("rnn_tanh", batch=1, hidden=128, input=64, seq_len=10, layers=2, bidirectional=True,
                   dtype="bfloat16")
    f = floor.step_floor(rnn, "inference", _machine(onchip=50e6))
    assert f.compute_s == pytest.approx(2 * 1 * 1152 * 128 / 1000e12)
    assert f.floor_s == pytest.approx(2 * 1152 / 2e12 + 2e-6)
    with pytest.raises(ValueError):
        floor.step_floor(rnn, "speed", _machine(onchip=0))


def test_rows_carry_the_floor_when_a_machine_is_known():
    cfg = C.Config("gru", batch=2, hidden=8, input=8, seq_len=4)
    m = _machine(onchip=50e6)
    rows = run.bench_config(cfg, [P.Provider("torch.nn", None), P.Provider("reference", "reference")],
                            ["inference"], "cpu", machine=m, timing={"budget": 0.01, "min_reps": 2, "warmup": 1})
    expected = floor.step_floor(cfg, "inference", m).floor_s * 1e6
    for r in rows:
        assert r["floor_us_per_step"] == pytest.approx(expected)
        assert r["x_floor"] == pytest.approx(r["us_per_step"] / expected)


def test_grid_barrier_kernel_in_the_interpreter():
    # One program only: the interpreter runs programs one after another, so more would wait for each other forever.
    code = ("import torch; from bench.barrier import _barrier_chain; c = torch.zeros(1, dtype=torch.int32); "
            "_barrier_chain[(1,)](c, 5, num_warps=1); print(int(c))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "5"


def test_markdown_of_a_gpu_run():
    # The GPU half of the report, from a made-up payload: this machine cannot make a real one.
    from bench import report

    stamp = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132,
             "driver": "580.1", "cuda": "13.0", "cudnn": 91000, "torch": "2.11", "triton": "3.6", "python": "3.12",
             "rnnfast": "0.1.0", "git": "abc", "git_dirty": False, "date": "2026-11-24"}
    m = _machine(onchip=50e6)
    m.source = {"peak_flops": "measured", "sync_s": "measured"}
    cfg = C.FLASHRNN_H768[1]
    common = dict(config=cfg.id, cell="lstm", batch=16, seq_len=1024, hidden=768, input=768, layers=1,
                  bidirectional=False, dtype="float16", anchor="flashrnn-h768", mode="training",
                  published=cfg.published, peak_mem_mb=100.0, floor_us_per_step=1.0, reason=None)
    t = {"median": 5.0, "q25": 4.9, "q75": 5.1, "min": 4.8, "max": 5.3, "reps": 20}
    rows = [dict(common, provider="cudnn", backend="cudnn", baseline=True, status="ok", time_ms=t,
                 us_per_step=4.9, speedup=1.0, x_floor=4.9, check={"ratio": 0.5}),
            dict(common, provider="triton:fused", backend="triton:fused", baseline=False, status="wrong",
                 time_ms=None, us_per_step=None, speedup=None, x_floor=None,
                 check={"ok": False, "worst": "dx", "error": 0.5, "bound": 0.01})]
    md = report.markdown({"stamp": stamp, "results": rows, "baseline": "cudnn", "modes": ["training"],
                          "machine": m.to_json(), "unloaded_backends": {"cuda": "not built"}})
    assert "NVIDIA H100 80GB HBM3" in md and "cuDNN 91000" in md and "driver 580.1" in md
    assert "published cudnn, H100, float16 (FlashRNN paper): 5.19 ms" in md
    assert "| 4.9 |" in md and "**wrong**: dx err 0.5 > 0.01" in md and "`cuda`: not built" in md
    assert "sync 2.00 µs" in md


def test_known_gpu_table():
    peaks, bw = floor.known("NVIDIA H100 80GB HBM3")
    assert peaks["bfloat16"] == pytest.approx(989.4e12) and bw == pytest.approx(3.35e12)
    assert floor.known("NVIDIA H200")[1] == pytest.approx(4.8e12)
    assert floor.known("NVIDIA H100 PCIe")[1] == pytest.approx(2.0e12)
    assert floor.known("Some GPU") is None


# -- end to end, tools --------------------------------------------------------------------------------------------

# The reference backend by name: the tests below break it on purpose, and auto would not run it.
CHARLM_TINY = ["--device", "cpu", "--steps", "3", "--batch", "4", "--seq-len", "16", "--hidden", "24",
               "--backend", "reference"]


def test_charlm_curves_agree_on_the_cpu(tmp_path):
    assert charlm.main([*CHARLM_TINY, "--out", str(tmp_path), "--no-plots"]) == 0
    p = json.loads((tmp_path / "charlm.json").read_text())
    a, b = p["runs"]["torch.nn"]["loss"], p["runs"]["rnnfast"]["loss"]
    assert len(a) == len(b) == 3 and p["agree"] and p["max_abs_loss_diff"] <= 1e-4
    assert math.log(p["vocabulary"]) == pytest.approx(a[0], abs=0.5)  # untrained: about uniform over the vocabulary
    assert p["corpus"] == "pydoc_data.topics" and p["backend_used"] == "reference"
    assert all(r["tokens_per_s"] > 0 for r in p["runs"].values())


def test_charlm_notices_a_wrong_layer(tmp_path, monkeypatch):
    import rnnfast

    real = rnnfast.reference.layer_forward

    def off(*args, **kwargs):
        y, h, c = real(*args, **kwargs)
        return y * 4 + 1, h, c  # far from the real layer: the loss must move past the tolerance

    monkeypatch.setattr(rnnfast.reference, "layer_forward", off)
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert charlm.main([*CHARLM_TINY, "--text", str(text), "--out", str(tmp_path), "--no-plots"]) == 1
    p = json.loads((tmp_path / "charlm.json").read_text())
    assert not p["agree"] and p["vocabulary"] == len(set(text.read_text()))


def test_charlm_notices_a_diverged_run(tmp_path, monkeypatch):
    import rnnfast

    real = rnnfast.reference.layer_forward

    def nan_late(*args, **kwargs):
        y, h, c = real(*args, **kwargs)
        return (y * float("nan"), h, c) if nan_late.calls.__next__() >= 2 else (y, h, c)

    nan_late.calls = itertools.count()
    monkeypatch.setattr(rnnfast.reference, "layer_forward", nan_late)
    assert charlm.main([*CHARLM_TINY, "--out", str(tmp_path), "--no-plots"]) == 1
    assert not json.loads((tmp_path / "charlm.json").read_text())["agree"]


def test_smooth():
    assert charlm.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert charlm.smooth([2.0, 4.0], 1) == [2.0, 4.0]


def test_sanitize_runs_the_reference_on_the_cpu(capsys):
    assert sanitize.main(["--device", "cpu", "--backends", "reference", "--dtypes", "float32"]) == 0
    assert capsys.readouterr().out.count(": ok") == len(C.CELLS)


def test_progress_without_a_terminal():
    buf = io.StringIO()
    with Progress(2, stream=buf) as p:
        p.update("a")
        p.update("b")
    assert buf.getvalue().splitlines() == ["bench [1/2] a", "bench [2/2] b"]


# -- packed sequences -----------------------------------------------------------------------------------------------

def test_packed_configs_and_the_lease_group():
    c = C.parse_id("gru-B3-T17-H37-I5-packed-fp16")
    assert (c.cell, c.batch, c.seq_len, c.hidden, c.input, c.packed, c.dtype) == \
        ("gru", 3, 17, 37, 5, True, "float16")
    assert c.id == "gru-B3-T17-H37-I5-packed-fp16" and c.padded().id == "gru-B3-T17-H37-I5-fp16"
    packed = C.GROUPS["packed"]
    assert [c.packed for c in packed] == [True, False] * 4
    assert [c.padded() for c in packed[::2]] == packed[1::2]  # each packed case is followed by its padded twin
    assert {(c.cell, c.dtype) for c in packed} == set(itertools.product(("lstm", "gru"), ("bfloat16", "float16")))
    assert {(c.batch, c.seq_len, c.hidden, c.input, c.layers, c.bidirectional) for c in packed} == \
        {(64, 1024, 512, 512, 1, False)}
    lease = C.GROUPS["lease"]
    anchors = C.GROUPS["anchors"]
    assert lease[:len(anchors)] == anchors and lease[len(anchors):len(anchors) + len(packed)] == packed
    assert {c.id for c in C.GROUPS["quick"]} <= {c.id for c in lease} and len({c.id for c in lease}) == len(lease)
    cpu = C.GROUPS["cpu-lease"]
    assert {c.dtype for c in cpu} >= {"float32", "bfloat16", "float16"}
    assert any(c.packed and c.padded() in cpu for c in cpu)


def test_lengths_are_seeded_and_uniform_on_1_to_T():
    cfg = C.Config("lstm", batch=4000, hidden=8, input=8, seq_len=50, packed=True)
    a = C.lengths(cfg)
    assert a == C.lengths(cfg) and a != C.lengths(cfg, seed=4)
    assert len(a) == 4000 and min(a) == 1 and max(a) == 50
    counts = [a.count(t) for t in range(1, 51)]
    assert min(counts) > 40 and max(counts) < 120  # 80 expected of each length


def test_packed_inputs_and_workload(tmp_path):
    cfg = C.Config("lstm", batch=5, hidden=6, input=4, seq_len=7, packed=True)
    xs, g = measure.make_inputs(cfg, "cpu", copies=2)
    lens = C.lengths(cfg)
    assert all(isinstance(x, torch.nn.utils.rnn.PackedSequence) for x in xs)
    assert g.shape == (sum(lens), 6) and xs[0].data.shape == (sum(lens), 4)
    padded, got = torch.nn.utils.rnn.pad_packed_sequence(xs[0])
    assert got.tolist() == lens and not torch.equal(xs[0].data, xs[1].data)
    m = P.torch_module(cfg, "cpu")
    res = measure.Workload(m, xs, g, "training").results()
    assert res["y"].shape == g.shape and res["dx"].shape == xs[0].data.shape and res["dweight_hh_l0"] is not None
    # The gradient of sum(y * g) with respect to the packed data, by hand through the padded module call.
    x = padded.detach().requires_grad_()
    y, _ = m(torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lens), enforce_sorted=False))
    (y.data * g).sum().backward()
    ref = torch.nn.utils.rnn.pack_padded_sequence(x.grad, torch.tensor(lens), enforce_sorted=False).data
    torch.testing.assert_close(res["dx"], ref)


def test_packed_rows_carry_the_padded_time(tmp_path):
    out = tmp_path / "out"
    packed = "gru-B3-T5-H4-packed-fp32"
    assert run.main(["--configs", f"{packed},gru-B3-T5-H4-fp32,lstm-B2-T3-H4-packed-fp32", "--device", "cpu",
                     "--providers", "reference", "--out", str(out), "--no-plots", *TINY]) == 0
    rows = json.loads((out / "bench.json").read_text())["results"]
    times = {(r["config"], r["provider"], r["mode"]): r["time_ms"]["median"] for r in rows}
    for r in rows:
        if r["config"] == packed:
            assert r["packed"] and r["steps"] == sum(C.lengths(C.parse_id(packed)))
            padded = times[("gru-B3-T5-H4-fp32", r["provider"], r["mode"])]
            assert r["padded_ms"] == padded
            assert r["packed_vs_padded"] == pytest.approx(r["time_ms"]["median"] / padded)
        elif r["config"].startswith("lstm"):
            assert r["packed"] and r["padded_ms"] is None and r["packed_vs_padded"] is None  # its twin did not run
        else:
            assert not r["packed"] and "packed_vs_padded" not in r
    md = (out / "bench.md").read_text()
    assert "## Packed sequences" in md and f"| {packed} | reference | training |" in md


# -- provider choice, the dispatch table, the short table -----------------------------------------------------------

def test_exclude_providers():
    provs = [P.Provider("cudnn", None), P.Provider("triton:hoisted", "triton:hoisted"),
             P.Provider("triton:fused", "triton:fused"), P.Provider("cuda:fused", "cuda:fused"),
             P.Provider("auto", "auto")]
    names = lambda ps: [p.name for p in ps]  # noqa: E731
    assert names(run.drop_providers(provs, ["cuda*", "nothing-matches", "cudnn"])) == \
        ["cudnn", "triton:hoisted", "triton:fused", "auto"]
    assert run.drop_providers(provs, None) == provs
    assert run.parse_args(["--exclude-providers", "a,b", "--exclude-providers", "c"]).exclude_providers == \
        ["a", "b", "c"]


def test_discover_reads_the_backend_names_this_version_has(monkeypatch):
    from rnnfast import backends

    monkeypatch.setattr(backends, "BACKENDS", ("reference", "no-such-backend"), raising=False)
    assert [p.name for p in P.discover("cpu")[0]] == ["torch.nn", "reference", "auto"]
    monkeypatch.delattr(backends, "BACKENDS", raising=False)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("reference",), raising=False)
    assert [p.name for p in P.discover("cpu")[0]] == ["torch.nn", "reference", "auto"]


def _result(config, provider, mode, us, status="ok", **kw):
    cfg = C.parse_id(config)
    return dict(config=config, cell=cfg.cell, batch=cfg.batch, seq_len=cfg.seq_len, hidden=cfg.hidden, input=cfg.input,
                layers=cfg.layers, bidirectional=cfg.bidirectional, dtype=cfg.dtype, packed=cfg.packed, mode=mode,
                provider=provider, baseline=provider == "cudnn", status=status, us_per_step=us, **kw)


def test_dispatch_table_rows_come_from_single_layer_unpacked_results():
    from rnnfast import dispatch

    stamp = {"date": "2026-11-24", "rnnfast": "0.1.0", "git": "abc", "git_dirty": False, "device": "cuda",
             "capability": "9.0", "gpu": "NVIDIA H200"}
    results = [_result("lstm-B64-T100-H512-fp32", "cudnn", "inference", 10.0),
               _result("lstm-B64-T100-H512-fp32", "triton:fused", "inference", 7.0),
               _result("lstm-B64-T100-H512-fp32", "auto", "inference", 1.0),  # auto is never a table entry
               _result("lstm-B64-T100-H512-fp32", "cuda:fused", "inference", 0.5, status="wrong"),
               _result("lstm-B64-T100-H512-fp32", "cudnn", "training", 20.0),
               _result("lstm-B64-T100-H512-fp32", "triton:fused", "training", 30.0),
               # Same buckets, but packed or two bidirectional layers: a table key cannot tell them apart.
               _result("lstm-B64-T100-H512-packed-fp32", "triton:hoisted", "inference", 2.0),
               _result("lstm-B64-T100-H512-L2-bi-fp32", "triton:hoisted", "inference", 3.0)]
    rows = run.table_rows({"stamp": stamp, "baseline": "cudnn", "results": results})
    got = {(r.training, r.backend, r.us_per_step, r.torch_us_per_step) for r in rows}
    assert got == {(False, "triton:fused", 7.0, 10.0), (True, "torch", 20.0, 20.0)}
    assert all(r.capability == "9.0" and r.gpu == "NVIDIA H200" and (r.batch, r.hidden, r.seq_len) == (64, 512, 256)
               for r in rows)
    assert all("abc" in r.source for r in rows) and isinstance(rows[0], dispatch.Row)


def test_the_short_table(tmp_path, capsys):
    from bench import summary

    results = [_result("lstm-B64-T1024-H512-packed-bf16", "cudnn", "inference", 10.0, speedup=1.0),
               _result("lstm-B64-T1024-H512-packed-bf16", "triton:fused", "inference", 5.0, speedup=2.0,
                       packed_vs_padded=1.25),
               _result("lstm-B64-T1024-H512-packed-bf16", "triton:hoisted", "inference", 4.0, status="wrong"),
               _result("lstm-B64-T1024-H512-packed-bf16", "cuda:fused", "inference", 8.0, speedup=1.25),
               _result("lstm-B64-T1024-H512-packed-bf16", "cudnn", "training", 30.0, speedup=1.0),
               _result("lstm-B64-T1024-H512-packed-bf16", "triton:fused", "training", None, status="error")]
    payload = {"baseline": "cudnn", "stamp": {"gpu": "NVIDIA H200"}, "configs": ["lstm-B64-T1024-H512-packed-bf16"],
               "modes": ["inference", "training"], "results": results,
               "grid_barrier": {"triton_us": 1.5, "cuda_us": None, "errors": {"cuda_us": "hung"}}}
    lines = summary.lines(payload)
    assert lines[0] == "grid barrier, one block per SM: triton 1.5 µs, cuda not measured"
    assert "NVIDIA H200" in lines[1] and lines[2].split()[:5] == ["config", "mode", "provider", "µs/step", "vs"]
    inference, training = lines[3].split(), lines[4].split()
    assert inference[:6] == ["lstm-B64-T1024-H512-packed-bf16", "inference", "triton:fused", "5", "2", "10"]
    assert "packed/padded 1.25 (over 1.2)" in lines[3] and "triton:hoisted wrong" in lines[3]
    assert training[:6] == ["lstm-B64-T1024-H512-packed-bf16", "training", "(none)", "-", "-", "30"]
    assert "triton:fused error" in lines[4] and len(lines) == 5
    (tmp_path / "bench.json").write_text(json.dumps(payload))
    assert summary.main([str(tmp_path), "--write", str(tmp_path / "s.txt")]) == 0
    assert capsys.readouterr().out.splitlines() == lines == (tmp_path / "s.txt").read_text().splitlines()
    assert summary.main([str(tmp_path / "missing")]) == 1


def test_markdown_packed_and_barrier_sections():
    from bench import report

    r = _result("gru-B64-T1024-H512-packed-fp16", "triton:fused", "training", 3.0,
                time_ms={"median": 3.6, "q25": 3.5, "q75": 3.7, "min": 3.4, "max": 3.9, "reps": 9}, steps=33000,
                padded_ms=3.0, packed_vs_padded=1.2)
    lines = report._packed({"results": [r]}) + report._barrier(
        {"grid_barrier": {"triton_us": 1.25, "cuda_us": None, "errors": {"cuda_us": "TimeoutExpired"}}})
    assert "| gru-B64-T1024-H512-packed-fp16 | triton:fused | training | 33000 | 3.6 | 3 | 1.2 |" in lines
    assert any("triton 1.25 µs" in x and "cuda not measured (TimeoutExpired)" in x for x in lines)
    r["packed_vs_padded"] = 1.21
    assert "1.21 (over 1.2) |" in report._packed({"results": [r]})[-2]


def test_grid_barrier_costs(monkeypatch):
    from bench import barrier

    calls = []

    def child(flag, timeout):
        calls.append(flag)
        if flag == ["--cuda"]:
            raise RuntimeError("the library did not load")
        return 2e-6

    monkeypatch.setattr(barrier, "_child", child)
    got = barrier.costs(None, cuda=True, log=lambda *a: None)
    assert calls == [[], ["--cuda"], ["--cuda-counter"], ["--cuda-flags"]] and got["triton_us"] == pytest.approx(2.0)
    assert got["cuda_us"] is None and "did not load" in got["errors"]["cuda_us"]
    assert got["cuda_counter_us"] == got["cuda_flags_us"] == pytest.approx(2.0)
    calls.clear()
    m = floor.Machine(name="x", peak_flops={}, bandwidth=1.0, sync_s=1e-6, onchip_bytes=0,
                      source={"handoffs_s": {"grid barrier": 3e-6}})
    got = barrier.costs(m, cuda=False, log=lambda *a: None)
    assert calls == [] and got["triton_us"] == pytest.approx(3.0) and "not benchmarked" in got["errors"]["cuda_us"]
    assert "not benchmarked" in got["errors"]["cuda_counter_us"] and "not benchmarked" in got["errors"]["cuda_flags_us"]


def test_the_cuda_barrier_is_looked_up_where_this_version_keeps_it(monkeypatch):
    import types

    from bench import barrier

    def fn(**kw):
        return 1.5

    monkeypatch.setitem(sys.modules, "fake_rnnfast_new", types.ModuleType("fake_rnnfast_new"))
    old = types.ModuleType("fake_rnnfast_old")
    old.measure_grid_barrier = fn
    monkeypatch.setitem(sys.modules, "fake_rnnfast_old", old)
    monkeypatch.setattr(barrier, "CUDA_MODULES", ("fake_rnnfast_missing", "fake_rnnfast_new", "fake_rnnfast_old"))
    assert barrier.cuda_measure_function() is fn
    assert barrier.measure_cuda() == pytest.approx(1.5e-6) and barrier.measure_cuda("flags") == pytest.approx(1.5e-6)
    monkeypatch.setattr(barrier, "CUDA_MODULES", ("fake_rnnfast_new",))
    with pytest.raises(RuntimeError, match="no measure_grid_barrier"):
        barrier.cuda_measure_function()


def test_sanitize_cells_option(capsys):
    assert sanitize.main(["--device", "cpu", "--backends", "reference", "--dtypes", "float32", "--cells", "gru"]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == 1 and "gru" in out
    with pytest.raises(SystemExit):
        sanitize.main(["--device", "cpu", "--backends", "reference", "--cells", "cnn"])


def test_smoke_backends_can_be_restricted(monkeypatch):
    import warnings

    from rnnfast import backends

    with warnings.catch_warnings():  # its case_timeout marker is registered by bench/conftest.py, not loaded here
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        from bench import test_smoke

    kernel = list(getattr(backends, "KERNEL_BACKENDS", ("triton", "cuda")))
    monkeypatch.delenv(test_smoke.ENV_BACKENDS, raising=False)
    assert test_smoke.kernel_backends() == kernel
    monkeypatch.setenv(test_smoke.ENV_BACKENDS, "triton")
    assert test_smoke.kernel_backends() == ["triton"]
    assert test_smoke.backend_modes("triton") == [f"triton:{m}" for m in backends.get("triton").modes]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_baseline_check_sees_torch_nn_autograd_node(packed):
    # What tells cuDNN from torch.nn's other paths on a GPU; on the CPU the node is the CPU kernel's.
    cfg = C.Config("lstm", batch=3, hidden=4, input=2, seq_len=5, packed=packed)
    xs, _ = measure.make_inputs(cfg, "cpu", copies=1)
    name = run.autograd_node(P.torch_module(cfg, "cpu"), xs[0])
    assert name != "no autograd node" and name.endswith("Backward0")
