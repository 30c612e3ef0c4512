"""Figures 5-8 of the paper (section 4.4 and appendix A3) and a semantic-preservation score.

* Figure 5 / 8, :func:`reconstruction_grid`: training examples (top row) and the inputs
  decoded, ``g1'(z')``, from five perturbed latents ``z' = z + ze`` each, for random (left)
  and class-conditional (right) noise.
* Figure 6, :func:`tsne_figure`: one t-SNE map of the latents of unseen examples
  (background, coloured by class), the training examples and their perturbed latents.
* Figure 7, :func:`tsne_per_class`: the same map, one row per class.
* :func:`preservation_scores`: a number for what Figures 5-7 show by eye. For each kind of
  noise and std, the fraction of perturbed latents that keep the example's class, judged by
  the network's own head ``f2(z')`` and by the nearest unseen example's latent.

:func:`make_figures` trains the paper's *proposed-base* network (Figure 1(b), Eq. 5) and
writes all of them; ``latent-aug figures`` is its command line. matplotlib and scikit-learn
are imported only inside the functions that draw or embed, so ``import latent_aug`` needs
neither.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .errors import ConfigError

KINDS = ("random", "class_conditional")
KIND_TITLES = {"random": "random", "class_conditional": "class-conditional"}
SCORE_COLUMNS = ("kind", "std", "samples", "n", "head_agreement", "nearest_agreement")
#: Unseen examples drawn behind the t-SNE maps. All ~49k MNIST ones take too long on a
#: small CPU; a random subsample keeps the picture (and says so on the figure).
DEFAULT_MAX_BACKGROUND = 10_000
FIGURE_FILES = {
    "figure5": "figure5_reconstructions.png",
    "figure6": "figure6_tsne.png",
    "figure7": "figure7_tsne_per_class.png",
    "figure8a": "figure8_reconstructions_example1.png",
    "figure8b": "figure8_reconstructions_example2.png",
    "scores_csv": "preservation_scores.csv",
    "scores_png": "preservation_scores.png",
}


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _analysis_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode without autograd; every submodule's training flag is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators for a block, then put their old state back."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _flat(z: Tensor) -> Tensor:
    """``(B, ...) -> (B, D)``."""
    return rearrange(z, "b ... -> b (...)")


def _encode(wrapper: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Flattened latents ``(N, D)`` of ``x: (N, C, H, W)``, computed ``batch_size`` at a time."""
    device = _device(wrapper)
    return torch.cat(
        [_flat(wrapper.encode(x[i : i + batch_size].to(device)))
         for i in range(0, x.shape[0], batch_size)]
    )


def _perturbed(wrapper: nn.Module, x: Tensor, kind: str, std: float, batch_size: int) -> Tensor:
    """Flattened perturbed latents ``(N, D)`` of ``x: (N, C, H, W)``."""
    device = _device(wrapper)
    return torch.cat(
        [_flat(wrapper.perturb_latent(x[i : i + batch_size].to(device), kind, std)[1])
         for i in range(0, x.shape[0], batch_size)]
    )


