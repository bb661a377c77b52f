"""The reference against torch.nn (second oracle) and its explicit backward against autograd."""

import pytest
import torch

from rnnfast import reference
from conftest import CELLS, assert_close, make_layer_inputs

TORCH_MODE = {"rnn_tanh": ("RNN", {"nonlinearity": "tanh"}), "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
              "gru": ("GRU", {}), "lstm": ("LSTM", {})}


def torch_layer(cell, args, reverse=False):
    """torch.nn running the same one-layer weights (bidirectional when reverse, taking the reverse half)."""
    kind, kw = TORCH_MODE[cell]
    I, H = args["x"].shape[2], args["w_hh"].shape[0] // reference.GATES[cell]
    proj = args["w_hr"].shape[0] if "w_hr" in args else 0
    if proj:
        kw = dict(kw, proj_size=proj)
    bias = "b_ih" in args
    m = getattr(torch.nn, kind)(I, H, bias=bias, bidirectional=reverse, dtype=torch.float64, **kw)
    sfx = "_reverse" if reverse else ""
    with torch.no_grad():
        for name, key in [("weight_ih", "w_ih"), ("weight_hh", "w_hh"), ("bias_ih", "b_ih"), ("bias_hh", "b_hh"),
                          ("weight_hr", "w_hr")]:
            if key in args:
                getattr(m, f"{name}_l0{sfx}").copy_(args[key])
    return m


def ids(cell, T, B, I, H, proj=0):
    return f"{cell}-T{T}-B{B}-I{I}-H{H}" + (f"-P{proj}" if proj else "")


CASES = [(c, T, B, I, H, 0) for c in CELLS for (T, B, I, H) in [(1, 1, 1, 1), (7, 3, 5, 37), (17, 2, 4, 6)]]
CASES += [("lstm", 9, 3, 4, 7, 3), ("lstm", 1, 1, 2, 2, 1)]


@pytest.mark.parametrize("cell,T,B,I,H,proj", CASES, ids=[ids(*c) for c in CASES])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_forward_matches_torch_nn(cell, T, B, I, H, proj, reverse):
    args = make_layer_inputs(cell, T, B, I, H, proj=proj)
    m = torch_layer(cell, args, reverse)
    P = proj or H
    hx = torch.zeros(2 if reverse else 1, B, P, dtype=torch.float64)
    d = 1 if reverse else 0
    hx[d] = args["h0"]
    if cell == "lstm":
        cx = torch.zeros(hx.shape[0], B, H, dtype=torch.float64)
        cx[d] = args["c0"]
        out, (h_n, c_n) = m(args["x"], (hx, cx))
    else:
        out, h_n = m(args["x"], hx)
    y, h, c = reference.layer_forward(cell, **{"c0": None, **args}, reverse=reverse)
    assert_close(y, out[..., d * P:(d + 1) * P])
    assert_close(h, h_n[d])
    if cell == "lstm":
        assert_close(c, c_n[d])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_lengths_match_packed_torch_nn(cell, reverse):
    """Padded steps: zero output, state unchanged; reversal is within each sequence's own length."""
    T, B, I, H = 6, 4, 3, 5
    lengths = [6, 4, 4, 1]
    args = make_layer_inputs(cell, T, B, I, H, lengths=lengths)
    m = torch_layer(cell, args, reverse)
    d = 1 if reverse else 0
    hx = torch.zeros(2 if reverse else 1, B, H, dtype=torch.float64)
    hx[d] = args["h0"]
    packed = torch.nn.utils.rnn.pack_padded_sequence(args["x"], lengths)
    if cell == "lstm":
        cx = torch.zeros_like(hx)
        cx[d] = args["c0"]
        out, (h_n, c_n) = m(packed, (hx, cx))
    else:
        out, h_n = m(packed, hx)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    y, h, c = reference.layer_forward(cell, **{"c0": None, **args}, reverse=reverse)
    assert_close(y, out[..., d * H:(d + 1) * H])
    assert_close(h, h_n[d])
    if cell == "lstm":
        assert_close(c, c_n[d])
    for b, n in enumerate(lengths):
        assert torch.all(y[n:, b] == 0), "padded steps must be zero"


def test_zero_length_keeps_initial_state():
    args = make_layer_inputs("lstm", 3, 2, 3, 4, lengths=[0, 3])
    y, h, c = reference.layer_forward("lstm", **args)
    assert torch.equal(h[0], args["h0"][0]) and torch.equal(c[0], args["c0"][0])
    assert torch.all(y[:, 0] == 0)


