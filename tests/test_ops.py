"""The layer ops: registration (opcheck), float64 gradcheck, validation and backend choice."""

import pytest
import torch

import rnnfast
from rnnfast import backends, ops, reference
from conftest import CELLS, assert_close, make_layer_inputs

OP_CASES = [(c, 0) for c in CELLS] + [("lstm", 2)]
OP_IDS = [f"{c}-P{p}" if p else c for c, p in OP_CASES]


def positional(cell, a, reverse, backend):
    """The op's positional arguments, in schema order."""
    if cell == "lstm":
        return (a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a.get("b_ih"), a.get("b_hh"), a.get("w_hr"),
                a.get("lengths"), reverse, backend)
    return (a["x"], a["h0"], a["w_ih"], a["w_hh"], a.get("b_ih"), a.get("b_hh"), a.get("lengths"), reverse,
            backend)


@pytest.mark.parametrize("cell,proj", OP_CASES, ids=OP_IDS)
@pytest.mark.parametrize("lengths", [None, [3, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_forward_and_backward(cell, proj, lengths, bias):
    a = make_layer_inputs(cell, 3, 2, 3, 4, proj=proj, bias=bias, lengths=lengths, requires_grad=True)
    fwd, bwd = ops.OPS[cell]
    args = positional(cell, a, True, "reference")
    torch.library.opcheck(fwd, args)
    outs = fwd(*args)
    grads = [torch.randn_like(t) for t in outs[:-1]]
    inputs = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    bargs = (*grads, *inputs, *[t.detach() for t in outs])
    torch.library.opcheck(bwd, bargs)


@pytest.mark.parametrize("cell,proj", OP_CASES, ids=OP_IDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [4, 2, 0]], ids=["full", "lengths"])
def test_gradcheck(cell, proj, reverse, lengths):
    a = make_layer_inputs(cell, 4, 3, 3, 3, proj=proj, lengths=lengths, requires_grad=True)
    fn = ops.LAYER_FUNCTIONS[cell]
    keys = [k for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr") if k in a]

    def f(*tensors):
        kw = dict(zip(keys, tensors))
        return fn(**kw, lengths=a.get("lengths"), reverse=reverse, backend="reference")

    assert torch.autograd.gradcheck(f, [a[k] for k in keys])


@pytest.mark.parametrize("cell", CELLS)
def test_op_matches_reference_and_writes_everything(cell, poison_torch_memory):
    """Outputs come back finite with torch.empty poisoned: nothing is left unwritten."""
    a = make_layer_inputs(cell, 5, 3, 4, 5, lengths=[5, 3, 1], requires_grad=True)
    out = ops.LAYER_FUNCTIONS[cell](**a, reverse=True, backend="reference")
    ref = reference.layer_forward(cell, **{"c0": None, **a}, reverse=True)
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all()
        assert_close(o, r)
    sum(o.sum() for o in out).backward()
    for k, t in a.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            assert torch.isfinite(t.grad).all(), k


def test_unused_outputs_get_zero_gradients():
    a = make_layer_inputs("lstm", 4, 2, 3, 5, requires_grad=True)
    y, h, c = ops.lstm(**a, backend="reference")
    h.sum().backward()  # y and c unused
    ref = {k: v.detach().clone().requires_grad_() for k, v in a.items()}
    _, h2, _ = reference.layer_forward("lstm", **ref)
    h2.sum().backward()
    for k in a:
        assert_close(a[k].grad, ref[k].grad, msg=k)


def test_bias_free_gradients_are_none():
    a = make_layer_inputs("gru", 3, 2, 3, 4, bias=False, requires_grad=True)
    y, h = ops.gru(**a, backend="reference")
    (y.sum() + h.sum()).backward()
    assert a["w_hh"].grad is not None and a["x"].grad is not None


# -- validation --------------------------------------------------------------------------------------------------

def _bad(cell="lstm", **changes):
    a = make_layer_inputs(cell, 3, 2, 4, 5)
    a.update(changes)
    return a


@pytest.mark.parametrize("changes,exc,match", [
    (dict(x=torch.zeros(3, 4, dtype=torch.float64)), RuntimeError, r"3 dimensions"),
    (dict(x=torch.zeros(0, 2, 4, dtype=torch.float64)), RuntimeError, r"sequence length"),
    (dict(x=torch.zeros(3, 2, 4, dtype=torch.int64)), ValueError, r"floating-point.*torch.int64"),
    (dict(x=torch.zeros(3, 2, 6, dtype=torch.float64)), RuntimeError, r"w_ih of shape \[20, 6\], got \[20, 4\]"),
    (dict(h0=torch.zeros(3, 5, dtype=torch.float64)), RuntimeError, r"h0 of shape \[2, 5\], got \[3, 5\]"),
    (dict(c0=torch.zeros(2, 4, dtype=torch.float64)), RuntimeError, r"c0 of shape \[2, 5\], got \[2, 4\]"),
    (dict(h0=torch.zeros(2, 5)), ValueError, r"h0 has dtype torch.float32 but x has dtype torch.float64"),
    (dict(b_hh=None), ValueError, r"both"),
    (dict(h0=torch.zeros(2, 5, dtype=torch.float64, device="meta")), RuntimeError, r"h0 is on meta"),
    (dict(lengths=torch.tensor([3])), RuntimeError, r"lengths must have shape \[2\]"),
    (dict(lengths=torch.tensor([3.0, 1.0])), ValueError, r"integer"),
    (dict(lengths=torch.tensor([4, 1])), ValueError, r"\[0, 3\].*\[1, 4\]"),
    (dict(lengths=torch.tensor([-1, 1])), ValueError, r"\[0, 3\]"),
], ids=["x-2d", "T0", "int-x", "input-size", "h0-batch", "c0-size", "h0-dtype", "half-bias", "device",
        "lengths-shape", "lengths-float", "lengths-long", "lengths-negative"])
def test_bad_arguments_raise_clear_errors(changes, exc, match):
    with pytest.raises(exc, match=match):
        ops.lstm(**_bad(**changes), backend="reference")


def test_projection_only_for_lstm():
    a = make_layer_inputs("gru", 3, 2, 4, 5)
    with pytest.raises(TypeError):
        ops.gru(**a, w_hr=torch.zeros(2, 5, dtype=torch.float64))


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown rnnfast backend 'fast'"):
        ops.lstm(**_bad(), backend="fast")
    with pytest.raises(ValueError, match="unknown rnnfast backend"):
        rnnfast.nn.LSTM(3, 4, backend="cudnn")


@pytest.mark.parametrize("name", ["cuda", "triton", "cuda:hoisted"])
def test_explicit_backend_that_cannot_run_raises(name):
    """A backend named explicitly never falls back: on CPU tensors without the interpreter it says why."""
    spec = ops.layer_spec("lstm", torch.zeros(3, 2, 4, dtype=torch.float64), torch.zeros(20, 5), None, None, None)
    if backends.why_unavailable(name, spec) is None:
        pytest.skip(f"{name} can run CPU tensors in this environment")
    with pytest.raises(backends.BackendUnavailableError, match=name.split(":")[0]):
        ops.lstm(**_bad(), backend=name)


def test_auto_runs_torch_on_the_cpu_and_matches_reference():
    a = make_layer_inputs("lstm", 3, 2, 4, 5)
    spec = ops.layer_spec("lstm", a["x"], a["w_hh"], None, a["b_ih"], None)
    assert backends.select("auto", spec) == "torch"
    out = ops.lstm(**a, backend="auto")
    ref = ops.lstm(**a, backend="reference")
    for o, r in zip(out, ref):
        assert_close(o, r)


def test_registry_rejects_foreign_names_and_modes():
    with pytest.raises(ValueError):
        backends.register(type("X", (backends.Backend,), {"name": "mine"})())
    with pytest.raises(ValueError, match="has no mode"):
        backends.get("reference:fused")
    with pytest.raises(ValueError):
        backends.check_name("auto:fused")
