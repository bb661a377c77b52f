"""rnnfast.nn against torch.nn on the CPU in float64: outputs, states, gradients, state_dict, errors."""

import itertools
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfast
from conftest import assert_close

F64 = torch.float64
KINDS = {
    "rnn_tanh": ("RNN", dict(nonlinearity="tanh")),
    "rnn_relu": ("RNN", dict(nonlinearity="relu")),
    "gru": ("GRU", {}),
    "lstm": ("LSTM", {}),
    "lstm_proj": ("LSTM", dict(proj_size=3)),
}


# Every test here runs twice: with auto (on the CPU: torch's own implementation, the call torch.nn makes) and with
# the reference (rnnfast's own time loop through the layer ops, what the kernel backends are checked against).
BACKENDS = ("auto", "reference")


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request, monkeypatch):
    monkeypatch.setattr(rnnfast.nn, "DEFAULT_BACKEND", request.param)
    return request.param


def pair(kind, I, H, seed=0, **kw):
    """(rnnfast module, torch.nn module), each built from the same seed: equal weights test equal init."""
    cls, extra = KINDS[kind]
    kw = {**extra, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ours = getattr(rnnfast.nn, cls)(I, H, dtype=F64, **kw)
        torch.manual_seed(seed)
        theirs = getattr(torch.nn, cls)(I, H, dtype=F64, **kw)
    return ours, theirs


def random_hx(m, B, unbatched=False):
    L = m.num_layers * (2 if m.bidirectional else 1)
    H_out = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
    shape = (L, H_out) if unbatched else (L, B, H_out)
    h = torch.randn(*shape, dtype=F64)
    if m.mode == "LSTM":
        return (h, torch.randn(*shape[:-1], m.hidden_size, dtype=F64))
    return h


def leaves(hx):
    return list(hx) if isinstance(hx, tuple) else [hx]


def run_and_grad(m, x, hx):
    """Forward, then backward of a fixed random projection of every output; returns outputs and gradients."""
    x = x.detach().clone().requires_grad_()
    hx = tuple(h.detach().clone().requires_grad_() for h in hx) if isinstance(hx, tuple) else (
        hx.detach().clone().requires_grad_() if hx is not None else None)
    out, hn = m(x, hx) if hx is not None else m(x)
    outs = [out.data if hasattr(out, "batch_sizes") else out] + leaves(hn)
    gen = torch.Generator().manual_seed(123)
    loss = sum((o * torch.randn(o.shape, dtype=F64, generator=gen)).sum() for o in outs)
    m.zero_grad()
    loss.backward()
    grads = {"input": x.grad}
    if hx is not None:
        for i, h in enumerate(leaves(hx)):
            grads[f"hx{i}"] = h.grad
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return outs, grads


def assert_same(ours, theirs, x, hx):
    o1, g1 = run_and_grad(ours, x, hx)
    o2, g2 = run_and_grad(theirs, x, hx)
    for i, (a, b) in enumerate(zip(o1, o2)):
        assert a.shape == b.shape, f"output {i}: {a.shape} vs {b.shape}"
        assert_close(a, b, msg=f"output {i}")
    assert g1.keys() == g2.keys()
    for k in g1:
        assert_close(g1[k], g2[k], msg=f"gradient of {k}")


GRID = list(itertools.product(KINDS, [1, 2, 3], [False, True], [False, True], [True, False]))


@pytest.mark.parametrize("kind,layers,bidirectional,batch_first,bias", GRID,
                         ids=[f"{k}-L{L}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}-{'b' if b else 'nob'}"
                              for k, L, bi, bf, b in GRID])
def test_matches_torch_nn(kind, layers, bidirectional, batch_first, bias):
    ours, theirs = pair(kind, 4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                        bias=bias)
    T, B = 5, 3
    x = torch.randn(B, T, 4, dtype=F64) if batch_first else torch.randn(T, B, 4, dtype=F64)
    assert_same(ours, theirs, x, random_hx(ours, B))
    assert_same(ours, theirs, x, None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 4), (1, 4, 3, 37), (6, 1, 2, 1), (9, 2, 7, 37)],
                         ids=lambda v: str(v))