def _nearest(queries: Tensor, reference: Tensor, *, max_elements: int = 1 << 24) -> Tensor:
    """Index of the nearest ``reference (M, D)`` row for every ``queries (Q, D)`` row, ``(Q,)``.

    Distances are computed for a block of queries at a time, so at most ``max_elements``
    distances exist at once.
    """
    rows = max(1, max_elements // max(1, reference.shape[0]))
    return torch.cat(
        [torch.cdist(queries[i : i + rows], reference).argmin(dim=1)
         for i in range(0, queries.shape[0], rows)]
    )


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG through a temporary file renamed into place, then close it."""
    from .files import atomic_write

    try:
        return atomic_write(
            path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi, bbox_inches="tight")
        )
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{name} must be a non-empty (N, C, H, W) tensor, got {got}.")


def _check_labels(x: Tensor, y: Tensor, name: str) -> None:
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ConfigError(
            f"{name} must hold one class index per example, shape ({x.shape[0]},), "
            f"got {tuple(y.shape)}."
        )


# ----------------------------------------------------------------------------------------------
# Figures 5 and 8: inputs decoded from perturbed latents
# ----------------------------------------------------------------------------------------------


def _mosaic(images: Tensor, pad: int = 1) -> np.ndarray:
    """``images: (R, N, C, H, W)`` in [0, 1] -> one ``(R*(H+p), N*(W+p), C)`` array, with
    ``pad`` white pixels right of and below every image."""
    padded = F.pad(images, (0, pad, 0, pad), value=1.0)
    return rearrange(padded, "r n c h w -> (r h) (n w) c").cpu().numpy()


def reconstruction_grid(
    wrapper: nn.Module,
    x: Tensor,
    path: str | os.PathLike,
    *,
    std: float = 0.2,
    samples: int = 5,
    mean: Tensor | None = None,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Figure 5 / 8: originals over the inputs decoded from ``samples`` perturbed latents.

    Two panels, (a) random and (b) class-conditional noise. In each, the top row is ``x``
    and every further row is ``g1'(z + ze)`` for one draw of the noise
    (:meth:`~latent_aug.SemanticNoiseWrapper.perturb_latent`), decoded with
    :meth:`~latent_aug.SemanticNoiseWrapper.reconstruct_input`.

    Args:
        wrapper: a :class:`~latent_aug.SemanticNoiseWrapper` with an input decoder.
        x: ``(N, C, H, W)`` examples, as the network sees them (mean-subtracted).
        path: the PNG to write.
        std: noise std (the paper's figures use 0.2).
        samples: perturbed draws per example (rows below the originals).
        mean: ``(C,)`` per-channel mean added back before display.
        seed: seed of the noise draws (torch's global generator is left as it was).
        title: figure title (default: says the std).

    Returns:
        ``path``. Pixels are clipped to the originals' range for display.
    """
    _check_images(x, "x")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}.")
    plt = _pyplot()
    device = _device(wrapper)
    x = x.to(device)
    with _analysis_mode(wrapper), _seeded(seed, device):
        panels = []
        for kind in KINDS:
            rows = [x]
            for _ in range(samples):
                _, z_perturbed = wrapper.perturb_latent(x, kind, std)
                rows.append(wrapper.reconstruct_input(z_perturbed, x))
            panels.append(torch.stack(rows))  # (1 + S, N, C, H, W)
    images = torch.stack(panels).float()  # (2, 1 + S, N, C, H, W)
    if mean is not None:
        images = images + mean.to(images).view(1, 1, 1, -1, 1, 1)
    lo, hi = images[:, 0].amin(), images[:, 0].amax()
    images = ((images - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)

    n, c, h, _ = x.shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.55 * n + 0.4), 0.55 * (samples + 1) + 0.9),
                             dpi=150)
    for ax, panel, kind, letter in zip(axes, images, KINDS, "ab"):
        grid = _mosaic(panel)
        ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None,
                  vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.axhline(h + 0.5, color="tab:red", linewidth=1.0)  # originals | reconstructions
        ax.set_title(f"({letter}) {KIND_TITLES[kind]} perturbation", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"Top row: training examples; below: g1'(z') for {samples} "
                          f"perturbed latents (noise std {std:g})", fontsize=9)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Figures 6 and 7: one t-SNE map of unseen, training and perturbed latents
# ----------------------------------------------------------------------------------------------


