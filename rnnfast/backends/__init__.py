"""The backends and their registry: who can run a layer, by name.

The host side of every backend sits here side by side: :mod:`.native` (``torch``: torch's own implementation, the
call torch.nn makes), :mod:`.reference` (the pure-PyTorch time loop of :mod:`rnnfast.reference`, the spec),
:mod:`.triton` (launchers of the Triton kernels in ``kernels/``) and :mod:`.cuda` (the CUDA C++ kernels in
``csrc/``). A backend implements one layer in one direction over a whole sequence for every cell
(:class:`Backend`): it takes one :class:`LayerInputs` and returns :class:`LayerOutputs`, and its backward returns
:class:`LayerGrads`. The ops in :mod:`rnnfast.ops` dispatch to it by name.

``auto`` is decided by measurement (:mod:`rnnfast.dispatch`), never by an order of preference. A backend named
explicitly that cannot run a layer raises :class:`BackendUnavailableError` with its reason; nothing falls back
silently to a backend the caller did not ask for.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..reference import GATES
from ..workspace import workspace_bytes

# Every backend rnnfast knows by name. "torch" is the module "native" (a submodule named torch would replace the
# name torch in this package).
BACKENDS = ("torch", "triton", "cuda", "reference")
# The kernel backends, which load optionally (a missing compiler leaves them out with the reason).
KERNEL_BACKENDS = ("triton", "cuda")
NAMES = ("auto",) + BACKENDS


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this configuration; the message says why."""


@dataclass(frozen=True)
class LayerSpec:
    """What a backend needs to know to decide whether it can run a layer (no tensor data)."""

    cell: str
    device: torch.device
    dtype: torch.dtype
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    proj_size: int  # 0 when the LSTM has no projection
    bias: bool
    has_lengths: bool


@dataclass(frozen=True)
class LayerInputs:
    """Everything one layer call takes: the cell, the tensors (shapes in :mod:`rnnfast.ops`) and the direction."""

    cell: str
    x: Tensor
    h0: Tensor
    c0: Tensor | None
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None
    w_hr: Tensor | None = None
    lengths: Tensor | None = None
    reverse: bool = False

    @property
    def hidden_size(self) -> int:
        return self.w_hh.shape[0] // GATES[self.cell]

    def spec(self) -> LayerSpec:
        """The :class:`LayerSpec` of this call (shapes, dtype and device only)."""
        return LayerSpec(cell=self.cell, device=self.x.device, dtype=self.x.dtype, seq_len=self.x.shape[0],
                         batch=self.x.shape[1], input_size=self.x.shape[2], hidden_size=self.hidden_size,
                         proj_size=self.w_hr.shape[0] if self.w_hr is not None else 0, bias=self.b_ih is not None,
                         has_lengths=self.lengths is not None)

    def reference_args(self) -> tuple:
        """The positional arguments of :func:`rnnfast.reference.layer_forward` after ``cell``."""
        return (self.x, self.h0, self.c0, self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr, self.lengths,
                self.reverse)


@dataclass(frozen=True)
class LayerOutputs:
    """What a layer's forward returns: ``y (T, B, H_out)`` with zeros at padded steps, ``h_n``, ``c_n`` (LSTM,
    else None) and ``workspace``, whatever the backend's backward needs in a layout of its choosing. Also the
    upstream gradients of those outputs (``workspace`` None), which are always tensors (zeros where unused)."""

    y: Tensor
    h_n: Tensor
    c_n: Tensor | None = None
    workspace: Tensor | None = None


@dataclass(frozen=True)
class LayerGrads:
    """The gradients of a layer's inputs, named as in :class:`LayerInputs`; None where the input is None."""

    x: Tensor
    h0: Tensor
    c0: Tensor | None = None
    w_ih: Tensor | None = None
    w_hh: Tensor | None = None
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None
    w_hr: Tensor | None = None

    NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")

    def astuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


