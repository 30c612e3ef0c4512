"""CIFAR-10 with a timm backbone: does latent perturbation help a modern network?

    python benchmarks/timm_cifar.py --device cuda                 # the full grid (GPU)
    python benchmarks/timm_cifar.py --device cuda --input-decoder learned
    python benchmarks/timm_cifar.py --backbone test_resnet --epochs 20   # the CPU stand-in
    python benchmarks/timm_cifar.py --smoke                       # 1 epoch, tiny subset, CPU

The paper's CIFAR-10 protocol (``latent_aug.protocol``) with the reference network replaced
by a timm backbone (``--backbone``, default resnet18 with the 3×3 stride-1 stem of
:func:`latent_aug.timm_support.adapt_resnet_for_cifar`): 100, 500 and 1000 training examples
per class, three sets, methods ``feed_forward``, ``perturb_class_conditional`` and
``perturb_random``; Adam at 0.002 divided by 5 at 1/3 and 2/3 of ``--epochs`` (the paper's
schedule at 120), batch 100, λ = 0.01, random 24×24 crops and flips (center crops to
evaluate), best-validation test error.

Why resnet18: it is the usual CIFAR baseline and the opposite of the paper's network in every
way that matters here (11M parameters instead of 0.2M, residual blocks, batch norm, a 512-d
pooled latent), and its 32×32 variant is well known. On the 24×24 crops the CIFAR stem leaves a
3×3 map at ``layer4``. It needs a GPU: one run at 1000 per class is ~1.2M image-steps.

On CPU (2 cores) resnet18 is out of reach (the CIFAR stem costs 625 MFLOP per 24×24 image
forward; even timm's plain stem 56 MFLOP), so the CPU results use timm's ``test_resnet``: the
same ResNet code (deep stem, max-pool, one BasicBlock per stage, batch norm, 96-d pooled
latent, 0.37M parameters, 5 MFLOP per image forward) through the same timm contract, for 20
epochs (schedule compressed) instead of 120. It shows whether the regularizer helps a timm
residual backbone with batch norm; it says nothing of resnet18's numbers, which need the GPU
command above.

z is timm's pre-logits (the classifier input); the input decoder is ``none`` (latent-only: λ1
unused) or, with ``--input-decoder learned``, a small decoder with its own weights: residual
blocks cannot be mirrored by the tied decoder.

Rows go to ``benchmarks/results/timm_cifar_<device>.csv`` through ``latent_aug.grid``
(atomic, resumable: rerun the same command to continue); the report is
``timm_cifar_<device>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from latent_aug.grid import (
    ResultStore,
    atomic_write_text,
    device_name,
    result_row,
    run_grid,
    spec_key,
)
from latent_aug.protocol import RunSpec, train_run

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["feed_forward", "perturb_class_conditional", "perturb_random"]
PER_CLASS = [100, 500, 1000]
SPLITS = [1, 2, 3]


def make_specs(backbone: str, methods: list[str], per_class: list[int], splits: list[int],
               epochs: int, input_decoder: str) -> list[RunSpec]:
    """One spec per (set, size, method). ``feed_forward`` ignores the decoder option, so it
    is left out of its options: both decoder modes share the same baseline rows."""
    specs = []
    for s in splits:
        for n in per_class:
            for m in methods:
                options = [("backbone", backbone)]
                if m != "feed_forward":
                    options.append(("input_decoder", input_decoder))
                specs.append(RunSpec("cifar10", m, n, s, epochs=epochs, options=tuple(options)))
    return specs


# -- report --------------------------------------------------------------------------------


def _options(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(";") if kv)


def report(rows: list[dict[str, str]], header: str) -> str:
    """Mean ± std test error per backbone, decoder mode, method and size; Δ vs feed_forward."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        opts = _options(r["options"])
        backbone = opts.get("backbone", "reference")
        decoder = opts.get("input_decoder", "") if r["method"] != "feed_forward" else ""
        cells[(backbone, r["epochs"], r["method"], decoder, int(r["per_class"]))].append(
            float(r["test_error"]))
    lines = ["# CIFAR-10 with timm backbones: test error (%)", "", header, ""]
    meta = sorted({(r["device"], r["torch"]) for r in rows})
    lines += [f"Runs: {len(rows)}. Device / torch: "
              + "; ".join(" / ".join(m) for m in meta) + ".", ""]
    lines += ["Each cell: mean ± std over the sets that ran [n sets]; (Δ vs feed_forward of "
              "the same backbone, epochs and size).", ""]
    for backbone, epochs in sorted({(k[0], k[1]) for k in cells}):
        sizes = sorted({k[4] for k in cells if k[:2] == (backbone, epochs)})
        lines += [f"## {backbone}, {epochs} epochs", "",
                  "| method | input decoder | " + " | ".join(map(str, sizes)) + " |",
                  "|---|---|" + "---|" * len(sizes)]
        variants = sorted({k[2:4] for k in cells if k[:2] == (backbone, epochs)},
                          key=lambda v: (v[0] != "feed_forward", v))
        for method, decoder in variants:
            out = []
            for n in sizes:
                vals = cells.get((backbone, epochs, method, decoder, n))
                if not vals:
                    out.append("")
                    continue
                base = cells.get((backbone, epochs, "feed_forward", "", n))
                delta = ""
                if base and method != "feed_forward":
                    delta = f" ({mean(vals) - mean(base):+.2f})"
                spread = f" ± {pstdev(vals):.2f}" if len(vals) > 1 else ""
                out.append(f"{mean(vals):.2f}{spread} [{len(vals)}]{delta}")
            lines.append(f"| {method} | {decoder or '-'} | " + " | ".join(out) + " |")
        lines.append("")
    lines += ["CIFAR-10 is read from the JPEG re-encoded copy when the original batches are "
              "missing (see latent_aug.data), so errors are close to, not identical with, the "
              "original dataset's.", ""]
    return "\n".join(lines)


