"""Variable-length batches: padded self-attention with a bool key padding mask (varlen.py).

Three contenders on the same weights, x (B, L, E) right-padded, need_weights=False:
    - ours: `MultiheadAttention` (the packed path: only valid keys projected and attended);
    - torch: `torch.nn.MultiheadAttention(batch_first=True)`;
    - floor: the padded batch done well: one fused in-projection, SDPA with the bool key mask over the
      whole padded batch, the out-projection.
Batches: lengths uniform in [L/4, L] (`uniform`), exactly half of the keys padded (`half`: every
sequence L/2 long), and little padding (`small`: 1/32 of the keys, where the threshold must keep us
on the padded path). Forward (train mode, dropout 0, under `torch.no_grad()`) and a training step
(forward + backward of `out.sum()`). `threshold` forces packing at several padding shares to show
where it starts to pay (the measurement behind `varlen.PACK_MIN_SHARE`).

Rounds are interleaved in a rotating order; each sample repeats a call until it lasts >= min_sample_s;
the ratios of each round are paired (same round) and reported as median (min, max). Times are CPU
time of the process (`time.process_time`): on a shared machine, waiting for a core does not count.

    python -m multihead.benchmarks.varlen [--B 8] [--L 1024] [--E 512] [--H 8] [--rounds 7] [--threads N]
    python -m multihead bench --scenarios 'varlen_*'
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import multihead.varlen as varlen
from multihead import MultiheadAttention


def lengths_for(kind: str, B: int, L: int, seed: int = 0) -> list[int]:
    if kind == "uniform":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(L // 4, L + 1, (B,), generator=g).tolist()
    if kind == "half":
        return [L // 2] * B
    if kind == "small":
        return [L - L // 32] * B
    if kind.startswith("fixed:"):  # every sequence this long
        return [min(L, int(kind.split(":")[1]))] * B
    raise ValueError(f"kind must be uniform, half, small or fixed:N, got {kind!r}")


def _floor(torch_mha: nn.MultiheadAttention, heads: int) -> Callable:
    w, b = torch_mha.in_proj_weight, torch_mha.in_proj_bias
    w_out, b_out = torch_mha.out_proj.weight, torch_mha.out_proj.bias

    def floor(x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        q, k, v = F.linear(x, w, b).split(E, dim=-1)  # (B, L, E) x3
        q, k, v = (t.unflatten(-1, (heads, E // heads)).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :])  # (B, H, L, D)
        return F.linear(out.transpose(1, 2).reshape(B, L, E), w_out, b_out)

    return floor


def _time_interleaved(contenders: dict[str, Callable[[], object]], rounds: int, min_sample_s: float) -> dict:
    """Per-call seconds of each contender in each round (rounds interleaved, order rotated), in CPU
    time of this process (a shared machine's waits do not count; with N threads it sums their work)."""
    names = list(contenders)
    for fn in contenders.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, calls, start = contenders[name], 0, time.process_time()
            while True:
                fn()
                calls += 1
                elapsed = time.process_time() - start
                if elapsed >= min_sample_s:
                    break
            samples[name].append(elapsed / calls)
    return samples


def _summary(values: list[float], digits: int = 3) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def run(
    kind: str = "half",
    train: bool = False,
    B: int = 8,
    L: int = 1024,
    E: int = 512,
    H: int = 8,
    rounds: int = 7,
    min_sample_s: float = 0.1,
    threads: int | None = None,
    quick: bool = False,
    force_share: float | None = None,
) -> dict:
    if quick:
        B, L, E, H, rounds, min_sample_s = 2, 128, 64, 4, 3, 0.02
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    floor = _floor(theirs, H)
    lengths = lengths_for(kind, B, L)
    padding = torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]  # (B, L) True = pad
    x = torch.randn(B, L, E)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        if not train:

            def forward() -> object:
                with torch.no_grad():
                    return fn(x)

            return forward
        x_grad = x.clone().requires_grad_()

        def training() -> None:
            fn(x_grad).sum().backward()

        return training

    contenders = {
        "ours": step(lambda t: ours(t, t, t, key_padding_mask=padding, need_weights=False)[0]),
        "torch": step(lambda t: theirs(t, t, t, key_padding_mask=padding, need_weights=False)[0]),
        "floor": step(lambda t: floor(t, padding)),
    }
    share = float(padding.float().mean())
    with _forced_share(force_share):
        served = varlen.serves(x, _mask(padding, H, L), None, False, False)
        samples = _time_interleaved(contenders, rounds, min_sample_s)
    ours_s, torch_s, floor_s = samples["ours"], samples["torch"], samples["floor"]
    return {
        "kind": kind,
        "train": train,
        "B": B,
        "L": L,
        "E": E,
        "H": H,
        "threads": torch.get_num_threads(),
        "padding_share": round(share, 4),
        "packed": served,
        "ours_ms": round(1e3 * statistics.median(ours_s), 2),
        "torch_ms": round(1e3 * statistics.median(torch_s), 2),
        "floor_ms": round(1e3 * statistics.median(floor_s), 2),
        "ours_over_floor": _summary([o / f for o, f in zip(ours_s, floor_s)]),
        "torch_over_ours": _summary([t / o for t, o in zip(torch_s, ours_s)]),
        "rounds": rounds,
    }


def _mask(padding: torch.Tensor, heads: int, length: int):
    from multihead.masks import build_mask

    B = padding.shape[0]
    return build_mask(
        attn_mask=None,
        key_padding_mask=padding,
        is_causal=False,
        batch=B,
        heads=heads,
        q_len=length,
        k_len=length,
        batched=True,
        device=padding.device,
    )


@contextlib.contextmanager
def _forced_share(share: float | None):
    """With a share, pack from that share on (the threshold sweep); restore after."""
    if share is None:
        yield
        return
    saved = varlen.PACK_MIN_SHARE
    varlen.PACK_MIN_SHARE = share
    try:
        yield
    finally:
        varlen.PACK_MIN_SHARE = saved


def threshold_sweep(threads: int | None = None, quick: bool = False, train: bool = False) -> dict:
    """Packed path forced at each padding share (every sequence equally padded): ours / floor, where
    packing starts to pay (the measurement behind `varlen.PACK_MIN_SHARE`)."""
    L = 128 if quick else 1024
    out = {}
    for share in (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4):
        result = run(
            f"fixed:{L - round(share * L)}", train=train, threads=threads, quick=quick, force_share=0.0, rounds=5
        )
        out[f"{share:.4f}"] = {k: result[k] for k in ("padding_share", "ours_ms", "floor_ms", "ours_over_floor")}
    return out


# partials keep run's signature, so bench.py passes threads and quick
SCENARIOS: dict[str, Callable[..., dict]] = {
    "varlen_uniform_forward": functools.partial(run, "uniform", train=False),
    "varlen_uniform_train": functools.partial(run, "uniform", train=True),
    "varlen_half_forward": functools.partial(run, "half", train=False),
    "varlen_half_train": functools.partial(run, "half", train=True),
    "varlen_small_forward": functools.partial(run, "small", train=False),
    "varlen_small_train": functools.partial(run, "small", train=True),
    "varlen_threshold": threshold_sweep,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="*", default=[n for n in SCENARIOS if n != "varlen_threshold"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    for name in args.scenarios:
        results[name] = SCENARIOS[name](threads=args.threads, quick=args.quick)
        print(json.dumps({name: results[name]}), flush=True)
    return results


if __name__ == "__main__":
    main()
