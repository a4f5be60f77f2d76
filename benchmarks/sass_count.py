"""Instructions in the main loop of the tensor-core GEMV (_gemv_mma_kernel), compiled offline for sm_90: no GPU
needed, only Triton (its bundled ptxas and cuobjdump). The figure BENCHMARKS.md quotes per code.

  python benchmarks/sass_count.py [--bits 4] [--tiles 1] [--warps 4] [--gpi 2] [--fp16]
"""

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zinfer.quant import triton_kernels as tk


def compile_offline(bits=4, group=64, tiles=1, warps=4, gpi=2, bf16=True, has_zero=True):
    """The kernel built for sm_90 (no GPU needed): Triton's CompiledKernel (asm["ttgir"], asm["cubin"], ...)."""
    half = "bf16" if bf16 else "fp16"
    sig = {"x_ptr": "*i64", "q_ptr": "*i64", "s_ptr": f"*{half}", "z_ptr": f"*{half}", "out_ptr": f"*{half}",
           **{name: "i32" for name in ("M", "N", "NG", "G_PER_SPLIT", "stride_xm", "stride_qn", "stride_sn",
                                       "stride_os", "stride_om")}}  # fmt: skip
    const = {"BITS": bits, "GROUP": group, "HAS_ZERO": has_zero, "X_BF16": bf16, "TILES": tiles, "WARPS": warps,
             "GPI": gpi, "ASM": True}  # fmt: skip
    names = list(sig) + list(const)
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(fn=tk._gemv_mma_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--tiles", type=int, default=1, choices=(1, 2))
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--gpi", type=int, default=2)
    p.add_argument("--fp16", action="store_true", help="fp16 x (default bf16)")
    a = p.parse_args()
    kernel = compile_offline(a.bits, a.group, a.tiles, a.warps, a.gpi, not a.fp16)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?);", sass)]
    back = [(int(m.group(1), 16), a) for a, t in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", t))
            and int(m.group(1), 16) < a]  # fmt: skip
    lo, hi = back[0]
    body = [t for a, t in ins if lo <= a <= hi]
    ops = Counter(re.sub(r"^@!?U?P[0-9T] ", "", t).split()[0].split(".")[0] for t in body)
    codes = a.group // 4 * 2 * a.tiles * a.gpi  # per lane and loop step: a quarter of each group of two rows
    print(f"int{a.bits} g{a.group} {'fp16' if a.fp16 else 'bf16'} TILES={a.tiles} WARPS={a.warps} GPI={a.gpi}: "
          f"loop body {len(body)} instructions for {codes} codes per lane = {len(body) / codes:.2f} per code")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
