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
import json, sys, torch
from rnnfast.backends import triton as bk
from rnnfast.kernels import aot

CASES = [  # (dtype, precision, H): H=256 streams W_hh over K tiles; H=128 keeps it resident
    ("float16", "ieee", 256), ("bfloat16", "ieee", 128), ("float32", "tf32", 256), ("float32", "ieee", 128),
    ("float64", "ieee", 256),
]
out = []
for cell in ("rnn_tanh", "rnn_relu", "gru", "lstm"):
    for i, (dt, precision, H) in enumerate(CASES):
        dtype = getattr(torch, dt)
        plan = bk.make_plan(cell, torch.device("cuda"), 16, H, H, sm_count=132)
        kw = dict(arch=90, precision=precision, reverse=bool(i % 2))
        f = aot.compile_forward(cell, plan, dtype, H, fused=bool(i % 2), **kw)
        b = aot.compile_backward(cell, plan, dtype, H, **kw)
        for kind, k in (("forward", f), ("backward", b)):
            out.append(dict(cell=cell, dtype=dt, precision=precision, H=H, kind=kind, arch=90,
                            sync=plan.needs_sync(H), resident=plan.w_resident, registers=k.registers,
                            spill=k.spill_bytes, mma=k.uses("mma.sync"), tf32=k.uses(".tf32"),
                            release=k.uses("atom.global.gpu.release"), acquire=k.uses("global.gpu.acquire"),
                            cooperative=bool(k.kernel.metadata.launch_cooperative_grid)))
# sm_80 (A100) and the per-step schedule (no barrier) for one cell.
plan = bk.make_plan("lstm", torch.device("cuda"), 64, 512, 512, sm_count=108, schedule="step")
for kind, k in (("forward", aot.compile_forward("lstm", plan, torch.bfloat16, 512, fused=False, arch=80)),
                ("backward", aot.compile_backward("lstm", plan, torch.bfloat16, 512, arch=80))):
    out.append(dict(cell="lstm", dtype="bfloat16", precision="ieee", H=512, kind=kind, arch=80, sync=False,
                    resident=plan.w_resident, registers=k.registers, spill=k.spill_bytes, mma=k.uses("mma.sync"),
                    tf32=k.uses(".tf32"), release=k.uses("atom.global.gpu.release"),
                    acquire=k.uses("global.gpu.acquire")))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"compiling the Triton kernels failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ids(r):
    return f"{r['cell']}-{r['kind']}-{r['dtype']}-{r['precision']}-H{r['H']}-sm{r['arch']}"


@pytest.mark.slow
def test_every_cell_compiles_forward_and_backward(compiled):
    got = {(r["cell"], r["kind"]) for r in compiled}
    assert got == {(c, k) for c in ("rnn_tanh", "rnn_relu", "gru", "lstm") for k in ("forward", "backward")}
    assert {r["arch"] for r in compiled} == {80, 90}


@pytest.mark.slow
def test_tensor_cores_where_allowed_and_ieee_float32_stays_exact(compiled):
    for r in compiled:
        if r["dtype"] == "float32" and r["precision"] == "ieee":
            assert not r["tf32"], f"{_ids(r)}: float32 without TF32 allowed must not use TF32"
        else:
            assert r["mma"], f"{_ids(r)}: expected tensor-core mma instructions"


@pytest.mark.slow
def test_barrier_is_a_release_acquire_pair_only_when_programs_share_a_batch_tile(compiled):
    assert any(r["sync"] for r in compiled) and not all(r["sync"] for r in compiled)
    for r in compiled:
        assert r["release"] == r["sync"] and r["acquire"] == r["sync"], _ids(r)


@pytest.mark.slow
def test_programs_that_wait_for_each_other_are_launched_cooperatively(compiled):
    """A plain launch of programs that wait on each other can hang when one of them is not resident (another
    stream, NCCL, MPS); a cooperative launch is refused by the driver instead."""
    for r in compiled:
        if "cooperative" in r:
            assert r["cooperative"] == r["sync"], _ids(r)
    assert any(r.get("cooperative") for r in compiled)


@pytest.mark.slow
def test_default_half_precision_plans_do_not_spill(compiled):
    for r in compiled:
        if r["dtype"] in ("float16", "bfloat16"):
            assert r["spill"] == 0, f"{_ids(r)}: {r['registers']} registers, {r['spill']} bytes spilled"
