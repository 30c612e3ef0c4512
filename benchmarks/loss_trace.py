"""Trace the loss terms of the first training steps of one run (a diagnostic).

    python benchmarks/loss_trace.py --dataset cifar10 --method recon_all --per-class 100 \\
        --steps 30 --option l2_reduction=mean --write benchmarks/results/loss_trace.md

The run is the protocol's (its seed's initial weights, Adam at the dataset's learning rate,
batches and crops from the run's generator, as in :func:`latent_aug.protocol.fit`); every
``--every`` steps it prints the cross-entropy, each unweighted term of the wrapper's
``LossBreakdown`` and the standard deviation of the logits, and at the end the validation
error. Each ``--write`` appends one table with its command to the file, so that readings can
be set side by side (e.g. the L2 reduction of ``recon_all`` on CIFAR-10, which collapses with
the default sum: the README's "Which reading of the paper").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from latent_aug.config import parse_options
from latent_aug.data import make_splits
from latent_aug.errors import ConfigError
from latent_aug.protocol import (
    LEARNING_RATE,
    WRAPPED_METHODS,
    RunSpec,
    build_model,
    epoch_batches,
    error_rate,
)


def trace(spec: RunSpec, steps: int, every: int, data_dir: str | None) -> tuple[list[dict], float]:
    """``(rows, validation error)`` of the first ``steps`` steps of ``spec``."""
    data = make_splits(spec.dataset, data_dir, per_class=spec.per_class, split=spec.split)
    torch.manual_seed(spec.seed)
    model = build_model(spec)
    if not hasattr(model, "losses"):
        raise ConfigError(f"Method {spec.method!r} has no auxiliary terms to trace; pick a "
                          f"wrapped method: {list(WRAPPED_METHODS)}.")
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE[spec.dataset])
    rows, step = [], 0
    model.train()
    while step < steps:
        for xb, yb in epoch_batches(data, spec.batch_size, gen):
            logits = model(xb)
            ce = F.cross_entropy(logits, yb)
            terms = model.losses(yb)
            opt.zero_grad(set_to_none=True)
            (ce + terms.total).backward()
            opt.step()
            if step % every == 0 or step == steps - 1:
                rows.append({"step": step, "cross_entropy": float(ce.detach()),
                             **terms.as_floats(), "logit_std": float(logits.detach().std())})
            step += 1
            if step == steps:
                break
    val = float(error_rate(model, data.valid_x, data.valid_y, data.crop))
    return rows, val


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) if k == "step" else f"{r[k]:.4g}"
                                       for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="cifar10")
    p.add_argument("--method", choices=WRAPPED_METHODS, default="recon_all")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--split", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--option", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--write", default=None, metavar="PATH", help="append the table to PATH")
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        raise SystemExit("error: --steps and --every must be >= 1.")
    try:
        options = tuple(sorted(parse_options(args.option).items()))
        spec = RunSpec(args.dataset, args.method, args.per_class, args.split, options=options)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    torch.set_num_threads(args.threads)
    rows, val = trace(spec, args.steps, args.every, args.data_dir)
    given = argv if argv is not None else sys.argv[1:]
    text = "\n".join([
        f"## {spec.dataset} {spec.method} {args.per_class}/class set {args.split}"
        f"{' [' + ', '.join(args.option) + ']' if args.option else ''}",
        "",
        f"Command: `python benchmarks/loss_trace.py {' '.join(given)}`; torch {torch.__version__}, "
        f"CPU, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Terms are unweighted "
        f"(the total is weighted, as `aux_loss` returns it).",
        "",
        table(rows),
        "",
        f"Validation error after {args.steps} steps: {val:.2f} %.",
        "",
    ])
    print(text)
    if args.write:
        path = Path(args.write)
        if not path.exists():
            path.write_text("# Loss terms of the first training steps\n\n")
        with path.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
