"""keep_freed_memory: freed blocks are reused instead of page-faulted in again; the grid
runner applies it to the processes that train, and only when asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from models import tiny_split

from latent_aug import grid
from latent_aug.allocator import keep_freed_memory
from latent_aug.grid import ResultStore, run_grid
from latent_aug.protocol import RunSpec

_FAULTS = """
import resource, sys, torch
from latent_aug.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm-up: 40 MB blocks, above glibc's mmap threshold
    torch.empty(10 << 20).fill_(1)
per_block = []
for _ in range(10):
    before = faults()
    torch.empty(10 << 20).fill_(1)
    per_block.append(faults() - before)
print(applied, *per_block)
"""


def _faults(mode: str) -> tuple[str, list[int]]:
    """Minor page faults of each of ten 40 MB allocations after a warm-up, in a fresh
    process with (``"keep"``) or without the setting."""
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt only")
def test_keep_freed_memory_stops_refaulting_the_same_allocation() -> None:
    _, default = _faults("default")
    if min(default) < 2560:  # a 40 MB block in 4 KiB pages is 10,240
        pytest.skip(f"this C library does not return freed blocks ({default} faults)")
    applied, kept = _faults("keep")
    assert applied == "True"
    # Most allocations reuse kept pages. Not always all of them: this machine's kernel runs
    # DAMON with a "pageout" scheme, which now and then pages out a kept idle block (then
    # that one allocation faults it in again).
    assert sum(n < 100 for n in kept) >= 6, (kept, default)


def test_keep_freed_memory_rejects_a_nonpositive_limit() -> None:
    with pytest.raises(ValueError, match="limit_mib must be >= 1"):
        keep_freed_memory(0)


@pytest.mark.parametrize(("keep", "device", "calls"),
                         [(True, "cpu", 1), (False, "cpu", 0), (True, "meta", 0)])
def test_run_grid_keeps_freed_memory_only_on_cpu_and_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool, device: str, calls: int
) -> None:
    called: list[int] = []
    monkeypatch.setattr(grid, "keep_freed_memory", lambda: called.append(1) or True)
    monkeypatch.setattr(grid, "_data_for", lambda spec, *a: tiny_split(spec.split, n=20,
                                                                        n_eval=10))
    monkeypatch.setattr(grid, "device_name", lambda d: "cpu")  # the data stays on the CPU
    spec = RunSpec("mnist", "feed_forward", per_class=2, split=1, epochs=1, batch_size=10)
    run_grid([spec], ResultStore(tmp_path / "g.csv"), device=device, progress=False,
             keep_memory=keep)
    assert len(called) == calls


def test_worker_initializer_keeps_freed_memory_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    called: list[int] = []
    monkeypatch.setattr(grid, "keep_freed_memory", lambda: called.append(1) or True)
    grid._init_worker(1, False)
    assert called == []
    grid._init_worker(1, True)
    assert called == [1]
