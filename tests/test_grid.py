"""Grid bookkeeping: atomic CSV rows, resume, a grid killed with SIGKILL mid-run, and epoch
checkpoints."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from models import tiny_split

from latent_aug import files, grid
from latent_aug.files import atomic_write_text
from latent_aug.grid import COLUMNS, KEY, ResultStore, run_grid, spec_key
from latent_aug.protocol import RunSpec


def _row(method: str, split: int = 1, **extra: object) -> dict[str, object]:
    return {"dataset": "mnist", "method": method, "per_class": 2, "split": split,
            "epochs": 1, "options": "", "test_error": "50.00", **extra}


def spec_key_of(row: dict[str, object]) -> tuple[str, ...]:
    """The resume key of a CSV row, as :func:`latent_aug.grid.spec_key` builds it for a spec."""
    return tuple(str(row[k]) for k in KEY)


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------------------------
# atomic_write_text and ResultStore
# ----------------------------------------------------------------------------------------------


def test_atomic_write_text_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert _tmp_files(path.parent) == []


def test_atomic_write_text_keeps_the_old_file_when_writing_raises(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    path.write_text("old,contents\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "new,contents\n" * 1000 + "\ud800")  # fails part-way
    assert path.read_text() == "old,contents\n"
    assert _tmp_files(tmp_path) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_text_keeps_the_old_file_when_sync_or_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = tmp_path / "out.csv"
    path.write_text("old\n")

    def boom(*args: object) -> None:
        raise error

    for target in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(files.os, target, boom)
            with pytest.raises(type(error)):
                atomic_write_text(path, "new\n")
        assert path.read_text() == "old\n", target
        assert _tmp_files(tmp_path) == [], target


def test_result_store_appends_rows_in_order(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results.csv")
    assert store.rows() == [] and store.done() == set()
    store.append(_row("feed_forward", tag='has "quotes", commas\nand a newline', extra="x"))
    store.append(_row("proposed_base"))
    rows = store.rows()
    assert [r["method"] for r in rows] == ["feed_forward", "proposed_base"]
    assert rows[0]["tag"] == 'has "quotes", commas\nand a newline'
    assert "extra" not in rows[0] and rows[1]["seconds"] == ""  # unknown dropped, missing empty
    with (tmp_path / "results.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert header == COLUMNS
    assert store.done() == {
        ("mnist", "feed_forward", "2", "1", "1", ""),
        ("mnist", "proposed_base", "2", "1", "1", ""),
    }
    assert _tmp_files(tmp_path) == []


def test_result_store_append_that_fails_keeps_every_finished_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ResultStore(tmp_path / "results.csv")
    store.append(_row("feed_forward"))
    before = (tmp_path / "results.csv").read_bytes()

    def boom(*args: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(grid.os, "replace", boom)
    with pytest.raises(OSError):
        store.append(_row("proposed_base"))
    assert (tmp_path / "results.csv").read_bytes() == before
    assert [r["method"] for r in store.rows()] == ["feed_forward"]


# ----------------------------------------------------------------------------------------------
# run_grid resumes
# ----------------------------------------------------------------------------------------------


SPECS = [
    RunSpec("mnist", "feed_forward", per_class=2, split=1, epochs=1, batch_size=10),
    RunSpec("mnist", "proposed_base", per_class=2, split=1, epochs=1, batch_size=10),
    RunSpec("mnist", "perturb_class_conditional", per_class=2, split=1, epochs=1,
            batch_size=10),
    RunSpec("mnist", "perturb_class_conditional", per_class=2, split=1, epochs=1,
            batch_size=10, options=(("noise_std", 0.1),)),
]


def test_run_grid_skips_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grid, "_data_for", lambda spec, *a: tiny_split(spec.split, n=20, n_eval=10))
    trained: list[RunSpec] = []
    real_train_run = grid.train_run

    def counting_train_run(spec, data, **kw):
        trained.append(spec)
        return real_train_run(spec, data, **kw)

    monkeypatch.setattr(grid, "train_run", counting_train_run)
    store = ResultStore(tmp_path / "grid.csv")

    first = run_grid(SPECS[:2], store, progress=False)
    assert trained == [SPECS[1], SPECS[0]]  # longest first: the wrapped run before the plain one
    assert [spec_key_of(r) for r in first] == [spec_key(s) for s in (SPECS[1], SPECS[0])]
    rows_after_first = store.rows()

    trained.clear()
    second = run_grid(SPECS, store, progress=False)
    assert trained == SPECS[2:]  # the runs with options are not confused with the plain one
    assert [spec_key_of(r) for r in second] == [spec_key(s) for s in SPECS[2:]]
    assert store.rows()[:2] == rows_after_first  # finished rows untouched

    trained.clear()
    assert run_grid(SPECS, store, progress=False) == []
    assert trained == []
    keys = [spec_key_of(r) for r in store.rows()]
    assert sorted(keys) == sorted(spec_key(s) for s in SPECS)


def test_jobs_run_longest_first() -> None:
    specs = [
        RunSpec("mnist", "feed_forward", per_class=10, split=1),
        RunSpec("mnist", "perturb_class_conditional", per_class=10, split=1),
        RunSpec("mnist", "feed_forward", per_class="all", split=1),
        RunSpec("mnist", "perturb_class_conditional", per_class=100, split=1, epochs=10),
        RunSpec("mnist", "perturb_class_conditional", per_class=100, split=1),
    ]
    order = [job[2] for job in grid._jobs(specs, {}, None)]
    assert order == [2, 4, 1, 0, 3]  # 10 epochs at 100 per class cost less than 120 at 10
    groups = grid._jobs([*specs[:2], RunSpec("mnist", "feed_forward", per_class=10, split=2)],
                        {}, "sets")
    assert [job[2] for job in groups] == [[0, 2], 1]  # a group costs the sum of its runs


# ----------------------------------------------------------------------------------------------
# SIGKILL in the middle of a grid, then resume
# ----------------------------------------------------------------------------------------------

KILL_SPECS = [
    RunSpec("mnist", method, per_class=2, split=split, epochs=2, batch_size=4)
    for split in (1, 2, 3)
    for method in ("feed_forward", "perturb_class_conditional")
]

# The child trains KILL_SPECS on the tiny mnist.npz through the real loader.
_CHILD = f"""
import sys
from latent_aug.grid import ResultStore, run_grid
from latent_aug.protocol import RunSpec

