"""The registry of named benchmark configurations.

A :class:`Config` is one layer stack to time: cell, batch, hidden size, input size, sequence length, layers,
direction and dtype. Its id spells all of that (``lstm-B64-T100-H512-fp32``, ``gru-B16-T256-H128-I64-L2-bi-bf16``)
and parses back, so ``--configs`` also accepts a shape that is not registered.

Groups (``GROUPS``) name the sets the runner, the pytest-benchmark tests and the plots use:

- ``grid``: the GPU grid, cells {rnn_tanh, gru, lstm} x B {1, 16, 64, 256} x H {128, 256, 512, 1024}
  x T {256, 1024} x {float32, bfloat16, float16}, input size = H, one layer, one direction,
  plus ``bidir`` (a 2-layer bidirectional LSTM per dtype) and the two anchors;
- ``fastrnns``: LSTM T=100, B=64, I=H=512, float32 (PyTorch's own RNN benchmark defaults);
- ``flashrnn-h768``: LSTM B=16, T=1024, I=H=768 in bfloat16 and float16 (cuDNN on an H100, published with
  FlashRNN: 2.01 ms forward, 5.19 ms forward+backward in float16);
- ``quick``: the anchors and a B x H slice in bfloat16, a few minutes on a GPU;
- ``packed``: LSTM and GRU, B=64, T=1024, I=H=512 in bfloat16 and float16, each fed as a ``PackedSequence`` whose
  lengths are drawn uniformly from [1, T] (seeded: :func:`lengths`), followed by its padded twin (every sequence
  T long, the same shape), so the runner can report packed against padded time;
- ``lease``: what one GPU lease benchmarks (``bench/gpu_run.sh``): the anchors, ``packed``, then the rest of
  ``quick``, most important first, since a run that reaches its time limit keeps what it measured;
- ``cpu`` / ``cpu-quick``: small shapes for a machine without a GPU; ``cpu-lease``: the same kinds as ``lease``
  (float32, bfloat16, float16, packed and padded) at toy sizes, for the CPU dry run of ``bench/gpu_run.sh``.

A packed configuration's id ends its shape with ``-packed`` (``lstm-B64-T1024-H512-packed-bf16``).
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from dataclasses import dataclass, field, replace

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
DTYPES = ("float32", "bfloat16", "float16", "float64")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
_DTYPE_ALIASES = {**{d: d for d in DTYPES}, **{s: d for d, s in SHORT.items()}, "half": "float16",
                  "float": "float32"}
_CELL_ALIASES = {**{c: c for c in CELLS}, "rnn": "rnn_tanh", "tanh": "rnn_tanh", "relu": "rnn_relu"}


@dataclass(frozen=True)
class Config:
    """One benchmark configuration. ``input`` is the input size of the first layer."""

    cell: str
    batch: int
    hidden: int
    input: int
    seq_len: int
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    packed: bool = False  # fed as a PackedSequence with the lengths of :func:`lengths`
    # Published numbers to print beside ours, e.g. {"cudnn-H100-float16": {"inference": 2.01, "training": 5.19}}
    # in ms; only as context: a ratio measured in the same run is what counts.
    published: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {CELLS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        for name in ("batch", "hidden", "input", "seq_len", "layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    @property
    def id(self) -> str:
        s = f"{self.cell}-B{self.batch}-T{self.seq_len}-H{self.hidden}"
        if self.input != self.hidden:
            s += f"-I{self.input}"
        if self.layers != 1:
            s += f"-L{self.layers}"
        if self.bidirectional:
            s += "-bi"
        if self.packed:
            s += "-packed"
        return f"{s}-{SHORT[self.dtype]}"

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def layer_inputs(self) -> list[int]:
        """Input size of each layer: the first reads ``input``, the others the previous layer's output."""
        return [self.input] + [self.hidden * self.directions] * (self.layers - 1)

    def padded(self) -> "Config":
        """The same shape fed as a padded tensor (every sequence ``seq_len`` long): a packed one's twin."""
        return replace(self, packed=False, published={})


def lengths(cfg: Config, seed: int = 3) -> list[int]:
    """The sequence lengths of a packed configuration: uniform on [1, T], drawn from ``seed`` (the same in every
    run and on every machine), in batch order."""
    import torch  # here, not at the top: importing the registry stays cheap

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, cfg.seq_len + 1, (cfg.batch,), generator=g).tolist()


_ID_RE = re.compile(r"^(?P<cell>[a-z_]+)-B(?P<B>\d+)-T(?P<T>\d+)-H(?P<H>\d+)(?:-I(?P<I>\d+))?(?:-L(?P<L>\d+))?"
                    r"(?P<bi>-bi)?(?P<packed>-packed)?-(?P<dtype>[a-z0-9]+)$")


def parse_id(text: str) -> Config:
    """The :class:`Config` an id names (the inverse of :attr:`Config.id`); ValueError if it is not one."""
    m = _ID_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a configuration id like 'lstm-B64-T100-H512-fp32' "
                         "(optional -I<input> -L<layers> -bi -packed before the dtype)")
    H = int(m["H"])
    return Config(cell=parse_cell(m["cell"]), batch=int(m["B"]), hidden=H, input=int(m["I"] or H),
                  seq_len=int(m["T"]), layers=int(m["L"] or 1), bidirectional=bool(m["bi"]),
                  packed=bool(m["packed"]), dtype=parse_dtype(m["dtype"]))


def parse_dtype(text: str) -> str:
    try:
        return _DTYPE_ALIASES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {text!r}; expected one of {sorted(_DTYPE_ALIASES)}") from None


