"""Compile the Triton kernels for a GPU target without a GPU, and read what the compiler says about them.

``triton.compile`` with an explicit target runs the whole pipeline down to a cubin (Triton ships ``ptxas``), so a
machine without a GPU can check that every kernel variant compiles, which instructions it uses (tensor-core
``mma``, the barrier's release/acquire atomics) and how many registers it needs and spills. Kernels must be
real ``JITFunction``s: run this in a process without ``TRITON_INTERPRET``.

``python -m rnnfast.kernels.aot`` prints that for the plans chosen for the benchmark's H100 grid.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..backends import triton as backend
from ..reference import compute_dtype
from . import layer

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Arguments in the layer's dtype; every other pointer is in the compute dtype, except these two.
_LAYER_DTYPE_ARGS = {"x_ptr", "w_ih_ptr", "w_hh_ptr", "y_ptr", "hn_ptr", "cn_ptr", "grad_y_ptr"}
_OTHER_ARGS = {"len_ptr": "*i64", "sync_ptr": "*i32"}
_INT_ARGS = {"T", "B", "I", "H", "s_begin", "n_steps", "r_begin"}


@dataclass
class Compiled:
    kernel: object  # triton's CompiledKernel
    ptx: str
    registers: int
    spill_bytes: int

    def uses(self, instruction: str) -> bool:
        return instruction in self.ptx


def _signature(fn, meta: dict, dtype: torch.dtype) -> dict:
    dt, ct = _TYPES[dtype], _TYPES[compute_dtype(dtype)]
    sig = {}
    for name in fn.arg_names:
        if name in meta:
            sig[name] = "constexpr"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name in _OTHER_ARGS:
            sig[name] = _OTHER_ARGS[name]
        else:
            sig[name] = f"*{dt}" if name in _LAYER_DTYPE_ARGS else f"*{ct}"
    return sig


def _resources(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` for the sm_<arch> target."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def _compile(fn, meta: dict, dtype: torch.dtype, arch: int) -> Compiled:
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("the kernels were created by the Triton interpreter (TRITON_INTERPRET is set); "
                           "compile them in a process without it")
    meta = dict(meta)
    # The launch options compile into the kernel as the JIT's do; the rest are its constexprs.
    options = {k: meta.pop(k) for k in ("num_warps", "launch_cooperative_grid") if k in meta}
    src = ASTSource(fn, _signature(fn, meta, dtype), meta)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = k.asm["ptx"]
    return Compiled(k, ptx, *_resources(ptx, arch))


def compile_forward(cell: str, plan: backend.Plan, dtype: torch.dtype, H: int, *, fused: bool, arch: int = 90,
                    reverse: bool = False, has_len: bool = True, has_bias: bool = True,
                    precision: str = "ieee") -> Compiled:
    meta = backend.forward_meta(cell, plan, H, fused=fused, reverse=reverse, has_len=has_len, has_bias=has_bias,
                                precision=precision)
    return _compile(layer.layer_forward_kernel, meta, dtype, arch)


def compile_backward(cell: str, plan: backend.Plan, dtype: torch.dtype, H: int, *, arch: int = 90,
                     reverse: bool = False, has_len: bool = True, precision: str = "ieee") -> Compiled:
    meta = backend.backward_meta(cell, plan, H, reverse=reverse, has_len=has_len, precision=precision)
    return _compile(layer.layer_backward_kernel, meta, dtype, arch)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90, H100)")
    p.add_argument("--sms", type=int, default=132, help="multiprocessor count to plan for (default 132, H100 SXM)")
    args = p.parse_args(argv)
    print(f"{'cell':9} {'dtype':9} {'B':>4} {'H':>5} {'plan':44} {'fwd regs/spill':>15} {'bwd regs/spill':>15}")
    for cell in ("rnn_tanh", "gru", "lstm"):
        for dtype in (torch.bfloat16, torch.float32):
            for B in (16, 64, 256):
                for H in (128, 256, 512, 1024):
                    plan = backend.make_plan(cell, torch.device("cuda"), B, H, H, sm_count=args.sms)
                    f = compile_forward(cell, plan, dtype, H, fused=False, arch=args.arch)
                    b = compile_backward(cell, plan, dtype, H, arch=args.arch)
                    desc = (f"{plan.schedule} b{plan.block_b} h{plan.block_h} k{plan.block_k}"
                            f"{' resident' if plan.w_resident else ''} w{plan.num_warps}")
                    print(f"{cell:9} {str(dtype)[6:]:9} {B:4} {H:5} {desc:44} "
                          f"{f.registers:>9}/{f.spill_bytes:<5} {b.registers:>9}/{b.spill_bytes:<5}")


if __name__ == "__main__":
    main()
