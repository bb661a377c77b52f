"""Backend registry: who can run a layer, and who runs it under ``backend="auto"``.

A backend implements one layer in one direction over a whole sequence for every cell (see :class:`Backend`). The
ops in :mod:`rnnfast.ops` dispatch to it by name; the Triton and CUDA backends register themselves here when their
modules are imported. ``auto`` takes the first backend in :data:`AUTO_ORDER` that can run the configuration;
a backend named explicitly that cannot run it raises :class:`BackendUnavailableError` with its reason.
Nothing falls back silently to a backend the caller did not ask for.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference

# Fastest first, once a benchmark on a GPU has decided it; none has yet. Until then triton comes before cuda: its
# kernels' arithmetic is checked in every CI run (under the Triton interpreter), the CUDA kernels' only on a GPU.
AUTO_ORDER = ("triton", "cuda", "reference")
NAMES = ("auto",) + AUTO_ORDER


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


class Backend:
    """One implementation of the layer ops.

    Subclasses implement:

    - ``unavailable(spec) -> str | None``: None when the backend can run ``spec``, else the reason it cannot.
    - ``forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse) -> (y, h_n, c_n, workspace)``.
      Shapes as in :func:`rnnfast.reference.layer_forward`; ``c0``/``c_n`` are None except for LSTM. All outputs
      are fresh tensors (never an input returned as is). ``workspace`` is whatever the backward needs beyond the
      inputs and outputs, in a layout of the backend's choosing.
    - ``workspace(cell, x, h0, w_hh, w_hr) -> Tensor``: an empty tensor shaped like the forward's workspace, on
      ``x``'s device (used by the fake kernels that ``torch.compile`` traces with).
    - ``backward(cell, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
      y, h_n, c_n, workspace) -> (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)`` with None for absent inputs.
      ``grad_*`` are always tensors (zeros where the output was unused).
    """

    name: str = ""
    # Variants a caller may name as "<backend>:<mode>" (e.g. the input part "fused" or "hoisted"); the first is
    # the default. ``self.mode`` is None for the default instance.
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
        """Why ``auto`` must not pick this backend for ``spec`` even if it can run it (e.g. an interpreter that is
        correct but slow); None when it may. Defaults to :meth:`unavailable`."""
        return self.unavailable(spec)

    def forward(self, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
        raise NotImplementedError

    def workspace(self, cell, x, h0, w_hh, w_hr) -> Tensor:
        raise NotImplementedError

    def backward(self, cell, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                 reverse, y, h_n, c_n, workspace):
        raise NotImplementedError


class ReferenceBackend(Backend):
    """The pure-PyTorch time loop of :mod:`rnnfast.reference`: any device, any floating dtype."""

    name = "reference"

    def unavailable(self, spec):
        return None

    def forward(self, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
        y, h_n, c_n = reference.layer_forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
        return y, h_n, c_n, self.workspace(cell, x, h0, w_hh, w_hr)

    def workspace(self, cell, x, h0, w_hh, w_hr):
        # The reference backward recomputes the forward; it keeps nothing.
        return x.new_empty(0)

    def backward(self, cell, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                 reverse, y, h_n, c_n, workspace):
        return reference.layer_backward(cell, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                        w_hr, lengths, reverse)


def fused_layer_problem(spec: LayerSpec, dtypes: tuple[torch.dtype, ...], unit: str) -> str | None:
    """What every fused kernel backend refuses, whoever owns a slice of hidden units (``unit``: "program",
    "block"): LSTM projections, whose product mixes all hidden units inside the step, and other dtypes."""
    if spec.proj_size:
        return (f"LSTM with proj_size is not fused: the projection mixes every hidden unit inside the step, "
                f"which one {unit}'s slice does not hold")
    if spec.dtype not in dtypes:
        return f"dtype {spec.dtype} is not supported (supported: {', '.join(map(str, dtypes))})"
    return None


_REGISTRY: dict[str, Backend] = {}
# Backends that are known by name but failed to load, with the reason (shown when one is asked for).
_LOAD_ERRORS: dict[str, str] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry under ``backend.name``."""
    if backend.name not in AUTO_ORDER:
        raise ValueError(f"backend name {backend.name!r} is not one of {AUTO_ORDER}")
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
        if name in AUTO_ORDER:
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


def select(name: str, spec: LayerSpec) -> str:
    """Resolve ``name`` (a backend or ``auto``) to the backend that will run ``spec``."""
    check_name(name)
    if name != "auto":
        reason = why_unavailable(name, spec)
        if reason is not None:
            raise BackendUnavailableError(f"rnnfast backend {name!r} cannot run this {spec.cell} layer "
                                          f"({spec.dtype}, {spec.device}): {reason}")
        return name
    for candidate in AUTO_ORDER:
        if why_unavailable(candidate, spec, for_auto=True) is None:
            return candidate
    raise BackendUnavailableError(f"no rnnfast backend can run this {spec.cell} layer: {spec}")


def available(spec: LayerSpec) -> dict[str, str | None]:
    """Every known backend mapped to None (can run ``spec``) or the reason it cannot."""
    return {name: why_unavailable(name, spec) for name in AUTO_ORDER}


register(ReferenceBackend())
