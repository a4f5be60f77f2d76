"""Instructions in the main loop of the quantized GEMVs, compiled offline for sm_90: no GPU needed, only Triton (its
bundled ptxas and cuobjdump). The figures BENCHMARKS.md quotes per code.

  python benchmarks/sass_count.py [--kernel mma|words] [--bits 4] [--group 64] [--fp16]
                                  mma:   [--tiles 1] [--warps 4] [--gpi 2]
                                  words: [--block-n 8] [--block-w 128] [--warps 4] [--narrow] [--prefetch]

Pointers, row strides and N are compiled as multiples of 16, as Triton specialises them at a launch on real
weights (without it the word kernel's x loads are not vectorised and go through shared memory).
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

ALIGNED = ("x_ptr", "q_ptr", "s_ptr", "z_ptr", "out_ptr", "N", "KU", "stride_xm", "stride_qn", "stride_sn",
           "stride_os", "stride_om")  # fmt: skip


def _build(fn, sig: dict, const: dict, warps: int):
    names = list(sig) + list(const)
    sig = {**sig, **{k: "constexpr" for k in const}}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in ALIGNED if k in names})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})


def compile_offline(bits=4, group=64, tiles=1, warps=4, gpi=2, bf16=True, has_zero=True, pdl=False):
    """The MMA kernel built for sm_90 (no GPU needed): Triton's CompiledKernel (asm["ttgir"], asm["cubin"], ...)."""
    half = "bf16" if bf16 else "fp16"
    sig = {"x_ptr": "*i64", "q_ptr": "*i64", "s_ptr": f"*{half}", "z_ptr": f"*{half}", "out_ptr": f"*{half}",
           **{name: "i32" for name in ("M", "N", "NG", "G_PER_SPLIT", "stride_xm", "stride_qn", "stride_sn",
                                       "stride_os", "stride_om")}}  # fmt: skip
    const = {"BITS": bits, "GROUP": group, "HAS_ZERO": has_zero, "X_BF16": bf16, "TILES": tiles, "WARPS": warps,
             "GPI": gpi, "ASM": True, "PDL": pdl}  # fmt: skip
    return _build(tk._gemv_mma_kernel, sig, const, warps)


def compile_words(bits=4, group=64, block_n=8, block_w=128, warps=4, wide=True, prefetch=False, bf16=True,
                  pdl=False):
    """The word kernel (one row of x) built for sm_90."""
    half = "bf16" if bf16 else "fp16"
    sig = {"x_ptr": "*i32", "q_ptr": "*i64" if wide else "*i32", "s_ptr": f"*{half}", "z_ptr": f"*{half}",
           "out_ptr": f"*{half}", **{name: "i32" for name in ("M", "N", "KU", "U_PER_SPLIT", "stride_xm", "stride_qn",
                                                              "stride_sn", "stride_os", "stride_om")}}  # fmt: skip
    const = {"BITS": bits, "GROUP": group, "HAS_ZERO": True, "X_BF16": bf16, "WIDE": wide, "BLOCK_M": 1,
             "BLOCK_N": block_n, "BLOCK_W": block_w, "PREFETCH": prefetch, "ASM": True, "PDL": pdl}  # fmt: skip
    return _build(tk._gemv_words_kernel, sig, const, warps)


def loop_body(kernel) -> list[str]:
    """The SASS instructions of the kernel's first loop (up to its first backward branch)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?);", sass)]
    back = [(int(m.group(1), 16), a) for a, t in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", t))
            and int(m.group(1), 16) < a]  # fmt: skip
    lo, hi = back[0]
    return [t for a, t in ins if lo <= a <= hi]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", choices=("mma", "words"), default="mma")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--tiles", type=int, default=1, choices=(1, 2))
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--gpi", type=int, default=2)
    p.add_argument("--block-n", type=int, default=8)
    p.add_argument("--block-w", type=int, default=128)
    p.add_argument("--narrow", action="store_true", help="words: one 32-bit word per load (default two)")
    p.add_argument("--prefetch", action="store_true")
    p.add_argument("--fp16", action="store_true", help="fp16 x (default bf16)")
    p.add_argument("--pdl", action="store_true", help="built for dependent launch (first tile before the wait)")
    a = p.parse_args()
    if a.kernel == "mma":
        body = loop_body(compile_offline(a.bits, a.group, a.tiles, a.warps, a.gpi, not a.fp16, pdl=a.pdl))
        codes = a.group // 4 * 2 * a.tiles * a.gpi  # per lane and loop step: a quarter of each group of two rows
        what = f"TILES={a.tiles} WARPS={a.warps} GPI={a.gpi}"
    else:
        body = loop_body(compile_words(a.bits, a.group, a.block_n, a.block_w, a.warps, not a.narrow, a.prefetch,
                                       not a.fp16, a.pdl))
        units = a.block_w // (32 * a.warps)  # per thread and loop step, for each of BLOCK_N weight rows
        codes = units * (1 if a.narrow else 2) * (32 // a.bits) * a.block_n
        what = f"BLOCK_N={a.block_n} BLOCK_W={a.block_w} warps={a.warps} {'narrow' if a.narrow else 'wide'}"
    ops = Counter(re.sub(r"^@!?U?P[0-9T] ", "", t).split()[0].split(".")[0] for t in body)
    print(f"{a.kernel} int{a.bits} g{a.group} {'fp16' if a.fp16 else 'bf16'} {what}: loop body {len(body)} "
          f"instructions for {codes} codes per thread = {len(body) / codes:.2f} per code")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
