"""torch.compile(fullgraph=True) traces the modules without a graph break and matches eager."""

import pytest
import torch

import rnnfast
from conftest import assert_close


@pytest.mark.slow
@pytest.mark.parametrize("cls,kw", [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)),
                                    ("GRU", dict(batch_first=True)), ("RNN", dict(nonlinearity="relu"))],
                         ids=["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(cls, kw, backend):
    if backend == "inductor" and cls != "LSTM":
        pytest.skip("inductor is slow on the CPU: one cell is enough to show the ops lower")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = getattr(rnnfast.nn, cls)(4, 6, dtype=torch.float64, **kw)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, h_e = m(xe)
    out_c, h_c = compiled(xc)
    assert_close(out_c, out_e)
    (out_e.sum()).backward()
    grads_e = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    (out_c.sum()).backward()
    for p, g in zip(m.parameters(), grads_e):
        assert_close(p.grad, g)
    assert_close(xc.grad, xe.grad)


@pytest.mark.slow
def test_compile_op_with_lengths():
    torch._dynamo.reset()
    torch.manual_seed(0)
    from conftest import make_layer_inputs

    a = make_layer_inputs("gru", 4, 3, 2, 5, lengths=[4, 2, 1])

    def f(x, h0, w_ih, w_hh, b_ih, b_hh, lengths):
        return rnnfast.ops.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=True)

    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(**a)
    out_e = f(**a)
    for c, e in zip(out_c, out_e):
        assert_close(c, e)
