"""Who gets benchmarked: torch.nn (cuDNN on a GPU) and every rnnfast backend the registry has at run time.

Nothing here knows which backends exist: :func:`discover` asks :mod:`rnnfast.backends` for each name it knows
(``BACKENDS``; ``AUTO_ORDER`` in older versions) that loaded and lists one provider per mode (``triton:fused``,
``triton:hoisted``), then ``auto``. Every provider's module is built from the torch.nn module's ``state_dict``, so
all of them hold the same weights.
"""

from __future__ import annotations

import torch

import rnnfast
from rnnfast import backends

from .configs import Config

_TORCH_CLASSES = {"rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}
_RNNFAST_CLASSES = {"rnn_tanh": rnnfast.nn.RNN, "rnn_relu": rnnfast.nn.RNN, "gru": rnnfast.nn.GRU,
                    "lstm": rnnfast.nn.LSTM}


def _module_kwargs(cfg: Config, device, dtype) -> dict:
    kw = dict(num_layers=cfg.layers, bidirectional=cfg.bidirectional, device=device, dtype=dtype)
    if cfg.cell in ("rnn_tanh", "rnn_relu"):
        kw["nonlinearity"] = cfg.cell.removeprefix("rnn_")
    return kw


def torch_module(cfg: Config, device, dtype=None, seed: int = 0) -> torch.nn.Module:
    """The torch.nn module of ``cfg`` with weights drawn from ``seed`` (the weights every provider gets)."""
    dtype = dtype or getattr(torch, cfg.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Initialise in float32 on the CPU so every dtype and device starts from the same numbers.
        m = _TORCH_CLASSES[cfg.cell](cfg.input, cfg.hidden, **_module_kwargs(cfg, "cpu", torch.float32))
    return m.to(device=device, dtype=dtype)


def layer_specs(cfg: Config, device) -> list[backends.LayerSpec]:
    """One :class:`~rnnfast.backends.LayerSpec` per layer of ``cfg`` (both directions share it)."""
    dev = torch.device(device)
    return [backends.LayerSpec(cell=cfg.cell, device=dev, dtype=getattr(torch, cfg.dtype), seq_len=cfg.seq_len,
                               batch=cfg.batch, input_size=I, hidden_size=cfg.hidden, proj_size=0, bias=True,
                               has_lengths=cfg.packed)
            for I in cfg.layer_inputs()]


class Provider:
    """An implementation to time. ``backend`` is an rnnfast backend name (or ``auto``); None means torch.nn."""

    def __init__(self, name: str, backend: str | None):
        self.name, self.backend = name, backend

    def __repr__(self) -> str:
        return f"Provider({self.name!r})"

    @property
    def is_baseline(self) -> bool:
        return self.backend is None

    def resolve(self, cfg: Config, device) -> tuple[str | None, str | None]:
        """``(what runs, None)`` when this provider can run ``cfg``, else ``(None, reason)``."""
        if self.backend is None:
            return self.name, None
        ran = []
        for spec in layer_specs(cfg, device):
            if self.backend == "auto":
                try:
                    ran.append(backends.select("auto", spec))
                except backends.BackendUnavailableError as exc:
                    return None, str(exc)
            else:
                reason = backends.why_unavailable(self.backend, spec)
                if reason is not None:
                    return None, reason
                ran.append(self.backend)
        return "+".join(dict.fromkeys(ran)), None

    def build(self, reference: torch.nn.Module, cfg: Config) -> torch.nn.Module:
        """This provider's module for ``cfg``, holding a copy of ``reference``'s weights."""
        p = next(reference.parameters())
        if self.backend is None:
            m = _TORCH_CLASSES[cfg.cell](cfg.input, cfg.hidden, **_module_kwargs(cfg, p.device, p.dtype))
        else:
            m = _RNNFAST_CLASSES[cfg.cell](cfg.input, cfg.hidden, **_module_kwargs(cfg, p.device, p.dtype),
                                           backend=self.backend)
        m.load_state_dict(reference.state_dict())
        return m


def baseline_name(device) -> str:
    if torch.device(device).type == "cuda" and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled:
        return "cudnn"
    return "torch.nn"


def discover(device) -> tuple[list[Provider], dict[str, str]]:
    """The providers of this run, baseline first, and the backends that did not load (name -> reason)."""
    providers = [Provider(baseline_name(device), None)]
    missing: dict[str, str] = {}
    for base in getattr(backends, "BACKENDS", None) or backends.AUTO_ORDER:
        try:
            be = backends.get(base)
        except backends.BackendUnavailableError as exc:
            missing[base] = str(exc)
            continue
        except ValueError:  # a name this version does not know (e.g. no "reference" any more): nothing to time
            continue
        names = [f"{base}:{mode}" for mode in be.modes] or [base]
        providers += [Provider(n, n) for n in names]
    providers.append(Provider("auto", "auto"))
    return providers, missing
