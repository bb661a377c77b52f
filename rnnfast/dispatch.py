"""How ``backend="auto"`` chooses: by measurement, and ``torch`` wherever nothing was measured.

``auto`` picks one backend (and mode) per module call from three sources, in this order:

1. a measurement made on this very GPU by :func:`rnnfast.tune` (cached per device in the user's cache folder);
2. the dispatch table shipped with the package (``dispatch_table.json``), written by ``python -m bench --table``
   from a GPU run: for each device capability, cell, dtype, training or inference, and bucket of batch, hidden size
   and sequence length, the provider that was fastest and correct, torch.nn (cuDNN) included;
3. otherwise ``torch``: torch's own implementation, the same call torch.nn makes.

``auto`` never picks ``reference`` (it is the spec, a Python time loop) nor a backend running under an interpreter
or a CPU emulation mode (``Backend.auto_unavailable``). On the CPU it always uses ``torch``. A chosen kernel backend
that refuses one of the module's layers (``proj_size``, a size that does not fit) gives way to ``torch`` for the
whole module, never to something slower. :func:`explain` says which backend runs and why.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import backends

TABLE_SCHEMA = 1
TUNE_SCHEMA = 1
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
# Bucket upper edges (inclusive); a size above the last edge falls in the open bucket, written as None. Each point
# of the benchmark grid (bench/configs.py: B {1, 16, 64, 256}, H {128, ..., 1024}, T {256, 1024}) is its own bucket.
BATCH_EDGES = (1, 16, 64, 256)
HIDDEN_EDGES = (128, 256, 512, 1024)
SEQ_EDGES = (256, 1024)
FALLBACK = "torch"


def bucket(n: int, edges: tuple[int, ...]) -> int | None:
    """The smallest edge ``>= n``, or None above the last edge."""
    for e in edges:
        if n <= e:
            return e
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModuleSpec:
    """What ``auto`` decides on: one module call's shapes, dtype, device and whether it records gradients."""

    cell: str
    device: torch.device
    dtype: torch.dtype
    training: bool  # a backward will follow (grad mode on and something requires grad)
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    proj_size: int = 0
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    has_lengths: bool = False

    @classmethod
    def of_layer(cls, spec: backends.LayerSpec, training: bool) -> "ModuleSpec":
        """The spec of a one-layer, one-direction call (the layer ops)."""
        return cls(cell=spec.cell, device=spec.device, dtype=spec.dtype, training=training, seq_len=spec.seq_len,
                   batch=spec.batch, input_size=spec.input_size, hidden_size=spec.hidden_size,
                   proj_size=spec.proj_size, bias=spec.bias, has_lengths=spec.has_lengths)

    def layer_specs(self) -> list[backends.LayerSpec]:
        """One :class:`~rnnfast.backends.LayerSpec` per layer (both directions of a layer share it)."""
        out = self.proj_size or self.hidden_size
        dirs = 2 if self.bidirectional else 1
        return [backends.LayerSpec(cell=self.cell, device=self.device, dtype=self.dtype, seq_len=self.seq_len,
                                   batch=self.batch, input_size=self.input_size if layer == 0 else out * dirs,
                                   hidden_size=self.hidden_size, proj_size=self.proj_size, bias=self.bias,
                                   has_lengths=self.has_lengths)
                for layer in range(self.num_layers)]


def measured_device(device: torch.device) -> bool:
    """Whether auto looks up measurements for ``device`` (CUDA GPUs); elsewhere it always uses torch."""
    return device.type == "cuda"


