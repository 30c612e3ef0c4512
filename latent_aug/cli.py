"""The ``latent-aug`` command line.

    latent-aug figures --dataset mnist --data-dir DIR --out docs/figures --epochs 120 \\
        --checkpoint-dir checkpoints --max-background 10000 --device cpu
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import figures
from .allocator import keep_freed_memory


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _run_figures(args: argparse.Namespace) -> int:
    if torch.device(args.device).type == "cpu":
        keep_freed_memory()  # this process trains: reuse freed heap (see latent_aug.allocator)
    written = figures.make_figures(
        dataset=args.dataset,
        data_dir=args.data_dir,
        out_dir=args.out,
        checkpoint_dir=args.checkpoint_dir,
        device=args.device,
        epochs=args.epochs,
        recon_per_class=args.recon_per_class,
        embed_per_class=args.embed_per_class,
        split=args.split,
        std=args.std,
        max_background=args.max_background,
        seed=args.seed,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    for path in written.values():
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latent-aug", description="Semantic-noise latent regularization: tools."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "figures",
        help="train proposed-base and draw the paper's Figures 5-8 + preservation scores",
        description=figures.make_figures.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    p.add_argument("--data-dir", default=None,
                   help="dataset directory (default: $LATENT_AUG_DATA, then ~/.cache/latent_aug)")
    p.add_argument("--out", default="docs/figures", help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=120)
    p.add_argument("--checkpoint-dir", default=None,
                   help="save trained networks here and reuse them on the next run")
    p.add_argument("--max-background", type=_positive_int,
                   default=figures.DEFAULT_MAX_BACKGROUND,
                   help="unseen examples behind the t-SNE maps (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--recon-per-class", type=_positive_int, default=2000,
                   help="training examples per class for Figures 5 and 8 (default: %(default)s)")
    p.add_argument("--embed-per-class", type=_positive_int, default=100,
                   help="training examples per class for Figures 6, 7 and the scores "
                        "(default: %(default)s)")
    p.add_argument("--split", type=int, choices=[1, 2, 3], default=1,
                   help="which subset draw ('set' in the paper)")
    p.add_argument("--std", type=float, default=0.2, help="noise std of the figures")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_figures)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``latent-aug`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