data_dir, csv_path = sys.argv[1], sys.argv[2]
specs = {KILL_SPECS!r}
run_grid(specs, ResultStore(csv_path), data_dir=data_dir, threads=1, progress=False)
"""


def _write_tiny_mnist(folder: Path) -> None:
    """A ``mnist.npz`` in the real layout: uint8 ``(N, 28, 28)`` images, int64 labels."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, n in (("train", 60), ("valid", 100), ("test", 100)):
        arrays[f"x_{name}"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"y_{name}"] = (np.arange(n) % 10).astype(np.int64)
    np.savez(folder / "mnist.npz", **arrays)


def _complete_rows(path: Path) -> list[dict[str, str]]:
    """Parse the CSV and check every row has every column, with numbers where numbers go."""
    with path.open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == COLUMNS
    for line in table[1:]:
        assert len(line) == len(COLUMNS), line
    rows = [dict(zip(COLUMNS, line)) for line in table[1:]]
    for r in rows:
        float(r["test_error"]), float(r["best_val_error"]), float(r["seconds"])
        assert int(r["best_epoch"]) >= 1 and int(r["epochs"]) == 2
        assert r["date"].endswith("Z") and r["device"]
    return rows


def test_grid_killed_mid_run_keeps_complete_rows_and_resumes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_tiny_mnist(data_dir)
    csv_path = tmp_path / "grid.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data_dir), str(csv_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            if csv_path.exists() and len(ResultStore(csv_path).rows()) >= 1:
                break
            time.sleep(0.02)
        assert child.poll() is None, f"child ended early: {child.stderr.read().decode()}"
        assert csv_path.exists(), "no row within the time limit"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    before = _complete_rows(csv_path)
    assert 1 <= len(before) < len(KILL_SPECS), "the kill should land in the middle of the grid"
    done_keys = {spec_key_of(r) for r in before}
    assert len(done_keys) == len(before)

    # Resume in-process over the same grid: only the unfinished runs are trained.
    new = run_grid(KILL_SPECS, ResultStore(csv_path), data_dir=str(data_dir), progress=False)
    assert len(new) == len(KILL_SPECS) - len(before)
    assert not {spec_key_of(r) for r in new} & done_keys

    after = _complete_rows(csv_path)
    assert after[: len(before)] == before  # finished rows are kept byte for byte
    assert sorted(spec_key_of(r) for r in after) == sorted(spec_key(s) for s in KILL_SPECS)


