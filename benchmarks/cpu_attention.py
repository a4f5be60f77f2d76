"""Decode attention on the CPU over an offloaded KV cache: compiled multiply-and-sum (`decode_attention`,
reduce=True) against the eager matmul form over fp32 copies, PyTorch's fused CPU attention
(`scaled_dot_product_attention` on the half-precision cache as it lies), and a plain read of the same cache bytes.

One layer of OPT-66B (72 heads of 128) at 512 + 16 cached tokens, fp16, token-major as the host cache lays it out.
Run:  python benchmarks/cpu_attention.py [--batches 1,16,48] [--heads 72] [--len 528]
Prints one JSON line per batch: ms per layer for each form and GB/s of cache bytes read.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from zinfer.layers.attention import _compiled_decode, decode_attention


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def eager_upcast(q, keys, values, mask, scale, heads):
    # what the eager host path does: one sequence at a time through reused fp32 buffers, then the matmul form
    k32, v32 = torch.empty(keys[:1].shape), torch.empty(values[:1].shape)
    out = torch.empty(q.shape)
    for b in range(q.shape[0]):
        k32.copy_(keys[b:b + 1])
        v32.copy_(values[b:b + 1])
        out[b:b + 1] = decode_attention(q[b:b + 1].float(), k32, v32, mask[b:b + 1], None, scale, heads)
    return out


def measure(b: int, h: int, d: int, n: int, reps: int) -> dict:
    compiled = _compiled_decode()
    store_k = torch.randn(n + 16, b, h, d).half()  # token-major [T_max, B, H, D], as HostArrays hold it
    store_v = torch.randn(n + 16, b, h, d).half()
    keys, values = store_k[:n].permute(1, 2, 0, 3), store_v[:n].permute(1, 2, 0, 3)
    q = torch.randn(b, h, 1, d).half()
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)

    def fused():
        return compiled(q, keys, values, mask, None, d ** -0.5, h, reduce=True)

    start = time.perf_counter()
    out = fused()
    first = time.perf_counter() - start
    ref = eager_upcast(q, keys, values, mask, d ** -0.5, h)
    nbytes = 2 * keys.numel() * keys.element_size()

    def sdpa():
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=d ** -0.5)

    sdpa_err = ((sdpa().float() - ref).norm() / ref.norm()).item()
    t_s = timed(sdpa, reps)
    t_c = timed(fused, reps)
    t_e = timed(lambda: eager_upcast(q, keys, values, mask, d ** -0.5, h), max(1, reps // 2))
    t_r = timed(lambda: (store_k[:n].sum(), store_v[:n].sum()), reps)
    return dict(batch=b, heads=h, len=n, cache_mib=nbytes / 2**20, threads=torch.get_num_threads(),
                first_call_s=round(first, 2), rel_err=((out - ref).norm() / ref.norm()).item(),
                sdpa_rel_err=sdpa_err, compiled_ms=t_c * 1e3, eager_ms=t_e * 1e3, sdpa_ms=t_s * 1e3,
                read_ms=t_r * 1e3, compiled_gb_s=nbytes / t_c / 1e9, eager_gb_s=nbytes / t_e / 1e9,
                sdpa_gb_s=nbytes / t_s / 1e9, read_gb_s=nbytes / t_r / 1e9, compiled_vs_read=t_r / t_c)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,48")
    ap.add_argument("--heads", type=int, default=72)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--len", type=int, default=528)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    for b in (int(x) for x in args.batches.split(",")):
        print(json.dumps(measure(b, args.heads, args.head_dim, args.len, args.reps)), flush=True)


if __name__ == "__main__":
    main()
