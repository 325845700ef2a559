"""What one CPU core really has: its caches, read once from Linux sysfs, and the tile budget derived from them.

The blockwise backend cuts attention into tiles whose scores should stay in the cache of the core that
works on them. The figure that matters is the core's own L2: a virtual machine sees only its own vCPUs,
so sysfs may report the whole socket's L3 (hundreds of MiB) as shared by just the two vCPUs it has, and
a "share per sharing core" of that is still far too big to be a cache. So the budget is a small multiple
of the per-core L2, never below `MIN_TILE_BYTES` nor above `MAX_TILE_BYTES`; a shared L3 can only lower
it (when its share per core is smaller than that), never raise it.

The machine is read once, on first use, outside any compiled graph (`topology()`); while compiling, a
topology not read yet counts as unknown. `tile_budget_bytes(topology)` takes an explicit topology, so
tests can simulate any machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

#: Scores one tile may hold, as a multiple of the core's L2: the tile's scores, its slice of K and V and
#: the weights it writes share the L2 and the L3 behind it; measured on a 2 MiB-L2 Xeon (see BENCHMARKS.md).
L2_MULTIPLE = 2
#: Bounds of the per-tile budget: below 1 MiB the per-tile overhead (a dozen ops) dominates; above
#: 8 MiB a tile is no longer cache-sized on any current core.
MIN_TILE_BYTES = 1 * 2**20
MAX_TILE_BYTES = 8 * 2**20
#: When nothing about the caches can be read: a core with a 2 MiB L2.
UNKNOWN_L2_BYTES = 2 * 2**20
#: A GPU's tiles hold this much (it has its own memory hierarchy; the budget only bounds memory there).
GPU_TILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Cache:
    """One cache as cpu0 sees it: level (1, 2, 3...), kind (Data | Instruction | Unified), size in
    bytes, and how many CPUs share it (from `shared_cpu_list`; 1 when unknown)."""

    level: int
    kind: str
    size: int
    shared_by: int = 1


@dataclass(frozen=True)
class Topology:
    """The CPU model and cpu0's caches; empty `caches` means nothing could be read."""

    cpu: str = "unknown"
    caches: tuple[Cache, ...] = ()

    def level(self, n: int) -> Cache | None:
        """The data or unified cache of level n (the largest if several), or None."""
        found = [c for c in self.caches if c.level == n and c.kind != "Instruction"]
        return max(found, key=lambda c: c.size) if found else None

    def describe(self) -> str:
        """One line, e.g. 'L1d 48 KiB, L2 2 MiB, L3 105 MiB shared by 2 CPUs'."""
        parts = []
        for c in sorted(self.caches, key=lambda c: (c.level, c.kind)):
            name = f"L{c.level}{'d' if c.kind == 'Data' else 'i' if c.kind == 'Instruction' else ''}"
            shared = f" shared by {c.shared_by} CPUs" if c.shared_by > 1 else ""
            parts.append(f"{name} {_human(c.size)}{shared}")
        return ", ".join(parts) or "caches unknown"


def tile_budget_bytes(topology: Topology, device: torch.device | str = "cpu") -> int:
    """Bytes of scores one tile may hold on one core of this machine (each worker thread holds one).

    CPU: `L2_MULTIPLE` x the per-core L2 (or `UNKNOWN_L2_BYTES` when unknown), lowered to the per-core
    share of the L3 when that is smaller, within [`MIN_TILE_BYTES`, `MAX_TILE_BYTES`]. GPU: `GPU_TILE_BYTES`.
    """
    if torch.device(device).type != "cpu":
        return GPU_TILE_BYTES
    l2 = topology.level(2)
    budget = L2_MULTIPLE * (l2.size if l2 is not None else UNKNOWN_L2_BYTES)
    l3 = topology.level(3)
    if l3 is not None:
        budget = min(budget, l3.size // max(1, l3.shared_by))
    return max(MIN_TILE_BYTES, min(MAX_TILE_BYTES, budget))


# ---- reading the machine (once) ----------------------------------------------------------------------
_topology: Topology | None = None


def topology() -> Topology:
    """This machine's topology, read on the first call and kept. While torch.compile traces, a topology
    not read yet is reported as unknown (no file is read inside a graph)."""
    global _topology
    if _topology is None:
        if torch.compiler.is_compiling():
            return Topology()
        _topology = read_topology()
    return _topology


def read_topology(root: Path | str = "/sys/devices/system/cpu", cpuinfo: Path | str = "/proc/cpuinfo") -> Topology:
    """cpu0's caches from sysfs (`root`/cpu0/cache/index*/{level,type,size,shared_cpu_list}) and the
    model name from `cpuinfo`; whatever cannot be read is left out."""
    caches = []
    for entry in sorted(Path(root, "cpu0", "cache").glob("index*")):
        try:
            level = int(_read(entry / "level"))
            kind = _read(entry / "type")
            size = parse_size(_read(entry / "size"))
        except (OSError, ValueError):
            continue
        try:
            shared = len(parse_cpu_list(_read(entry / "shared_cpu_list")))
        except (OSError, ValueError):
            shared = 1
        caches.append(Cache(level, kind, size, max(1, shared)))
    return Topology(_cpu_model(Path(cpuinfo)), tuple(caches))


def _read(path: Path) -> str:
    return path.read_text().strip()


def _cpu_model(cpuinfo: Path) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def parse_size(text: str) -> int:
    """sysfs cache sizes: '48K', '2048K', '105M', '1G' or plain bytes -> bytes."""
    text = text.strip().upper().removesuffix("B")
    unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    if not digits.isdigit():
        raise ValueError(f"not a cache size: {text!r}")
    return int(digits) * unit


def parse_cpu_list(text: str) -> set[int]:
    """'0-1', '0,2,4-7' -> the CPU numbers."""
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % (size // 4 or 1) == 0:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{n} B"


@functools.cache
def summary() -> dict:
    """The machine as benchmarks record it: CPU model, caches, the per-tile budget."""
    topo = topology()
    return {
        "cpu_model": topo.cpu,
        "caches": topo.describe(),
        "cache_list": [vars(c) for c in topo.caches],
        "tile_budget_bytes": tile_budget_bytes(topo),
    }