def parse_cell(text: str) -> str:
    try:
        return _CELL_ALIASES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown cell {text!r}; expected one of {sorted(_CELL_ALIASES)}") from None


# -- the groups ---------------------------------------------------------------------------------------------------

GRID_CELLS = ("rnn_tanh", "gru", "lstm")
GRID_BATCH = (1, 16, 64, 256)
GRID_HIDDEN = (128, 256, 512, 1024)
GRID_SEQ = (256, 1024)
GRID_DTYPES = ("float32", "bfloat16", "float16")


def _grid(cells, batches, hiddens, seqs, dtypes) -> list[Config]:
    return [Config(cell=c, batch=b, hidden=h, input=h, seq_len=t, dtype=d)
            for c, d, t, h, b in itertools.product(cells, dtypes, seqs, hiddens, batches)]


FASTRNNS = [Config("lstm", batch=64, hidden=512, input=512, seq_len=100, dtype="float32")]
FLASHRNN_H768 = [Config("lstm", batch=16, hidden=768, input=768, seq_len=1024, dtype=d,
                        published={"cudnn, H100, float16 (FlashRNN paper)": {"inference": 2.01, "training": 5.19}})
                 for d in ("bfloat16", "float16")]
BIDIR = [Config("lstm", batch=64, hidden=512, input=512, seq_len=256, layers=2, bidirectional=True, dtype=d)
         for d in GRID_DTYPES]
ANCHORS = FASTRNNS + FLASHRNN_H768
PACKED_AIM = 1.2  # a packed batch should take at most this many times the padded batch of the same shape
# Each packed case is followed by its padded twin: the ratio of the two times is what the packed path costs.
PACKED = [cfg for c, d in itertools.product(("lstm", "gru"), ("bfloat16", "float16"))
          for p in [Config(c, batch=64, hidden=512, input=512, seq_len=1024, dtype=d, packed=True)]
          for cfg in (p, p.padded())]
QUICK = ANCHORS + _grid(GRID_CELLS, (16, 256), (256, 1024), (256,), ("bfloat16",))
_CPU_PACKED = [cfg for c, d in (("lstm", "bfloat16"), ("gru", "float16"))
               for p in [Config(c, batch=4, hidden=16, input=16, seq_len=8, dtype=d, packed=True)]
               for cfg in (p, p.padded())]

GROUPS: dict[str, list[Config]] = {
    "grid": _grid(GRID_CELLS, GRID_BATCH, GRID_HIDDEN, GRID_SEQ, GRID_DTYPES) + BIDIR + ANCHORS,
    "fastrnns": FASTRNNS,
    "flashrnn-h768": FLASHRNN_H768,
    "bidir": BIDIR,
    "anchors": ANCHORS,
    # Enough to plot speedup across B and H in one dtype; the anchors carry the other dtypes.
    "quick": QUICK,
    "packed": PACKED,
    "lease": ANCHORS + PACKED + [c for c in QUICK if c not in ANCHORS],
    "cpu": _grid(GRID_CELLS, (1, 16), (64, 128), (32,), ("float32",))
           + [Config("lstm", batch=4, hidden=32, input=32, seq_len=16, layers=2, bidirectional=True)],
    "cpu-quick": _grid(GRID_CELLS, (8,), (64,), (32,), ("float32",)),
    # The kinds of "lease" at toy sizes: an fp32 anchor-like LSTM, a bfloat16 slice point, packed and padded.
    "cpu-lease": [Config("lstm", batch=4, hidden=16, input=16, seq_len=8)] + _CPU_PACKED
                 + _grid(("rnn_tanh",), (4,), (16,), (8,), ("bfloat16",)),
}

REGISTRY: dict[str, Config] = {c.id: c for group in GROUPS.values() for c in group}


def default_group(device: str, quick: bool) -> str:
    if device == "cuda":
        return "quick" if quick else "grid"
    return "cpu-quick" if quick else "cpu"


def resolve(items: list[str]) -> list[Config]:
    """Configurations named by ``items``: group names, ids (registered or not), or globs over registered ids."""
    out: list[Config] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item in GROUPS:
            out += GROUPS[item]
        elif item in REGISTRY:
            out.append(REGISTRY[item])
        elif any(ch in item for ch in "*?["):
            hits = [c for cid, c in REGISTRY.items() if fnmatch.fnmatchcase(cid, item)]
            if not hits:
                raise ValueError(f"--configs pattern {item!r} matches no registered configuration")
            out += hits
        else:
            try:
                out.append(parse_id(item))
            except ValueError as exc:
                raise ValueError(f"--configs {item!r}: not a group ({', '.join(GROUPS)}), a registered id, a glob "
                                 f"or a valid id: {exc}") from None
    return _unique(out)


def select(configs: list[Config], cells=None, dtypes=None) -> list[Config]:
    """``configs`` restricted to ``cells`` and ``dtypes`` (None keeps all), in order, without duplicates."""
    cells = None if cells is None else {parse_cell(c) for c in cells}
    dtypes = None if dtypes is None else {parse_dtype(d) for d in dtypes}
    return _unique([c for c in configs if (cells is None or c.cell in cells)
                    and (dtypes is None or c.dtype in dtypes)])


def _unique(configs: list[Config]) -> list[Config]:
    seen, out = set(), []
    for c in configs:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def anchor_name(config: Config) -> str | None:
    """The anchor group a configuration belongs to, if any (shown in the tables)."""
    for name in ("fastrnns", "flashrnn-h768"):
        if any(c.id == config.id for c in GROUPS[name]):
            return name
    return None