def capability(device: torch.device) -> str | None:
    """``"9.0"`` for a CUDA device, None for any other."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


@dataclass(frozen=True)
class Row:
    """One measured case of the dispatch table: which provider was fastest (``backend``; ``torch`` when torch.nn
    was), with the times it was chosen by (µs per step, the provider's and torch.nn's, in the same run)."""

    capability: str
    cell: str
    dtype: str
    training: bool
    batch: int | None  # bucket upper edges; None: above the last edge
    hidden: int | None
    seq_len: int | None
    backend: str
    us_per_step: float
    torch_us_per_step: float
    gpu: str = ""
    source: str = ""  # the benchmark result the row comes from

    @property
    def key(self) -> tuple:
        return (self.capability, self.cell, self.dtype, self.training, self.batch, self.hidden, self.seq_len)

    def describe(self) -> str:
        t = "training" if self.training else "inference"
        return (f"dispatch table row sm{self.capability} {self.cell} {self.dtype} {t} B<={self.batch} "
                f"H<={self.hidden} T<={self.seq_len}: {self.backend} {self.us_per_step:.3g} us/step against torch "
                f"{self.torch_us_per_step:.3g} us/step ({self.gpu or 'GPU'}, {self.source or 'no source'})")


def key_of(spec: ModuleSpec) -> tuple:
    """The table key of a module call: capability, cell, dtype, training, and the three size buckets."""
    return (capability(spec.device), spec.cell, dtype_name(spec.dtype), bool(spec.training),
            bucket(spec.batch, BATCH_EDGES), bucket(spec.hidden_size, HIDDEN_EDGES), bucket(spec.seq_len, SEQ_EDGES))


def row_for(case: dict) -> Row:
    """A :class:`Row` from a JSON object, checking its fields (``ValueError`` names the bad one)."""
    try:
        row = Row(**case)
    except TypeError as exc:
        raise ValueError(f"dispatch table row {case!r}: {exc}") from None
    backends.check_name(row.backend)
    if row.backend == "auto" or backends.split_name(row.backend)[0] == "reference":
        raise ValueError(f"dispatch table row names {row.backend!r}, which auto never runs")
    return row


def read_table(path: Path | str = TABLE_PATH) -> dict[tuple, Row]:
    """The rows of a dispatch table file by key (the fastest row where a key repeats)."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != TABLE_SCHEMA:
        raise ValueError(f"{path}: dispatch table schema {data.get('schema')!r}, expected {TABLE_SCHEMA}")
    rows: dict[tuple, Row] = {}
    for case in data.get("rows", []):
        row = row_for(case)
        if row.key not in rows or row.us_per_step < rows[row.key].us_per_step:
            rows[row.key] = row
    return rows


def write_table(path: Path | str, rows: list[Row], *, about: str = "") -> None:
    """Write ``rows`` as a dispatch table file (what :func:`read_table` and the package read)."""
    for row in rows:
        row_for(asdict(row))  # the same checks as reading
    payload = {"schema": TABLE_SCHEMA, "about": about or "written by python -m bench --table",
               "rows": [asdict(r) for r in sorted(rows, key=lambda r: tuple(str(k) for k in r.key))]}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def rows_from_results(results: list[dict], *, capability: str, gpu: str, source: str,
                      baseline: str) -> list[Row]:
    """Dispatch table rows from benchmark results: for each (config, mode), the fastest correct provider among the
    rnnfast backends (named, not ``auto`` or ``reference``) and the baseline ``baseline`` (torch.nn), which the
    row names ``torch``. Each result is a dict with ``provider``, ``cell``, ``dtype``, ``mode`` (inference or
    training), ``batch``, ``hidden``, ``seq_len``, ``ok`` (correct) and ``us_per_step``."""
    best: dict[tuple, tuple[str, float]] = {}
    torch_time: dict[tuple, float] = {}
    for r in results:
        if not r.get("ok") or r.get("us_per_step") is None or not math.isfinite(r["us_per_step"]):
            continue
        case = (r["cell"], r["dtype"], r["mode"] == "training", bucket(r["batch"], BATCH_EDGES),
                bucket(r["hidden"], HIDDEN_EDGES), bucket(r["seq_len"], SEQ_EDGES))
        name = r["provider"]
        if name == baseline:
            name = FALLBACK
            torch_time[case] = r["us_per_step"]
        elif name == "auto" or backends.split_name(name)[0] in ("reference", "auto"):
            continue
        if case not in best or r["us_per_step"] < best[case][1]:
            best[case] = (name, r["us_per_step"])
    return [Row(capability, *case, backend=name, us_per_step=t, torch_us_per_step=torch_time[case], gpu=gpu,
                source=source)
            for case, (name, t) in best.items() if case in torch_time]  # no row without the side-by-side baseline


_TABLE: dict[tuple, Row] | None = None


def table() -> dict[tuple, Row]:
    """The shipped table, read once (an unreadable one is a packaging bug: it raises)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = read_table(TABLE_PATH)
    return _TABLE


# ----------------------------------------------------------------------------------------------------------------
# The tuning cache: measurements on the user's own GPU.

def cache_dir() -> Path:
    """``$RNNFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/rnnfast``, else ``~/.cache/rnnfast``."""
    env = os.environ.get("RNNFAST_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rnnfast"


def device_id(device: torch.device) -> str:
    """The cache file's name for a device: its name and capability (``NVIDIA-H200-sm9.0``; ``cpu`` elsewhere)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).replace(" ", "-").replace("/", "-")
    return f"{name}-sm{capability(device)}"


def tune_key(spec: ModuleSpec) -> str:
    """A tuned measurement is kept for the exact shapes it was made on."""
    return (f"{spec.cell}|{dtype_name(spec.dtype)}|{'training' if spec.training else 'inference'}|B{spec.batch}"
            f"|T{spec.seq_len}|I{spec.input_size}|H{spec.hidden_size}|P{spec.proj_size}|L{spec.num_layers}"
            f"|{'bi' if spec.bidirectional else 'uni'}|{'bias' if spec.bias else 'nobias'}"
            f"|{'lengths' if spec.has_lengths else 'full'}")