class Backend:
    """One implementation of the layer ops. Subclasses implement:

    - ``unavailable(spec) -> str | None``: None when the backend can run ``spec``, else the reason it cannot;
    - ``forward(inputs: LayerInputs) -> LayerOutputs``: all outputs are fresh tensors (never an input as is);
    - ``workspace(inputs) -> Tensor``: an empty tensor shaped like the forward's workspace, on ``x``'s device (the
      fake kernels that ``torch.compile`` traces with use it);
    - ``backward(inputs, outputs, grads: LayerOutputs) -> LayerGrads``: ``grads`` holds the upstream gradients of
      ``y``, ``h_n`` and ``c_n``.
    """

    name: str = ""
    # Variants a caller may name as "<backend>:<mode>" (the Triton and CUDA kernels' input product: "hoisted" or
    # "fused"); the first is the default. ``self.mode`` is None for the default instance.
    modes: tuple[str, ...] = ()
    mode: str | None = None

    def with_mode(self, mode: str) -> "Backend":
        """A copy of this backend bound to ``mode``."""
        if mode not in self.modes:
            raise ValueError(f"rnnfast backend {self.name!r} has no mode {mode!r}; its modes are {self.modes}")
        clone = copy.copy(self)
        clone.mode = mode
        return clone

    def unavailable(self, spec: LayerSpec) -> str | None:
        raise NotImplementedError

    def auto_unavailable(self, spec: LayerSpec) -> str | None:
        """Why ``auto`` must not pick this backend for ``spec`` even if it can run it (an interpreter or an emulation
        that is correct but slow, the reference); None when it may. Defaults to :meth:`unavailable`."""
        return self.unavailable(spec)

    def forward(self, inputs: LayerInputs) -> LayerOutputs:
        raise NotImplementedError

    def workspace(self, inputs: LayerInputs) -> Tensor:
        raise NotImplementedError

    def backward(self, inputs: LayerInputs, outputs: LayerOutputs, grads: LayerOutputs) -> LayerGrads:
        raise NotImplementedError


class KernelBackend(Backend):
    """What the kernel backends (``triton``, ``cuda``) share: the input modes (``hoisted``: ``x @ W_ih^T`` for all
    steps as one GEMM first; ``fused``: inside each step) and the forward's workspace (:mod:`rnnfast.workspace`)."""

    modes = ("hoisted", "fused")
    # Set when the kernels run on CPU tensors under an interpreter or an emulation: correct, for testing, and so
    # never picked by auto. ``cpu_mode_name`` says which.
    cpu_mode = False
    cpu_mode_name = ""

    def auto_unavailable(self, spec):
        reason = self.unavailable(spec)
        if reason is None and self.cpu_mode:
            return f"it runs under {self.cpu_mode_name}, which is for testing, not speed"
        return reason

    def workspace(self, inputs):
        T, B = inputs.x.shape[0], inputs.x.shape[1]
        return inputs.x.new_empty(workspace_bytes(inputs.cell, 1, T, B, inputs.w_hh.shape[1], inputs.x.dtype),
                                  dtype=torch.uint8)


def kernel_layer_problem(spec: LayerSpec, dtypes: tuple[torch.dtype, ...], unit: str) -> str | None:
    """What every kernel backend refuses, whoever owns a slice of hidden units (``unit``: "program", "block"):
    LSTM projections, whose product mixes all hidden units inside the step, and other dtypes."""
    if spec.proj_size:
        return (f"LSTM with proj_size is not fused: the projection mixes every hidden unit inside the step, "
                f"which one {unit}'s slice does not hold")
    if spec.dtype not in dtypes:
        return f"dtype {spec.dtype} is not supported (supported: {', '.join(map(str, dtypes))})"
    return None


def constant_under_compile(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (a second of start-up) when
    rnnfast is imported: it sets the attribute dynamo reads, as torch's decorator does (tests/test_ops.py checks
    that it still does)."""
    fn._dynamo_marked_constant = True
    return fn


_REGISTRY: dict[str, Backend] = {}
# Backends that are known by name but failed to load, with the reason (shown when one is asked for).
_LOAD_ERRORS: dict[str, str] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry under ``backend.name``."""
    if backend.name not in BACKENDS:
        raise ValueError(f"backend name {backend.name!r} is not one of {BACKENDS}")
    _REGISTRY[backend.name] = backend
    _LOAD_ERRORS.pop(backend.name, None)
    return backend


