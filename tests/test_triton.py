"""The Triton backend against the float64 reference (and torch.nn / cuDNN).

On the CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1 without a GPU): every
cell, both input modes, the per-step schedule with several programs per batch tile and the persistent schedule with
one program per batch tile. On a GPU the same tests run on CUDA tensors, plus the persistent schedule whose programs
wait on each other (the in-kernel barrier), and float16/bfloat16 against cuDNN.
"""

import math
import zlib
from dataclasses import replace

import pytest
import torch

import rnnfast
from rnnfast import backends, ops, reference
from rnnfast.backends import triton as tk
from rnnfast.testing import bidirectional_gradchecks
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
# The default plan keeps W_hh in registers where it fits (float32 here, in chunks) and streams it otherwise
# (float64); "streamed" forces the streaming path; "step-multi" keeps the forward's 16-deep chunks resident and
# streams the backward's 10 chunks.
PLANS = {
    "persistent-1": ("persistent", 3, dict()),
    "persistent-1-streamed": ("persistent", 3, dict(resident=False)),
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


def test_tf32_only_under_the_switch_torch_nn_rnns_obey():
    # torch.nn's RNNs run TF32 under cuDNN's switch (on by default), not the matmul one. Saved and restored here:
    # monkeypatch cannot delattr on torch's backend modules (pytest 9), and the flags must not leak.
    cuda = torch.device("cuda")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = False
        assert tk._precision(torch.float32, cuda) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        assert tk._precision(torch.float32, cuda) == "tf32"
        assert tk._precision(torch.float64, cuda) == "ieee"
        assert tk._precision(torch.float32, torch.device("cpu")) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_only_plans_whose_programs_wait_for_each_other_launch_cooperatively():
    shared = tk.make_plan("lstm", torch.device("cuda"), 16, 64, 512, sm_count=132)
    alone = tk.make_plan("lstm", torch.device("cuda"), 16, 64, 512, sm_count=132, schedule="step")
    assert shared.forward.needs_sync(512) and shared.backward.needs_sync(512) and not alone.needs_sync(512)
    kw = dict(reverse=False, dirs=1, has_len=False, precision="ieee")
    for meta, want in ((tk.forward_meta("lstm", shared.forward, 512, fused=False, has_bias=True, **kw), True),
                       (tk.backward_meta("lstm", shared.backward, 512, **kw), True),
                       (tk.forward_meta("lstm", alone.forward, 512, fused=False, has_bias=True, **kw), False),
                       (tk.backward_meta("lstm", alone.backward, 512, **kw), False)):
        assert meta.get("launch_cooperative_grid", False) is want


# -- the packed operands: one dot gives every gate of a slice ------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_packed_forward_weights_give_every_gate_of_a_slice(cell):
    """``h @ pack[s]`` holds, at column ``j*NGP + slot``, the pre-activation of gate ``g`` (slot ``slots[g]``) of
    unit ``s*bh + j``, computed here straight from the unpacked weight; every other column is zero."""
    NG, NGP = reference.GATES[cell], tk.gate_slots(cell)
    g = torch.Generator().manual_seed(1)
    Hs, K, bh, k_pad = 37, 21, 8 if NGP == 4 else 16, 32
    for which in ("hh", "ih"):
        w = torch.randn(NG * Hs, K, generator=g, dtype=torch.float64)
        h = torch.randn(5, K, generator=g, dtype=torch.float64)
        packed = tk.pack_forward(cell, w, which, Hs, bh, k_pad)
        assert packed.shape == (math.ceil(Hs / bh), k_pad, bh * NGP)
        slots = tk._forward_slots(cell, which)
        h_pad = torch.nn.functional.pad(h, (0, k_pad - K))
        for s in range(packed.shape[0]):
            out = (h_pad @ packed[s]).view(5, bh, NGP)
            want = torch.zeros_like(out)
            for j in range(bh):
                u = s * bh + j
                if u < Hs:
                    for gate in range(NG):
                        want[:, j, slots[gate]] = h @ w[gate * Hs + u]
            assert_close(out, want, msg=f"{cell} {which} slice {s}")


def test_packed_gru_biases_keep_the_two_parts_of_n_apart():
    Hs, bh = 5, 4
    b_ih = torch.arange(3 * Hs, dtype=torch.float64)
    b_hh = 100 + torch.arange(3 * Hs, dtype=torch.float64)
    p = tk.pack_bias("gru", b_ih, b_hh, Hs, bh, torch.float64).view(2, bh, 4)
    u = 3  # unit 3: slice 0, column 3
    assert p[0, u].tolist() == [b_ih[u] + b_hh[u], b_ih[Hs + u] + b_hh[Hs + u], b_hh[2 * Hs + u], b_ih[2 * Hs + u]]
    assert torch.equal(p[1, 1:], torch.zeros(3, 4, dtype=torch.float64))  # units 5..7 do not exist


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_packed_backward_weights_are_column_slices_of_w_hh(cell):
    NG, Hs, bh, k_pad = reference.GATES[cell], 37, 16, 160
    g = torch.Generator().manual_seed(2)
    w = torch.randn(NG * Hs, Hs, generator=g, dtype=torch.float64)
    d = torch.randn(4, NG * Hs, generator=g, dtype=torch.float64)
    packed = tk.pack_backward(w, Hs, bh, k_pad)
    d_pad = torch.nn.functional.pad(d, (0, k_pad - NG * Hs))
    full = torch.cat([d_pad @ packed[s] for s in range(packed.shape[0])], 1)
    assert_close(full[:, :Hs], d @ w)
    assert torch.equal(full[:, Hs:], torch.zeros_like(full[:, Hs:]))


# -- plans: grids sized from the compiled kernel's occupancy --------------------------------------------------------

def test_occupancy_from_registers_shared_memory_and_threads():
    dev = tk.H200
    assert tk.occupancy(64, 0, 8, dev) == 4  # 64 x 32 x 8 registers a program: 4 in 64K; threads allow 8
    assert tk.occupancy(255, 0, 8, dev) == 1  # 255 rounds up to 256 a thread
    assert tk.occupancy(129, 0, 4, dev) == 3  # 136 a thread after rounding: 15 warps
    assert tk.occupancy(32, 100 * 1024, 4, dev) == 2  # shared memory: 2 x (100 + 1) KB of 228 KB
    assert tk.occupancy(32, 0, 4, dev) == 16  # threads: 2048 / 128
    assert tk.occupancy(32, 240 * 1024, 4, dev) == 0


def _fake_resources(regs, shared=0):
    calls = []

    def resources(kind, kplan):
        calls.append((kind, kplan))
        return regs, shared
    return resources, calls


def test_grid_fills_every_multiprocessor_within_what_can_be_resident():
    B, Hs = 16, 768  # anchor (a)
    res, calls = _fake_resources(64)  # 4 programs a multiprocessor
    plan = tk.make_plan("lstm", torch.device("cuda"), B, Hs, Hs, dtype=torch.bfloat16, target=tk.H200, resources=res)
    assert calls, "the plan must ask the compiled kernel for its resources"
    for kp in (plan.forward, plan.backward):
        assert kp.schedule == "persistent" and kp.needs_sync(Hs)
        assert math.prod(kp.grid(B, Hs)) <= 4 * tk.H200.sms, kp
    # The plan that fills every multiprocessor (192 programs of 4 units) fits too; the chosen one is predicted no
    # slower than it.
    from rnnfast.kernels import cost
    fill = tk.make_plan("lstm", torch.device("cuda"), B, Hs, Hs, dtype=torch.bfloat16, target=tk.H200, resources=res,
                        block_h=4).forward
    assert math.prod(fill.grid(B, Hs)) >= tk.H200.sms
    price = lambda kp: cost.kernel_step("forward", kp, "lstm", torch.bfloat16, B, Hs, Hs, tk.H200)["us"]  # noqa
    assert price(plan.forward) <= price(fill)
    # A plan whose kernel spills is never chosen, however it is priced.
    res, _ = _fake_resources(64)
    spilling = lambda kind, kp: (64, 0, 0 if kp.nk == 0 else 16)  # noqa: E731
    streamed = tk.make_plan("lstm", torch.device("cuda"), B, Hs, Hs, dtype=torch.bfloat16, target=tk.H200,
                            resources=spilling)
    assert not streamed.forward.w_resident and not streamed.backward.w_resident
    # One program a multiprocessor: the grid shrinks to fit.
    res, _ = _fake_resources(255)
    plan = tk.make_plan("lstm", torch.device("cuda"), B, Hs, Hs, dtype=torch.bfloat16, target=tk.H200, resources=res)
    assert math.prod(plan.forward.grid(B, Hs)) <= tk.H200.sms
    # Nothing can be co-resident: the per-step schedule, or a refusal when the persistent one is asked for.
    res, _ = _fake_resources(32, shared=240 * 1024)
    plan = tk.make_plan("lstm", torch.device("cuda"), B, Hs, Hs, dtype=torch.bfloat16, target=tk.H200, resources=res)
    assert plan.forward.schedule == "step" and plan.backward.schedule == "step"
    with pytest.raises(ValueError, match="resident"):
        tk.make_plan("lstm", torch.device("cuda"), B, Hs, Hs, dtype=torch.bfloat16, target=tk.H200, resources=res,
                     schedule="persistent")


def test_weights_stay_resident_only_within_the_register_budget():
    small = tk.make_plan("lstm", torch.device("cuda"), 16, 768, 768, dtype=torch.bfloat16, sm_count=132)
    for kp, K, n_cols in ((small.forward, 768, 4 * small.forward.block_h), (small.backward, 4 * 768,
                                                                            small.backward.block_h)):
        assert kp.w_resident and kp.nk <= tk.MAX_CHUNKS and kp.k_pad(K) >= K
        assert kp.k_pad(K) * n_cols * 2 <= tk.RESIDENT_BYTES
    big = tk.make_plan("gru", torch.device("cuda"), 256, 1024, 1024, dtype=torch.bfloat16, sm_count=132)
    assert not big.forward.w_resident  # 1024 x 64 x 2 bytes would not fit


def test_half_types_save_16_bit_state():
    a = _inputs("lstm", 3, torch.float16, None, seed=4)
    y, h_n, c_n, ws = tk.forward("lstm", a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                 None, False, fused=False)
    gates, hs, cs = tk.split_workspace("lstm", ws, 1, T, 3, H, torch.float16)
    assert gates.dtype == hs.dtype == cs.dtype == torch.float16
    assert ws.numel() < tk.workspace_bytes("lstm", 1, T, 3, H, torch.float32)
    assert torch.equal(hs[0, 1:], y[:-1].to(torch.float16))  # the exchange copy is h_t itself, rounded once


# -- both directions of a bidirectional layer in one launch --------------------------------------------------------

@pytest.mark.parametrize("mode", ["hoisted", "fused"])
@pytest.mark.parametrize("cell", CELLS)
def test_both_directions_in_one_launch_match_the_reference(cell, mode, monkeypatch, poison_torch_memory):
    B = 3
    g = torch.Generator().manual_seed(zlib.crc32(f"bi-{cell}-{mode}".encode()))
    dirs = [make_layer_inputs(cell, T, B, I, H, dtype=torch.float64, lengths=[7, 0, 4], generator=g, scale=0.25)
            for _ in range(2)]
    x, lengths = dirs[0]["x"], dirs[0]["lengths"]
    for a in dirs:
        a["x"], a["lengths"] = x, lengths
    stack = lambda k: torch.stack([a[k] for a in dirs]) if k in dirs[0] else None  # noqa: E731
    runs = []
    monkeypatch.setattr(tk.Launch, "run", lambda self, real=tk.Launch.run: runs.append(self.grid) or real(self))
    y, h_n, c_n, ws = tk.forward_directions(cell, x, stack("h0"), stack("c0"), [a["w_ih"] for a in dirs],
                                            [a["w_hh"] for a in dirs], [a["b_ih"] for a in dirs],
                                            [a["b_hh"] for a in dirs], lengths, False, fused=mode == "fused")
    assert runs == [(1, 1, 2)], "one launch, a program per direction"
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h_n.shape, generator=g, dtype=torch.float64)
    gc = torch.randn(h_n.shape, generator=g, dtype=torch.float64) if cell == "lstm" else None
    dx, dh0, dc0, weights = tk.backward_directions(cell, gy, gh, gc, x, [a["w_ih"] for a in dirs],
                                                   [a["w_hh"] for a in dirs], True, lengths, False, ws)
    assert runs[1:] == [(1, 1, 2)]
    dx_ref = torch.zeros_like(x)
    for d, a in enumerate(dirs):
        cols = slice(d * H, (d + 1) * H)
        (ry, rh, rc), rg = reference_layer(cell, a, d == 1, (gy[:, :, cols], gh[d], None if gc is None else gc[d]))
        assert_close(y[:, :, cols], ry, msg=f"y of direction {d}")
        assert_close(h_n[d], rh, msg=f"h_n of direction {d}")
        if cell == "lstm":
            assert_close(c_n[d], rc)
            assert_close(dc0[d], rg[2])
        assert_close(dh0[d], rg[1], msg=f"dh0 of direction {d}")
        for got, want in zip(weights[d], rg[3:]):
            assert_close(got, want, msg=f"weight gradients of direction {d}")
        dx_ref += rg[0]
    assert_close(dx, dx_ref)


