"""Compile the Triton kernels for a GPU target without a GPU, exactly as the JIT would, and read what the compiler
says about them.

The launch is built by the backend's own launcher (:func:`rnnfast.backends.triton.forward_launch`) on meta
tensors, and its arguments are specialised by the JIT's own binder (``create_function_from_signature`` and
``_pack_args``): integers equal to 1 become constants, integers and pointers divisible by 16 get
``tt.divisibility``, just as when the kernel is launched. ``triton.compile`` with an explicit target then runs the
whole pipeline down to a cubin (Triton ships ``ptxas``), so a machine without a GPU can check that every kernel
variant compiles, which instructions it uses (tensor-core ``mma``, the barrier's release/acquire atomics) and how
many registers and how much shared memory it needs. Kernels must be real ``JITFunction``s: run this in a process
without ``TRITON_INTERPRET``.

``python -m rnnfast.kernels.aot`` prints the plans chosen for an H200 (the grid sized from these compiles) with
their registers, spills, occupancy and the per-step cost model's prediction.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from ..backends import triton as backend
from . import cost

META = torch.device("meta")


@dataclass
class Compiled:
    kernel: object  # triton's CompiledKernel
    ptx: str
    registers: int
    spill_bytes: int
    shared: int  # bytes of shared memory a program uses
    attrs: dict  # the specialisation it was compiled with: {argument name: attributes}
    constants: list  # runtime arguments the JIT turned into constants (an integer equal to 1)

    def uses(self, instruction: str) -> bool:
        return instruction in self.ptx


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


def specialize(fn, args: tuple, meta: dict, arch: int):
    """``(signature, constexprs, attrs, options)`` the JIT derives for ``fn[grid](*args, **meta)`` on sm_<arch>."""
    target = GPUTarget("cuda", arch, 32)
    be = make_backend(target)
    kwargs = dict(meta)
    binder = create_function_from_signature(fn.signature, fn.params, be)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(be, kwargs, bound_args, specialization, options)
    return target, signature, constexprs, attrs, options


def compile_launch(launch: backend.Launch, arch: int = 90) -> Compiled:
    fn = launch.kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("the kernels were created by the Triton interpreter (TRITON_INTERPRET is set); "
                           "compile them in a process without it")
    args = launch.step_args(0, launch.T) if launch.persistent else launch.step_args(0, 1)
    target, signature, constexprs, attrs, options = specialize(fn, args, launch.meta, arch)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = k.asm["ptx"]
    names = {(i,): n for i, n in enumerate(fn.arg_names)}
    constants = [n for n, t in signature.items() if t == "constexpr" and n not in launch.meta]
    return Compiled(k, ptx, *_resources(ptx, arch), int(k.metadata.shared),
                    {names[p]: a for p, a in attrs.items() if a}, constants)


def _meta_inputs(cell, dtype, T, B, I, H, dirs, has_len, has_bias):
    G = backend.GATES[cell]
    e = lambda *s: torch.empty(*s, dtype=dtype, device=META)  # noqa: E731
    w_ihs = [e(G * H, I) for _ in range(dirs)]
    w_hhs = [e(G * H, H) for _ in range(dirs)]
    b = ([e(G * H) for _ in range(dirs)], [e(G * H) for _ in range(dirs)]) if has_bias else (None, None)
    lengths = torch.empty(B, dtype=torch.int64, device=META) if has_len else None
    c0 = e(dirs, B, H) if cell == "lstm" else None
    return e(T, B, I), e(dirs, B, H), c0, w_ihs, w_hhs, b, lengths


def compile_forward(cell: str, plan: backend.Plan, dtype: torch.dtype, H: int, *, fused: bool, arch: int = 90,
                    reverse: bool = False, has_len: bool = True, has_bias: bool = True, precision: str = "ieee",
                    T: int = 64, B: int | None = None, I: int | None = None, dirs: int = 1) -> Compiled:
    """The forward kernel of ``plan`` as the launcher would launch it for a ``(T, B, I)`` input."""
    B = B or plan.forward.block_b
    I = I or H
    x, h0, c0, w_ihs, w_hhs, (b_ihs, b_hhs), lengths = _meta_inputs(cell, dtype, T, B, I, H, dirs, has_len, has_bias)
    st = backend.forward_launch(cell, x, h0, c0, w_ihs, w_hhs, b_ihs, b_hhs, lengths, reverse, fused=fused, plan=plan)
    st.launch.meta["PRECISION"] = precision
    return compile_launch(st.launch, arch)


def compile_backward(cell: str, plan: backend.Plan, dtype: torch.dtype, H: int, *, arch: int = 90,
                     reverse: bool = False, has_len: bool = True, precision: str = "ieee", T: int = 64,
                     B: int | None = None, I: int | None = None, dirs: int = 1) -> Compiled:
    """The backward's recurrent kernel of ``plan`` as the launcher would launch it."""
    B = B or plan.backward.block_b
    I = I or H
    x, h0, c0, w_ihs, w_hhs, _, lengths = _meta_inputs(cell, dtype, T, B, I, H, dirs, has_len, False)
    ws = torch.empty(backend.workspace_bytes(cell, dirs, T, B, H, dtype), dtype=torch.uint8, device=META)
    gy = torch.empty(T, B, dirs * H, dtype=dtype, device=META)
    launch, *_ = backend.backward_launch(cell, gy, h0, c0, x, w_hhs, lengths, reverse, ws, plan=plan)
    launch.meta["PRECISION"] = precision
    return compile_launch(launch, arch)


