"""A per-step cost model of the kernels' plans (Triton's, and the CUDA library's in :func:`cuda_kernel_step`): what one time step of the persistent schedule costs on one
multiprocessor, in four serial parts. A **prediction**, never a measurement: the constants below are assumptions
about an H100/H200 (public figures and the usual microbenchmark values), to be replaced by what ``bench.barrier``
and ``python -m bench`` measure once a GPU has run the kernels.

Per step, a program (the slowest multiprocessor holds ``ceil(programs / SMs)`` of them) does, in order:

1. **load**: its operand rows from L2: the whole ``h_{t-1}`` (forward; ``d_hid`` backward) row of its batch tile,
   the hoisted input tile, and its weight slice if it is not register-resident: one L2 latency plus the bytes over
   its share of the L2 bandwidth;
2. **mma**: the slice's product, ``K/16`` dependent ``mma.sync`` per accumulator chain (the N/8 chains run side by
   side on the warps), or its throughput if that is longer;
3. **epilogue**: the cell's activations and stores, a fixed number of cycles;
4. **sync**: the grid barrier of the batch tile (release, then acquire-polling an L2 counter), or a kernel launch
   for the per-step schedule.

The steps are chained (step t+1 reads what step t published), so nothing overlaps across steps.
"""

from __future__ import annotations

import math

import torch

from ..backends import triton as backend
from ..reference import GATES

CLOCK_HZ = 1.98e9  # H100 SXM / H200 boost clock
L2_BYTES_PER_S = 5.5e12  # L2 read bandwidth of the whole GPU
SM_L2_BYTES_PER_S = 64 * CLOCK_HZ  # what one SM can pull from L2 (64 bytes a cycle)
L2_LATENCY_S = 0.3e-6  # a dependent L2 round trip under load, including the address arithmetic before it
MMA_LATENCY_CYCLES = 32  # one dependent mma.sync m16n8k16 (16-bit or TF32 per k16 step)
# Dense tensor throughput one SM reaches with mma.sync (about half of the wgmma peak), FLOP/s.
MMA_FLOPS_PER_SM = {torch.bfloat16: 3.7e12, torch.float16: 3.7e12, torch.float32: 1.85e12, torch.float64: 0.25e12}
EPILOGUE_CYCLES = 400  # activations (exp), the where/select of lengths, 4-6 stores
GRID_BARRIER_S = 1.0e-6  # release + acquire-polling of one counter by every program of a tile
CLUSTER_BARRIER_S = 0.2e-6  # one thread-block cluster barrier (barrier.cluster arrive + wait), an assumption
STEP_LAUNCH_S = 5.0e-6  # one kernel launch per step from Python


def kernel_step(kind: str, kp: backend.KernelPlan, cell: str, dtype: torch.dtype, B: int, I: int, H: int,
                target: backend.Device, hoisted: bool = True) -> dict:
    """Predicted µs of one step of one kernel plan, and its parts. Latencies overlap across the programs an SM
    holds; bytes and MMA throughput add up."""
    es = torch.empty((), dtype=dtype).element_size()
    NG, NGP = GATES[cell], backend.gate_slots(cell)
    rows = min(kp.block_b, B)
    if kind == "forward":
        K, N = H, NGP * kp.block_h
        in_bytes = rows * N * 4 if hoisted else rows * I * es  # hoisted gx tile (fp32) or x_t
    else:
        K, N = NG * H, kp.block_h
        in_bytes = rows * kp.block_h * es * (backend.gate_planes(cell) + 1)  # saved gates and dy_t
    k_pad = kp.k_pad(K)
    w_bytes = 0 if kp.w_resident else k_pad * N * es
    program_bytes = rows * K * es + in_bytes + w_bytes
    programs = math.prod(kp.grid(B, H))
    per_sm = math.ceil(programs / target.sms)
    load = L2_LATENCY_S + max(programs * program_bytes / L2_BYTES_PER_S, per_sm * program_bytes / SM_L2_BYTES_PER_S)
    flops = 2 * kp.block_b * k_pad * N * per_sm
    chain_k = kp.block_k if kp.w_resident else k_pad  # resident chunks are independent chains
    mma = max(chain_k / 16 * MMA_LATENCY_CYCLES / CLOCK_HZ, flops / MMA_FLOPS_PER_SM[dtype])
    epilogue = EPILOGUE_CYCLES / CLOCK_HZ
    sync = (GRID_BARRIER_S if kp.needs_sync(H) else 0.0) if kp.schedule == "persistent" else STEP_LAUNCH_S
    parts = dict(load=load, mma=mma, epilogue=epilogue, sync=sync)
    return dict(us=1e6 * sum(parts.values()), **{k: 1e6 * v for k, v in parts.items()})