@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [("lstm", 3)])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [5, 2, 0]], ids=["full", "lengths"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_explicit_backward_matches_autograd(cell, proj, reverse, lengths, bias):
    args = make_layer_inputs(cell, 5, 3, 4, 6, proj=proj, bias=bias, lengths=lengths, requires_grad=True)
    y, h, c = reference.layer_forward(cell, **{"c0": None, **args}, reverse=reverse)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    gc = torch.randn_like(c) if c is not None else None
    names = [k for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr") if k in args]
    outs = [t for t in (y, h, c) if t is not None]
    expected = torch.autograd.grad(outs, [args[k] for k in names], [g for g in (gy, gh, gc) if g is not None])
    got = reference.layer_backward(cell, gy, gh, gc, args["x"], args["h0"], args.get("c0"), args["w_ih"],
                                   args["w_hh"], args.get("b_ih"), args.get("b_hh"), args.get("w_hr"),
                                   args.get("lengths"), reverse)
    got = dict(zip(("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"), got))
    for k, e in zip(names, expected):
        assert_close(got[k], e, msg=f"gradient of {k}")
    for k in ("c0", "b_ih", "b_hh", "w_hr"):
        if k not in args:
            assert got[k] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32(dtype):
    """Half inputs run in float32 and round once at the end: closer to float64 than a pure half computation."""
    args64 = make_layer_inputs("lstm", 12, 3, 8, 16)
    args = {k: v.to(dtype) for k, v in args64.items()}
    y, h, c = reference.layer_forward("lstm", **args)
    assert y.dtype == dtype and h.dtype == dtype and c.dtype == dtype
    y64, _, _ = reference.layer_forward("lstm", **{k: v.double() for k, v in args.items()})
    # One rounding of the result: within half an ulp-ish of the dtype.
    eps = torch.finfo(dtype).eps
    assert (y.double() - y64).abs().max().item() <= 2 * eps * y64.abs().max().item() + 1e-6


def test_round_tf32_matches_the_format():
    """round_tf32 against tf32_oracle (from the exponent, not the bits): random values over the whole range, exact
    ties of both signs, a round into the next binade and past the largest float, subnormals, zeros, inf, NaN."""
    from rnnfast.testing import tf32_oracle

    g = torch.Generator().manual_seed(11)
    v = torch.randn(5000, generator=g) * torch.pow(10.0, torch.randint(-30, 30, (5000,), generator=g).float())
    one = torch.tensor(1.0).view(torch.int32).item()
    edges = torch.tensor([one | 0x1000, one | 0x3000, one | 0x0FFF, 0x3FFFF000, 0x7F7FFFFF, 0x1000, 0x3000],
                         dtype=torch.int32).view(torch.float32)
    v = torch.cat([v, edges, -edges, torch.tensor([0.0, -0.0, float("inf"), float("-inf")])])
    got = reference.round_tf32(v)
    assert torch.equal(got.view(torch.int32), tf32_oracle(v).view(torch.int32))
    assert got[5000 + 4] == float("inf")
    assert reference.round_tf32(torch.tensor([float("nan")])).isnan().all()
    d = torch.randn(3, dtype=torch.float64)
    assert reference.round_tf32(d) is d  # only float32 has a TF32


@pytest.mark.parametrize("cell", CELLS)
def test_tf32_rounds_only_the_recurrent_products(cell):
    """tf32=True over one step equals the float32 reference run on W_hh and h0 rounded to TF32 (the input product
    stays float32); GRU, whose update reads h0 again, gets an h0 that TF32 holds exactly. It differs from the
    float32 reference."""
    T, B, I, H = 1, 3, 4, 5
    g = torch.Generator().manual_seed(2)
    a = make_layer_inputs(cell, T, B, I, H, dtype=torch.float32, generator=g)
    if cell == "gru":
        a["h0"] = reference.round_tf32(a["h0"])
    args = [a["x"], a["h0"], a.get("c0"), a["w_ih"], a["w_hh"], a.get("b_ih"), a.get("b_hh")]
    y32 = reference.layer_forward(cell, *args, tf32=True)[0]
    rounded = list(args)
    rounded[1], rounded[4] = reference.round_tf32(args[1]), reference.round_tf32(args[4])
    torch.testing.assert_close(y32, reference.layer_forward(cell, *rounded)[0], rtol=1e-6, atol=1e-7)
    assert not torch.equal(y32, reference.layer_forward(cell, *args)[0])