def resources_for(cell: str, dtype: torch.dtype, B: int, I: int, H: int, *, arch: int = 90, dirs: int = 1,
                  fused: bool = False, precision: str = "ieee"):
    """``resources(kind, kernel_plan) -> (registers, shared bytes, spilled bytes)`` for
    :func:`rnnfast.backends.triton.make_plan`, from compiles for sm_<arch>; ``resources.compiled(kind,
    kernel_plan)`` is the :class:`Compiled` kernel itself (each compiled once)."""

    @functools.lru_cache(maxsize=None)
    def compiled(kind, kplan) -> Compiled:
        plan = backend.Plan(kplan, kplan)
        if kind == "forward":
            return compile_forward(cell, plan, dtype, H, fused=fused, arch=arch, T=2, B=B, I=I, dirs=dirs,
                                   precision=precision)
        return compile_backward(cell, plan, dtype, H, arch=arch, T=2, B=B, I=I, dirs=dirs, precision=precision)

    def resources(kind, kplan):
        k = compiled(kind, kplan)
        return k.registers, k.shared, k.spill_bytes

    resources.compiled = compiled
    return resources


# The anchors: (a) LSTM bf16 B=16 T=1024 I=H=768, (b) LSTM fp32 B=64 T=100 I=H=512, (c) GRU bf16 B=256
# T=... H=1024.
ANCHORS = {
    "a": ("lstm", torch.bfloat16, 16, 768, 768, "ieee"),
    "b": ("lstm", torch.float32, 64, 512, 512, "tf32"),
    "c": ("gru", torch.bfloat16, 256, 1024, 1024, "ieee"),
}


def report_row(cell, dtype, B, I, H, precision, target: backend.Device, arch: int) -> dict:
    res = resources_for(cell, dtype, B, I, H, arch=arch, precision=precision)
    plan = backend.make_plan(cell, torch.device("cuda"), B, I, H, dtype=dtype, target=target, resources=res)
    row = dict(cell=cell, dtype=str(dtype)[6:], B=B, H=H)
    for kind, kp in (("forward", plan.forward), ("backward", plan.backward)):
        k = res.compiled(kind, kp)
        row[kind] = dict(plan=kp.describe(), programs=math.prod(kp.grid(B, H)), registers=k.registers,
                         spill=k.spill_bytes, shared=k.shared,
                         per_sm=backend.occupancy(k.registers, k.shared, kp.num_warps, target),
                         mma=k.uses("mma.sync") or k.uses("wgmma"))
    row["predicted"] = cost.predict(cell, dtype, B, I, H, plan, target)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90, H100/H200)")
    p.add_argument("--sms", type=int, default=132, help="multiprocessor count to plan for (default 132, H100/H200)")
    args = p.parse_args(argv)
    target = backend.Device(args.sms, arch=args.arch)
    print(f"{'':3} {'cell':5} {'dtype':9} {'B':>4} {'H':>5}  {'kernel':8} {'plan':34} {'progs':>5} {'regs':>4} "
          f"{'spill':>5} {'smem':>6} {'/SM':>3}  predicted us/step (model, not measured)")
    for name, (cell, dtype, B, I, H, precision) in ANCHORS.items():
        row = report_row(cell, dtype, B, I, H, precision, target, args.arch)
        for kind in ("forward", "backward"):
            r = row[kind]
            pred = row["predicted"][kind]
            print(f"({name}) {cell:5} {row['dtype']:9} {B:4} {H:5}  {kind:8} {r['plan']:34} {r['programs']:5} "
                  f"{r['registers']:4} {r['spill']:5} {r['shared']:6} {r['per_sm']:3}  {pred['us']:.2f} "
                  f"({cost.explain(pred)})")


if __name__ == "__main__":
    main()
