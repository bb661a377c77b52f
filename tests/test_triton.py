"""The Triton backend against the float64 reference (and torch.nn / cuDNN).

On the CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1 without a GPU): every
cell, both input modes, the per-step schedule with several programs per batch tile and the persistent schedule with
one program per batch tile. On a GPU the same tests run on CUDA tensors, plus the persistent schedule whose programs
wait on each other (the in-kernel barrier), and float16/bfloat16 against cuDNN.
"""

import math
import zlib

import pytest
import torch

import rnnfast
from rnnfast import backends, ops, reference
from rnnfast.backends import triton as tk
from conftest import (CELLS, GRAD_NAMES, assert_close, assert_layer_matches, assert_within_baseline, make_layer_inputs,
                      reference_layer, torch_nn_layer)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    backends.why_unavailable("triton", ops.layer_spec("gru", torch.zeros(1, 1, 1, device=DEVICE),
                                                      torch.zeros(3, 1, device=DEVICE), None, None, None)) is not None,
    reason="the Triton backend cannot run here: " + str(backends.why_unavailable(
        "triton", ops.layer_spec("gru", torch.zeros(1, 1, 1, device=DEVICE), torch.zeros(3, 1, device=DEVICE), None,
                                 None, None))))

# Odd sizes: H=37 is split into three 16-wide slices and three 16-deep K tiles in the multi-program plans, B=20
# into two batch tiles; lengths cover 0, 1 and T.
T, I, H = 7, 5, 37
LENGTHS = [7, 3, 0, 1, 7, 2, 5, 6, 4, 1, 7, 7, 3, 2, 1, 6, 5, 4, 7, 2]
# (schedule, batch, plan arguments): one program per batch tile in one launch; several per tile, one launch a step.
PLANS = {
    "persistent-1": ("persistent", 3, dict()),
    "step-multi": ("step", 20, dict(schedule="step", block_b=16, block_h=16, block_k=16, block_i=16)),
}


