"""What a torch.nn user meets at the edges: the torch backend's single call, second-order gradients, batch size 0,
torch's checking order and text, and a cheap import."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast
from rnnfast import ops
from rnnfast.backends import native
from conftest import CELLS, assert_close, make_layer_inputs

F64 = torch.float64
MODULES = {"rnn_tanh": ("RNN", {}), "rnn_relu": ("RNN", dict(nonlinearity="relu")), "gru": ("GRU", {}),
           "lstm": ("LSTM", {}), "lstm_proj": ("LSTM", dict(proj_size=2))}
CELL_MODULES = {"rnn_tanh": ("RNNCell", {}), "rnn_relu": ("RNNCell", dict(nonlinearity="relu")),
                "gru": ("GRUCell", {}), "lstm": ("LSTMCell", {})}


def _pair(cls, *args, seed=0, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ours = getattr(rnnfast.nn, cls)(*args, **kw)
        theirs = getattr(torch.nn, cls)(*args, **{k: v for k, v in kw.items() if k != "backend"})
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


# -- the torch backend ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_torch_backend_makes_torch_nns_single_call(kind, packed, monkeypatch):
    """One call for all layers and directions, dropout included, with results bit-identical to torch.nn's."""
    cls, kw = MODULES[kind]
    ours, theirs = _pair(cls, 3, 5, num_layers=2, bidirectional=True, dropout=0.3, dtype=F64, backend="torch", **kw)
    mode = ours.mode
    calls = []
    real = native._MODULE_CALL[mode]
    monkeypatch.setitem(native._MODULE_CALL, mode, lambda *a: calls.append(a) or real(*a))
    x = torch.randn(6, 4, 3, dtype=F64)
    inp = pack_padded_sequence(x, [6, 2, 5, 1], enforce_sorted=False) if packed else x
    results = []
    for m in (ours, theirs):
        torch.manual_seed(3)  # the same dropout masks
        out, h = m(inp)
        results.append([out.data if packed else out, *(h if isinstance(h, tuple) else (h,))])
    assert len(calls) == 1
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [5, 0, 3, 1]], ids=["full", "lengths"])
def test_torch_backend_layer_matches_reference(cell, reverse, lengths):
    """The layer op on torch's implementation (a packed sequence for lengths, each sequence reversed within its
    length, zero-length sequences keeping their state): outputs and every gradient against the reference."""
    proj = 2 if cell == "lstm" else 0
    a = make_layer_inputs(cell, 5, 4, 3, 4, proj=proj, lengths=lengths, requires_grad=True)
    fn = ops.LAYER_FUNCTIONS[cell]
    gen = torch.Generator().manual_seed(1)
    results = []
    for backend in ("torch", "reference"):
        for t in a.values():
            t.grad = None
        outs = fn(**a, reverse=reverse, backend=backend)
        sum((o * torch.randn(o.shape, dtype=F64, generator=gen)).sum() for o in outs).backward()
        gen.manual_seed(1)
        results.append((outs, {k: t.grad.clone() for k, t in a.items() if t.requires_grad}))
    (o1, g1), (o2, g2) = results
    for x, y in zip(o1, o2):
        assert_close(x, y)
    for k in g1:
        assert_close(g1[k], g2[k], msg=k)


def test_torch_backend_under_compile_is_one_node_per_layer_and_matches_eager():
    torch._dynamo.reset()
    ours, theirs = _pair("GRU", 3, 5, num_layers=2, dtype=F64, backend="torch")
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    counts = []

    def count(gm, example):
        counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "rnnfast" in str(n.target)))
        return gm

    out, h = torch.compile(ours, fullgraph=True, backend=count)(x)
    ref, href = theirs(x)
    assert counts == [2]
    assert_close(out, ref)
    g1 = torch.autograd.grad(out.sum() + h.sum(), x)[0]
    g2 = torch.autograd.grad(ref.sum() + href.sum(), x)[0]
    assert_close(g1, g2)


