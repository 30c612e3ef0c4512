"""Run grids of training runs (methods × sizes × sets), saving each finished run at once.

* Every finished run is one CSV row, written atomically (temporary file + ``os.replace``),
  so a grid killed at any moment keeps every finished row and never holds a partial one.
* A grid resumes: runs whose key (dataset, method, per_class, split, epochs, options) is
  already in the file are skipped.
* With ``checkpoint_dir``, a run trained on its own (not in lanes or vectorized sets) also
  saves its state there every ``checkpoint_every`` seconds (:func:`latent_aug.protocol.fit`),
  so a grid killed mid-run continues that run from its last saved epoch, not its first.
* On CPU, runs go to ``workers`` single-thread processes (two one-thread workers gave about
  1.5× the throughput of one two-thread process on a 2-core machine); on CUDA they run one
  after another in-process. Each run computes exactly what it would compute alone: the
  same seed, the same data, the same step order.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io
import math
import multiprocessing as mp
import os
import platform
import queue as _queue
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .allocator import keep_freed_memory
from .files import atomic_write_text
from .protocol import RunResult, RunSpec, load_epoch_checkpoint, train_run

COLUMNS = [
    "dataset", "method", "per_class", "split", "test_error", "best_val_error", "best_epoch",
    "epochs", "device", "seconds", "tag", "options", "torch", "threads", "date", "diverged_epoch",
    "last_val_error",
]
KEY = ("dataset", "method", "per_class", "split", "epochs", "options")


def options_text(options: Iterable[tuple[str, Any]]) -> str:
    """``(("y_space", "probs"),)`` -> ``"y_space=probs"`` (sorted, ``;``-separated)."""
    return ";".join(f"{k}={v}" for k, v in sorted(options))


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    """The run a CSV row (or a fresh ``result_row``) belongs to, comparable with
    :func:`spec_key`."""
    return tuple(str(row.get(k, "")) for k in KEY)


def spec_key(spec: RunSpec) -> tuple[str, ...]:
    return (spec.dataset, spec.method, str(spec.per_class), str(spec.split), str(spec.epochs),
            options_text(spec.options))


class ResultStore:
    """A CSV of finished runs, appended to atomically.

    Appends hold an exclusive lock on ``<csv>.lock`` (POSIX ``flock``) around their
    read-modify-write, so two grids writing one CSV at once keep every row."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def done(self) -> set[tuple[str, ...]]:
        return {row_key(r) for r in self.rows()}

    def append(self, row: dict[str, Any]) -> None:
        with self._locked():
            rows = self.rows() + [{k: row.get(k, "") for k in COLUMNS}]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(self.path, buf.getvalue())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: one writer at a time is the caller's business
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def resumed_tag(resumed_at: Sequence[int]) -> str:
    """``"resumed@19,106"`` for a run continued from its checkpoints at epochs 19 and 106."""
    return f"resumed@{','.join(map(str, resumed_at))}" if resumed_at else ""


def result_row(spec: RunSpec, result: RunResult, device: str, tag: str = "") -> dict[str, Any]:
    return {
        "dataset": spec.dataset,
        "method": spec.method,
        "per_class": spec.per_class,
        "split": spec.split,
        "test_error": f"{result.test_error:.2f}",
        "best_val_error": f"{result.best_val_error:.2f}",
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "device": device,
        "seconds": f"{result.seconds:.1f}",
        "tag": ";".join(filter(None, [tag, resumed_tag(result.resumed_at)])),
        "options": options_text(spec.options),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "diverged_epoch": diverged_epoch(result.train_losses) or "",
        "last_val_error": f"{result.val_errors[-1]:.2f}" if result.val_errors else "",
    }


def diverged_epoch(train_losses: Sequence[float]) -> int | None:
    """The first epoch (1-based) whose mean training loss was not finite, or ``None``.

    A run that diverges keeps training to its last epoch (the protocol is unchanged) and its
    test error is still that of its best-validation epoch, usually one before the divergence;
    the column says that it happened."""
    return next((i for i, loss in enumerate(train_losses, 1) if not math.isfinite(loss)), None)


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu:{platform.processor() or platform.machine()}"


# -- execution ------------------------------------------------------------------------------

_DATA_CACHE: dict[tuple, Any] = {}


def _data_for(spec: RunSpec, data_dir: str | None, device: str, download: bool):
    from .data import make_splits

    key = (spec.dataset, spec.per_class, spec.split, device)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one subset at a time keeps a worker's memory flat
        _DATA_CACHE[key] = make_splits(
            spec.dataset, data_dir, spec.per_class, spec.split, device, download=download
        )
    return _DATA_CACHE[key]