def _stamp() -> dict:
    from . import __version__

    return {"rnnfast": __version__, "torch": torch.__version__}


def cache_path(device: torch.device) -> Path:
    return cache_dir() / f"tune-{device_id(device)}.json"


def read_cache(device: torch.device) -> dict[str, dict]:
    """The tuned entries for ``device``; a missing file is empty, a corrupt or stale one is ignored with a
    warning (stale: written by another rnnfast or torch version, whose kernels and timings differ)."""
    path = cache_path(device)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("schema") != TUNE_SCHEMA or not isinstance(data.get("entries"), dict):
            raise ValueError("not an rnnfast tuning cache of schema " + str(TUNE_SCHEMA))
        for k, e in data["entries"].items():
            if not isinstance(e, dict) or not isinstance(e.get("backend"), str):
                raise ValueError(f"entry {k!r} has no backend")
            backends.check_name(e["backend"])
    except (OSError, ValueError) as exc:
        warnings.warn(f"rnnfast: ignoring the tuning cache {path}: it is unreadable ({exc}); run rnnfast.tune "
                      "again to rebuild it", RuntimeWarning, stacklevel=3)
        return {}
    if data.get("stamp") != _stamp():
        warnings.warn(f"rnnfast: ignoring the tuning cache {path}: it was written with {data.get('stamp')}, this "
                      f"is {_stamp()}; run rnnfast.tune again", RuntimeWarning, stacklevel=3)
        return {}
    return data["entries"]


def forget() -> None:
    """Drop what this process remembers of choices and of the shipped table (tests; after the cache changed)."""
    global _TABLE
    _TABLE = None
    _CHOSEN.clear()


def write_cache_entry(device: torch.device, key: str, entry: dict) -> Path:
    """Add one tuned entry to ``device``'s cache file (written to a temporary file, then renamed)."""
    path = cache_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable old cache is replaced
        entries = read_cache(device)
    entries[key] = entry
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"schema": TUNE_SCHEMA, "stamp": _stamp(), "entries": entries}, indent=1) + "\n")
    os.replace(tmp, path)
    _CHOSEN.clear()  # the choices this process remembered may be different now
    return path


# ----------------------------------------------------------------------------------------------------------------
# The choice.

@dataclass(frozen=True)
class Choice:
    """Which backend ``auto`` runs for a module call, and why."""

    backend: str
    reason: str
    row: Row | None = None  # the table row that chose it, if one did
    tuned: dict | None = None  # the cached measurement that chose it, if one did
    refusals: dict[str, str] = field(default_factory=dict)  # faster candidates that cannot run it, with why
    auto: bool = True  # False when the module names its backend

    def __str__(self) -> str:
        s = f"{'auto runs' if self.auto else 'runs'} {self.backend!r}: {self.reason}"
        for name, why in self.refusals.items():
            s += f"\n  {name} was not used: {why}"
        return s


def refusal(name: str, spec: ModuleSpec, *, for_auto: bool = True) -> str | None:
    """None when backend ``name`` can run every layer of ``spec`` (``for_auto``: and ``auto`` may pick it), else
    the first refusing layer's reason."""
    for i, layer in enumerate(spec.layer_specs()):
        why = backends.why_unavailable(name, layer, for_auto=for_auto)
        if why is not None:
            return f"layer {i}: {why}" if spec.num_layers > 1 else why
    return None


def choose(spec: ModuleSpec) -> Choice:
    """The backend ``auto`` runs for ``spec``: tuned on this GPU, else the table, else ``torch``."""
    if not measured_device(spec.device):
        return Choice(FALLBACK, f"on {spec.device.type} tensors auto uses torch's own implementation (the call "
                                "torch.nn makes); the kernel backends are for CUDA GPUs")
    refusals: dict[str, str] = {}
    entry = read_cache(spec.device).get(tune_key(spec))
    if entry is not None:
        name = entry["backend"]
        why = None if name == FALLBACK else refusal(name, spec)
        if why is None:
            return Choice(name, f"rnnfast.tune measured it fastest on this GPU ({entry.get('us_per_step', '?')} "
                                f"us/step; torch {entry.get('torch_us_per_step', '?')} us/step)", tuned=entry)
        refusals[name] = f"tuned fastest, but now refused: {why}"
    row = table().get(key_of(spec))
    if row is not None:
        why = None if row.backend == FALLBACK else refusal(row.backend, spec)
        if why is None:
            return Choice(row.backend, row.describe(), row=row, refusals=refusals)
        refusals[row.backend] = f"{row.describe()}; but it cannot run this module: {why}"
        return Choice(FALLBACK, "the backend the table chose cannot run this module, so torch's own implementation "
                                "runs", row=row, refusals=refusals)
    return Choice(FALLBACK, f"the dispatch table has no measurement for sm{capability(spec.device)} {spec.cell} "
                            f"{dtype_name(spec.dtype)} {'training' if spec.training else 'inference'} "
                            f"B={spec.batch} H={spec.hidden_size} T={spec.seq_len}, so torch's own implementation "
                            "runs (never slower than torch.nn: it is torch.nn's call)", refusals=refusals)