def _inputs(cell, B, dtype, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    a = make_layer_inputs(cell, T, B, I, H, dtype=dtype, lengths=lengths, generator=g, scale=0.25)
    return {k: v.to(DEVICE) for k, v in a.items()}


def _run(cell, a, reverse, mode, plan):
    """Forward and backward through the launchers with outputs poisoned first; gradients of a random projection."""
    fused = mode == "fused"
    y, h_n, c_n, ws = tk.forward(cell, a["x"], a["h0"], a.get("c0"), a["w_ih"], a["w_hh"], a.get("b_ih"),
                                 a.get("b_hh"), a.get("lengths"), reverse, fused=fused, plan=plan)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    gh = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(y)
    gc = torch.randn(c_n.shape, generator=g, dtype=torch.float64).to(y) if c_n is not None else None
    grads = tk.backward(cell, gy, gh, gc, a["x"], a["w_ih"], a["w_hh"], a.get("b_ih"), a.get("lengths"), reverse,
                        ws, plan=plan)
    return (y, h_n, c_n), grads, (gy, gh, gc)




@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("mode", ["hoisted", "fused"])
@pytest.mark.parametrize("cell", CELLS)
def test_kernels_match_reference(cell, mode, plan_name, dtype, poison_torch_memory):
    schedule, B, plan_kw = PLANS[plan_name]
    # Both directions for every cell, alternating over the (mode, schedule) pairs to keep the interpreter time down.
    reverse = (mode == "fused") != (schedule == "step")
    a = _inputs(cell, B, dtype, LENGTHS[:B], seed=zlib.crc32(f"{cell}-{mode}-{plan_name}".encode()))
    plan = tk.make_plan(cell, DEVICE, B, I, H, **plan_kw)
    assert plan.schedule == schedule
    outs, grads, upstream = _run(cell, a, reverse, mode, plan)
    assert_layer_matches(cell, dtype, outs, grads, *reference_layer(cell, a, reverse, upstream))


def test_padded_steps_output_zeros_and_keep_the_state():
    """Independent of the reference: a sequence of length 0 outputs zeros and returns its initial state."""
    a = _inputs("lstm", 3, torch.float64, [T, 0, 2], seed=3)
    (y, h_n, c_n), _, _ = _run("lstm", a, True, "fused", tk.make_plan("lstm", DEVICE, 3, I, H))
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    assert torch.equal(y[2:, 2], torch.zeros_like(y[2:, 2]))
    assert torch.equal(h_n[1], a["h0"][1]) and torch.equal(c_n[1], a["c0"][1])
    assert not torch.equal(y[:2, 2], torch.zeros_like(y[:2, 2]))


@pytest.mark.parametrize("mode", ["hoisted", "fused"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64(cell, mode):
    a = make_layer_inputs(cell, 3, 2, 2, 3, requires_grad=True, lengths=[3, 1])
    a = {k: (v.detach().to(DEVICE).requires_grad_() if v.is_floating_point() else v.to(DEVICE))
         for k, v in a.items()}
    fn = ops.LAYER_FUNCTIONS[cell]
    keys = [k for k in GRAD_NAMES if k in a]
    reverse = mode == "fused"

    def f(*tensors):
        return fn(**dict(zip(keys, tensors)), lengths=a["lengths"], reverse=reverse, backend=f"triton:{mode}")

    # fast_mode checks a random projection of the Jacobian: every input and output still takes part.
    assert torch.autograd.gradcheck(f, [a[k] for k in keys], fast_mode=True)


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck(cell):
    a = {k: v.to(DEVICE) for k, v in make_layer_inputs(cell, 3, 2, 3, 4, lengths=[3, 1], requires_grad=True).items()}
    fwd, _ = ops.OPS[cell]
    if cell == "lstm":
        args = (a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None, a["lengths"], True,
                "triton:fused")
    else:
        args = (a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["lengths"], True, "triton:fused")
    torch.library.opcheck(fwd, args)


@pytest.mark.parametrize("kind,cls,kw", [
    ("lstm", "LSTM", dict(num_layers=2, bidirectional=True)),
    ("gru", "GRU", dict(batch_first=True)),
    ("rnn_relu", "RNN", dict(nonlinearity="relu", bias=False)),
])
def test_modules_match_torch_nn_with_packed_sequences(kind, cls, kw):
    torch.manual_seed(0)
    ours = getattr(rnnfast.nn, cls)(4, 6, dtype=torch.float64, device=DEVICE, backend="triton", **kw)
    theirs = getattr(torch.nn, cls)(4, 6, dtype=torch.float64, device=DEVICE, **kw)
    theirs.load_state_dict(ours.state_dict())
    bf = kw.get("batch_first", False)
    x = torch.randn(3, 5, 4, dtype=torch.float64, device=DEVICE) if bf else \
        torch.randn(5, 3, 4, dtype=torch.float64, device=DEVICE)
    lengths = torch.tensor([5, 2, 4])
    outs, grads = [], []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, batch_first=bf, enforce_sorted=False)
        out, hn = m(packed)
        hn = hn if isinstance(hn, tuple) else (hn,)
        loss = out.data.square().sum() + sum(h.sum() for h in hn)
        m.zero_grad()
        loss.backward()
        outs.append([out.data, *hn])
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*outs):
        assert_close(a, b)
    for a, b in zip(*grads):
        assert_close(a, b)


def test_compile_fullgraph_with_the_triton_backend():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = rnnfast.nn.GRU(3, 5, dtype=torch.float64, device=DEVICE, backend="triton:hoisted")
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE)
    out_c, h_c = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    out_e, h_e = m(x)
    assert_close(out_c, out_e)
    assert_close(h_c, h_e)


# -- refusals: an explicit request that cannot run says why; nothing falls back -----------------------------------

def test_projection_is_refused_with_the_reason():
    a = {k: v.to(DEVICE) for k, v in make_layer_inputs("lstm", 3, 2, 3, 4, proj=2).items()}
    with pytest.raises(backends.BackendUnavailableError, match="proj_size"):
        ops.lstm(**a, backend="triton")
    # auto moves on to a backend that can run it.
    y, _, _ = ops.lstm(**a, backend="auto")
    assert y.shape == (3, 2, 2)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="interpreter limits")
def test_interpreter_limits_are_refused():
    a = make_layer_inputs("gru", 3, 2, 3, 4, dtype=torch.bfloat16)
    with pytest.raises(backends.BackendUnavailableError, match="bfloat16"):
        ops.gru(**a, backend="triton")
    with pytest.raises(ValueError, match="interpreter"):
        tk.make_plan("gru", DEVICE, 2, 3, 40, schedule="persistent", block_h=16)
    spec = ops.layer_spec("gru", a["x"].float(), a["w_hh"].float(), None, None, None)
    assert backends.why_unavailable("triton", spec) is None
    assert "interpreter" in backends.why_unavailable("triton", spec, for_auto=True)
    assert backends.select("auto", spec) != "triton"


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="schedule"):
        tk.make_plan("lstm", DEVICE, 2, 3, 4, schedule="eager")
    with pytest.raises(ValueError, match="block_h"):
        tk.make_plan("lstm", DEVICE, 2, 3, 4, schedule="step", block_h=24)


# -- half precision: the error against float64 is at most a small multiple of a same-precision torch run ---------

