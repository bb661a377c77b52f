"""How auto chooses: the dispatch table, the tuning cache, explain, and never reference or an interpreter."""

import json

import pytest
import torch

import rnnfast
from rnnfast import backends, dispatch
from rnnfast.backends import triton as tk
from conftest import assert_close

F64 = torch.float64


@pytest.fixture
def gpu_like(monkeypatch, tmp_path):
    """Treat CPU tensors as a measured GPU of capability 9.0, let auto run the Triton interpreter (normally
    excluded: it is for testing) and keep the tuning cache in tmp_path, so the whole chain runs on the CPU."""
    monkeypatch.setattr(dispatch, "measured_device", lambda device: True)
    monkeypatch.setattr(dispatch, "capability", lambda device: "9.0")
    monkeypatch.setattr(dispatch, "device_id", lambda device: "test-gpu")
    monkeypatch.setattr(tk.TritonBackend, "auto_unavailable", tk.TritonBackend.unavailable)
    monkeypatch.setenv("RNNFAST_CACHE_DIR", str(tmp_path))
    dispatch.forget()  # nothing remembered from before the patches, nor after them
    monkeypatch.setattr(dispatch, "_TABLE", {})
    yield tmp_path
    dispatch.forget()


def _row(backend, training=False, cell="lstm", dtype="float64", batch=16, hidden=128, seq_len=256):
    return dispatch.Row(capability="9.0", cell=cell, dtype=dtype, training=training, batch=batch, hidden=hidden,
                        seq_len=seq_len, backend=backend, us_per_step=1.0, torch_us_per_step=2.0, gpu="test",
                        source="test")


def _count_triton(monkeypatch):
    calls = []
    real = tk.forward
    monkeypatch.setattr(tk, "forward", lambda *a, **k: calls.append(k.get("fused")) or real(*a, **k))
    return calls


def _lstm(**kw):
    torch.manual_seed(0)
    ours = rnnfast.nn.LSTM(3, 5, dtype=F64, **kw)
    theirs = torch.nn.LSTM(3, 5, dtype=F64, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_on_the_cpu_auto_runs_torch_and_says_why():
    m, _ = _lstm()
    choice = rnnfast.explain(m, torch.randn(4, 2, 3, dtype=F64))
    assert choice.backend == "torch" and "cpu" in choice.reason


def test_table_hit_runs_the_row_and_explain_names_it(gpu_like, monkeypatch):
    dispatch._TABLE.update({r.key: r for r in [_row("triton:fused")]})
    calls = _count_triton(monkeypatch)
    ours, theirs = _lstm()
    x = torch.randn(7, 10, 3, dtype=F64)  # B=10 -> bucket 16, H=5 -> 128, T=7 -> 256
    with torch.no_grad():
        choice = rnnfast.explain(ours, x)
        assert choice.backend == "triton:fused" and choice.row == _row("triton:fused")
        assert "dispatch table row" in str(choice)
        out, _ = ours(x)
    assert calls == [True]
    assert_close(out, theirs(x)[0])
    # Training is another row: none, so torch.
    assert rnnfast.explain(ours, x, training=True).backend == "torch"


def test_table_miss_runs_torch(gpu_like, monkeypatch):
    dispatch._TABLE.update({r.key: r for r in [_row("triton:fused", batch=64)]})
    calls = _count_triton(monkeypatch)
    ours, theirs = _lstm()
    x = torch.randn(7, 10, 3, dtype=F64)
    choice = rnnfast.explain(ours, x, training=False)
    assert choice.backend == "torch" and "no measurement" in choice.reason
    with torch.no_grad():
        assert torch.equal(ours(x)[0], theirs(x)[0])
    assert calls == []


def test_a_row_the_backend_refuses_gives_way_to_torch_with_the_reason(gpu_like):
    dispatch._TABLE.update({r.key: r for r in [_row("triton:fused")]})
    ours, _ = _lstm(proj_size=2)
    choice = rnnfast.explain(ours, torch.randn(7, 10, 3, dtype=F64), training=False)
    assert choice.backend == "torch" and "proj_size" in choice.refusals["triton:fused"]


def test_cached_tuning_wins_over_the_table(gpu_like, monkeypatch):
    dispatch._TABLE.update({r.key: r for r in [_row("torch")]})
    ours, _ = _lstm()
    x = torch.randn(7, 10, 3, dtype=F64)
    spec = dispatch.module_spec(ours, x, training=False)
    dispatch.write_cache_entry(spec.device, dispatch.tune_key(spec), {"backend": "triton:hoisted"})
    calls = _count_triton(monkeypatch)
    with torch.no_grad():
        assert rnnfast.explain(ours, x).tuned == {"backend": "triton:hoisted"}
        ours(x)
    assert calls == [False]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": 1, "entries": {"k": {"backend": 3}}}),
                                     json.dumps({"schema": 99, "entries": {}})], ids=["garbage", "bad-entry",
                                                                                      "schema"])
def test_a_corrupt_cache_is_ignored_with_a_warning(gpu_like, content):
    ours, _ = _lstm()
    x = torch.randn(7, 10, 3, dtype=F64)
    dispatch.cache_path(x.device).parent.mkdir(parents=True, exist_ok=True)
    dispatch.cache_path(x.device).write_text(content)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert rnnfast.explain(ours, x, training=False).backend == "torch"