def test_odd_sizes(kind, T, B, I, H):
    if kind == "lstm_proj" and H < 4:
        pytest.skip("proj_size=3 needs hidden_size > 3")
    ours, theirs = pair(kind, I, H)
    assert_same(ours, theirs, torch.randn(T, B, I, dtype=F64), random_hx(ours, B))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(kind, batch_first):
    ours, theirs = pair(kind, 3, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(6, 3, dtype=F64)
    assert_same(ours, theirs, x, random_hx(ours, 1, unbatched=True))
    assert_same(ours, theirs, x, None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
def test_packed_sequences(kind, enforce_sorted):
    ours, theirs = pair(kind, 3, 5, num_layers=2, bidirectional=True)
    lengths = [7, 7, 4, 2, 1] if enforce_sorted else [2, 7, 1, 4, 7]
    x = torch.randn(7, 5, 3, dtype=F64)
    hx = random_hx(ours, 5)
    results = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        hh = tuple(h.clone().requires_grad_() for h in leaves(hx))
        packed = pack_padded_sequence(xx, lengths, enforce_sorted=enforce_sorted)
        out, hn = m(packed, hh if m.mode == "LSTM" else hh[0])
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        padded, out_lengths = pad_packed_sequence(out)
        assert out_lengths.tolist() == lengths
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=F64).view_as(padded)).sum()
        loss = loss + sum((h * h).sum() for h in leaves(hn))
        m.zero_grad()
        loss.backward()
        results.append(([padded, *leaves(hn)], [xx.grad, *[h.grad for h in hh]],
                        {n: p.grad for n, p in m.named_parameters()}))
    (o1, gi1, gp1), (o2, gi2, gp2) = results
    for a, b in zip(o1 + gi1, o2 + gi2):
        assert_close(a, b)
    for k in gp1:
        assert_close(gp1[k], gp2[k], msg=k)


@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "lstm", "lstm_proj"])
def test_dropout_matches_torch_nn_mask(kind):
    """Dropout between layers only, in training only, drawing the same mask from the same RNG state."""
    ours, theirs = pair(kind, 4, 6, num_layers=3, dropout=0.4, bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=F64)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        torch.manual_seed(7)
        o1, g1 = run_and_grad(ours, x, None)
        torch.manual_seed(7)
        o2, g2 = run_and_grad(theirs, x, None)
        for a, b in zip(o1, o2):
            assert_close(a, b, msg=mode)
        for k in g1:
            assert_close(g1[k], g2[k], msg=f"{mode}: {k}")
    ours.train()
    torch.manual_seed(1)
    a, _ = ours(x)
    torch.manual_seed(2)
    b, _ = ours(x)
    assert not torch.allclose(a, b), "training dropout must depend on the RNG"
    ours.eval()
    assert torch.equal(ours(x)[0], ours(x)[0])


def test_dropout_on_last_layer_is_not_applied():
    ours, theirs = pair("lstm", 4, 6, num_layers=1, dropout=0.9)
    ours.train()
    x = torch.randn(5, 3, 4, dtype=F64)
    assert torch.equal(ours(x)[0], ours(x)[0])


@pytest.mark.parametrize("kind", ["rnn_relu", "gru", "lstm"])
def test_cells_match_torch_nn(kind):
    cls = {"rnn_relu": "RNNCell", "gru": "GRUCell", "lstm": "LSTMCell"}[kind]
    kw = dict(nonlinearity="relu") if kind == "rnn_relu" else {}
    for bias in (True, False):
        torch.manual_seed(0)
        ours = getattr(rnnfast.nn, cls)(4, 37, bias=bias, dtype=F64, **kw)
        torch.manual_seed(0)
        theirs = getattr(torch.nn, cls)(4, 37, bias=bias, dtype=F64, **kw)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for shape in [(3, 4), (4,), (1, 4)]:
            x = torch.randn(*shape, dtype=F64)
            hshape = (shape[0], 37) if len(shape) == 2 else (37,)
            h = torch.randn(*hshape, dtype=F64)
            hx = (h, torch.randn(*hshape, dtype=F64)) if kind == "lstm" else h
            for args in [(x,), (x, hx)]:
                res = []
                for m in (ours, theirs):
                    xx = args[0].clone().requires_grad_()
                    out = m(xx, *args[1:])
                    outs = leaves(out)
                    sum((o * torch.arange(o.numel(), dtype=F64).view_as(o)).sum() for o in outs).backward()
                    res.append((outs, xx.grad, [p.grad.clone() for p in m.parameters()]))
                    m.zero_grad()
                for a, b in zip(res[0][0] + [res[0][1]] + res[0][2], res[1][0] + [res[1][1]] + res[1][2]):
                    assert a.shape == b.shape
                    assert_close(a, b)


