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

(c) `--torchtune` (scenario `decode_torchtune`): per token against torchtune 0.6.1's
    `MultiHeadAttention` + `KVCache` (its own cache, max_seq_len = prompt + tokens, bias=False, eager),
    the same weights and interleaved RoPE pairs on both sides (outputs checked equal), paired rounds,
    and a profiled breakdown of each variant's step. torchtune is imported lazily, only here
    (`pip install torchtune==0.6.1 --no-deps`; nothing else is needed, see `load_torchtune`).

    python -m multihead.benchmarks.decode [--tokens 1024] [--no-compile] [--baseline-stride 8]   # prints JSON
    python -m multihead.benchmarks.decode --torchtune [--rounds 5] [--threads 2] [--cache-len N]  # + a table
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        per_token: dict[str, list[float]] = {name: [] for name in steps}
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


# ---- against torchtune's cache (per token, a ratio that does not move with the machine) -------------------
def load_torchtune():
    """torchtune's `MultiHeadAttention`, `KVCache`, `RotaryPositionalEmbeddings` (benchmark environment
    only: `pip install torchtune==0.6.1 --no-deps`). Its package __init__ imports its datasets and
    models (datasets, torchao, ...), which these three modules never use: when that import fails, the
    three are loaded from the installed files under empty parent packages."""
    try:
        from torchtune.modules import KVCache as TTCache
        from torchtune.modules import MultiHeadAttention as TTAttention
        from torchtune.modules import RotaryPositionalEmbeddings as TTRope

        return TTAttention, TTCache, TTRope
    except ImportError:
        pass
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchtune is not installed: pip install torchtune==0.6.1 --no-deps")
    root = spec.submodule_search_locations[0]
    for name in ("torchtune", "torchtune.modules", "torchtune.utils"):
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            package = types.ModuleType(name)
            package.__path__ = [root + name[len("torchtune") :].replace(".", "/")]
            sys.modules[name] = package
    attention = importlib.import_module("torchtune.modules.attention")
    cache = importlib.import_module("torchtune.modules.kv_cache")
    rope = importlib.import_module("torchtune.modules.position_embeddings")
    return attention.MultiHeadAttention, cache.KVCache, rope.RotaryPositionalEmbeddings


def torchtune_benchmark(
    tokens: int = 1024,
    prompt: int = 16,
    E: int = 512,
    H: int = 8,
    kv_heads: int = 2,
    *,
    rounds: int = 5,
    threads: int | None = None,
    compile: bool = True,
    profile: bool = True,
    cache_len: int | None = None,
    seed: int = 0,
) -> dict:
    """ms per generated token: ours (eager, and the step compiled) against torchtune 0.6.1's
    `MultiHeadAttention` + `KVCache` (its own cache, max_seq_len = prompt + tokens, bias=False, eager),
    one layer, B=1, RoPE, the same weights (outputs checked equal). `rounds` paired rounds, each a full
    prefill + decode of every variant in a rotating order; medians of the per-round ratios with their
    spread. `breakdown`: each variant's step under torch.profiler (top ops by self CPU time per step).

    Also in the rounds: `floor`, the same step written in plain torch ops for this one configuration
    (told the structure: one sequence, its length a Python int; no checks, no dispatch), eager: what
    ours costs above it is our own overhead. And, compiled, `compiled_masked`: the step with the
    attention forced to the SDPA backend, which attends all of the cache's keys, masked (what a
    compiled step did before `KVCache.attend`). cache_len: our caches' max_len (default prompt +
    tokens; larger shows what attending only the cached keys buys)."""
    TTAttention, _, TTRope = load_torchtune()
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _torchtune_run(
            TTAttention, TTRope, tokens, prompt, E, H, kv_heads, rounds, compile, profile, cache_len, seed
        )
    finally:
        torch.set_num_threads(saved)


