"""rnnfast.nn under DistributedDataParallel (gloo, two CPU processes) against torch.nn under DDP, float64.

Each rank trains a stack LSTM(5, 7, num_layers=2, bidirectional) -> GRU(14, 6) -> Linear on its own shard of a
fixed batch (shards of different sequence lengths; a padded and a PackedSequence case) for two SGD steps. On every
rank the first step's gradients and the parameters after both steps must match those of the same stack built from
torch.nn under DDP, and those of a single-process run over the whole batch (the shard losses are means over equal
shard sizes, so DDP's average of the shard gradients is exactly the whole batch's gradient).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnfast

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
F64 = torch.float64
WORLD_SIZE = 2
STEPS = 2
T_MAX, B, I = 9, 6, 5
SHARD = B // WORLD_SIZE  # equal shard sizes: the mean of the shard losses is the whole batch's loss
# Per-sequence lengths; rank r gets sequences [r * SHARD, (r + 1) * SHARD). In the padded case each rank's shard is
# one dense tensor of its own length (9 and 6); in the packed case lengths vary inside a shard too (unsorted).
LENGTHS = {"padded": (9, 9, 9, 6, 6, 6), "packed": (9, 4, 7, 2, 9, 5)}
# Fixed weights of the loss; the loss is a sum over valid time steps, so padding and packing give the same loss.
C = torch.tensor([0.7, -1.3, 0.4], dtype=F64)
D = torch.tensor([1.1, 0.2, -0.9], dtype=F64)
JOIN_TIMEOUT_S = 120


class _Stack(torch.nn.Module):
    """LSTM(5, 7, 2 layers, bidirectional) -> GRU(14, 6) -> Linear(6, 3) on the outputs and on the GRU's h_n."""

    def __init__(self, ns, **kw):
        super().__init__()
        self.lstm = ns.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=F64, **kw)
        self.gru = ns.GRU(14, 6, dtype=F64, **kw)
        self.head = torch.nn.Linear(6, 3, dtype=F64)

    def forward(self, x):
        y, _ = self.lstm(x)
        z, h = self.gru(y)
        return self.head(z.data if isinstance(z, PackedSequence) else z), self.head(h[-1])


def _loss(outputs, batch_size):
    y, h = outputs
    return (((y * y) @ C).sum() + (h @ D).sum()) / batch_size


def _input(case, step, rows):
    """Sequences ``rows`` (a slice) of step ``step``'s fixed random batch: dense in the padded case, else packed."""
    x = torch.randn(T_MAX, B, I, dtype=F64, generator=torch.Generator().manual_seed(100 + step))[:, rows]
    lengths = LENGTHS[case][rows]
    if case == "padded" and len(set(lengths)) == 1:
        return x[: lengths[0]]
    return pack_padded_sequence(x, list(lengths), enforce_sorted=False)


def _train(model, params_of, inputs, batch_size):
    """SGD steps on ``inputs``; the first step's gradients and the final parameters of ``params_of``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    grads = None
    for x in inputs:
        opt.zero_grad()
        _loss(model(x), batch_size).backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in params_of.named_parameters()}
        opt.step()
    return grads, {n: p.detach().clone() for n, p in params_of.named_parameters()}


def _check_rank(rank, backend, assert_close):
    """Every comparison of one rank; returns the names of the checks that passed."""
    done = []
    for case in LENGTHS:
        shard = slice(rank * SHARD, (rank + 1) * SHARD)
        local = [_input(case, s, shard) for s in range(STEPS)]
        whole = [_input(case, s, slice(0, B)) for s in range(STEPS)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            ours = _Stack(rnnfast.nn, backend=backend)
            theirs = _Stack(torch.nn)
        theirs.load_state_dict(ours.state_dict())
        single = copy.deepcopy(ours)
        shard_only = copy.deepcopy(ours)

        g_ours, p_ours = _train(DDP(ours), ours, local, SHARD)
        g_theirs, p_theirs = _train(DDP(theirs), theirs, local, SHARD)
        g_single, p_single = _train(single, single, whole, B)
        g_shard, _ = _train(shard_only, shard_only, local[:1], SHARD)

        def check(actual, expected, label):
            # A callable msg keeps torch.testing's mismatch report under the label.
            assert_close(actual, expected, msg=lambda report: f"rank {rank} {case}: {label}\n{report}")

        assert g_ours.keys() == g_theirs.keys() == g_single.keys()
        for n in g_ours:
            check(g_ours[n], g_theirs[n], f"step-1 gradient of {n} vs torch.nn DDP")
            check(p_ours[n], p_theirs[n], f"{n} after {STEPS} steps vs torch.nn DDP")
            check(g_ours[n], g_single[n], f"step-1 gradient of {n} vs the single-process whole batch")
            check(p_ours[n], p_single[n], f"{n} after {STEPS} steps vs the single-process whole batch")
        # The shard's own gradient must differ from the whole batch's, or the checks above could not tell whether
        # DDP averaged anything.
        gap = max((g_shard[n] - g_single[n]).abs().max().item() for n in g_single)
        assert gap > 1e-3, f"rank {rank} {case}: shard and whole-batch gradients differ by only {gap:.1e}"
        done += [f"{case}: vs torch.nn DDP", f"{case}: vs single process"]
    return done


def _worker(rank, init_method, backend, out_dir):
    """One DDP rank (module level so that spawn can pickle it). A failure propagates through mp's error file."""
    sys.path.insert(0, TESTS_DIR)
    from conftest import assert_close

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        done = _check_rank(rank, backend, assert_close)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(done, f)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_ddp_matches_torch_nn(backend, tmp_path):
    init_method = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.start_processes(_worker, args=(init_method, backend, str(tmp_path)), nprocs=WORLD_SIZE, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        # join raises ProcessRaisedException with the worker's traceback when a rank fails (and ends the others).
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"DDP workers still running after {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    for rank in range(WORLD_SIZE):
        done = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert done == [f"{c}: vs {w}" for c in LENGTHS for w in ("torch.nn DDP", "single process")], done
