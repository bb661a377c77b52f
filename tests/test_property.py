"""Random configurations against torch.nn (hypothesis): outputs, final states and input gradients."""

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnfast
from conftest import assert_close


@st.composite
def configs(draw):
    cls = draw(st.sampled_from(["RNN", "GRU", "LSTM"]))
    H = draw(st.integers(1, 9))
    kw = dict(num_layers=draw(st.integers(1, 3)), bias=draw(st.booleans()), batch_first=draw(st.booleans()),
              bidirectional=draw(st.booleans()))
    if cls == "RNN":
        kw["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if cls == "LSTM" and H > 1 and draw(st.booleans()):
        kw["proj_size"] = draw(st.integers(1, H - 1))
    return dict(cls=cls, I=draw(st.integers(1, 6)), H=H, T=draw(st.integers(1, 6)), B=draw(st.integers(1, 4)),
                packed=draw(st.booleans()), seed=draw(st.integers(0, 2**16)), kw=kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_configuration_matches_torch_nn(c):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(c["seed"])
        ours = getattr(rnnfast.nn, c["cls"])(c["I"], c["H"], dtype=torch.float64, **c["kw"])
        torch.manual_seed(c["seed"])
        theirs = getattr(torch.nn, c["cls"])(c["I"], c["H"], dtype=torch.float64, **c["kw"])
    T, B = c["T"], c["B"]
    x = torch.randn(T, B, c["I"], dtype=torch.float64)
    gen = torch.Generator().manual_seed(c["seed"])
    lengths = torch.randint(1, T + 1, (B,), generator=gen).tolist()
    results = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        if c["packed"]:
            inp = torch.nn.utils.rnn.pack_padded_sequence(xx, lengths, enforce_sorted=False)
        else:
            inp = xx.transpose(0, 1) if c["kw"]["batch_first"] else xx
        out, hn = m(inp)
        out = out.data if c["packed"] else out
        hs = list(hn) if isinstance(hn, tuple) else [hn]
        (out.pow(2).sum() + sum(h.sum() for h in hs)).backward()
        results.append([out, *hs, xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert a.shape == b.shape
        assert_close(a, b)
