"""The Triton kernels compile for H100/A100 targets, without a GPU, with the instructions they are meant to use.

The interpreter checks the arithmetic; only the compiler can check what the GPU will run: that every cell's forward
and backward compile for sm_90 and sm_80, that half types and TF32 use tensor-core ``mma``, that float32 without TF32
uses no TF32 instruction, that the persistent schedule's barrier is a release/acquire pair, and that the default
half-precision plans do not spill registers. The compile runs in a subprocess without ``TRITON_INTERPRET``.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, re, sys, torch
from rnnfast.backends import triton as bk
from rnnfast.kernels import aot


CASES = [  # (dtype, precision, H, resident): None lets the plan keep W_hh on chip, False streams it
    ("float16", "ieee", 256, None), ("bfloat16", "ieee", 128, False), ("float32", "tf32", 256, None),
    ("float32", "ieee", 128, None), ("float64", "ieee", 256, False),
]
out = []
for cell in ("rnn_tanh", "rnn_relu", "gru", "lstm"):
    for i, (dt, precision, H, resident) in enumerate(CASES):
        dtype = getattr(torch, dt)
        plan = bk.make_plan(cell, torch.device("cuda"), 16, H, H, dtype=dtype, sm_count=132, resident=resident)
        kw = dict(arch=90, precision=precision, reverse=bool(i % 2), dirs=1 + (i % 2))
        f = aot.compile_forward(cell, plan, dtype, H, fused=bool(i % 2), **kw)
        b = aot.compile_backward(cell, plan, dtype, H, **kw)
        for kind, k, kp in (("forward", f, plan.forward), ("backward", b, plan.backward)):
            ttgir = k.kernel.asm["ttgir"]
            pre, body = ttgir.split("scf.for", 1)
            chunk = re.compile(r"tensor<%dx%dx" % (kp.block_k, kp.block_h * (bk.gate_slots(cell) if kind == "forward" else 1)))
            out.append(dict(cell=cell, dtype=dt, precision=precision, H=H, kind=kind, arch=90, sync=kp.needs_sync(H),
                            resident=kp.w_resident, nk=kp.nk, registers=k.registers,
                            spill=k.spill_bytes, mma=k.uses("mma.sync"), tf32=k.uses(".tf32"),
                            release=k.uses("atom.global.gpu.release"), acquire=k.uses("global.gpu.acquire"),
                            cooperative=bool(k.kernel.metadata.launch_cooperative_grid),
                            chunks_stored_before_loop=sum(1 for l in pre.splitlines()
                                                          if "ttg.local_alloc" in l and chunk.search(l)),
                            # a streamed tile is a tt.load, or a cp.async once the compiler pipelines the K loop
                            chunks_loaded_in_loop=sum(1 for l in body.splitlines()
                                                      if ("tt.load" in l or "async_copy_global_to_local" in l)
                                                      and chunk.search(l)),
                            forced_stream=resident is False,
                            attrs=sorted(k.attrs)))
# sm_80 (A100) and the per-step schedule (no barrier) for one cell.
plan = bk.make_plan("lstm", torch.device("cuda"), 64, 512, 512, dtype=torch.bfloat16, sm_count=108, schedule="step")
for kind, k in (("forward", aot.compile_forward("lstm", plan, torch.bfloat16, 512, fused=False, arch=80)),
                ("backward", aot.compile_backward("lstm", plan, torch.bfloat16, 512, arch=80))):
    out.append(dict(cell="lstm", dtype="bfloat16", precision="ieee", H=512, kind=kind, arch=80, sync=False,
                    resident=plan.forward.w_resident, registers=k.registers, spill=k.spill_bytes,
                    mma=k.uses("mma.sync"), tf32=k.uses(".tf32"), release=k.uses("atom.global.gpu.release"),
                    acquire=k.uses("global.gpu.acquire"), attrs=sorted(k.attrs)))
# The JIT's specialisation: B=1 and a one-step launch become constants; a 16-divisible H gets a divisibility hint.
plan = bk.make_plan("gru", torch.device("cuda"), 1, 48, 48, dtype=torch.float16, sm_count=132, schedule="step")
k = aot.compile_forward("gru", plan, torch.float16, 48, fused=False, B=1, I=48)
spec = dict(constants=k.constants, attrs=sorted(k.attrs))
anchors = {name: aot.report_row(*a, target=bk.H200, arch=90) for name, a in aot.ANCHORS.items()}
print(json.dumps(dict(cases=out, spec=spec, anchors=anchors)))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"compiling the Triton kernels failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cases(compiled):
    return compiled["cases"]


def _ids(r):
    return f"{r['cell']}-{r['kind']}-{r['dtype']}-{r['precision']}-H{r['H']}-sm{r['arch']}"


@pytest.mark.slow
def test_every_cell_compiles_forward_and_backward(cases):
    got = {(r["cell"], r["kind"]) for r in cases}
    assert got == {(c, k) for c in ("rnn_tanh", "rnn_relu", "gru", "lstm") for k in ("forward", "backward")}
    assert {r["arch"] for r in cases} == {80, 90}


@pytest.mark.slow
def test_tensor_cores_where_allowed_and_ieee_float32_stays_exact(cases):
    for r in cases:
        if r["dtype"] == "float32" and r["precision"] == "ieee":
            assert not r["tf32"], f"{_ids(r)}: float32 without TF32 allowed must not use TF32"
        else:
            assert r["mma"], f"{_ids(r)}: expected tensor-core mma instructions"


@pytest.mark.slow
def test_barrier_is_a_release_acquire_pair_only_when_programs_share_a_batch_tile(cases):
    assert any(r["sync"] for r in cases) and not all(r["sync"] for r in cases)
    for r in cases:
        assert r["release"] == r["sync"] and r["acquire"] == r["sync"], _ids(r)


@pytest.mark.slow
def test_programs_that_wait_for_each_other_are_launched_cooperatively(cases):
    """A plain launch of programs that wait on each other can hang when one of them is not resident (another
    stream, NCCL, MPS); a cooperative launch is refused by the driver instead."""
    for r in cases:
        if "cooperative" in r:
            assert r["cooperative"] == r["sync"], _ids(r)
    assert any(r.get("cooperative") for r in cases)


@pytest.mark.slow
def test_default_half_precision_plans_do_not_spill(cases):
    for r in cases:
        if r["dtype"] in ("float16", "bfloat16") and not r.get("forced_stream"):
            assert r["spill"] == 0, f"{_ids(r)}: {r['registers']} registers, {r['spill']} bytes spilled"


@pytest.mark.slow
def test_resident_weights_are_stored_on_chip_once_and_never_reloaded(cases):
    """A resident slice's chunks go to shared memory before the time loop; inside it no load has their shape."""
    resident = [r for r in cases if r.get("resident") and "nk" in r]
    assert resident, "no case keeps its weights resident"
    for r in resident:
        assert r["chunks_stored_before_loop"] >= r["nk"], _ids(r)
        assert r["chunks_loaded_in_loop"] == 0, _ids(r)
    streamed = [r for r in cases if "nk" in r and not r["resident"]]
    assert streamed and all(r["chunks_loaded_in_loop"] > 0 for r in streamed)


@pytest.mark.slow
def test_the_report_compiles_what_the_jit_runs(compiled):
    """The JIT makes an integer argument equal to 1 a constant and gives 16-divisible ones (and aligned pointers)
    a divisibility hint; the AOT compile uses the JIT's own binder, so it must show both."""
    spec = compiled["spec"]
    assert {"B", "n_steps"} <= set(spec["constants"]), spec
    assert {"H", "I", "hs_ptr", "wh_ptr", "gx_ptr"} <= set(spec["attrs"]), spec


@pytest.mark.slow
def test_anchor_plans_fit_on_an_h200_without_spilling(compiled):
    """The report's plans for (a), (b), (c): grids sized from the compiled kernels' occupancy, no spills, tensor
    cores, and a prediction from the cost model."""
    for name, row in compiled["anchors"].items():
        for kind in ("forward", "backward"):
            r = row[kind]
            assert r["spill"] == 0, (name, kind, r)
            assert 1 <= r["per_sm"] and r["programs"] <= r["per_sm"] * 132, (name, kind, r)
            assert r["mma"], (name, kind, r)
            assert row["predicted"][kind]["us"] > 0
