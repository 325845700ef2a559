"""GPU benchmarks: bfloat16, E=1024, H=16, B*L = 16k tokens, L = 1k, 4k, 8k.

    python -m multihead.benchmarks.gpu --out DIR [--lengths 1024 4096 8192] [--tokens 16384]
                                       [--rounds 7] [--decode-tokens 256] [--quick]

Rows (each one `torch` against `ours`, self-attention on (B, L, E) inputs, modules in train mode with
dropout 0 under `torch.no_grad()` unless training):
- `weights_module`: the whole module with need_weights=True (average_attn_weights=True), torch's
  nn.MultiheadAttention against ours (dispatch picks the Triton kernel on CUDA).
- `weights_attention`: the attention part alone: torch's math on (B*H, L, D) (bmm, softmax, bmm, mean
  over heads, as nn.MultiheadAttention does) against our Triton kernel on (B, H, L, D).
- `noweights_module`: need_weights=False, ours against the floor (one fused in-projection, plain SDPA,
  out-projection); torch's module reported beside.
- `train_weights`: forward + backward of the module with need_weights=True (loss = out.sum(); the
  weights are returned but not differentiated), torch against ours.
- `decode`: tokens/s of one attention layer (E, H, 4 kv heads, RoPE) decoding after a prompt, B=1,
  each step compiled with mode="reduce-overhead" (CUDA graphs): ours (MultiheadAttention + KVCache)
  against the same projections and SDPA with torchtune's KVCache (skipped if torchtune is missing).

Timing: CUDA events; each sample repeats the call until it lasts >= 50 ms; rounds interleave the
variants; the median ratio is reported with its spread (min, max over rounds). Peak memory: the rise
of `torch.cuda.max_memory_allocated` over the allocation before the call (results included).
Writes gpu.json and gpu.md (the table, with the GPU model) under --out. Exits with a message when CUDA
is absent. Not a CPU scenario: bench.py's discovery finds no SCENARIOS here.

Notation: B batch, L sequence length, E embed dim, H heads, D head dim.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCENARIOS: dict = {}  # GPU only: nothing for the CPU bench to discover

MIN_SAMPLE_S = 0.05
DTYPE = torch.bfloat16
DEVICE = "cuda"  # "cpu" only for --smoke-cpu (a check of this script's code paths, no measurement)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---- timing -------------------------------------------------------------------------------------------
def _once(fn: Callable[[], object], n: int) -> float:
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / n  # seconds per call


def _repeats(fn: Callable[[], object]) -> int:
    """Calls per sample so that a sample lasts >= MIN_SAMPLE_S (after two warm-up calls)."""
    fn()
    _sync()
    one = _once(fn, 1)
    return max(1, math.ceil(MIN_SAMPLE_S / max(one, 1e-6)))


def compare(variants: dict[str, Callable[[], object]], rounds: int) -> dict:
    """Median ms of each variant over interleaved rounds, and torch / ours with its spread."""
    reps = {name: _repeats(fn) for name, fn in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotating order
            times[name].append(_once(variants[name], reps[name]))
    result: dict[str, float | list[float]] = {f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()}
    base = names[0]
    for name in names[1:]:
        ratios = [a / b for a, b in zip(times[base], times[name])]
        result[f"{base}/{name}"] = statistics.median(ratios)
        result[f"{base}/{name}_spread"] = [min(ratios), max(ratios)]
    return result


def peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it (results included), MB."""
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


# ---- the modules ----------------------------------------------------------------------------------------
def _modules(E: int, H: int):
    from multihead import MultiheadAttention

    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE, dtype=DTYPE)
    ours = MultiheadAttention.from_torch(theirs)
    return theirs, ours


def _floor(theirs: nn.MultiheadAttention, H: int):
    """One fused in-projection, SDPA, the out-projection: the least a module can do (no weights)."""
    w, b = theirs.in_proj_weight, theirs.in_proj_bias
    wo, bo = theirs.out_proj.weight, theirs.out_proj.bias

    def run(x):  # (B, L, E)
        B, L, E = x.shape
        q, k, v = F.linear(x, w, b).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
        out = F.scaled_dot_product_attention(q, k, v)
        return F.linear(out.transpose(1, 2).reshape(B, L, E), wo, bo)

    return run


