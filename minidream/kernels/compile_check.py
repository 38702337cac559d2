"""Compile the attention kernels ahead of time for a GPU that is not here, and report what ptxas made of them.

CI and most development machines have no GPU, yet the kernels must build for Hopper (sm_90) on the
triton the GPU machine has and on the one CI installs. Triton can compile for any target without a
driver: this module builds the *same* launch plans `kernels/attention.py` would run (same block sizes,
warps, stages, and the same argument specialisation triton's JIT applies: pointers 16-byte aligned,
integers divisible by 16 marked so, integers equal to 1 made constants), compiles them to a cubin, and
reads back per kernel: registers per thread, local memory (register spills: slow), shared memory
(must fit the SM's 227 KiB), and whether the dots became Hopper wgmma instructions.

    python -m minidream.kernels.compile_check [--arch 90] [--out FILE]

It measures no speed; it shows that what a GPU would launch builds and fits.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

from minidream.kernels import attention as A
from minidream.kernels.shapes import SD_SHAPES

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # opt-in max per block, bytes
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def unet_layout(B, H, N, D, dtype):
    """(B, H, N, D) the way the UNet hands it over: a (B, N, H·D) projection viewed per head (no copy)."""
    return torch.empty(B, N, H * D, device="meta", dtype=dtype).view(B, N, H, D).transpose(1, 2)


def sd_plans(B, H, N, M, D, dtype=torch.bfloat16):
    """The three launch plans (forward, dK/dV, dQ) for one attention shape, on meta tensors."""
    q, k, v = unet_layout(B, H, N, D, dtype), unet_layout(B, H, M, D, dtype), unet_layout(B, H, M, D, dtype)
    o = A._output(q)  # written in the UNet's layout, as dO comes back in it
    do = A._output(q)
    lse, delta = (torch.empty(B, H, N, device="meta", dtype=torch.float32) for _ in range(2))
    dq = torch.empty_like(q)
    dk, dv = A._dkdv_outputs(q, k, v)  # fp32 partial sums when the dK/dV pass splits the queries
    backward = A._bwd_plans(q, k, v, do, lse, delta, dq, dk, dv, 0.1)
    return {"fwd": A._fwd_plan(q, k, v, o, lse, 0.1), **dict(zip(("dkdv", "dq"), backward))}


def specialise(kernel, args, backend):
    """Signature, constants and attributes as triton's JIT derives them from the runtime arguments."""
    signature, constants, attrs = {}, {}, {}
    for i, (param, a) in enumerate(zip(kernel.params, args)):
        name = param.name
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", a
        elif isinstance(a, torch.Tensor):
            signature[name] = "*" + DTYPES[a.dtype]
            attrs[(i,)] = backend.parse_attr("D")  # torch allocations are 256-byte aligned
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TypeError(f"{name}: unexpected argument {a!r}")
        elif isinstance(a, float):
            signature[name] = "fp32"
        elif a == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = backend.parse_attr("D")
    return signature, constants, attrs


def resources(cubin: bytes) -> dict:
    """Registers, local memory (spills) and static shared memory, from cuobjdump on the cubin."""
    import triton.backends.nvidia as nvidia
    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(l for l in text.splitlines() if "REG:" in l)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]), "stack_bytes": int(fields["STACK"])}


def compile_plan(plan, arch: int = 90) -> dict:
    kernel, _grid, args, constexprs, options = plan
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constants, attrs = specialise(kernel, args, backend)
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=kernel, signature=signature, constexprs={**constants, **constexprs}, attrs=attrs)
    compiled = triton.compile(src, target=target, options=options)
    r = resources(compiled.asm["cubin"])
    r["shared_bytes"] = compiled.metadata.shared  # dynamic shared memory the launch asks for
    r["fits_shared"] = r["shared_bytes"] <= SHARED_LIMIT.get(arch, 48 * 1024)
    r["spills"] = r["local_bytes"] > 0 or r["stack_bytes"] > 0  # ptxas puts spilled registers on the stack
    ptx = compiled.asm["ptx"]
    r["wgmma"] = "wgmma" in ptx
    # pipelined loads
    r["async_copies"] = ptx.count("cp.async.cg") + ptx.count("cp.async.ca") + ptx.count("cp.async.bulk")
    r["scalar_loads"] = ptx.count("ld.global.b16")  # 2-byte loads: the vectorisation failed somewhere
    return {**constexprs, **options, **r}


def check(shapes: dict, arch: int = 90, dtype=torch.bfloat16) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        for kernel, plan in sd_plans(*shape, dtype=dtype).items():
            row = {"shape": name, "kernel": kernel, **dict(zip("BHNMD", shape)), "grid": list(plan[1]),
                   **compile_plan(plan, arch)}
            rows.append(row)
            shown = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "registers", "stack_bytes", "shared_bytes",
                     "async_copies", "scalar_loads")
            print(f"{name:22s} {kernel:5s} " + " ".join(f"{k}={row[k]}" for k in shown), file=sys.stderr)
    return rows


def main():
    ap = argparse.ArgumentParser(prog="python -m minidream.kernels.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is what it does anyway
    rows = check(SD_SHAPES, a.arch)
    bad = [r for r in rows if r["spills"] or not r["fits_shared"]]
    if a.out:
        import platform
        doc = {"check": "kernel-compile", "target": f"sm_{a.arch}", "triton": triton.__version__,
               "torch": torch.__version__,
               "host": f"cpu ({platform.machine()}), no GPU: compiled ahead of time",
               "command": " ".join(["python -m minidream.kernels.compile_check", *sys.argv[1:]]),
               "dtype": "bf16", "results": rows}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {a.out}", file=sys.stderr)
    print(f"{len(rows)} launches compiled for sm_{a.arch} with triton {triton.__version__}; "
          f"{len(bad)} spill registers or overflow shared memory")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