# -- second-order gradients -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["reference", "torch", "triton:hoisted"])
def test_gradgradcheck_of_the_layer_ops(cell, backend):
    if rnnfast.backends.why_unavailable(backend, ops.layer_spec(cell, torch.zeros(1, 1, 1, dtype=F64),
                                                                torch.zeros(4, 1), None, None, None)):
        pytest.skip(f"{backend} cannot run float64 CPU tensors here")
    a = make_layer_inputs(cell, 3, 2, 2, 2, lengths=[3, 1], requires_grad=True)
    keys = [k for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh") if k in a]

    def f(*tensors):
        return ops.LAYER_FUNCTIONS[cell](**dict(zip(keys, tensors)), lengths=a["lengths"], reverse=True,
                                         backend=backend)

    assert torch.autograd.gradgradcheck(f, [a[k] for k in keys], fast_mode=True)


@pytest.mark.parametrize("kind", list(MODULES) + [f"{c}_cell" for c in CELL_MODULES])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradgradcheck_of_every_module(kind, backend):
    if kind.endswith("_cell"):
        cls, kw = CELL_MODULES[kind[:-5]]
        m = getattr(rnnfast.nn, cls)(2, 3, dtype=F64, backend=backend, **kw)
        x = torch.randn(2, 2, dtype=F64, requires_grad=True)
    else:
        cls, kw = MODULES[kind]
        m = getattr(rnnfast.nn, cls)(2, 3, num_layers=2, bidirectional=True, dtype=F64, backend=backend, **kw)
        x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    params = list(m.parameters())

    def f(x, *ps):
        out = torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradgradcheck(f, [x, *[p.detach().requires_grad_() for p in params]], fast_mode=True)


def test_create_graph_then_backward_matches_torch_nn():
    """A gradient penalty: autograd.grad(create_graph=True) and then backward() through it."""
    results = []
    for backend in ("reference", None):
        ours, theirs = _pair("LSTM", 3, 4, dtype=F64, backend="reference")
        m = ours if backend else theirs
        x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
        torch.manual_seed(0)
        x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
        out, _ = m(x)
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        results.append([x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert_close(a, b)


# -- batch size 0 -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_batch_forward_and_backward_like_torch_nn(kind, backend):
    cls, kw = MODULES[kind]
    ours, theirs = _pair(cls, 3, 4, num_layers=2, bidirectional=True, dtype=F64, backend=backend, **kw)
    res = []
    for m in (ours, theirs):
        x = torch.randn(5, 0, 3, dtype=F64, requires_grad=True)
        out, h = m(x)
        hs = h if isinstance(h, tuple) else (h,)
        (out.sum() + sum(t.sum() for t in hs)).backward()
        res.append(([out, *hs], x.grad, [p.grad for p in m.parameters()]))
    (o1, gx1, gp1), (o2, gx2, gp2) = res
    assert [t.shape for t in o1] == [t.shape for t in o2] and gx1.shape == gx2.shape == (5, 0, 3)
    for a, b in zip(gp1, gp2):
        assert torch.equal(a, b)  # zeros: no sequence contributes


@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch_layer_backward_of_the_reference(cell):
    a = make_layer_inputs(cell, 4, 0, 3, 5, requires_grad=True)
    outs = ops.LAYER_FUNCTIONS[cell](**a, backend="reference")
    sum(o.sum() for o in outs).backward()
    assert a["x"].grad.shape == (4, 0, 3) and torch.equal(a["w_hh"].grad, torch.zeros_like(a["w_hh"]))


# -- torch's checking order and text ----------------------------------------------------------------------------------

def _err(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - type and text are what is compared
        return type(e), str(e)
    return None, None


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", ["seq_len_0", "seq_len_0_unbatched", "hidden_on_meta"])
def test_module_errors_have_torchs_text(backend, case):
    ours, theirs = _pair("GRU", 3, 4, backend=backend)
    x, hx = {"seq_len_0": (torch.randn(0, 2, 3), None), "seq_len_0_unbatched": (torch.randn(0, 3), None),
             "hidden_on_meta": (torch.randn(5, 2, 3), torch.zeros(1, 2, 4, device="meta"))}[case]
    expected = _err(lambda: theirs(x, hx))
    assert expected[0] is not None
    assert _err(lambda: ours(x, hx)) == expected


def test_layer_op_sequence_length_0_has_torchs_text():
    a = make_layer_inputs("lstm", 0, 2, 3, 4)
    with pytest.raises(RuntimeError, match="^Expected sequence length to be larger than 0 in RNN$"):
        ops.lstm(**a, backend="reference")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cls", ["RNNCell", "GRUCell", "LSTMCell"])
def test_cells_check_hidden_size_before_dtype_as_torch(cls, backend):
    ours, theirs = _pair(cls, 3, 20, backend=backend)
    x = torch.randn(2, 3, dtype=F64)  # wrong dtype, and a wrong hidden size below: torch reports the size
    h = torch.zeros(2, 21)
    hx = (h, h) if cls == "LSTMCell" else h
    expected = _err(lambda: theirs(x, hx))
    assert expected == (RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20")
    assert _err(lambda: ours(x, hx)) == expected


# -- import ---------------------------------------------------------------------------------------------------------

def test_import_loads_no_dynamo_and_compiles_nothing():
    code = ("import sys, torch; import rnnfast; m = rnnfast.nn.LSTM(3, 4); m(torch.randn(2, 1, 3)); "
            "print('torch._dynamo' in sys.modules, rnnfast.backends.cuda._loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None"]