# -- half-precision gradients against the float64 reference, with the baseline rule --------------------------------

@pytest.mark.parametrize("dtype", _half_dtypes(), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("cell", CELLS)
def test_half_precision_gradients_within_baseline(cell, dtype):
    B = 5
    a = _inputs(cell, B, dtype, None, seed=13)
    outs, grads, upstream = _run(cell, a, cell == "gru", "hoisted", tk.make_plan(cell, DEVICE, B, I, H, dtype=dtype))
    ref_outs, ref_grads = reference_layer(cell, a, cell == "gru", upstream)
    # The same-precision torch computation: torch.nn's module (cuDNN on a GPU) and autograd.
    m = torch_nn_layer(cell, a)
    leaves = {k: a[k].clone().requires_grad_() for k in ("x", "h0", "c0") if k in a}
    x = leaves["x"].flip(0) if cell == "gru" else leaves["x"]  # no lengths: reversing the sequence is exact
    hx = (leaves["h0"][None], leaves["c0"][None]) if cell == "lstm" else leaves["h0"][None]
    y, state = m(x, hx)
    y = y.flip(0) if cell == "gru" else y
    gy, gh, gc = upstream
    hn = state[0] if cell == "lstm" else state
    loss = (y.float() * gy.float()).sum() + (hn[0].float() * gh.float()).sum()
    if cell == "lstm":
        loss = loss + (state[1][0].float() * gc.float()).sum()
    loss.backward()
    base = {"x": leaves["x"].grad, "h0": leaves["h0"].grad, "w_ih": m.weight_ih_l0.grad, "w_hh": m.weight_hh_l0.grad,
            "b_ih": m.bias_ih_l0.grad, "b_hh": m.bias_hh_l0.grad}
    if cell == "lstm":
        base["c0"] = leaves["c0"].grad
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        if want is None:
            continue
        assert got.dtype == dtype
        assert_within_baseline(got, want, base[name], msg=f"{cell} {dtype} gradient of {name}")


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_bidirectional_modules_run_both_directions_of_a_layer_in_one_launch(cls, monkeypatch):
    grids = []
    monkeypatch.setattr(tk.Launch, "run", lambda self, real=tk.Launch.run: grids.append(self.grid) or real(self))
    torch.manual_seed(0)
    ours = getattr(rnnfast.nn, cls)(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64, device=DEVICE,
                                    backend="triton")
    theirs = getattr(torch.nn, cls)(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64, device=DEVICE)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=DEVICE)
    out, _ = ours(x)
    out.sum().backward()
    assert [g[2] for g in grids] == [2, 2, 2, 2], "per layer: one forward and one backward launch, both directions"
    assert_close(out, theirs(x)[0])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bidirectional_layer_gradcheck_and_gradgradcheck_float64(cell):
    assert bidirectional_gradchecks("triton", cell, DEVICE)


