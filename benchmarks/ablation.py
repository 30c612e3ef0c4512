"""Which reading of the paper reproduces it? An ablation of the choices its text leaves open.

Stage 1 ("factorial", one factor at a time): the library's base reading, then each open
choice flipped alone, for the methods the choice can affect; MNIST, the paper's σ = 0.2 and
λ = 0.03 unchanged, three sets. Stage 2 ("combos"): combinations of the flips that helped.

    python benchmarks/ablation.py --stage factorial --per-class 100 50
    python benchmarks/ablation.py --stage combos --combos "y_space=probs,detach_noise=True"

Rows go to ``benchmarks/results/ablation.csv`` (resumable, like the reproduction benchmark);
the ``tag`` column names the reading and the ``options`` column holds its settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.paper_tables import PER_SET, TABLE1
from latent_aug.config import parse_options
from latent_aug.files import atomic_write_text
from latent_aug.grid import ResultStore, run_grid
from latent_aug.protocol import RunSpec

RESULTS = Path(__file__).resolve().parent / "results"
PROPOSED = ("proposed_base", "perturb_random", "perturb_class_conditional")

#: reading -> (options, methods it can change). "base" is the reading the library used before
#: this ablation (its defaults then, written out so the rows stay valid): y as logits,
#: gradient through ze, mirrored ReLU on decoded hidden layers, L2 summed over
#: features and averaged over the batch, z after fc1's ReLU, per-sample min-max range,
#: decoder biases, Glorot init.
READINGS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "base": ({}, ("feed_forward", *PROPOSED)),
    "y=probs": ({"y_space": "probs"}, PROPOSED),
    "ze detached": ({"detach_noise": True}, ("perturb_random", "perturb_class_conditional")),
    "linear decoders": ({"decoder_activation": "linear"}, PROPOSED),
    "L2 mean": ({"l2_reduction": "mean"}, PROPOSED),
    "z before ReLU": ({"latent_after_activation": False}, PROPOSED),
    "range per batch": ({"noise_range": "batch"}, ("perturb_random", "perturb_class_conditional")),
    "no decoder bias": ({"decoder_bias": False}, PROPOSED),
    "torch init": ({"init": "torch"}, ("feed_forward", *PROPOSED)),
}


def factorial_specs(per_class: list[int], splits: list[int], epochs: int, methods: list[str],
                    readings: list[str] | None = None):
    specs, tags = [], {}
    for n in per_class:
        for s in splits:
            for reading, (opts, affected) in READINGS.items():
                if readings and reading not in readings:
                    continue
                for m in affected:
                    if m not in methods:
                        continue
                    full = dict(opts)
                    if m != "feed_forward":  # every reading but "y=probs" uses logits
                        full.setdefault("y_space", "logits")
                    spec = RunSpec("mnist", m, n, s, epochs=epochs,
                                   options=tuple(sorted(full.items())))
                    specs.append(spec)
                    tags[spec] = reading
    return specs, tags


def combo_specs(combos: list[str], per_class, splits, epochs, methods):
    specs, tags = [], {}
    for n in per_class:
        for s in splits:
            for text in combos:
                opts = parse_options([text])
                for m in methods:
                    if m == "feed_forward":
                        continue
                    spec = RunSpec("mnist", m, n, s, epochs=epochs,
                                   options=tuple(sorted(opts.items())))
                    specs.append(spec)
                    tags[spec] = "combo: " + text
    return specs, tags


def report(rows: list[dict[str, str]]) -> str:
    """Per size: reading × method table (mean ± std over sets), and pcc − base per set."""
    cell: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        cell[(int(r["per_class"]), r["tag"], r["method"])][int(r["split"])] = float(
            r["test_error"])
    base_ff = {k[0]: v for k, v in cell.items() if k[1:] == ("base", "feed_forward")}
    lines = ["# Ablation: readings of the paper (MNIST test error %, σ = 0.2, λ = 0.03)", ""]
    meta = sorted({(r["device"], r["torch"], r["epochs"]) for r in rows})
    lines += ["Device / torch / epochs: " + "; ".join(" / ".join(m) for m in meta) + ".", ""]
    lines += ["Cells: mean ± std over the sets that ran, `[n]` = number of sets. "
              "`pcc − pb` / `pcc − pr`: class-conditional minus proposed_base / random noise "
              "in the same reading, paired by set (negative = the class-conditional noise "
              "helps).", ""]
    for n in sorted({k[0] for k in cell}):
        paper = {m: TABLE1["mnist"][m][n] for m in ("feed_forward", *PROPOSED)}
        lines += [f"## {n} examples per class", "",
                  "| reading | feed_forward | proposed_base | perturb_random | "
                  "perturb_class_conditional | pcc − pb | pcc − pr |",
                  "|---|---|---|---|---|---|---|"]
        lines.append("| paper (Table 1) | " + " | ".join(
            f"{paper[m]:.2f}" for m in ("feed_forward", *PROPOSED)) + " | "
            f"{paper['perturb_class_conditional'] - paper['proposed_base']:+.2f} | "
            f"{paper['perturb_class_conditional'] - paper['perturb_random']:+.2f} |")
        tags = sorted({k[1] for k in cell if k[0] == n}, key=_tag_order)
        for tag in tags:
            out = []
            for m in ("feed_forward", *PROPOSED):
                vals = cell.get((n, tag, m)) or (base_ff.get(n) if m == "feed_forward" else None)
                if not vals:
                    out.append("")
                    continue
                v = list(vals.values())
                inherited = "" if (n, tag, m) in cell else " (base)"
                out.append(f"{mean(v):.2f} ± {pstdev(v):.2f} [{len(v)}]{inherited}")
            pcc = cell.get((n, tag, "perturb_class_conditional"))
            pb = cell.get((n, tag, "proposed_base"))
            pb_note = ""
            if pb is None:  # a combination without its own proposed_base: its y reading's
                ref = "y=probs" if "y_space=probs" in tag else "base"
                pb, pb_note = cell.get((n, ref, "proposed_base")), f", vs {ref} pb"
            diffs = [_paired(pcc, pb, pb_note), _paired(pcc, cell.get((n, tag, "perturb_random")))]
            lines.append(f"| {tag} | " + " | ".join(out) + " | " + " | ".join(diffs) + " |")
        lines.append("")
    pcc_sets = PER_SET["mnist"]["perturb_class_conditional"]
    per_set = ", ".join(
        f"{n}: " + "/".join(f"{pcc_sets[s][n]:.2f}" for s in (1, 2, 3))
        for n in sorted({k[0] for k in cell})
    )
    lines += [f"Paper per-set perturb_class_conditional (set 1/2/3): {per_set}.", ""]
    return "\n".join(lines)


def _paired(a: dict[int, float] | None, b: dict[int, float] | None, note: str = "") -> str:
    """Mean of a − b over the sets both have, with the sets named."""
    common = sorted(set(a or {}) & set(b or {}))
    if not common:
        return ""
    d = mean(a[s] - b[s] for s in common)
    return f"{d:+.2f} (sets {','.join(map(str, common))}{note})"


def _tag_order(tag: str) -> tuple[int, str]:
    names = list(READINGS)
    return (names.index(tag) if tag in names else len(names), tag)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["factorial", "combos"], default="factorial")
    p.add_argument("--combos", nargs="*", default=[],
                   help='comma-separated option sets, e.g. "y_space=probs,detach_noise=True"')
    p.add_argument("--per-class", nargs="+", type=int, default=[100, 50])
    p.add_argument("--splits", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--methods", nargs="+", default=["feed_forward", *PROPOSED])
    p.add_argument("--readings", nargs="+", choices=list(READINGS), metavar="READING",
                   help=f"only these readings of the factorial: {', '.join(READINGS)}")
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", default=str(RESULTS / "ablation.csv"))
    p.add_argument("--vectorize", action="store_true", help="vmap the sets of a cell (GPUs)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    store = ResultStore(args.results)
    if not args.report_only:
        if args.stage == "factorial":
            specs, tags = factorial_specs(args.per_class, args.splits, args.epochs, args.methods,
                                          args.readings)
        else:
            specs, tags = combo_specs(args.combos, args.per_class, args.splits, args.epochs,
                                      args.methods)
        workers = args.workers or (1 if args.device.startswith("cuda")
                                   else max(1, torch.get_num_threads()))
        start = time.perf_counter()
        run_grid(specs, store, data_dir=args.data_dir, device=args.device, workers=workers,
                 threads=1 if workers > 1 else None, tags=tags, vectorize=args.vectorize)
        print(f"grid wall time: {time.perf_counter() - start:.1f} s ({workers} workers)")
    log = Path(args.results).with_suffix(".commands")
    given = argv if argv is not None else sys.argv[1:]
    if not args.report_only:  # every grid command that wrote rows, for the report
        command = "python benchmarks/ablation.py " + " ".join(
            f'"{a}"' if " " in a else a for a in given)
        done = log.read_text().splitlines() if log.exists() else []
        if command not in done:
            atomic_write_text(log, "\n".join([*done, command]) + "\n")
    rows = store.rows()
    if rows:
        text = report(rows)
        commands = log.read_text().splitlines() if log.exists() else []
        footer = "\n".join(f"    {c}" for c in commands)
        atomic_write_text(Path(args.results).with_suffix(".md"),
                          text + f"\nCommands that produced the rows:\n\n{footer}\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