@dataclass
class LatentEmbedding:
    """2-D t-SNE coordinates of one embedding, shared by Figures 6 and 7 (numpy arrays).

    Attributes:
        background: ``(M, 2)`` unseen examples; ``background_y`` ``(M,)`` their classes.
        train: ``(N, 2)`` training examples; ``train_y`` ``(N,)``.
        perturbed: kind -> ``(N * P, 2)``: the ``P`` perturbed latents of each training
            example (example-major); ``perturbed_y`` ``(N * P,)`` the example's class.
        background_total: unseen examples before subsampling (``M`` when none was needed).
        std, perturbations: the noise std and ``P``.
    """

    background: np.ndarray
    background_y: np.ndarray
    train: np.ndarray
    train_y: np.ndarray
    perturbed: dict[str, np.ndarray]
    perturbed_y: np.ndarray
    background_total: int
    std: float
    perturbations: int

    @property
    def classes(self) -> list[int]:
        return sorted({int(c) for c in np.concatenate([self.train_y, self.background_y])})

    def background_note(self) -> str:
        m = len(self.background)
        if m < self.background_total:
            return (f"background: random subsample of {m} of the {self.background_total} "
                    f"unseen examples")
        return f"background: all {m} unseen examples"


def embed_latents(
    wrapper: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    other_x: Tensor,
    other_y: Tensor,
    *,
    perturbations: int = 3,
    std: float = 0.2,
    max_background: int | None = DEFAULT_MAX_BACKGROUND,
    seed: int = 0,
    perplexity: float = 30.0,
    batch_size: int = 1000,
) -> LatentEmbedding:
    """One t-SNE embedding of the latents of unseen examples (``other_x``), training examples
    and ``perturbations`` random and class-conditional perturbations of each training latent.

    All points are embedded together, so every panel of Figures 6 and 7 shares coordinates.

    Args:
        train_x, train_y: ``(N, C, H, W)`` training examples and ``(N,)`` classes.
        other_x, other_y: ``(M, C, H, W)`` examples not used for training and their classes.
        max_background: at most this many unseen examples (a seeded random subsample);
            ``None`` keeps all.
        perplexity: t-SNE perplexity, lowered to ``(points - 1) / 3`` for tiny inputs.
    """
    from sklearn.manifold import TSNE

    _check_images(train_x, "train_x")
    _check_images(other_x, "other_x")
    _check_labels(train_x, train_y, "train_y")
    _check_labels(other_x, other_y, "other_y")
    if perturbations < 1:
        raise ConfigError(f"perturbations must be >= 1, got {perturbations}.")
    if max_background is not None and max_background < 1:
        raise ConfigError(f"max_background must be >= 1 or None, got {max_background}.")
    total = other_x.shape[0]
    if max_background is not None and total > max_background:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(total, generator=gen)[:max_background].sort().values
        other_x, other_y = other_x[keep.to(other_x.device)], other_y[keep.to(other_y.device)]
    device = _device(wrapper)
    with _analysis_mode(wrapper), _seeded(seed, device):
        background = _encode(wrapper, other_x, batch_size)
        train = _encode(wrapper, train_x, batch_size)
        perturbed = {}
        for kind in KINDS:
            draws = torch.stack(
                [_perturbed(wrapper, train_x, kind, std, batch_size) for _ in range(perturbations)]
            )  # (P, N, D)
            perturbed[kind] = rearrange(draws, "p n d -> (n p) d")
    points = torch.cat([background, train, *perturbed.values()]).float().cpu().numpy()
    n_points = points.shape[0]
    tsne = TSNE(
        n_components=2,
        perplexity=float(min(perplexity, max(1.0, (n_points - 1) / 3))),
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    coords = tsne.fit_transform(points)
    m, n = background.shape[0], train.shape[0]
    cuts = np.cumsum([m, n, n * perturbations])
    train_y_np = train_y.cpu().numpy()
    return LatentEmbedding(
        background=coords[: cuts[0]],
        background_y=other_y.cpu().numpy(),
        train=coords[cuts[0] : cuts[1]],
        train_y=train_y_np,
        perturbed={"random": coords[cuts[1] : cuts[2]], "class_conditional": coords[cuts[2] :]},
        perturbed_y=np.repeat(train_y_np, perturbations),
        background_total=total,
        std=float(std),
        perturbations=perturbations,
    )


def _class_colors(classes: Sequence[int]) -> dict[int, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(classes)}


def _draw_background(ax: Any, emb: LatentEmbedding, colors: dict[int, Any], size: float) -> None:
    ax.scatter(emb.background[:, 0], emb.background[:, 1], s=size, linewidths=0, alpha=0.6,
               c=[colors[int(c)] for c in emb.background_y], rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_training(ax: Any, emb: LatentEmbedding, keep: np.ndarray, kind: str | None,
                   size: float) -> None:
    """Training examples ``keep`` (a mask over ``emb.train``): black circles alone, yellow
    circles over their perturbed latents of ``kind`` (blue crosses)."""
    train = emb.train[keep]
    if kind is None:
        ax.scatter(train[:, 0], train[:, 1], s=size, facecolors="none", edgecolors="black",
                   linewidths=0.8)
        return
    crosses = emb.perturbed[kind][np.repeat(keep, emb.perturbations)]
    ax.scatter(crosses[:, 0], crosses[:, 1], s=size, marker="x", color="mediumblue",
               linewidths=0.8)
    ax.scatter(train[:, 0], train[:, 1], s=size, color="yellow", edgecolors="black",
               linewidths=0.4)


def _class_legend(fig: Any, colors: dict[int, Any]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=col, label=str(c))
               for c, col in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), fontsize=8,
               title="background: unseen examples by class", title_fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.06))