def _floor_step(ours: MultiheadAttention, k_buf: Tensor, v_buf: Tensor):
    """Our decode step for this configuration in the fewest plain torch ops (B=1, no bias, GQA,
    interleaved RoPE; `t` the token's position, a Python int): the floor of a decode step."""
    w_q, w_k, w_v, w_o = ours.q_proj_weight, ours.k_proj_weight, ours.v_proj_weight, ours.out_proj.weight
    H, Hkv, D = ours.num_heads, ours.num_kv_heads, ours.head_dim
    assert ours.rotary is not None and ours.rotary.interleaved  # the configuration this floor is written for
    table = ours.rotary.table  # (N, 2, D): cos, signed sin

    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return torch.addcmul(x * cos, x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2), sin)

    def step(h: Tensor, t: int) -> Tensor:  # (1, 1, E) -> (1, 1, E)
        q = F.linear(h, w_q).view(1, 1, H, D).transpose(1, 2)  # (1, H, 1, D)
        k = F.linear(h, w_k).view(1, 1, Hkv, D).transpose(1, 2)  # (1, Hkv, 1, D)
        v = F.linear(h, w_v).view(1, 1, Hkv, D).transpose(1, 2)
        cos, sin = table[t].unbind(0)  # (D,) x2
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_buf[:, :, t : t + 1].copy_(k)
        v_buf[:, :, t : t + 1].copy_(v)
        out = F.scaled_dot_product_attention(  # the G query heads of a kv head as its rows
            q.reshape(1, Hkv, H // Hkv, D), k_buf[:, :, : t + 1], v_buf[:, :, : t + 1]
        )
        return F.linear(out.reshape(1, 1, H * D), w_o)

    return step


def _torchtune_run(TTAttention, TTRope, tokens, prompt, E, H, kv_heads, rounds, compile, profile, cache_len, seed):
    total, D = prompt + tokens, E // H
    cache_len = cache_len or total
    torch.manual_seed(seed)
    x = torch.randn(1, total, E)  # the layer's input rows
    # ours: interleaved RoPE pairs, torchtune's convention, so both compute the same function
    rope = RotaryEmbedding(D, interleaved=True, max_seq_len=cache_len)
    ours = MultiheadAttention(E, H, dropout=0.0, bias=False, num_kv_heads=kv_heads, rotary=rope)
    linear = functools.partial(nn.Linear, bias=False)
    theirs = TTAttention(
        embed_dim=E,
        num_heads=H,
        num_kv_heads=kv_heads,
        head_dim=D,
        q_proj=linear(E, H * D),
        k_proj=linear(E, kv_heads * D),
        v_proj=linear(E, kv_heads * D),
        output_proj=linear(E, E),
        pos_embeddings=TTRope(D, max_seq_len=total),
        max_seq_len=total,
        is_causal=True,
    )
    with torch.no_grad():
        theirs.q_proj.weight.copy_(ours.q_proj_weight)
        theirs.k_proj.weight.copy_(ours.k_proj_weight)
        theirs.v_proj.weight.copy_(ours.v_proj_weight)
        theirs.output_proj.weight.copy_(ours.out_proj.weight)
    theirs.setup_cache(1, torch.float32, total)  # its own KVCache(max_seq_len=total), enabled
    ours.train()
    theirs.train()  # dropout 0 in both: train mode as the forward convention, no eval fast paths
    causal = torch.ones(total, total, dtype=torch.bool).tril_()  # torchtune's mask: True = may attend
    positions = torch.arange(total)[None]  # (1, total)
    names = ("eager", "compiled", "compiled_masked") if compile else ("eager",)
    caches = {name: KVCache(1, cache_len, kv_heads, D) for name in (*names, "floor")}
    masked = copy.deepcopy(ours)
    masked.backend = "sdpa"  # a forced backend: the compiled step attends all of the cache's keys, masked
    steps = {name: _step(masked if name == "compiled_masked" else ours, caches[name]) for name in names}
    floor = _floor_step(ours, caches["floor"].k, caches["floor"].v)

    def tt_step(t0: int, t1: int) -> torch.Tensor:  # tokens t0 .. t1-1, as torchtune's generate() feeds them
        pos = positions[:, t0:t1]
        return theirs(x[:, t0:t1], x[:, t0:t1], mask=causal[None, t0:t1], input_pos=pos)

    def decode(name: str, end: int = total) -> tuple[list[torch.Tensor], float]:
        """Prefill the prompt, then decode token by token up to `end`; returns the outputs and the
        seconds the decode steps took (the prefill is not timed)."""
        if name == "torchtune":
            theirs.reset_cache()
            rows = [tt_step(0, prompt)]
            t0 = time.perf_counter()
            rows += [tt_step(t, t + 1) for t in range(prompt, end)]
            return rows, time.perf_counter() - t0
        caches[name].reset()
        rows = [_step(ours, caches[name])(x[:, :prompt])]  # prefill eager
        if name == "floor":
            t0 = time.perf_counter()
            rows += [floor(x[:, t : t + 1], t) for t in range(prompt, end)]
            return rows, time.perf_counter() - t0
        step = steps[name]
        t0 = time.perf_counter()
        rows += [step(x[:, t : t + 1]) for t in range(prompt, end)]
        return rows, time.perf_counter() - t0

    result: dict = {
        "scenario": "decode_torchtune",
        "config": {
            "tokens": tokens,
            "prompt": prompt,
            "E": E,
            "H": H,
            "kv_heads": kv_heads,
            "batch": 1,
            "cache_len": cache_len,
        },
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torchtune_baseline": "torchtune 0.6.1 MultiHeadAttention + KVCache(max_seq_len=prompt+tokens), bias=False, "
        "RotaryPositionalEmbeddings, eager, bool causal mask rows and input_pos per step as its generate() does",
    }
    with torch.no_grad():
        for name in names[1:]:  # static shapes: (1, 1, E) in, the cache's buffers fixed; prefill stays eager
            steps[name] = torch.compile(steps[name], fullgraph=True, dynamic=False)
            caches[name].reset()
            _step(ours, caches[name])(x[:, :prompt])
            t0 = time.perf_counter()
            steps[name](x[:, prompt : prompt + 1])
            result[f"ours_{name}_compile_s"] = time.perf_counter() - t0
        names = ["torchtune", *steps, "floor"]
        outs = {name: torch.cat(decode(name)[0], 1) for name in names}  # also the warm-up
        for name in names[1:]:
            result[f"max_abs_diff_{name}_vs_torchtune"] = (outs[name] - outs["torchtune"]).abs().max().item()
        per_token: dict[str, list[float]] = {name: [] for name in names}
        loads = []
        for r in range(rounds):
            loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                per_token[name].append(1e3 * decode(name)[1] / tokens)
        # profiled: the first 128 steps (the profiler's bookkeeping over 1024 steps takes minutes)
        sample = min(tokens, 128)
        breakdown = {name: _profile(name, decode, prompt + sample, sample) for name in names} if profile else {}

    def paired(a: str, b: str) -> dict:
        ratios = [x / y for x, y in zip(per_token[a], per_token[b])]
        return {"median": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}

    for name, values in per_token.items():
        result[f"{name}_ms_per_token"] = statistics.median(values)
        result[f"{name}_spread_ms"] = [min(values), max(values)]
    for name in names[1:]:
        result[f"torchtune_over_{name}"] = paired("torchtune", name)
    result["eager_over_floor"] = paired("eager", "floor")
    if compile:
        result["eager_over_compiled"] = paired("eager", "compiled")
        result["compiled_masked_over_compiled"] = paired("compiled_masked", "compiled")
    result["load_avg_1min"] = loads
    result["breakdown"] = breakdown
    return result


def _profile(name: str, decode, end: int, tokens: int) -> dict:
    """A decode of `name` up to position `end` (`tokens` steps after the prefill) under torch.profiler:
    ms per token, and the ops that take most self CPU time in microseconds per token (the prefill is
    one call among them; what is not in an op is Python, dispatch and, compiled, the guards)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = decode(name, end)[1]
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    in_ops = sum(e.self_cpu_time_total for e in ops) / tokens
    return {
        "profiled_ms_per_token": 1e3 * seconds / tokens,
        "us_per_token_in_ops": round(in_ops, 1),
        "top_ops_us_per_token": {e.key: round(e.self_cpu_time_total / tokens, 1) for e in ops[:10]},
    }


def table(result: dict, machine: str = "") -> str:
    """BENCHMARKS.md-ready rows of a decode_torchtune result."""
    lines = [
        f"Decode, one layer, B=1, E={result['config']['E']}, H={result['config']['H']}, "
        f"{result['config']['kv_heads']} kv heads, RoPE, {result['config']['prompt']}-token prompt then "
        f"{result['config']['tokens']} tokens, our caches' max_len {result['config']['cache_len']}; "
        f"{result['threads']} threads; {machine}",
        "",
        "| variant | ms per token (median) | spread | torchtune / variant (paired median, spread) |",
        "|---|---|---|---|",
    ]
    for name in ("torchtune", "eager", "compiled", "compiled_masked", "floor"):
        if f"{name}_ms_per_token" not in result:
            continue
        low, high = result[f"{name}_spread_ms"]
        ratio = result.get(f"torchtune_over_{name}")
        shown = f"{ratio['median']:.2f} ({ratio['spread'][0]:.2f}-{ratio['spread'][1]:.2f})" if ratio else "1"
        label = {
            "torchtune": "torchtune 0.6.1 MHA + KVCache",
            "eager": "ours, eager",
            "compiled": "ours, compiled step",
            "compiled_masked": "ours, compiled, all max_len keys masked",
            "floor": "floor: the step in plain torch ops, eager",
        }
        lines.append(f"| {label[name]} | {result[f'{name}_ms_per_token']:.3f} | {low:.3f}-{high:.3f} | {shown} |")
    lines.append("")
    for key in ("eager_over_compiled", "eager_over_floor", "compiled_masked_over_compiled"):
        if key in result:
            e = result[key]
            what = key.replace("_over_", " / ")
            lines.append(f"{what}: {e['median']:.3f} (spread {e['spread'][0]:.3f}-{e['spread'][1]:.3f})  ")
    return "\n".join(lines)


SCENARIOS = {"decode": decode_benchmark, "decode_torchtune": torchtune_benchmark}


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
    parser.add_argument("--torchtune", action="store_true", help="per token against torchtune 0.6.1's cache instead")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (--torchtune)")
    parser.add_argument("--cache-len", type=int, default=None, help="our caches' max_len (--torchtune)")
    args = parser.parse_args(argv)
    if args.torchtune:
        result = torchtune_benchmark(
            args.tokens, args.prompt, args.E, args.H, args.kv_heads,
            rounds=args.rounds, threads=args.threads, compile=not args.no_compile, cache_len=args.cache_len,
        )  # fmt: skip
        from .bench import machine

        info = machine()
        result["machine"] = info
        print(json.dumps(result, indent=2))
        print(table(result, f"{info['cpu']}, {info.get('caches', '')}"))
        return result
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