def predict(cell: str, dtype: torch.dtype, B: int, I: int, H: int, plan: backend.Plan,
            target: backend.Device) -> dict:
    """Predicted µs per step of the forward and the backward's recurrent kernel, with their parts."""
    return {kind: kernel_step(kind, kp, cell, dtype, B, I, H, target)
            for kind, kp in (("forward", plan.forward), ("backward", plan.backward))}


def explain(pred: dict) -> str:
    return " + ".join(f"{k} {pred[k]:.2f}" for k in ("load", "mma", "epilogue", "sync"))


FMA_PER_SM_PER_CYCLE = {torch.float32: 128, torch.float64: 64}  # CUDA-core FMA lanes of one SM (H100)
FMA_EFFICIENCY = 0.25  # the FMA loops' share of that peak: shared-memory operands, a shuffle reduction per chunk


def cuda_kernel_step(kind: str, cell: str, dtype: torch.dtype, B: int, H: int, block_h: int, tensor_cores: bool,
                     sms: int = 132, hoisted: bool = True, m_tile: int = 0, passes: int = 1, cluster: int = 1) -> dict:
    """Predicted µs of one step of the CUDA library's persistent kernels (csrc/layer.cuh): ``ceil(H / block_h)``
    blocks, one a multiprocessor, each with the whole batch; the A operand (``h_{t-1}``, or the step's gate
    gradients backward, in the layer dtype) read from L2 each step, in batch tiles of ``m_tile`` rows (0: one tile),
    each tile's rows staged before its product (a dependent L2 round trip per tile); the product on mma.sync (K split
    over 8 warps; float32 in TF32, ``passes`` 3 for 3xTF32) or FMA; one grid barrier. With ``cluster`` > 1 (tensor
    cores only) each tile is read from L2 once a cluster, not once a block, for two cluster barriers a tile (the
    blocks still take in the whole tile, through distributed shared memory). The same four parts as
    :func:`kernel_step`."""
    G = GATES[cell]
    es = torch.empty((), dtype=dtype).element_size()
    blocks = math.ceil(H / block_h)
    K, N = (H, G * block_h) if kind == "forward" else (G * H, block_h)
    in_bytes = B * G * block_h * 4 if (kind == "forward" and hoisted) else 0  # gx (fp32) of the block's units
    if kind == "backward":
        in_bytes = B * block_h * (es * (backend.gate_planes(cell) + 1) + 8)  # saved gates, dy; dh, direct (fp32)
    program_bytes = B * K * es + in_bytes  # the exchange (h, or the gate gradients) is in the layer dtype
    width = 8 if dtype == torch.float32 else 16  # TF32 mma tiles are 16 x 8, the 16-bit types' 16 x 16
    m_pad, k_pad = (math.ceil(v / 16) * 16 for v in (B, K))
    n_pad = math.ceil(N / width) * width
    m_tile = min(m_tile or m_pad, m_pad)
    batch_tiles = math.ceil(m_pad / m_tile) if tensor_cores else 1
    cluster = cluster if tensor_cores else 1
    l2_bytes = blocks * (B * K * es / cluster + in_bytes)  # a cluster reads the exchanged tile from L2 once
    load = batch_tiles * (L2_LATENCY_S + (2 * CLUSTER_BARRIER_S if cluster > 1 else 0.0)) + max(
        l2_bytes / L2_BYTES_PER_S, program_bytes / SM_L2_BYTES_PER_S)
    if tensor_cores:
        tiles = (m_tile // 16) * (n_pad // width)
        depth = 8 if dtype == torch.float32 else 16
        splits = min(1 if tiles >= 8 else 8 // tiles, k_pad // depth)
        # Dependent mma.syncs on the busiest warp, in k16 steps (a TF32 chunk is half as deep), per batch tile.
        per_warp = math.ceil(tiles * splits / 8) * (k_pad // 16) / splits * passes
        flops = 2 * m_pad * n_pad * k_pad * passes
        mma = max(batch_tiles * per_warp * MMA_LATENCY_CYCLES / CLOCK_HZ, flops / MMA_FLOPS_PER_SM[dtype])
        epilogue = sum(math.ceil(min(m_tile, B - b0) * block_h / 256) for b0 in range(0, B, m_tile)) \
            * EPILOGUE_CYCLES / CLOCK_HZ
    else:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        fmas = B * N * K
        mma = fmas / (FMA_PER_SM_PER_CYCLE[acc] * FMA_EFFICIENCY * CLOCK_HZ)
        # One lane of a warp updates a unit after the shuffle sums: (sequence, chunk) items over 8 warps.
        epilogue = math.ceil(B * math.ceil(block_h / 8) / 8) * 8 * EPILOGUE_CYCLES / 4 / CLOCK_HZ
    parts = dict(load=load, mma=mma, epilogue=epilogue, sync=GRID_BARRIER_S if blocks > 1 else 0.0)
    return dict(us=1e6 * sum(parts.values()), **{k: 1e6 * v for k, v in parts.items()})