def test_a_stale_cache_is_ignored_with_a_warning(gpu_like):
    ours, _ = _lstm()
    x = torch.randn(7, 10, 3, dtype=F64)
    spec = dispatch.module_spec(ours, x, training=False)
    path = dispatch.write_cache_entry(spec.device, dispatch.tune_key(spec), {"backend": "triton:fused"})
    data = json.loads(path.read_text())
    data["stamp"]["torch"] = "1.0"
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="written with"):
        assert rnnfast.explain(ours, x, training=False).backend == "torch"


def test_tune_gates_on_correctness_and_caches_the_winner(gpu_like, monkeypatch):
    real = tk.forward

    def wrong(*a, **k):
        y, h_n, c_n, ws = real(*a, **k)
        return y + 1e-3, h_n, c_n, ws

    monkeypatch.setattr(tk, "forward", wrong)
    ours, _ = _lstm()
    x = torch.randn(4, 3, 3, dtype=F64)
    result = rnnfast.tune(ours, x, training=False, candidates=["triton:fused", "reference"], repeats=2, warmup=1)
    assert "wrong" in result.rejected["triton:fused"]
    assert "specification" in result.rejected["reference"]  # auto never runs the reference
    assert result.backend == "torch" and set(result.us_per_step) == {"torch"}
    entry = dispatch.read_cache(x.device)[dispatch.tune_key(dispatch.module_spec(ours, x, training=False))]
    assert entry["backend"] == "torch"
    monkeypatch.setattr(tk, "forward", real)  # a correct kernel is timed
    result = rnnfast.tune(ours, x, training=True, candidates=["triton:fused"], repeats=2, warmup=1)
    assert set(result.us_per_step) == {"torch", "triton:fused"} and not result.rejected


def test_auto_never_names_reference_or_auto_in_a_table(tmp_path):
    for bad in ("reference", "auto", "reference:x"):
        with pytest.raises(ValueError):
            dispatch.write_table(tmp_path / "t.json", [_row(bad)])
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"schema": 1, "rows": [vars(_row("torch")) | {"backend": "reference"}]}))
    with pytest.raises(ValueError, match="never runs"):
        dispatch.read_table(path)


def test_the_shipped_table_reads_and_round_trips(tmp_path):
    shipped = dispatch.read_table()
    path = tmp_path / "t.json"
    rows = [_row("triton:fused"), _row("torch", training=True), _row("cuda", batch=None)]
    dispatch.write_table(path, rows)
    assert dispatch.read_table(path) == {r.key: r for r in rows}
    assert all(r.capability for r in shipped.values())


def test_rows_from_benchmark_results_pick_the_fastest_correct_and_need_the_baseline():
    def res(provider, us, ok=True, batch=16, mode="inference"):
        return dict(provider=provider, cell="gru", dtype="bfloat16", mode=mode, batch=batch, hidden=512,
                    seq_len=1024, ok=ok, us_per_step=us)

    results = [res("cudnn", 5.0), res("triton:fused", 3.0), res("cuda:hoisted", 1.0, ok=False),
               res("reference", 0.1), res("auto", 0.5),
               res("cudnn", 2.0, mode="training"), res("triton:fused", 4.0, mode="training"),
               res("triton:fused", 1.0, batch=64)]  # no baseline there: no row
    rows = dispatch.rows_from_results(results, capability="9.0", gpu="H200", source="x", baseline="cudnn")
    got = {(r.training, r.batch): (r.backend, r.us_per_step, r.torch_us_per_step) for r in rows}
    assert got == {(False, 16): ("triton:fused", 3.0, 5.0), (True, 16): ("torch", 2.0, 2.0)}


def test_constant_under_compile_marks_as_torch_does():
    def f():
        return 1

    def g():
        return 1

    torch.compiler.assume_constant_result(f)
    backends.constant_under_compile(g)
    marks = lambda fn: {k: v for k, v in vars(fn).items() if k.startswith("_dynamo")}  # noqa: E731
    assert marks(f) == marks(g) == {"_dynamo_marked_constant": True}


def test_explain_an_explicit_backend_and_its_refusal():
    m = rnnfast.nn.LSTM(3, 4, proj_size=2, backend="triton")
    choice = rnnfast.explain(m, torch.randn(5, 3))
    assert not choice.auto and str(choice).startswith("runs 'triton'") and "proj_size" in choice.reason
    with pytest.raises(rnnfast.BackendUnavailableError, match="proj_size"):
        m(torch.randn(5, 3))
    with pytest.raises(TypeError, match="rnnfast.nn module"):
        rnnfast.explain(torch.nn.LSTM(3, 4), torch.randn(5, 3))


def test_auto_under_compile_reads_the_table_once_eagerly(gpu_like, monkeypatch):
    """torch.compile(fullgraph=True) keeps auto's choice as a constant (the table and cache are files, which dynamo
    cannot trace) and runs the backend the table names."""
    dispatch._TABLE.update({r.key: r for r in [_row("triton:fused", cell="gru", dtype="float32")]})
    calls = _count_triton(monkeypatch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = rnnfast.nn.GRU(3, 5)
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        out, _ = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        ref, _ = m(x)
    assert calls == [True, True]
    assert_close(out, ref)