def _torch_nn_baseline(cell, a):
    """torch.nn's output in the inputs' dtype on their device (cuDNN on a GPU)."""
    hx = (a["h0"][None], a["c0"][None]) if cell == "lstm" else a["h0"][None]
    with torch.no_grad():
        return torch_nn_layer(cell, a)(a["x"], hx)[0]


def _half_dtypes():
    if DEVICE.type == "cuda":
        return [torch.float16, torch.bfloat16]
    return [torch.float16]  # the interpreter's bfloat16 dot is wrong (shared/GPU.md)


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", ["hoisted", "fused"])
@pytest.mark.parametrize("cell", CELLS)
def test_half_precision_within_baseline(cell, mode, dtype):
    B = 20
    a = _inputs(cell, B, dtype, None, seed=11)
    (y, h_n, _), _, _ = _run(cell, a, False, mode, tk.make_plan(cell, DEVICE, B, I, H))
    (y64, _, _), _ = reference_layer(cell, a, False, (torch.zeros_like(y), torch.zeros_like(h_n),
                                                 torch.zeros_like(h_n) if cell == "lstm" else None))
    assert y.dtype == dtype
    assert_within_baseline(y, y64, _torch_nn_baseline(cell, a), msg=f"{cell} {mode} {dtype}")


# -- GPU only: the persistent schedule whose programs wait on each other, and sizes the interpreter cannot afford ---

@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["hoisted", "fused"])
@pytest.mark.parametrize("B,Hb,reverse", [(1, 37, False), (20, 200, True), (64, 512, False)])
def test_gpu_persistent_barrier_matches_reference(cell, mode, B, Hb, reverse, poison_torch_memory):
    g = torch.Generator().manual_seed(B + Hb)
    lengths = torch.randint(0, 50, (B,), generator=g).tolist()
    # Weights ~ N(0, (0.5/sqrt(H))^2): the recurrence contracts, so float32 rounding does not grow chaotically.
    a = make_layer_inputs(cell, 50, B, 33, Hb, dtype=torch.float32, lengths=lengths, generator=g,
                          scale=0.5 / math.sqrt(Hb))
    a = {k: v.to(DEVICE) for k, v in a.items()}
    plan = tk.make_plan(cell, DEVICE, B, 33, Hb, schedule="persistent", block_h=16)
    assert plan.needs_sync(Hb)
    outs, grads, upstream = _run(cell, a, reverse, mode, plan)
    assert_layer_matches(cell, torch.float32, outs, grads, *reference_layer(cell, a, reverse, upstream))


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_default_plan_large(cell):
    """The plan auto picks on this GPU for a benchmark-sized layer, in bfloat16, against cuDNN's error."""
    B, Tl, Hl = 16, 256, 768
    g = torch.Generator().manual_seed(5)
    a = make_layer_inputs(cell, Tl, B, Hl, Hl, dtype=torch.bfloat16, generator=g, scale=0.5 / math.sqrt(Hl))
    a = {k: v.to(DEVICE) for k, v in a.items()}
    y, *_ = ops.LAYER_FUNCTIONS[cell](**a, backend="triton")
    ref = reference.layer_forward(cell, *(a[k].double() if k in a else None for k in ("x", "h0", "c0")),
                                  a["w_ih"].double(), a["w_hh"].double(), a["b_ih"].double(), a["b_hh"].double())
    assert_within_baseline(y, ref[0], _torch_nn_baseline(cell, a), msg=cell)


def test_tf32_only_when_torch_allows_it():
    # Saved and restored here: monkeypatch cannot delattr on torch's cuBLASModule (pytest 9), and the flag must not
    # leak into the tests after this one.
    cuda = torch.device("cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert tk._precision(torch.float32, cuda) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert tk._precision(torch.float32, cuda) == "tf32"
        assert tk._precision(torch.float64, cuda) == "ieee"
        assert tk._precision(torch.float32, torch.device("cpu")) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert torch.backends.cuda.matmul.allow_tf32 == saved


def test_only_plans_whose_programs_wait_for_each_other_launch_cooperatively():
    shared = tk.make_plan("lstm", torch.device("cuda"), 16, 64, 512, sm_count=132)
    alone = tk.make_plan("lstm", torch.device("cuda"), 16, 64, 512, sm_count=132, schedule="step")
    assert shared.needs_sync(512) and not alone.needs_sync(512)
    for meta, want in ((tk.forward_meta("lstm", shared, 512, fused=False, reverse=False, has_len=False,
                                        has_bias=True, precision="ieee"), True),
                       (tk.backward_meta("lstm", shared, 512, reverse=False, has_len=False, precision="ieee"), True),
                       (tk.forward_meta("lstm", alone, 512, fused=False, reverse=False, has_len=False,
                                        has_bias=True, precision="ieee"), False)):
        assert meta.get("launch_cooperative_grid", False) is want