def _torch_attention(q, k, v, B: int, H: int):
    """nn.MultiheadAttention's need_weights=True math on (B*H, L, D): scores, softmax, P @ V, mean."""
    L, S, D = q.shape[1], k.shape[1], q.shape[2]
    w = torch.bmm(q * D**-0.5, k.transpose(-2, -1))
    w = torch.softmax(w, dim=-1)
    out = torch.bmm(w, v)
    return out, w.view(B, H, L, S).mean(dim=1)


def attention_rows(L: int, tokens: int, E: int, H: int, rounds: int) -> list[dict]:
    from multihead.attend import triton as triton_backend
    from multihead.masks import AttentionMask

    B = max(1, tokens // L)
    D = E // H
    theirs, ours = _modules(E, H)
    floor = _floor(theirs, H)
    x = torch.randn(B, L, E, device=DEVICE, dtype=DTYPE)
    shape = dict(B=B, L=L, E=E, H=H, dtype=str(DTYPE))
    rows = []

    def row(name: str, fn: Callable[[], dict]) -> None:
        try:
            result = fn()
        except Exception as err:  # one failing row must not lose the others
            result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=3)}
        rows.append({"row": name, **shape, **result})
        print(json.dumps(rows[-1]), flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    with torch.no_grad():

        def weights_module():
            variants = {
                "torch": lambda: theirs(x, x, x, need_weights=True),
                "ours": lambda: ours(x, x, x, need_weights=True),
            }
            result = compare(variants, rounds)
            result.update({f"{n}_peak_mb": peak_mb(fn) for n, fn in variants.items()})
            out_t, w_t = variants["torch"]()
            out_o, w_o = variants["ours"]()
            result["max_abs_diff_out"] = (out_o.float() - out_t.float()).abs().max().item()
            result["max_abs_diff_weights"] = (w_o.float() - w_t.float()).abs().max().item()
            return result

        row("weights_module", weights_module)

        def weights_attention():
            q4, k4, v4 = (torch.randn(B, L, H, D, device=DEVICE, dtype=DTYPE).transpose(1, 2) for _ in range(3))
            q3, k3, v3 = (t.reshape(B * H, L, D) for t in (q4, k4, v4))
            mask = AttentionMask(B, H, L, L, device=x.device)
            variants = {
                "torch": lambda: _torch_attention(q3, k3, v3, B, H),
                "ours": lambda: triton_backend.attend(
                    q4, k4, v4, mask, scale=D**-0.5, dropout_p=0.0, need_weights=True, average_weights=True
                ),
            }
            result = compare(variants, rounds)
            result.update({f"{n}_peak_mb": peak_mb(fn) for n, fn in variants.items()})
            flops = 4 * B * H * L * L * D
            result["ours_tflops"] = flops / (result["ours_ms"] * 1e-3) / 1e12
            return result

        row("weights_attention", weights_attention)

        def noweights_module():
            variants = {
                "floor": lambda: floor(x),
                "ours": lambda: ours(x, x, x, need_weights=False),
                "torch": lambda: theirs(x, x, x, need_weights=False),
            }
            result = compare(variants, rounds)
            result.update({f"{n}_peak_mb": peak_mb(fn) for n, fn in variants.items()})
            return result

        row("noweights_module", noweights_module)

    def train_weights():
        params = {"torch": list(theirs.parameters()), "ours": list(ours.parameters())}
        xg = x.detach().requires_grad_()

        def step(m, name):
            def run():
                out, w = m(xg, xg, xg, need_weights=True)
                return torch.autograd.grad(out.float().sum(), [xg, *params[name]])

            return run

        variants = {"torch": step(theirs, "torch"), "ours": step(ours, "ours")}
        result = compare(variants, rounds)
        result.update({f"{n}_peak_mb": peak_mb(fn) for n, fn in variants.items()})
        return result

    row("train_weights", train_weights)
    return rows


# ---- decode -------------------------------------------------------------------------------------------------
def _torchtune_kv_cache():
    """torchtune's KVCache class, or None. Its module needs only torch; loaded from its file when
    importing the package fails (torchtune's __init__ insists on torchao)."""
    try:
        from torchtune.modules.kv_cache import KVCache

        return KVCache
    except Exception:  # noqa: BLE001 - fall back to the file itself
        pass
    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "modules" / "kv_cache.py"
    if not path.exists():
        return None
    file_spec = importlib.util.spec_from_file_location("_torchtune_kv_cache", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.KVCache


def decode_rows(E: int, H: int, kv_heads: int, prompt: int, tokens: int, rounds: int) -> list[dict]:
    from multihead import MultiheadAttention
    from multihead.cache import KVCache
    from multihead.rotary import RotaryEmbedding

    D, B, total = E // H, 1, prompt + tokens
    torch.manual_seed(0)
    rope = RotaryEmbedding(D, max_seq_len=total, device=DEVICE)
    m = MultiheadAttention(E, H, num_kv_heads=kv_heads, rotary=rope, device=DEVICE, dtype=DTYPE).eval()
    x = torch.randn(B, total, E, device=DEVICE, dtype=DTYPE)
    shape = dict(B=B, E=E, H=H, kv_heads=kv_heads, prompt=prompt, tokens=tokens, dtype=str(DTYPE))
    row: dict = {"row": "decode", **shape}

    ours_cache = KVCache(B, total, kv_heads, D, device=DEVICE, dtype=DTYPE)

    def ours_step(h):  # (B, 1, E)
        return m(h, h, h, need_weights=False, kv_cache=ours_cache)[0]

    def ours_prefill():
        ours_cache.reset()
        return ours_step(x[:, :prompt])

    variants: dict[str, tuple[Callable, Callable]] = {}  # name: (prefill, compiled step)
    variants["ours"] = (ours_prefill, _compiled(ours_step, True))

    TTCache = _torchtune_kv_cache()
    if TTCache is None:
        row["torchtune"] = "not installed: row skipped"
    else:
        tt_cache = TTCache(B, total, kv_heads, D, DTYPE).to(DEVICE)
        if m.in_proj_weight is not None:  # packed (kv_heads == H)
            w_q, w_k, w_v = m.in_proj_weight.split([E, kv_heads * D, kv_heads * D])
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        b_q, b_k, b_v = m.in_proj_bias.split([E, kv_heads * D, kv_heads * D])
        keys = torch.arange(total, device=DEVICE)
        pos = torch.zeros(B, 1, dtype=torch.long, device=DEVICE)  # the step's position, a static input

        def tt_forward(h, positions):  # (B, L, E), (B, L) -> (B, L, E): same math, torchtune's cache
            L = h.shape[1]
            q = F.linear(h, w_q, b_q).view(B, L, H, D).transpose(1, 2)
            k = F.linear(h, w_k, b_k).view(B, L, kv_heads, D).transpose(1, 2)
            v = F.linear(h, w_v, b_v).view(B, L, kv_heads, D).transpose(1, 2)
            q, k = rope(q, positions, max_position=total - 1), rope(k, positions, max_position=total - 1)
            k_all, v_all = tt_cache.update(k, v)  # (B, Hkv, total, D): the whole buffers
            visible = keys[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, L, total)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=visible, enable_gqa=True)
            return F.linear(out.transpose(1, 2).reshape(B, L, E), m.out_proj.weight, m.out_proj.bias)

        def tt_prefill():
            tt_cache.reset()
            pos.fill_(prompt)
            return tt_forward(x[:, :prompt], torch.arange(prompt, device=DEVICE)[None])

        compiled_tt = _compiled(tt_forward, False)

        def tt_step(h):
            out = compiled_tt(h, pos)
            pos.add_(1)
            return out

        variants["torchtune"] = (tt_prefill, tt_step)

    try:
        with torch.no_grad():
            per_token: dict[str, list[float]] = {name: [] for name in variants}
            last: dict[str, torch.Tensor] = {}  # each variant's output for the last token
            for r in range(rounds + 1):  # round 0 compiles and captures
                for name, (prefill, step) in variants.items():
                    prefill()
                    _sync()
                    t0 = time.perf_counter()
                    for t in range(prompt, total):
                        torch.compiler.cudagraph_mark_step_begin()
                        out = step(x[:, t : t + 1])
                    _sync()
                    if r > 0:
                        per_token[name].append((time.perf_counter() - t0) / tokens)
                    last[name] = out.float().clone()
            for name, values in per_token.items():
                row[f"{name}_tokens_per_s"] = 1 / statistics.median(values)
                row[f"{name}_tokens_per_s_spread"] = [1 / max(values), 1 / min(values)]
            if "torchtune" in per_token:  # the same layer, so the same answer
                row["max_abs_diff_last_token"] = (last["ours"] - last["torchtune"]).abs().max().item()
                ratios = [a / b for a, b in zip(per_token["torchtune"], per_token["ours"])]
                row["torchtune/ours"] = statistics.median(ratios)
                row["torchtune/ours_spread"] = [min(ratios), max(ratios)]
    except Exception as err:  # noqa: BLE001 - reported in the row
        row["error"] = f"{type(err).__name__}: {err}"
        row["trace"] = traceback.format_exc(limit=3)
    print(json.dumps(row), flush=True)
    return [row]


def _compiled(fn, fullgraph: bool):
    if DEVICE != "cuda":  # --smoke-cpu: the code path, not the compiler
        return fn
    return torch.compile(fn, mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)


# ---- output ------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "" if value is None else str(value)


def table(result: dict) -> str:
    lines = [
        f"# GPU benchmarks: {result['gpu']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, CUDA {result['cuda']}, bfloat16; "
        f"median of {result['rounds']} interleaved rounds (spread: min, max of the per-round ratio).",
        "",
        "| row | B | L | torch ms | ours ms | floor ms | ratio | spread | torch MB | ours MB | floor MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["row"] == "decode":
            continue
        key = "floor/ours" if "floor/ours" in r else "torch/ours"
        note = r.get("error", "")
        if "floor_ms" in r and "torch_ms" in r:
            note = note or f"torch module {r['torch_ms']:.3g} ms"
        cells = [r["row"], r["B"], r["L"], r.get("torch_ms"), r.get("ours_ms"), r.get("floor_ms"), r.get(key),
                 r.get(f"{key}_spread"), r.get("torch_peak_mb"), r.get("ours_peak_mb"), r.get("floor_peak_mb"),
                 (key + " " + note).strip() if r.get(key) is not None else note]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    for r in result["rows"]:
        if r["row"] != "decode":
            continue
        lines += [
            "",
            f"Decode (B={r['B']}, E={r['E']}, H={r['H']}, {r['kv_heads']} kv heads, RoPE, prompt {r['prompt']}, "
            f"{r['tokens']} tokens, CUDA graphs): ours {_fmt(r.get('ours_tokens_per_s'))} tokens/s "
            f"{_fmt(r.get('ours_tokens_per_s_spread'))}, torchtune's cache "
            f"{_fmt(r.get('torchtune_tokens_per_s', r.get('torchtune')))} tokens/s; "
            f"speedup (torchtune's time / ours) {_fmt(r.get('torchtune/ours'))} {_fmt(r.get('torchtune/ours_spread'))}"
            f"{' error: ' + r['error'] if 'error' in r else ''}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=16384, help="B * L per row")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds (a smoke run)")
    parser.add_argument(
        "--smoke-cpu", action="store_true", help="run every row at tiny sizes on CPU (Triton's interpreter): no figures"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.tokens, args.rounds, args.prompt, args.decode_tokens = [256, 512], 1024, 3, 32, 16
    if args.smoke_cpu:
        global DEVICE, MIN_SAMPLE_S
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        DEVICE, MIN_SAMPLE_S = "cpu", 0.0
        args.lengths, args.tokens, args.rounds, args.prompt, args.decode_tokens = [32], 64, 2, 8, 4
        args.embed_dim, args.heads = 64, 8
    elif not torch.cuda.is_available():
        print("multihead.benchmarks.gpu: CUDA is not available; nothing to measure", file=sys.stderr)
        return 0
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "none (--smoke-cpu: no figures)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": DEVICE,
        "python": platform.python_version(),
        "rounds": args.rounds,
        "min_sample_s": MIN_SAMPLE_S,
        "rows": [],
    }
    for L in args.lengths:
        result["rows"] += attention_rows(L, args.tokens, args.embed_dim, args.heads, args.rounds)
    if not args.no_decode:
        result["rows"] += decode_rows(args.embed_dim, args.heads, 4, args.prompt, args.decode_tokens, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
