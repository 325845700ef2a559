"""Compiled vs eager: `torch.compile(fullgraph=True)` (inductor) on our module and on torch's, against
both in eager mode, self-attention on (B, L, E).

Per scenario: torch eager, torch compiled, ours eager, ours compiled (the weights path runs as our
custom op under compile), timed interleaved (`bench.time_interleaved`: rounds in rotating order,
each sample repeated to >= `min_sample_s`; medians with (min, max)). Compile time (the first call,
which compiles) is reported separately. Forward scenarios: train mode, dropout 0, `torch.no_grad()`;
train scenarios: forward + backward of output.sum() (+ weights.sum()).

    python -m multihead bench --scenarios 'compiled_*'
    python -m multihead.benchmarks.compiled [--scenarios NAME ...] [--rounds 5] [--threads N]   # JSON
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from multihead import MultiheadAttention

from .bench import MIN_SAMPLE_S, time_interleaved


@dataclass(frozen=True)
class Config:
    batch: int
    length: int
    need_weights: bool
    train: bool = False
    embed_dim: int = 512
    heads: int = 8


CONFIGS = {
    "compiled_page_example_1": Config(4, 100, True),
    "compiled_L1024_weights": Config(4, 1024, True),
    "compiled_L1024_noweights": Config(4, 1024, False),
    "compiled_train_L512_weights": Config(4, 512, True, train=True),
}


def _step(module: Callable, x: torch.Tensor, config: Config) -> Callable[[], object]:
    def forward():
        out, weights = module(x, x, x, need_weights=config.need_weights)
        return out, weights

    if config.train:

        def train():
            out, weights = forward()
            loss = out.sum() + (weights.sum() if weights is not None else 0)
            loss.backward()

        return train

    def no_grad():
        with torch.no_grad():
            return forward()

    return no_grad


def run(config: Config, *, rounds: int = 5, threads: int | None = None, quick: bool = False) -> dict:
    if threads is not None:
        torch.set_num_threads(threads)
    if quick:
        config = Config(2, min(config.length, 64), config.need_weights, config.train, 64, 4)
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(config.embed_dim, config.heads, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    x = torch.randn(config.batch, config.length, config.embed_dim, requires_grad=config.train)
    torch._dynamo.reset()
    fns = {
        "torch_eager": _step(theirs, x, config),
        "torch_compiled": _step(torch.compile(theirs, fullgraph=True), x, config),
        "ours_eager": _step(ours, x, config),
        "ours_compiled": _step(torch.compile(ours, fullgraph=True), x, config),
    }
    compile_s = {}
    for name in ("torch_compiled", "ours_compiled"):
        start = time.perf_counter()
        fns[name]()
        compile_s[name] = time.perf_counter() - start
    timings = time_interleaved(fns, rounds, 0.02 if quick else MIN_SAMPLE_S)
    ours_ms = timings["ours_eager"]["median_ms"]
    return {
        "config": config.__dict__,
        "threads": torch.get_num_threads(),
        "timings": timings,
        "compile_s": compile_s,
        "ours_ms": ours_ms,
        "torch_ms": timings["torch_eager"]["median_ms"],
        "ours_compiled_vs_eager": ours_ms / timings["ours_compiled"]["median_ms"],
        "torch_compiled_vs_eager": timings["torch_eager"]["median_ms"] / timings["torch_compiled"]["median_ms"],
        "ours_compiled_vs_torch_compiled": timings["torch_compiled"]["median_ms"]
        / timings["ours_compiled"]["median_ms"],
    }


def _scenario(config: Config) -> Callable[..., dict]:
    return lambda threads=None, quick=False: run(config, threads=threads, quick=quick)


SCENARIOS = {name: _scenario(config) for name, config in CONFIGS.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    results = {
        name: run(CONFIGS[name], rounds=args.rounds, threads=args.threads, quick=args.quick) for name in args.scenarios
    }
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
