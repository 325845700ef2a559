"""Tile sizing from the machine (`multihead.hardware`, `blockwise.choose_tiles`) on simulated topologies:
sysfs trees written to a temporary folder, read back, and the tiles chosen on them held to their
memory bound (a few MiB per worker, whatever the L3 says)."""

from __future__ import annotations

import math

import pytest
import torch

from multihead import hardware
from multihead.attend import blockwise

KiB, MiB = 2**10, 2**20
CPU = torch.device("cpu")


def write_sysfs(root, caches, cpu="Simulated CPU"):
    """caches: (level, type, size text, shared_cpu_list) per index; returns (root, cpuinfo path)."""
    for i, (level, kind, size, shared) in enumerate(caches):
        d = root / "cpu" / "cpu0" / "cache" / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
        (d / "shared_cpu_list").write_text(f"{shared}\n")
    (root / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: {cpu}\n")
    return root / "cpu", root / "cpuinfo"


# the machines of the issue: a VM that sees its socket's whole L3 from 2 vCPUs; an EPYC VM; a small core
MACHINES = {
    "xeon_vm_300M_l3": [(1, "Data", "48K", "0"), (1, "Instruction", "32K", "0"), (2, "Unified", "2048K", "0"),
                        (3, "Unified", "307200K", "0-1")],
    "epyc_vm_32M_l3": [(1, "Data", "32K", "0"), (2, "Unified", "1024K", "0"), (3, "Unified", "32768K", "0-15")],
    "small_256K_l2": [(1, "Data", "32K", "0"), (2, "Unified", "256K", "0"), (3, "Unified", "8M", "0-3")],
}  # fmt: skip
EXPECTED_L2 = {"xeon_vm_300M_l3": 2 * MiB, "epyc_vm_32M_l3": 1 * MiB, "small_256K_l2": 256 * KiB}


@pytest.fixture(params=[*MACHINES, "nothing_readable"])
def machine(request, tmp_path):
    if request.param == "nothing_readable":
        return request.param, hardware.read_topology(tmp_path / "missing", tmp_path / "missing_cpuinfo")
    root, cpuinfo = write_sysfs(tmp_path, MACHINES[request.param])
    return request.param, hardware.read_topology(root, cpuinfo)


def test_topology_is_read_from_sysfs(machine):
    name, topo = machine
    if name == "nothing_readable":
        assert topo.caches == () and topo.level(2) is None and topo.describe() == "caches unknown"
        return
    assert topo.cpu == "Simulated CPU"
    assert topo.level(2).size == EXPECTED_L2[name]
    assert topo.level(1).kind == "Data"  # the instruction cache is never the one that counts
    l3 = topo.level(3)
    assert l3.shared_by == {"xeon_vm_300M_l3": 2, "epyc_vm_32M_l3": 16, "small_256K_l2": 4}[name]
    assert "L2 " in topo.describe() and "shared by" in topo.describe()


def test_budget_comes_from_the_core_not_the_socket(machine):
    """Per tile: a small multiple of the core's L2, within [MIN, MAX] — never the L3 (300 MiB seen by
    2 vCPUs is still 150 MiB per vCPU, far beyond any core's cache)."""
    name, topo = machine
    budget = hardware.tile_budget_bytes(topo)
    assert hardware.MIN_TILE_BYTES <= budget <= hardware.MAX_TILE_BYTES <= 8 * MiB
    l2 = EXPECTED_L2.get(name, hardware.UNKNOWN_L2_BYTES)
    assert budget == max(hardware.MIN_TILE_BYTES, min(hardware.MAX_TILE_BYTES, hardware.L2_MULTIPLE * l2))
    if topo.level(3) is not None:  # the L3 is never a reason for a bigger tile
        assert budget <= max(hardware.MIN_TILE_BYTES, hardware.L2_MULTIPLE * topo.level(2).size)
    assert hardware.tile_budget_bytes(topo, "cuda") == hardware.GPU_TILE_BYTES  # a GPU bounds memory only


def test_a_small_shared_l3_lowers_the_budget():
    big_l2 = hardware.Topology(caches=(hardware.Cache(2, "Unified", 4 * MiB), hardware.Cache(3, "Unified", 8 * MiB, 4)))
    assert hardware.tile_budget_bytes(big_l2) == 2 * MiB  # 8 MiB shared by 4 cores: 2 MiB each


@pytest.mark.parametrize("threads", [1, 2, 16])
@pytest.mark.parametrize(
    "shape",  # (B, H, Hkv, L, S): the scenarios, GQA, many short sequences, one that fits a tile
    [(2, 8, 8, 2048, 2048), (1, 8, 8, 4096, 4096), (4, 8, 8, 1024, 1024), (1, 8, 2, 4096, 4096),
     (64, 16, 16, 128, 128), (1, 2, 2, 10, 10)],
)  # fmt: skip
def test_tiles_hold_their_memory_bound(machine, monkeypatch, shape, threads):
    """The scores in flight (one tile per worker) stay within workers x the larger of the per-tile
    budget and the K/V-amortizing rows (capped at KV_AMORTIZE_MAX_BYTES), or one 16-row tile, the
    least a tile holds: far below the B*H*L*S of the whole call; the tiles cover every query row; with
    workers there are two tiles per worker whenever 16-row tiles allow."""
    name, topo = machine
    monkeypatch.setattr(hardware, "_topology", topo)
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    B, H, Hkv, L, S = shape
    D = 64
    batches, rows = blockwise.choose_tiles(B, H, L, S, 4, CPU, kv_heads=Hkv, head_dim=D)
    workers = blockwise._parallel_share(B * H * L * S, CPU)
    row_bytes = H * S * 4
    tile_bytes = batches * rows * row_bytes
    budget = hardware.tile_budget_bytes(topo)
    assert blockwise.tile_budget_bytes(CPU) == budget
    kv_tile = min(2 * Hkv * D / H * row_bytes, blockwise.KV_AMORTIZE_MAX_BYTES)
    bound = max(budget, kv_tile, 16 * row_bytes)
    assert tile_bytes <= bound + row_bytes  # (+1 row: rows are evened out by rounding up)
    assert workers * bound <= threads * max(16 * MiB, 16 * row_bytes)
    assert 1 <= rows <= max(L, 1) and 1 <= batches <= B
    if batches > 1:
        assert rows == L  # several batch elements only with whole sequences
    tiles = math.ceil(B / batches) * math.ceil(L / rows)
    if B * H * L * S * 4 > bound:
        assert tiles > 1
    if workers > 1 and B * L >= 2 * workers * 16:
        assert tiles >= 2 * workers
    # without K/V information only the budget (or 16 rows) counts
    batches, rows = blockwise.choose_tiles(B, H, L, S, 4, CPU)
    assert batches * rows * row_bytes <= max(budget, 16 * row_bytes) + row_bytes


def test_block_bytes_still_overrides(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 1 * MiB)
    assert blockwise.tile_budget_bytes(CPU) == 1 * MiB
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert blockwise.choose_tiles(1, 4, 1024, 1024, 4, CPU) == (1, 64)  # 16 KiB a row: 64 rows
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert blockwise.choose_tiles(1, 4, 1024, 1024, 4, CPU) == (1, 32)  # shared by two workers


def test_read_once_and_never_while_compiling(monkeypatch):
    monkeypatch.setattr(hardware, "_topology", None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert hardware.topology() == hardware.Topology()  # unknown, and nothing was read
    assert hardware._topology is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    first = hardware.topology()
    monkeypatch.setattr(hardware, "read_topology", lambda *a: pytest.fail("read twice"))
    assert hardware.topology() is first


@pytest.mark.parametrize(
    "text,expected", [("48K", 48 * KiB), ("2048K", 2 * MiB), ("105M", 105 * MiB), ("1G", 2**30), ("512", 512)]
)
def test_parse_size(text, expected):
    assert hardware.parse_size(text) == expected


def test_parse_size_and_cpu_list_reject_garbage():
    with pytest.raises(ValueError):
        hardware.parse_size("lots")
    assert hardware.parse_cpu_list("0-1") == {0, 1}
    assert hardware.parse_cpu_list("0,2,4-7\n") == {0, 2, 4, 5, 6, 7}


def test_summary_names_the_machine():
    info = hardware.summary()
    assert set(info) >= {"cpu_model", "caches", "tile_budget_bytes"}
    assert hardware.MIN_TILE_BYTES <= info["tile_budget_bytes"] <= hardware.MAX_TILE_BYTES
