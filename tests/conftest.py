"""Shared fixtures and the one tolerance table of the test suite."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which triton.jit picks when rnnfast is imported, and
# the CUDA kernels in their CPU execution mode (rnnfast.backends.cuda reads RNNFAST_CUDA_EMULATE at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("RNNFAST_CUDA_EMULATE", "1")

# The tolerance table and rule live in rnnfast.testing (shared with bench and rnnfast.tune); re-exported here.
from rnnfast.testing import (BASELINE_FACTOR, TOLERANCES, assert_close, assert_within_baseline,  # noqa: E402,F401
                             layer_inputs, make_layer_inputs, poison_, tol)

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")


@pytest.fixture(autouse=True, scope="session")
def ieee_float32():
    """float32 in IEEE precision, unless a test asks for TF32 (and restores the switch itself): the table's float32
    tolerance is IEEE's, and torch.nn's RNNs (cuDNN) and the kernels alike follow torch.backends.cudnn.allow_tf32,
    which is on by default."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def poison_torch_memory(monkeypatch):
    """Make torch.empty / empty_like / new_empty return NaN-filled tensors for the duration of a test."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        return poison_(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison_(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison_(real_new_empty(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def torch_nn_layer(cell, a):
    """A one-layer torch.nn module (cuDNN on a GPU) in ``a["x"]``'s dtype and device holding the layer weights of
    ``a`` (as made by :func:`make_layer_inputs`): the same-precision PyTorch computation of the layer."""
    import warnings

    cls = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "gru": "GRU", "lstm": "LSTM"}[cell]
    kw = {"nonlinearity": cell[4:]} if cls == "RNN" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = getattr(torch.nn, cls)(a["x"].shape[2], a["w_hh"].shape[1], device=a["x"].device, dtype=a["x"].dtype,
                                   bias="b_ih" in a, **kw)
    with torch.no_grad():
        for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"),
                          ("bias_hh_l0", "b_hh")):
            if key in a:
                getattr(m, name).copy_(a[key])
    return m


GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")


def reference_layer(cell, a, reverse, upstream):
    """The float64 reference of a layer (inputs ``a`` as made by :func:`make_layer_inputs`): ``(outs, grads)``,
    outputs ``(y, h_n, c_n)`` and the gradients of :data:`GRAD_NAMES` for the upstream ``(gy, gh, gc)``."""
    from rnnfast import reference

    f = lambda t: t.double() if t is not None and t.is_floating_point() else t  # noqa: E731
    args = (f(a["x"]), f(a["h0"]), f(a.get("c0")), f(a["w_ih"]), f(a["w_hh"]), f(a.get("b_ih")), f(a.get("b_hh")),
            None, a.get("lengths"), reverse)
    outs = reference.layer_forward(cell, *args)
    grads = reference.layer_backward(cell, *(f(u) for u in upstream), *args)
    return outs, grads[:7]


def assert_layer_matches(cell, dtype, outs, grads, ref_outs, ref_grads):
    """Outputs ``(y, h_n, c_n)`` and gradients (in :data:`GRAD_NAMES` order) in ``dtype``, of the reference's shapes,
    within the table's tolerance; None exactly where the reference has None."""
    for name, o, r in zip(("y", "h_n", "c_n"), outs, ref_outs):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == dtype and o.shape == r.shape, name
        assert_close(o, r, msg=f"{cell} {name}")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close(g, r, msg=f"{cell} gradient of {name}")