def plot_tsne(
    emb: LatentEmbedding, path: str | os.PathLike, *, highlight: Sequence[int] | None = (0, 1, 9)
) -> Path:
    """Figure 6 from an embedding: (a) training examples, (b) with random and (c) with
    class-conditional perturbations, over the unseen examples; ``highlight`` picks the
    classes whose training examples are drawn (``None``: all)."""
    plt = _pyplot()
    colors = _class_colors(emb.classes)
    keep = (np.ones(len(emb.train_y), dtype=bool) if highlight is None
            else np.isin(emb.train_y, list(highlight)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    titles = [
        "(a) training examples",
        f"(b) + {emb.perturbations}x random perturbation",
        f"(c) + {emb.perturbations}x class-conditional perturbation",
    ]
    for ax, kind, title in zip(axes, (None, *KINDS), titles):
        _draw_background(ax, emb, colors, size=4.0)
        _draw_training(ax, emb, keep, kind, size=14.0)
        ax.set_title(title, fontsize=10)
    shown = "all classes" if highlight is None else "classes " + ", ".join(map(str, highlight))
    fig.suptitle(f"t-SNE of z: training examples of {shown} (noise std {emb.std:g}); "
                 f"{emb.background_note()}", fontsize=9)
    _class_legend(fig, colors)
    return _save_figure(fig, path)


def tsne_figure(
    wrapper: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    other_x: Tensor,
    other_y: Tensor,
    path: str | os.PathLike,
    *,
    perturbations: int = 3,
    std: float = 0.2,
    highlight: Sequence[int] | None = (0, 1, 9),
    max_background: int | None = DEFAULT_MAX_BACKGROUND,
    seed: int = 0,
    perplexity: float = 30.0,
) -> LatentEmbedding:
    """Figure 6: embed with :func:`embed_latents`, draw with :func:`plot_tsne`.

    Returns the embedding, for :func:`tsne_per_class` (Figure 7) to reuse.
    """
    emb = embed_latents(
        wrapper, train_x, train_y, other_x, other_y, perturbations=perturbations, std=std,
        max_background=max_background, seed=seed, perplexity=perplexity,
    )
    plot_tsne(emb, path, highlight=highlight)
    return emb


def tsne_per_class(
    emb: LatentEmbedding, path: str | os.PathLike, *, classes: Sequence[int] | None = None
) -> Path:
    """Figure 7: one row per class (all classes of the training examples by default), three
    columns: training examples, + random, + class-conditional perturbations, over the whole
    background, in the coordinates of Figure 6's embedding ``emb``."""
    plt = _pyplot()
    colors = _class_colors(emb.classes)
    rows = sorted({int(c) for c in emb.train_y}) if classes is None else list(classes)
    if not rows:
        raise ConfigError("tsne_per_class needs at least one class.")
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    titles = ["training examples", "+ random perturbation", "+ class-conditional perturbation"]
    for r, cls in enumerate(rows):
        keep = emb.train_y == cls
        for col, kind in enumerate((None, *KINDS)):
            ax = axes[r, col]
            _draw_background(ax, emb, colors, size=2.5)
            _draw_training(ax, emb, keep, kind, size=8.0)
            if r == 0:
                ax.set_title(titles[col], fontsize=10)
        axes[r, 0].set_ylabel(f"class {cls}", fontsize=10)
    fig.suptitle(f"t-SNE of z per class (noise std {emb.std:g}); {emb.background_note()}",
                 fontsize=9, y=1.0)
    fig.tight_layout()
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Semantic-preservation score
# ----------------------------------------------------------------------------------------------


def preservation_scores(
    wrapper: nn.Module,
    x: Tensor,
    y: Tensor,
    reference_x: Tensor,
    reference_y: Tensor,
    *,
    stds: Sequence[float] = (0.1, 0.2, 0.4),
    samples: int = 3,
    seed: int = 0,
    batch_size: int = 1000,
) -> list[dict[str, Any]]:
    """How often a perturbed latent keeps its example's class, per kind of noise and std.

    For each kind (``"random"``, ``"class_conditional"``) and each std (0 added first), every
    example ``x`` is perturbed ``samples`` times and each perturbed latent ``z'`` is scored:

    * ``head_agreement``: fraction with ``argmax f2(z') == y``;
    * ``nearest_agreement``: fraction whose nearest latent (Euclidean) among the reference
      (unseen) examples has class ``y``.

    The std 0 rows score the unperturbed latents (one draw), so they are exactly the
    baseline: ``head_agreement`` is then the head's accuracy on ``x``.

    Args:
        x, y: ``(N, C, H, W)`` examples (the training examples) and ``(N,)`` classes.
        reference_x, reference_y: ``(M, C, H, W)`` unseen examples and ``(M,)`` classes.

    Returns:
        One dict per (kind, std), with keys :data:`SCORE_COLUMNS` (``n``: latents scored).
    """
    _check_images(x, "x")
    _check_images(reference_x, "reference_x")
    _check_labels(x, y, "y")
    _check_labels(reference_x, reference_y, "reference_y")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}.")
    for s in stds:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
            raise ConfigError(f"stds must be finite numbers >= 0, got {s!r}.")
    levels = sorted({0.0, *(float(s) for s in stds)})
    device = _device(wrapper)
    y = y.to(device)
    rows = []
    with _analysis_mode(wrapper), _seeded(seed, device):
        reference = _encode(wrapper, reference_x, batch_size)
        reference_y = reference_y.to(device)
        for kind in KINDS:
            for std in levels:
                draws = 1 if std == 0 else samples
                head_hits = torch.zeros((), dtype=torch.long, device=device)
                near_hits = torch.zeros((), dtype=torch.long, device=device)
                for _ in range(draws):
                    for i in range(0, x.shape[0], batch_size):
                        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size]
                        if std == 0:
                            z = wrapper.encode(xb)
                        else:
                            z = wrapper.perturb_latent(xb, kind, std)[1]
                        head_hits += (wrapper.head_logits(z).argmax(dim=1) == yb).sum()
                        near_hits += (reference_y[_nearest(_flat(z), reference)] == yb).sum()
                n = draws * x.shape[0]
                rows.append({
                    "kind": kind,
                    "std": std,
                    "samples": draws,
                    "n": n,
                    "head_agreement": int(head_hits) / n,
                    "nearest_agreement": int(near_hits) / n,
                })
    return rows