# -- the per-step cost model (a prediction; these are its properties, not its numbers) -----------------------------

def test_cost_model_charges_what_the_plan_moves_and_waits_for():
    from rnnfast.kernels import cost

    B, Hs = 16, 768
    plan = tk.make_plan("lstm", torch.device("cuda"), B, Hs, Hs, dtype=torch.bfloat16, sm_count=132)
    kp = plan.forward
    assert kp.w_resident and kp.needs_sync(Hs)
    resident = cost.kernel_step("forward", kp, "lstm", torch.bfloat16, B, Hs, Hs, tk.H200)
    streamed = cost.kernel_step("forward", replace(kp, nk=0, block_k=32), "lstm", torch.bfloat16, B, Hs, Hs,
                                tk.H200)
    assert streamed["load"] > resident["load"]  # the weight slice crosses from L2 every step
    assert resident["sync"] == cost.GRID_BARRIER_S * 1e6
    alone = cost.kernel_step("forward", replace(kp, block_h=1024), "lstm", torch.bfloat16, B, Hs, Hs, tk.H200)
    assert alone["sync"] == 0  # one program per batch tile waits for no other
    step = cost.kernel_step("forward", replace(kp, schedule="step"), "lstm", torch.bfloat16, B, Hs, Hs, tk.H200)
    assert step["sync"] == cost.STEP_LAUNCH_S * 1e6
    wide = cost.kernel_step("forward", kp, "lstm", torch.bfloat16, 4 * B, Hs, Hs, tk.H200)
    assert wide["us"] > resident["us"]  # four batch tiles: four times the programs reading h
    assert abs(sum(resident[k] for k in ("load", "mma", "epilogue", "sync")) - resident["us"]) < 1e-9