_CHOSEN: dict[tuple, str] = {}  # choose_name's answers, per call shape


@backends.constant_under_compile
def choose_name(cell: str, device: str, dtype: str, training: bool, seq_len: int, batch: int, input_size: int,
                hidden_size: int, proj_size: int, num_layers: int, bidirectional: bool, bias: bool,
                has_lengths: bool) -> str:
    """:func:`choose`'s backend from plain values, which ``torch.compile`` evaluates once, eagerly, and keeps
    (the table and the cache are files, which dynamo cannot trace). Remembered per process for each call shape, so
    a module call pays a dictionary look-up; :func:`rnnfast.tune` (and :func:`forget`) clear it. (A plain dict, not
    functools.lru_cache: dynamo looks through an lru_cache wrapper and would trace the file reads.)"""
    key = (cell, device, dtype, training, seq_len, batch, input_size, hidden_size, proj_size, num_layers,
           bidirectional, bias, has_lengths)
    name = _CHOSEN.get(key)
    if name is None:
        spec = ModuleSpec(cell=cell, device=torch.device(device), dtype=getattr(torch, dtype), training=training,
                          seq_len=seq_len, batch=batch, input_size=input_size, hidden_size=hidden_size,
                          proj_size=proj_size, num_layers=num_layers, bidirectional=bidirectional, bias=bias,
                          has_lengths=has_lengths)
        name = _CHOSEN[key] = choose(spec).backend
    return name


def module_spec(module: torch.nn.Module, input, *, training: bool | None = None) -> ModuleSpec:
    """The :class:`ModuleSpec` of calling an rnnfast module (RNN, GRU, LSTM or a Cell) on ``input`` (a tensor,
    batched or not, or a PackedSequence). ``training`` defaults to what the call would record: grad mode on and
    a parameter or the input requiring grad."""
    from torch.nn.utils.rnn import PackedSequence

    from . import nn as rnn_nn

    if not isinstance(module, (rnn_nn._RNNBase, rnn_nn._CellBase)):
        raise TypeError(f"expected an rnnfast.nn module (RNN, GRU, LSTM or a Cell), got {type(module).__name__}; "
                        "rnnfast.convert(model) swaps torch.nn's")
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    if training is None:
        training = torch.is_grad_enabled() and (data.requires_grad or any(p.requires_grad
                                                                          for p in module.parameters()))
    amp = None
    if data.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(data.device.type):
        amp = torch.get_autocast_dtype(data.device.type)
    common = dict(device=data.device, dtype=amp or data.dtype, training=bool(training), bias=module.bias)
    if isinstance(module, rnn_nn._CellBase):
        batch = data.shape[0] if data.dim() == 2 else 1
        cell = {"RNNCell": f"rnn_{getattr(module, 'nonlinearity', 'tanh')}", "GRUCell": "gru",
                "LSTMCell": "lstm"}[module._name]
        return ModuleSpec(cell=cell, seq_len=1, batch=batch, input_size=module.input_size,
                          hidden_size=module.hidden_size, **common)
    if packed:
        seq_len, batch = input.batch_sizes.numel(), int(input.batch_sizes[0])
    elif data.dim() == 3:
        seq_len, batch = (data.shape[1], data.shape[0]) if module.batch_first else (data.shape[0], data.shape[1])
    else:
        seq_len, batch = data.shape[0], 1
    return ModuleSpec(cell=rnn_nn._MODE_CELL[module.mode], seq_len=seq_len, batch=batch,
                      input_size=module.input_size, hidden_size=module.hidden_size, proj_size=module.proj_size,
                      num_layers=module.num_layers, bidirectional=module.bidirectional, has_lengths=packed, **common)


def explain(module: torch.nn.Module, input, *, training: bool | None = None) -> Choice:
    """Which backend ``module(input)`` runs on, and why: the module's own ``backend`` when it names one; else
    what ``auto`` chooses, with the tuned measurement or the table row that chose it, or why ``torch`` runs, and
    each faster candidate's refusal. ``print(rnnfast.explain(m, x))`` reads as a sentence."""
    spec = module_spec(module, input, training=training)
    if module.backend != "auto":
        why = refusal(module.backend, spec, for_auto=False)
        return Choice(module.backend, "the module names it (backend=...); explicit backends never fall back" + (
            f", and this call will raise: {why}" if why else ""), auto=False)
    return choose(spec)