def write_report(store: ResultStore, path: Path, header: str) -> str:
    rows = store.rows()
    if not rows:
        return ""
    text = report(rows, header)
    atomic_write_text(path, text)
    return text


# -- running -------------------------------------------------------------------------------


def smoke(args: argparse.Namespace, store: ResultStore) -> None:
    """One epoch per method on 10 examples per class, evaluated on 200 validation and test
    images, in-process: checks the whole path (backbone, wrapper, protocol, CSV, report)."""
    from latent_aug.data import make_splits

    data = make_splits("cifar10", args.data_dir, 10, 1, args.device, download=args.download)
    # a fixed random 200 of each (the files may be sorted by class)
    pick = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:200]
    pick = pick.to(data.valid_x.device)
    data = dataclasses.replace(
        data, valid_x=data.valid_x[pick], valid_y=data.valid_y[pick],
        test_x=data.test_x[pick], test_y=data.test_y[pick],
    )
    specs = make_specs(args.backbone, args.methods, [10], [1], 1, args.input_decoder)
    done = store.done()
    for spec in specs:
        if spec_key(spec) in done:
            continue
        result = train_run(spec, data)
        store.append(result_row(spec, result, device_name(args.device), tag="smoke"))
        print(f"{spec.method}: test error {result.test_error:.1f}% ({result.seconds:.1f} s)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="resnet18", help="a timm model name (default resnet18)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, metavar="METHOD")
    p.add_argument("--per-class", nargs="+", type=int, default=PER_CLASS, metavar="N")
    p.add_argument("--splits", nargs="+", type=int, choices=[1, 2, 3], default=SPLITS,
                   metavar="SET")
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--input-decoder", choices=["none", "learned"], default="none",
                   help="none: latent-only (default); learned: a small decoder of its own")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=None,
                   help="CPU worker processes (default: one single-thread worker per core)")
    p.add_argument("--data-dir", default=None,
                   help="dataset directory (default: $LATENT_AUG_DATA, then ~/.cache/latent_aug)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 if missing")
    p.add_argument("--name", help="results file stem (default timm_cifar_<device type>)")
    p.add_argument("--smoke", action="store_true",
                   help="1 epoch, 10 per class, 200 eval images, set 1 (name gets '_smoke')")
    p.add_argument("--report-only", action="store_true", help="rewrite the report and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device_type = args.device.split(":")[0]
    name = args.name or f"timm_cifar{'_smoke' if args.smoke else ''}_{device_type}"
    store = ResultStore(RESULTS / f"{name}.csv")
    given = argv if argv is not None else sys.argv[1:]
    header = f"Command: `python benchmarks/timm_cifar.py {' '.join(given)}`"
    if not args.report_only:
        if device_type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False.")
        start = time.perf_counter()
        if args.smoke:
            smoke(args, store)
        else:
            specs = make_specs(args.backbone, args.methods, args.per_class, args.splits,
                               args.epochs, args.input_decoder)
            workers = args.workers or (1 if device_type == "cuda"
                                       else max(1, torch.get_num_threads()))
            run_grid(specs, store, data_dir=args.data_dir, device=args.device, workers=workers,
                     threads=1 if workers > 1 else None, download=args.download)
        print(f"wall time: {time.perf_counter() - start:.1f} s")
    text = write_report(store, RESULTS / f"{name}.md", header)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