# -- state_dict, init, convert ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_parameters_and_state_dict_round_trip(kind, backend):
    ours, theirs = pair(kind, 3, 6, num_layers=2, bidirectional=True, bias=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    for (n, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), f"same seed must give the same init ({n})"
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert repr(ours) == (repr(theirs) if backend == "auto" else repr(theirs)[:-1] + f", backend={backend!r})")
    # Both directions, with weights that differ from either module's own.
    other_ours, other_theirs = pair(kind, 3, 6, seed=5, num_layers=2, bidirectional=True)
    ours.load_state_dict(other_theirs.state_dict())
    theirs.load_state_dict(other_ours.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(4, 2, 3, dtype=F64)
    assert_close(ours(x)[0], theirs(x)[0])


def test_convert_keeps_parameters_and_outputs():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.rnn = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, proj_size=2)
            self.block = torch.nn.Sequential(torch.nn.GRU(2, 3, bidirectional=True, batch_first=True))
            self.cell = torch.nn.RNNCell(6, 5, nonlinearity="relu")
            self.head = torch.nn.Linear(6, 10)

        def forward(self, tokens):
            y, _ = self.rnn(self.emb(tokens))
            y, _ = self.block[0](y)
            h = self.cell(y[:, -1])
            return self.head(torch.cat([y[:, -1], h[:, :0]], 1)), h

    torch.manual_seed(0)
    model = Model().double().eval()
    tokens = torch.randint(0, 10, (3, 7))
    expected = model(tokens)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert rnnfast.convert(model) is model
    assert type(model.rnn) is rnnfast.nn.LSTM and type(model.block[0]) is rnnfast.nn.GRU
    assert type(model.cell) is rnnfast.nn.RNNCell and model.cell.nonlinearity == "relu"
    assert model.rnn.proj_size == 2 and model.rnn.batch_first and not model.training
    for n, p in model.named_parameters():
        assert p is params[n], f"{n} must be the same Parameter object"
    got = model(tokens)
    for a, b in zip(got, expected):
        assert_close(a, b)
    got[0].sum().backward()
    opt.step()  # the optimizer built before conversion updates the converted model
    assert not torch.equal(model.rnn.weight_ih_l0, expected[0].new_zeros(1)) and model.rnn.weight_ih_l0.grad is not None
    lone = torch.nn.GRUCell(3, 4)
    assert type(rnnfast.convert(lone)) is rnnfast.nn.GRUCell


# -- errors: the same exception type (and message) as torch.nn -----------------------------------------------------

def _err(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e)
    return None, None


CTOR_CASES = [
    ("LSTM", (4, 0), {}), ("LSTM", (0, 4), {}), ("LSTM", (4, 5), dict(num_layers=0)),
    ("LSTM", (4, 5), dict(dropout=1.5)), ("LSTM", (4, 5), dict(dropout=True)), ("LSTM", (4, 5), dict(bias=1)),
    ("LSTM", (4, 5), dict(batch_first="yes")), ("LSTM", (4.0, 5), {}), ("LSTM", (4, 5), dict(proj_size=5)),
    ("LSTM", (4, 5), dict(proj_size=-1)), ("GRU", (4, 5), dict(proj_size=2)), ("RNN", (4, 5), dict(proj_size=2)),
    ("RNN", (4, 5), dict(nonlinearity="sigmoid")),
]


@pytest.mark.parametrize("cls,args,kw", CTOR_CASES, ids=[f"{c}-{a}-{k}" for c, a, k in CTOR_CASES])
def test_constructor_errors_match_torch_nn(cls, args, kw):
    t1, m1 = _err(lambda: getattr(rnnfast.nn, cls)(*args, **kw))
    t2, m2 = _err(lambda: getattr(torch.nn, cls)(*args, **kw))
    assert t2 is not None and t1 is t2 and m1 == m2


def _forward_cases():
    x = torch.randn(3, 2, 4)
    return [
        ("LSTM", x.unsqueeze(0), None), ("GRU", x[0, 0], None), ("RNN", torch.randn(3, 2, 6), None),
        ("LSTM", x.double(), None), ("GRU", x.long(), None), ("LSTM", x, (torch.zeros(1, 3, 5), torch.zeros(1, 2, 5))),
        ("LSTM", x, (torch.zeros(1, 2, 5), torch.zeros(1, 2, 4))), ("GRU", x, torch.zeros(2, 2, 5)),
        ("GRU", x, torch.zeros(2, 5)), ("LSTM", x[:, 0], (torch.zeros(1, 1, 5), torch.zeros(1, 1, 5))),
        ("RNN", x[:, 0], torch.zeros(1, 1, 5)), ("RNN", torch.randn(0, 2, 4), None),
    ]


@pytest.mark.parametrize("i", range(len(_forward_cases())))
def test_forward_errors_match_torch_nn(i):
    cls, x, hx = _forward_cases()[i]
    ours, theirs = getattr(rnnfast.nn, cls)(4, 5), getattr(torch.nn, cls)(4, 5)
    t1, m1 = _err(lambda: ours(x, hx))
    t2, m2 = _err(lambda: theirs(x, hx))
    assert t2 is not None, "the case must be an error for torch.nn too"
    assert t1 is t2, f"{t1.__name__}: {m1} vs {t2.__name__}: {m2}"
    assert m1 == m2 or t1 is RuntimeError, (m1, m2)  # torch's C++ messages differ; the type is the contract


def test_hidden_dtype_mismatch_is_a_clear_error():
    m = rnnfast.nn.GRU(4, 5)
    with pytest.raises(RuntimeError, match=r"hx dtype \(torch.float64\) does not match input dtype"):
        m(torch.randn(3, 2, 4), torch.zeros(1, 2, 5, dtype=F64))


def test_device_mismatch_is_a_clear_error():
    m = rnnfast.nn.LSTM(4, 5)
    with pytest.raises(RuntimeError, match="not at the same device"):
        m(torch.randn(3, 2, 4, device="meta"))


CELL_CASES = [
    ("LSTMCell", torch.randn(2, 3), None), ("LSTMCell", torch.randn(2, 4), (torch.zeros(3, 5), torch.zeros(3, 5))),
    ("LSTMCell", torch.randn(2, 4), (torch.zeros(2, 6), torch.zeros(2, 5))),
    ("LSTMCell", torch.randn(2, 4), (torch.zeros(2, 5), torch.zeros(2, 6))), ("GRUCell", torch.randn(2, 2, 4), None),
    ("GRUCell", torch.randn(2, 4), torch.zeros(1, 2, 5)), ("RNNCell", torch.randn(2, 4).double(), None),
    ("RNNCell", torch.randn(2, 4), torch.zeros(3, 5)),
]


@pytest.mark.parametrize("i", range(len(CELL_CASES)))
def test_cell_errors_match_torch_nn(i):
    cls, x, hx = CELL_CASES[i]
    ours, theirs = getattr(rnnfast.nn, cls)(4, 5), getattr(torch.nn, cls)(4, 5)
    t1, m1 = _err(lambda: ours(x, hx))
    t2, m2 = _err(lambda: theirs(x, hx))
    assert t2 is not None and t1 is t2, f"{t1}: {m1} vs {t2}: {m2}"


def test_empty_batch_like_torch_nn():
    ours, theirs = pair("lstm", 4, 5)
    x = torch.randn(3, 0, 4, dtype=F64)
    o1, (h1, c1) = ours(x)
    o2, (h2, c2) = theirs(x)
    assert o1.shape == o2.shape and h1.shape == h2.shape and c1.shape == c2.shape


@pytest.mark.parametrize("cls", ["LSTM", "GRUCell"])
def test_autocast_like_torch_nn_or_in_the_autocast_dtype(cls, backend):
    """Under autocast, torch's implementation does what torch.nn does (the same call, the same autocast rules);
    rnnfast's own layers run in the autocast dtype (as torch.nn's cuDNN path does). Either way gradients reach the
    float32 parameters."""
    torch.manual_seed(0)
    m = getattr(rnnfast.nn, cls)(4, 6)
    x = torch.randn(5, 3, 4) if cls == "LSTM" else torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    out = out[0] if cls == "LSTM" else out
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
    if backend == "auto":
        theirs = getattr(torch.nn, cls)(4, 6)
        theirs.load_state_dict(m.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = theirs(x)
    else:
        assert out.dtype == torch.bfloat16
        low = getattr(rnnfast.nn, cls)(4, 6, dtype=torch.bfloat16)
        low.load_state_dict(m.state_dict())
        expected = low(x.bfloat16())
    expected = expected[0] if cls == "LSTM" else expected
    assert out.dtype == expected.dtype and torch.equal(out, expected)
