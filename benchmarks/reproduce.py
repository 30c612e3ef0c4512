"""The reproduction benchmark from a checkout: ``python benchmarks/reproduce.py ARGS`` is
``latent-aug reproduce ARGS`` (see :mod:`latent_aug.reproduce`) with results in this folder's
``results/`` by default."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from latent_aug.reproduce import main

    sys.exit(main(prog="python benchmarks/reproduce.py",
                  results=Path(__file__).resolve().parent / "results"))