def checkpoint_path(folder: str | os.PathLike, spec: RunSpec) -> Path:
    """Where a grid keeps ``spec``'s epoch checkpoint in ``folder``:
    ``mnist-proposed_base-100-set1-e120[-<options hash>].pt``."""
    name = f"{spec.dataset}-{spec.method}-{spec.per_class}-set{spec.split}-e{spec.epochs}"
    if spec.options or spec.batch_size != 100:
        detail = f"{options_text(spec.options)}|{spec.batch_size}".encode()
        name += "-" + hashlib.sha1(detail).hexdigest()[:10]
    return Path(folder) / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".pt")


def saved_epochs(folder: str | os.PathLike | None, spec: RunSpec) -> int:
    """Epochs of ``spec`` already in its checkpoint in ``folder`` (0 when none)."""
    if folder is None:
        return 0
    state = load_epoch_checkpoint(checkpoint_path(folder, spec), spec)
    return 0 if state is None else int(state["epoch"])


def execute(
    spec: RunSpec,
    data_dir: str | None,
    device: str,
    download: bool = False,
    events: Any = None,
    run_id: int = 0,
    tag: str = "",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> dict[str, Any]:
    """Train one run and return its CSV row (runs in a worker or in-process)."""
    data = _data_for(spec, data_dir, device, download)

    def on_epoch(epoch: int, val: float) -> None:
        if events is not None:
            events.put((run_id, epoch, val))

    checkpoint = checkpoint_path(checkpoint_dir, spec) if checkpoint_dir is not None else None
    result = train_run(spec, data, on_epoch=on_epoch, checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every)
    return result_row(spec, result, device_name(device), tag)


def execute_group(
    specs: list[RunSpec],
    data_dir: str | None,
    device: str,
    download: bool = False,
    events: Any = None,
    run_ids: list[int] | None = None,
    tags: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Train runs that differ only in their set together (vmap); return their CSV rows."""
    from .data import load_dataset, split_from
    from .vectorized import train_runs_vectorized

    loaded = load_dataset(specs[0].dataset, data_dir, download=download)  # one load per cell
    datas = [split_from(loaded, s.dataset, s.per_class, s.split, device) for s in specs]
    ids = run_ids or list(range(len(specs)))

    def on_epoch(r: int, epoch: int, val: float) -> None:
        if events is not None:
            events.put((ids[r], epoch, val))

    results = train_runs_vectorized(specs, datas, on_epoch=on_epoch)
    tags = tags or [""] * len(specs)
    return [
        result_row(s, res, device_name(device), tag) | {"tag": tag or "vectorized"}
        for s, res, tag in zip(specs, results, tags)
    ]


def execute_lanes(
    specs: list[RunSpec],
    data_dir: str | None,
    device: str,
    download: bool = False,
    events: Any = None,
    run_ids: list[int] | None = None,
    tags: list[str] | None = None,
    cuda_graph: bool | None = None,
) -> list[dict[str, Any]]:
    """Train ``specs`` in lanes (see :mod:`latent_aug.lanes`): one trainer per method family,
    all driven round-robin. Each finished run's row is also sent through ``events`` at once
    (``("row", run id, row)``), so the grid writes it before the bundle ends."""
    from .data import eval_sets, load_dataset, split_from
    from .lanes import LaneTrainer, family_key, train_families

    ids = run_ids or list(range(len(specs)))
    tags = tags or [""] * len(specs)
    loaded = {name: load_dataset(name, data_dir, download=download)
              for name in dict.fromkeys(s.dataset for s in specs)}
    shared = {name: eval_sets(data, device) for name, data in loaded.items()}  # one copy
    families: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        families.setdefault(family_key(spec), []).append(i)
    rows: list[dict[str, Any]] = []
    trainers = []
    for members in families.values():
        datas = [split_from(loaded[specs[i].dataset], specs[i].dataset, specs[i].per_class,
                            specs[i].split, device, with_eval=False) for i in members]

        def on_result(run: int, result: Any, members: list[int] = members) -> None:
            i = members[run]
            row = result_row(specs[i], result, device_name(device), tags[i] or "lanes")
            rows.append(row)
            if events is not None:
                events.put(("row", ids[i], row))

        def on_epoch(run: int, epoch: int, val: float, members: list[int] = members) -> None:
            if events is not None:
                events.put((ids[members[run]], epoch, val))

        trainers.append(LaneTrainer([specs[i] for i in members], datas, cuda_graph=cuda_graph,
                                    on_epoch=on_epoch, on_result=on_result,
                                    eval_sets=shared[specs[members[0]].dataset]))
    train_families(trainers)
    return rows


def _init_worker(threads: int, keep_memory: bool = False) -> None:
    torch.set_num_threads(threads)
    if keep_memory:
        keep_freed_memory()


def run_grid(
    specs: list[RunSpec],
    store: ResultStore,
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    workers: int = 1,
    threads: int | None = None,
    download: bool = False,
    tags: dict[RunSpec, str] | None = None,
    progress: bool = True,
    vectorize: bool | str = False,
    cuda_graph: bool | None = None,
    keep_memory: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> list[dict[str, Any]]:
    """Run every spec not yet in ``store``; return the new rows (in completion order).

    ``checkpoint_dir``: runs trained one at a time save their state there at most every
    ``checkpoint_every`` seconds and continue from it when the grid is run again after an
    interruption (their row's ``tag`` then says ``resumed@<epoch>[,<epoch>...]``, one epoch per
    continuation, and ``seconds`` sums the pieces); each file is deleted when its run ends, and
    the folder when it is left empty.

    ``vectorize="sets"`` (or True) trains the sets of each grid cell together (see
    :mod:`latent_aug.vectorized`); ``vectorize="lanes"`` trains every run of a method together
    in lanes (see :mod:`latent_aug.lanes`; the method families are split over ``workers``
    and each worker drives its families round-robin; ``cuda_graph`` as in
    :class:`~latent_aug.lanes.LaneTrainer`). Runs that cannot be vectorized run one at a time.

    ``keep_memory`` (CPU only): the processes that train call
    :func:`latent_aug.allocator.keep_freed_memory`, so the per-batch activations reuse freed
    heap instead of page-faulting in fresh pages (a 50-per-class MNIST slice: 78 s instead of
    101 s, the same rows; ``benchmarks/results/timings.md``). In-process runs (``workers=1``)
    change this process.
    """
    mode = _vectorize_mode(vectorize)
    from tqdm.auto import tqdm

    done = store.done()
    todo = [s for s in specs if spec_key(s) not in done]
    tags = tags or {}
    saved = sum(saved_epochs(checkpoint_dir, s) for s in todo)
    bar = tqdm(
        total=sum(s.epochs for s in todo),
        initial=saved,
        unit="ep",
        disable=not progress,
        desc=f"{len(todo)} runs ({len(specs) - len(todo)} already done)",
        dynamic_ncols=True,
    )
    new_rows: list[dict[str, Any]] = []
    if not todo:
        bar.close()
        _remove_if_empty(checkpoint_dir)
        return new_rows
    status: dict[int, str] = {}

    def show(run_id: int, epoch: int, val: float) -> None:
        s = todo[run_id]
        status[run_id] = f"{s.method}@{s.per_class}/set{s.split} ep{epoch} val {val:.2f}%"
        bar.update(1)
        if epoch == s.epochs:
            status.pop(run_id)
        bar.set_postfix_str(" | ".join(status.values()), refresh=False)

    written: set[tuple[str, ...]] = set()

    def keep(row: dict[str, Any]) -> None:
        key = row_key(row)
        if key not in written:  # a lanes row arrives as an event, then again at job end
            written.add(key)
            store.append(row)
            new_rows.append(row)

    def handle(item: tuple) -> None:
        if item[0] == "row":
            keep(item[2])
        else:
            show(*item)

    jobs = _jobs(todo, tags, mode, workers, cuda_graph)
    if checkpoint_dir is not None:
        one_run = partial(execute, checkpoint_dir=str(checkpoint_dir),
                          checkpoint_every=checkpoint_every)
        jobs = [(one_run if fn is execute else fn, *rest) for fn, *rest in jobs]
    if 1 < len(jobs) < workers or (workers > 1 and len(jobs) == 1):
        # fewer jobs than workers: give the idle workers' threads to the ones that run
        threads = max(1, (threads or 1) * workers // len(jobs))
        workers = len(jobs)
    keep_memory = keep_memory and torch.device(device).type == "cpu"
    if workers <= 1:
        if threads:
            torch.set_num_threads(threads)
        if keep_memory:
            keep_freed_memory()

        class _Direct:
            def put(self, item: tuple) -> None:
                handle(item)

        for fn, what, ids, tag in jobs:
            for row in _as_list(fn(what, data_dir, device, download, _Direct(), ids, tag)):
                keep(row)
        bar.close()
        _remove_if_empty(checkpoint_dir)
        return new_rows

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker,
        initargs=(threads or 1, keep_memory),
    ) as pool:
        events = manager.Queue()
        pending = {
            pool.submit(fn, what, data_dir, device, download, events, ids, tag)
            for fn, what, ids, tag in jobs
        }
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(events, handle)
            for fut in finished:
                for row in _as_list(fut.result()):
                    keep(row)
        _drain(events, handle)
    bar.close()
    _remove_if_empty(checkpoint_dir)
    return new_rows


def _remove_if_empty(folder: str | os.PathLike | None) -> None:
    """Remove a checkpoint folder that holds no checkpoint any more."""
    if folder is not None:
        with contextlib.suppress(OSError):  # absent, or still holding an unfinished run
            Path(folder).rmdir()


def _vectorize_mode(vectorize: bool | str | None) -> str | None:
    if vectorize in (False, None, "", "none"):
        return None
    if vectorize is True:
        return "sets"
    if vectorize not in ("sets", "lanes"):
        raise ValueError(f"vectorize must be False, 'sets' or 'lanes', got {vectorize!r}")
    return vectorize


def _jobs(todo: list[RunSpec], tags: dict[RunSpec, str], mode: str | None, workers: int = 1,
          cuda_graph: bool | None = None) -> list[tuple]:
    """``(function, spec(s), run id(s), tag(s))`` per unit of work."""
    from .lanes import can_pack_spec, family_key, pack_lanes
    from .vectorized import group_key

    jobs: list[tuple] = []
    if mode == "lanes":
        families: dict[tuple, list[int]] = {}
        rest = []
        for i, s in enumerate(todo):
            if can_pack_spec(s):
                families.setdefault(family_key(s), []).append(i)
            else:
                rest.append(i)
        fams = list(families.values())
        costs = [sum(estimated_cost(todo[i]) for i in f) for f in fams]
        lanes_fn = partial(execute_lanes, cuda_graph=cuda_graph)
        for bundle in pack_lanes([round(c) for c in costs], min(workers, len(fams))):
            ids = [i for f in bundle for i in fams[f]]
            jobs.append((lanes_fn, [todo[i] for i in ids], ids, [tags.get(todo[i], "")
                                                                 for i in ids]))
        # the rest (short batches, stateful methods) as vectorized cells; their ids back into todo
        for fn, what, ids, tag in _jobs([todo[i] for i in rest], tags, "sets"):
            mapped = [rest[j] for j in ids] if isinstance(ids, list) else rest[ids]
            jobs.append((fn, what, mapped, tag))
    elif mode == "sets":
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(todo):
            groups.setdefault(group_key(s), []).append(i)
        for ids in groups.values():
            specs = [todo[i] for i in ids]
            if len(ids) > 1 and specs[0].method not in ("ladder", "isda", "manifold_mixup"):
                jobs.append((execute_group, specs, ids, [tags.get(s, "") for s in specs]))
            else:
                jobs += [(execute, todo[i], i, tags.get(todo[i], "")) for i in ids]
    else:
        jobs = [(execute, s, i, tags.get(s, "")) for i, s in enumerate(todo)]
    # longest first: the big runs start at once and the small ones fill the workers at the
    # end, instead of one worker finishing the grid's largest run alone
    jobs.sort(key=lambda job: -sum(map(estimated_cost, _as_list(job[1]))))
    return jobs


def estimated_cost(spec: RunSpec) -> float:
    """Relative cost of a run, for scheduling only: training steps (a wrapped step costs about
    2.5 plain ones) plus one validation pass per epoch (about 25 plain steps on the paper's
    nets)."""
    per_class = spec.per_class if isinstance(spec.per_class, int) else 5000
    steps = -(-10 * per_class // spec.batch_size)
    return spec.epochs * (steps * (1.0 if spec.method == "feed_forward" else 2.5) + 25.0)


def _as_list(what: Any) -> list:
    """A job's spec(s) or result row(s) as a list."""
    return what if isinstance(what, list) else [what]




def _drain(events: Any, handle: Any) -> None:
    """Hand every queued event (a progress tuple or a ``("row", id, row)``) to ``handle``."""
    while True:
        try:
            item = events.get_nowait()
        except _queue.Empty:
            return
        handle(item)