# ----------------------------------------------------------------------------------------------
# lanes: whole method families in one trainer, rows written as each run finishes
# ----------------------------------------------------------------------------------------------

LANE_SPECS = [
    RunSpec("mnist", method, per_class=k, split=split, epochs=2, batch_size=10)
    for method in ("feed_forward", "proposed_base")
    for k in (2, 4)
    for split in (1, 2)
]


def test_lanes_grid_writes_each_run_at_once_and_matches_sequential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_tiny_mnist(data_dir)
    lanes_store = ResultStore(tmp_path / "lanes.csv")
    rows_when_job_returned = []
    real = grid.execute_lanes

    def spy(*args, **kwargs):
        rows = real(*args, **kwargs)
        rows_when_job_returned.append(len(lanes_store.rows()))
        return rows

    monkeypatch.setattr(grid, "execute_lanes", spy)
    run_grid(LANE_SPECS[:3], lanes_store, data_dir=str(data_dir), vectorize="lanes",
             progress=False)
    assert rows_when_job_returned == [3]  # written through events before the job returned
    new = run_grid(LANE_SPECS, lanes_store, data_dir=str(data_dir), vectorize="lanes",
                   progress=False)
    assert len(new) == len(LANE_SPECS) - 3  # resumed: the first three were not trained again
    seq_store = ResultStore(tmp_path / "seq.csv")
    run_grid(LANE_SPECS, seq_store, data_dir=str(data_dir), progress=False)
    lanes = {spec_key_of(r): r for r in lanes_store.rows()}
    seq = {spec_key_of(r): r for r in seq_store.rows()}
    assert lanes.keys() == seq.keys() and len(lanes) == len(LANE_SPECS)
    for key, row in seq.items():
        assert lanes[key]["tag"] == "lanes"
        for col in ("test_error", "best_val_error", "best_epoch"):
            assert lanes[key][col] == row[col], (key, col)


def test_lanes_jobs_split_families_over_workers_and_keep_the_rest() -> None:
    specs = [*LANE_SPECS, RunSpec("cifar10", "feed_forward", per_class=2, split=1),
             RunSpec("mnist", "ladder", per_class=2, split=1),
             RunSpec("cifar10", "feed_forward", per_class=10, split=1)]
    jobs = grid._jobs(specs, {}, "lanes", workers=2)
    lane_jobs = [j for j in jobs if isinstance(j[0], grid.partial)]
    assert len(lane_jobs) == 2 and sum(len(j[1]) for j in lane_jobs) == 9  # two workers
    packed = sorted((s.dataset, s.method) for j in lane_jobs for s in j[1])
    assert packed.count(("cifar10", "feed_forward")) == 1  # CIFAR (random crops) packs too
    rest = sorted(j[2] for j in jobs if not isinstance(j[0], grid.partial))
    # 20 examples (not a multiple of the batch) and a stateful method: per-run path
    assert rest == [8, 9]
    assert len(grid._jobs(specs[:8], {}, "lanes", workers=1)) == 1
    with pytest.raises(ValueError, match="vectorize must be"):
        grid._vectorize_mode("grid")