def mark_unloadable(name: str, reason: str) -> None:
    """Record that backend ``name`` could not be loaded (e.g. its compiler is missing) and why."""
    if name not in _REGISTRY:
        _LOAD_ERRORS[name] = reason


def split_name(name: str) -> tuple[str, str | None]:
    """``"triton:fused"`` -> ``("triton", "fused")``; ``"triton"`` -> ``("triton", None)``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    base, _, mode = name.partition(":")
    return base, (mode or None)


def check_name(name: str) -> str:
    """Validate a backend name (``auto``, a backend, or ``backend:mode``) without loading anything."""
    base, mode = split_name(name)
    if base not in NAMES or (base == "auto" and mode is not None):
        raise ValueError(f"unknown rnnfast backend {name!r}; expected one of {NAMES}, optionally with ':<mode>'")
    return name


def get(name: str) -> Backend:
    """The registered backend called ``name`` (``backend`` or ``backend:mode``; not ``auto``)."""
    base, mode = split_name(name)
    try:
        be = _REGISTRY[base]
        return be if mode is None else be.with_mode(mode)
    except KeyError:
        name = base
        if name in _LOAD_ERRORS:
            raise BackendUnavailableError(f"rnnfast backend {name!r} is not available: {_LOAD_ERRORS[name]}") from None
        if name in BACKENDS:
            raise BackendUnavailableError(f"rnnfast backend {name!r} is not available: it is not built into this "
                                          "version of rnnfast") from None
        raise ValueError(f"unknown rnnfast backend {name!r}; expected one of {NAMES}") from None


def why_unavailable(name: str, spec: LayerSpec, *, for_auto: bool = False) -> str | None:
    """None when backend ``name`` can run ``spec`` (with ``for_auto``: and ``auto`` may pick it), else the reason."""
    base, mode = split_name(name)
    if base not in _REGISTRY:
        return _LOAD_ERRORS.get(base, "it is not built into this version of rnnfast")
    be = _REGISTRY[base]
    if mode is not None and mode not in be.modes:
        return f"it has no mode {mode!r} (modes: {be.modes})"
    be = be if mode is None else be.with_mode(mode)
    return be.auto_unavailable(spec) if for_auto else be.unavailable(spec)


def select(name: str, spec: LayerSpec, *, training: bool = False) -> str:
    """Resolve ``name`` (a backend or ``auto``) to the backend that will run the layer ``spec``."""
    check_name(name)
    if name == "auto":
        from .. import dispatch  # the table and the tuning cache; imported on use: it imports this module

        return dispatch.choose(dispatch.ModuleSpec.of_layer(spec, training)).backend
    reason = why_unavailable(name, spec)
    if reason is not None:
        raise BackendUnavailableError(f"rnnfast backend {name!r} cannot run this {spec.cell} layer "
                                      f"({spec.dtype}, {spec.device}): {reason}")
    return name


def available(spec: LayerSpec) -> dict[str, str | None]:
    """Every known backend mapped to None (can run ``spec``) or the reason it cannot."""
    return {name: why_unavailable(name, spec) for name in BACKENDS}


def _register_builtin() -> None:
    # torch and the reference always load; each kernel backend registers itself when its module imports, and one
    # that cannot is recorded with its reason, so that naming it says why.
    from . import native, reference  # noqa: F401

    try:
        from . import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (depends on the machine: no triton, an old one)
        mark_unloadable("triton", f"importing the Triton backend failed: {type(exc).__name__}: {exc}")
    try:
        from . import cuda  # noqa: F401  (builds csrc/ on first use, never at import)
    except ImportError as exc:
        mark_unloadable("cuda", f"importing the CUDA backend failed: {exc}")


_register_builtin()