def write_scores_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write score rows (columns :data:`SCORE_COLUMNS`) atomically: temp file + rename."""
    from .files import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def read_scores_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read rows written by :func:`write_scores_csv` back, with their numeric types."""
    types: dict[str, Callable[[str], Any]] = {
        "kind": str, "std": float, "samples": int, "n": int,
        "head_agreement": float, "nearest_agreement": float,
    }
    with open(path, newline="") as f:
        return [{k: types[k](v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_scores(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Score vs noise std: one line per kind (colour) and score (solid: head, dashed:
    nearest unseen example)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colors = {"random": "tab:orange", "class_conditional": "tab:blue"}
    scores = {"head_agreement": ("-", "head f2(z')"),
              "nearest_agreement": ("--", "nearest unseen z")}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["std"])
        for score, (style, label) in scores.items():
            ax.plot([r["std"] for r in mine], [r[score] for r in mine], style, marker="o",
                    markersize=4, color=colors.get(kind), label=f"{KIND_TITLES.get(kind, kind)}: "
                    f"{label}")
    ax.set_xlabel("noise std σ")
    ax.set_ylabel("fraction keeping the example's class")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Semantic preservation of perturbed latents", fontsize=10)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Checkpoints and training
# ----------------------------------------------------------------------------------------------


def checkpoint_name(spec: Any) -> str:
    """File name of a run's checkpoint, e.g. ``mnist_proposed_base_pc100_set1_e120.pt``."""
    return f"{spec.dataset}_{spec.method}_pc{spec.per_class}_set{spec.split}_e{spec.epochs}.pt"


def save_checkpoint(model: nn.Module, spec: Any, path: str | os.PathLike) -> Path:
    """Save ``model.state_dict()`` and its :class:`~latent_aug.protocol.RunSpec` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "spec": dataclasses.asdict(spec),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    from .files import atomic_write

    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, Any]:
    """``(model, spec)`` from :func:`save_checkpoint`: the spec's network, built with
    :func:`~latent_aug.protocol.build_model`, with the saved weights, in eval mode."""
    from .protocol import RunSpec, build_model

    payload = torch.load(path, map_location="cpu", weights_only=True)
    fields = dict(payload["spec"])
    fields["options"] = tuple(tuple(o) for o in fields.get("options", ()))
    spec = RunSpec(**fields)
    model = build_model(spec)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), spec


def train_model(spec: Any, data: Any, *, log: Callable[[str], None] | None = None) -> nn.Module:
    """Train ``spec``'s network on ``data`` with :func:`latent_aug.protocol.fit` (the paper's
    protocol) and return it with the weights of the best validation epoch, in eval mode."""
    from .protocol import fit

    def on_epoch(epoch: int, val: float) -> None:
        if log is not None:
            log(f"  {spec.per_class}/class epoch {epoch}/{spec.epochs}: "
                f"validation error {val:.2f}%")

    model, _ = fit(spec, data, on_epoch=on_epoch)
    return model


def _trained(spec: Any, data: Any, checkpoint_dir: str | os.PathLike | None, device: str,
             log: Callable[[str], None] | None) -> nn.Module:
    """The network of ``spec``: loaded from ``checkpoint_dir`` when saved there before,
    else trained (and saved there, when a directory is given)."""
    path = Path(checkpoint_dir) / checkpoint_name(spec) if checkpoint_dir else None
    if path is not None and path.is_file():
        model, saved = load_checkpoint(path, device=device)
        if saved != spec:
            raise ConfigError(f"{path} holds the run {saved}, not {spec}; delete or move it.")
        if log is not None:
            log(f"loaded {path}")
        return model
    if log is not None:
        log(f"training {spec.method} on {spec.per_class} examples per class "
            f"for {spec.epochs} epochs")
    model = train_model(spec, data, log=log)
    if path is not None:
        save_checkpoint(model, spec, path)
        if log is not None:
            log(f"saved {path}")
    return model


def _one_per_class(y: Tensor, seed: int) -> Tensor:
    """Indices of one randomly chosen example of every class, in class order, ``(K,)``."""
    gen = torch.Generator().manual_seed(seed)
    y = y.cpu()
    picks = []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        picks.append(members[torch.randint(len(members), (1,), generator=gen)])
    return torch.cat(picks)


def make_figures(
    dataset: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "docs/figures",
    checkpoint_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    epochs: int = 120,
    *,
    recon_per_class: int = 2000,
    embed_per_class: int = 100,
    split: int = 1,
    std: float = 0.2,
    stds: Sequence[float] = (0.1, 0.2, 0.4),
    samples: int = 3,
    max_background: int | None = DEFAULT_MAX_BACKGROUND,
    perplexity: float = 30.0,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Path]:
    """Train *proposed-base* (Figure 1(b)) as the paper does and write Figures 5-8 and the
    preservation scores into ``out_dir`` (file names in :data:`FIGURE_FILES`).

    * Figures 5 and 8 use a network trained on ``recon_per_class`` (2000) examples per class:
      one training example of every class, five perturbed reconstructions each (Figure 8:
      two more draws of examples).
    * Figures 6, 7 and the scores use a network trained on ``embed_per_class`` (100) per
      class; the unseen examples are the training split's images not used for training
      (all of them for the scores, at most ``max_background`` behind the t-SNE maps).

    With ``checkpoint_dir``, each trained network is saved there (:func:`checkpoint_name`)
    and loaded instead of retrained on the next call.

    Returns:
        figure key (as in :data:`FIGURE_FILES`) -> path written.
    """
    from .data import center_crop, load_dataset, make_splits, prepare
    from .protocol import RunSpec

    out = Path(out_dir)
    written: dict[str, Path] = {}

    def view(x: Tensor, crop: int | None) -> Tensor:
        return center_crop(x, crop) if crop else x

    # Figures 5 and 8: 2000 examples per class.
    data = make_splits(dataset, data_dir, recon_per_class, split, device)
    spec = RunSpec(dataset, "proposed_base", recon_per_class, split, epochs=epochs)
    model = _trained(spec, data, checkpoint_dir, device, log)
    for key, offset in (("figure5", 0), ("figure8a", 1), ("figure8b", 2)):
        idx = _one_per_class(data.train_y, seed + offset).to(data.train_x.device)
        written[key] = reconstruction_grid(
            model, view(data.train_x[idx], data.crop), out / FIGURE_FILES[key], std=std,
            samples=5, mean=data.mean, seed=seed + offset,
        )
    del data, model

    # Figures 6, 7 and the scores: 100 examples per class, the rest of the split unseen.
    data = make_splits(dataset, data_dir, embed_per_class, split, device)
    spec = RunSpec(dataset, "proposed_base", embed_per_class, split, epochs=epochs)
    model = _trained(spec, data, checkpoint_dir, device, log)
    full_x, full_y = load_dataset(dataset, data_dir)["train"]
    unseen = torch.ones(full_x.shape[0], dtype=torch.bool)
    unseen[data.train_indices.cpu()] = False
    other_x = view(prepare(full_x[unseen], device, data.mean), data.crop)
    other_y = full_y[unseen].to(device)
    train_x = view(data.train_x, data.crop)
    if log is not None:
        log("t-SNE embedding (the slow part)")
    emb = tsne_figure(
        model, train_x, data.train_y, other_x, other_y, out / FIGURE_FILES["figure6"],
        std=std, max_background=max_background, seed=seed, perplexity=perplexity,
    )
    written["figure6"] = out / FIGURE_FILES["figure6"]
    written["figure7"] = tsne_per_class(emb, out / FIGURE_FILES["figure7"])
    rows = preservation_scores(
        model, train_x, data.train_y, other_x, other_y, stds=stds, samples=samples, seed=seed
    )
    written["scores_csv"] = write_scores_csv(rows, out / FIGURE_FILES["scores_csv"])
    written["scores_png"] = plot_scores(rows, out / FIGURE_FILES["scores_png"])
    return written