@pytest.mark.parametrize("vectorize", [False, "lanes"])
def test_worker_processes_send_progress_and_rows(tmp_path: Path, vectorize) -> None:
    """Two spawned workers: progress events and (lanes) finished rows cross the process
    boundary through the manager queue, and every run ends up in the CSV once."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_tiny_mnist(data_dir)
    store = ResultStore(tmp_path / "grid.csv")
    new = run_grid(LANE_SPECS, store, data_dir=str(data_dir), workers=2, threads=1,
                   vectorize=vectorize, progress=False)
    assert len(new) == len(LANE_SPECS)
    assert sorted(spec_key_of(r) for r in store.rows()) == sorted(map(spec_key, LANE_SPECS))


_APPENDER = """
import sys
from latent_aug.grid import ResultStore
store, who = ResultStore(sys.argv[1]), sys.argv[2]
for i in range(40):
    store.append({"dataset": "mnist", "method": who, "per_class": i, "split": 1, "epochs": 1})
"""


def test_two_processes_appending_to_one_csv_keep_every_row(tmp_path: Path) -> None:
    path = tmp_path / "shared.csv"
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), who])
             for who in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    rows = ResultStore(path).rows()
    assert sorted((r["method"], int(r["per_class"])) for r in rows) == sorted(
        (who, i) for who in ("a", "b") for i in range(40))


# ----------------------------------------------------------------------------------------------
# epoch checkpoints: a run cut off mid-way continues from its last saved epoch
# ----------------------------------------------------------------------------------------------


def test_grid_continues_an_interrupted_run_from_its_epoch_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grid, "_data_for", lambda spec, *a: tiny_split(spec.split, n=20, n_eval=10))
    spec = RunSpec("mnist", "perturb_class_conditional", per_class=2, split=1, epochs=4,
                   batch_size=10)
    reference = run_grid([spec], ResultStore(tmp_path / "reference.csv"), progress=False)[0]
    real_train_run = grid.train_run

    def ctrl_c_after_epoch_two(spec, data, *, on_epoch, **kw):
        def hook(epoch: int, val: float) -> None:
            on_epoch(epoch, val)
            if epoch == 2:
                raise KeyboardInterrupt

        return real_train_run(spec, data, on_epoch=hook, **kw)

    monkeypatch.setattr(grid, "train_run", ctrl_c_after_epoch_two)
    folder = tmp_path / "grid.checkpoints"
    store = ResultStore(tmp_path / "grid.csv")
    with pytest.raises(KeyboardInterrupt):
        run_grid([spec], store, progress=False, checkpoint_dir=folder, checkpoint_every=0)
    assert store.rows() == []
    assert [p.name for p in folder.iterdir()] == [grid.checkpoint_path(folder, spec).name]
    assert grid.saved_epochs(folder, spec) == 2

    monkeypatch.setattr(grid, "train_run", real_train_run)
    [row] = run_grid([spec], store, progress=False, checkpoint_dir=folder, checkpoint_every=0)
    assert row["tag"] == "resumed@2" and reference["tag"] == ""
    for column in ("test_error", "best_val_error", "best_epoch", "last_val_error"):
        assert row[column] == reference[column], column
    assert not folder.exists(), "the emptied checkpoint folder is removed"


def test_checkpoint_names_tell_runs_apart() -> None:
    base = RunSpec("cifar10", "recon_all", per_class="all", split=2)
    variants = [base, RunSpec("cifar10", "recon_all", per_class="all", split=3),
                RunSpec("cifar10", "recon_all", per_class="all", split=2,
                        options=(("l2_reduction", "mean"),)),
                RunSpec("cifar10", "recon_all", per_class="all", split=2, batch_size=50)]
    names = [grid.checkpoint_path("ck", s).name for s in variants]
    assert names[0] == "cifar10-recon_all-all-set2-e120.pt"
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names)
