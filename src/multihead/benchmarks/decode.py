"""Decode benchmark: one attention layer generating token by token.

(a) ours: `MultiheadAttention` with grouped-query heads and RoPE, B=1; prefill `prompt` tokens into a
    `KVCache`, then decode `tokens` tokens one at a time (eager, and the decode step under
    `torch.compile(fullgraph=True)` with static shapes; compile time reported separately).
(b) torch: `torch.nn.MultiheadAttention(E, H, batch_first=True)` with no cache: each step the whole
    prefix is the query, `need_weights=False`, a causal bool mask (with the `is_causal=True` hint, so
    torch takes its fastest causal path).

Both modules in train mode with dropout 0 under `torch.no_grad()` (DESIGN.md's forward convention).
Layer inputs are random (B, prompt + tokens, E) rows, fed one per step. Reports ms per generated
token for each, and torch / ours.

    python -m multihead.benchmarks.decode [--tokens 1024] [--no-compile] [--baseline-stride 8]   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from multihead import MultiheadAttention
from multihead.cache import KVCache
from multihead.rotary import RotaryEmbedding


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours_module(E: int, H: int, kv_heads: int, max_len: int, device, dtype) -> MultiheadAttention:
    rope = RotaryEmbedding(E // H, max_seq_len=max_len, device=device)
    return MultiheadAttention(E, H, dropout=0.0, num_kv_heads=kv_heads, rotary=rope, device=device, dtype=dtype)


def decode_benchmark(
    tokens: int = 1024,
    prompt: int = 16,
    E: int = 512,
    H: int = 8,
    kv_heads: int = 2,
    compile: bool = True,
    *,
    repeats: int = 3,
    baseline_stride: int = 1,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Time (a) ours with a KV cache and (b) torch recomputing the prefix; see the module docstring.

    repeats: full decodes of ours per variant (median and spread reported).
    baseline_stride: time torch on every k-th step only (the midpoint of each run of k prefix
        lengths) and average: an estimate of its mean step time that is k times cheaper to get.
    threads: torch CPU threads for the run (restored afterwards); default: leave as is.
    """
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(tokens, prompt, E, H, kv_heads, compile, repeats, baseline_stride, device, dtype, seed)
    finally:
        torch.set_num_threads(saved)


def _run(tokens, prompt, E, H, kv_heads, compile, repeats, baseline_stride, device, dtype, seed) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = prompt + tokens
    torch.manual_seed(seed)
    x = torch.randn(1, total, E, device=dev, dtype=dtype)  # the layer's input rows, one per step
    attn = _ours_module(E, H, kv_heads, total, dev, dtype)
    theirs = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True, device=dev, dtype=dtype)
    causal = torch.ones(total, total, dtype=torch.bool, device=dev).triu_(1)  # True = may not attend
    caches = {
        name: KVCache(1, total, kv_heads, E // H, device=dev, dtype=dtype)
        for name in (("eager", "compiled") if compile else ("eager",))
    }
    result: dict = {
        "scenario": "decode",
        "config": {"tokens": tokens, "prompt": prompt, "E": E, "H": H, "kv_heads": kv_heads, "batch": 1},
        "device": str(dev),
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_baseline": "nn.MultiheadAttention, whole prefix as query, causal bool mask + is_causal hint",
    }

    def timed(fn, *args) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        fn(*args)
        _sync(dev)
        return time.perf_counter() - t0

    def torch_step(i: int) -> None:
        n = prompt + i + 1  # the query is the whole prefix, new token included
        q = x[:, :n]
        theirs(q, q, q, attn_mask=causal[:n, :n], need_weights=False, is_causal=True)

    with torch.no_grad():
        steps = {name: _step(attn, cache) for name, cache in caches.items()}
        # correctness: the cached decode equals one causal pass over the whole sequence
        cache = caches["eager"]
        cache.reset()
        rows = [steps["eager"](x[:, :prompt])] + [steps["eager"](x[:, t : t + 1]) for t in range(prompt, total)]
        full = attn(x, x, x, need_weights=False, is_causal=True)[0]
        result["ours_max_abs_diff_vs_full_pass"] = (torch.cat(rows, 1) - full).abs().max().item()
        if compile:  # static shapes: (1, 1, E) in, the cache's buffers fixed; prefill stays eager
            steps["compiled"] = torch.compile(steps["compiled"], fullgraph=True, dynamic=False)
            caches["compiled"].reset()
            _step(attn, caches["compiled"])(x[:, :prompt])
            result["ours_compile_s"] = timed(steps["compiled"], x[:, prompt : prompt + 1])
        torch_step(0)  # warm-up

        # repeats interleave the variants (ours eager, ours compiled, a share of torch's steps), so
        # load on the machine hits them alike; within a repeat each decodes back to back, as a
        # one-layer decode loop would (its weights stay in cache, see the notes)
        sampled = list(range(min(baseline_stride // 2, tokens - 1), tokens, baseline_stride))
        per_token = {name: [] for name in steps}
        prefill = []
        torch_times = []
        for r in range(repeats):
            for name, cache in caches.items():
                cache.reset()
                seconds = timed(_step(attn, cache), x[:, :prompt])  # prefill: eager
                if name == "eager":
                    prefill.append(seconds)
                step = steps[name]
                _sync(dev)
                t0 = time.perf_counter()
                for t in range(prompt, total):
                    step(x[:, t : t + 1])
                _sync(dev)
                per_token[name].append(1e3 * (time.perf_counter() - t0) / tokens)
            these = [timed(torch_step, i) for i in sampled[r::repeats]]
            torch_times += these
            result.setdefault("torch_ms_per_token_by_repeat", []).append(
                1e3 * statistics.fmean(these) if these else None
            )

    result["ours_prefill_ms"] = 1e3 * statistics.median(prefill)
    result["torch_ms_per_token"] = 1e3 * statistics.fmean(torch_times)
    result["torch_steps_timed"] = len(torch_times)
    for name, values in per_token.items():
        result[f"ours_{name}_ms_per_token"] = statistics.median(values)
        result[f"ours_{name}_spread"] = [min(values), max(values)]
        result[f"ratio_{name}"] = result["torch_ms_per_token"] / statistics.median(values)
    result["ratio"] = max(result[f"ratio_{name}"] for name in per_token)
    return result


def _step(attn: MultiheadAttention, cache: KVCache):
    def step(h: torch.Tensor) -> torch.Tensor:  # (1, L, E) -> (1, L, E)
        return attn(h, h, h, need_weights=False, kv_cache=cache)[0]

    return step


SCENARIOS = {"decode": decode_benchmark}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--E", type=int, default=512)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-stride", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    result = decode_benchmark(
        args.tokens,
        args.prompt,
        args.E,
        args.H,
        args.kv_heads,
        not args.no_compile,
        repeats=args.repeats,
        baseline_stride=args.baseline_stride,
        device=args.device,
        threads=args.threads,
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
