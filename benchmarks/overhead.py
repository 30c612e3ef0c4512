"""Training-step overhead of the wrapper: time and FLOPs, plain model vs wrapped.

    python benchmarks/overhead.py                                  # every case, CPU
    python benchmarks/overhead.py --device cuda --repeats 50 --write
    python benchmarks/overhead.py --cases mnist resnet18-latent --threads 2

One training step is forward + backward + ``Adam.step`` on a batch of ``--batch`` (100, the
paper's) random inputs. Plain and wrapped steps alternate (plain first on even repetitions,
wrapped first on odd ones), so that load changes hit both; each time is the median over
``--repeats``. FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one
full step of each (it counts matrix products and convolutions, forward and backward; the
optimizer's elementwise work is not counted). timm attention is counted through its unfused
path (the same products): the fused kernel is invisible to the counter.

Cases:

* ``mnist``: the paper's MNIST net split at ``fc1``, class-conditional noise, tied decoder:
  the decoder mirrors the encoder, so the FLOP ratio is about 2;
* ``resnet18-latent`` / ``resnet18-learned``: timm's resnet18 with the 32×32 stem
  (:func:`latent_aug.timm_support.adapt_resnet_for_cifar`), latent-only (``input_decoder=
  "none"``) or with the small learned input decoder;
* ``vit_tiny-latent`` / ``vit_tiny-learned``: timm's ViT-Tiny at 32×32 with 4×4 patches.

``ratio`` is the median over repetitions of wrapped / plain time of the same repetition (with
its quartiles: the spread on a noisy machine); ``ratio / FLOP ratio`` near 1 means the wrapper
costs what its arithmetic costs; above 1, launch or memory overhead dominates (small models,
GPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from latent_aug import MnistNet, wrap
from latent_aug.allocator import keep_freed_memory
from latent_aug.decoders import TiedConv, TiedDecoder
from latent_aug.files import atomic_write_text
from latent_aug.grid import device_name

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """A plain model factory, how to wrap it, and one input's shape ``(C, H, W)``."""

    model: Callable[[], nn.Module]
    wrap_options: dict
    input_shape: tuple[int, int, int]
    mode: str


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from latent_aug.timm_support import create_backbone

        return create_backbone(name, num_classes=10, img_size=32, **kwargs)

    return build


CASES: dict[str, Case] = {
    "mnist": Case(MnistNet, {"split": "fc1", "perturb": "class_conditional"}, (1, 28, 28),
                  "class-conditional, tied decoder"),
    "resnet18-latent": Case(_timm("resnet18"), {"input_decoder": "none"}, (3, 32, 32),
                            "class-conditional, latent-only"),
    "resnet18-learned": Case(_timm("resnet18"), {"input_decoder": "learned"}, (3, 32, 32),
                             "class-conditional, learned decoder"),
    "vit_tiny-latent": Case(_timm("vit_tiny_patch16_224", patch_size=4),
                            {"input_decoder": "none"}, (3, 32, 32),
                            "class-conditional, latent-only"),
    "vit_tiny-learned": Case(_timm("vit_tiny_patch16_224", patch_size=4),
                             {"input_decoder": "learned"}, (3, 32, 32),
                             "class-conditional, learned decoder"),
}


@dataclass
class Measurement:
    case: str
    mode: str
    plain_ms: float
    wrapped_ms: float
    plain_gflops: float
    wrapped_gflops: float
    extra_params: int
    pair_ratios: list[float]
    round_ratios: list[float] = dataclasses.field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Median over repetitions of wrapped / plain time of the same repetition (adjacent
        steps, so slow phases of a noisy machine hit both)."""
        return statistics.median(self.pair_ratios)

    @property
    def ratio_quartiles(self) -> tuple[float, float]:
        q = statistics.quantiles(self.pair_ratios, n=4)
        return q[0], q[2]

    @property
    def flop_ratio(self) -> float:
        return self.wrapped_gflops / self.plain_gflops


ADAM_KINDS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_step(model: nn.Module, x: Tensor, t: Tensor, wrapped: bool,
              adam: str = "default", compile: bool = False) -> Callable[[], None]:
    """One training step of ``model`` on ``(x, t)``: forward, backward, Adam (``adam``: the
    implementation, one of :data:`ADAM_KINDS`; the same for plain and wrapped). With
    ``compile`` the loss (forward and, through AOTAutograd, backward) goes through
    ``torch.compile`` as the pure function ``CE(logits, t) + aux terms``; Adam stays eager."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **ADAM_KINDS[adam])
    aux = model.aux_loss if wrapped else None
    if compile:
        from latent_aug.vectorized import _TrainLoss

        loss_of = torch.compile(_TrainLoss(model))
    else:
        def loss_of(x: Tensor, t: Tensor) -> Tensor:
            loss = F.cross_entropy(model(x), t)
            return loss + aux(t) if aux is not None else loss

    def step() -> None:
        loss = loss_of(x, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@contextlib.contextmanager
def setting(modules: list[nn.Module], attribute: str, value: object) -> Iterator[None]:
    """Set ``attribute`` to ``value`` on ``modules`` for the block, restoring each after."""
    saved = [(m, getattr(m, attribute)) for m in modules]
    for m, _ in saved:
        setattr(m, attribute, value)
    try:
        yield
    finally:
        for m, old in saved:
            setattr(m, attribute, old)


def count_flops(model: nn.Module, step: Callable[[], None]) -> int:
    """FLOPs of one step. timm attention runs its explicit matmul path (the fused kernel is
    invisible to the counter) and tied transposes run ``conv_transposeNd`` (the counter
    would see the phase kernel's forward product but not the convolutions of its custom
    backward); the same arithmetic."""
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    transposes = [m for m in model.modules() if isinstance(m, TiedConv)]
    with setting(attention, "fused_attn", False), setting(transposes, "cpu_kernels", False), \
            FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _late_layouts(model: nn.Module, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the tied decoders converting memory layout only at each transpose (not
    before the activations in front of it): the layout handling before 2026-11-28."""
    decoders = [m for m in model.modules() if isinstance(m, TiedDecoder)]

    def late() -> None:
        with setting(decoders, "layout_at", {}):
            step()

    return late


def _native_single_channel(model: nn.Module, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with every single-channel tied transpose run as before commit 0ac8476
    (2026-11-28): PyTorch's native ``slow_conv_transpose2d`` on contiguous input (converted
    before the activations in front of it), not :mod:`latent_aug.transpose`'s phase kernel."""
    singles = [m for m in model.modules() if isinstance(m, TiedConv)
               and m.source.in_channels == 1 and m.dims == 2]

    def native_2d(conv: TiedConv) -> Callable[..., Tensor]:
        def run(v: Tensor, bias: Tensor | None, output_padding: tuple[int, ...],
                kernel: str) -> Tensor:
            src = conv.source
            return torch.ops.aten.slow_conv_transpose2d(
                v.contiguous(), src.weight.to(v.dtype), src.kernel_size, bias, src.stride,
                conv.padding, output_padding, src.dilation)
        return run

    def native() -> None:
        for conv in singles:  # instance attributes shadow the methods for this step only
            conv._cpu_2d = native_2d(conv)
            conv.preferred_layout = lambda v: v.contiguous()
        try:
            step()
        finally:
            for conv in singles:
                del conv._cpu_2d, conv.preferred_layout

    return native


#: Earlier decoder handlings ``--compare`` can time beside the current one:
#: ``name: (step wrapper, row label)``.
VARIANTS = {
    "late-layouts": (_late_layouts,
                     "layout converted at each transpose (before 2026-11-28 10:00 UTC)"),
    "native-single-channel": (_native_single_channel,
                              "single-channel transpose by the native kernel on contiguous "
                              "input (before commit 0ac8476)"),
}


def measure(name: str, case: Case, device: torch.device, batch: int, repeats: int,
            warmup: int, adam: str = "default", compile: bool = False,
            compare: tuple[str, ...] = ()) -> list[Measurement]:
    """One round: plain and wrapped steps alternated (and, for each name of ``compare``
    (:data:`VARIANTS`), the same wrapped model with that earlier handling as one more step
    in the same alternation). Returns one :class:`Measurement` per wrapped variant, each
    against the same plain steps."""
    torch.manual_seed(0)
    plain = case.model().to(device).train()
    torch.manual_seed(0)
    options = dict(case.wrap_options)
    if options.get("input_decoder") == "learned":
        options["input_shape"] = case.input_shape
    wrapped = wrap(case.model(), **options).to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *case.input_shape, generator=g).to(device)
    t = torch.randint(0, 10, (batch,), generator=g).to(device)
    steps = {"plain": make_step(plain, x, t, False, adam, compile),
             "wrapped": make_step(wrapped, x, t, True, adam, compile)}
    for variant in compare:
        steps[variant] = VARIANTS[variant][0](wrapped, steps["wrapped"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for _ in range(warmup):
        for step in steps.values():
            step()
    # FLOPs of the eager step (the counter does not see inside compiled code)
    flops = {"plain": count_flops(plain, make_step(plain, x, t, False, adam)),
             "wrapped": count_flops(wrapped, make_step(wrapped, x, t, True, adam))}
    times: dict[str, list[float]] = {key: [] for key in steps}
    for r in range(repeats):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for key in order:
            sync()
            start = time.perf_counter()
            steps[key]()
            sync()
            times[key].append(time.perf_counter() - start)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_wrapped = sum(p.numel() for p in wrapped.parameters())
    modes = {"wrapped": case.mode} | {
        key: f"{case.mode}, {label}" for key, (_, label) in VARIANTS.items()}
    return [
        Measurement(
            case=name,
            mode=modes[key],
            plain_ms=1e3 * statistics.median(times["plain"]),
            wrapped_ms=1e3 * statistics.median(times[key]),
            plain_gflops=flops["plain"] / 1e9,
            wrapped_gflops=flops["wrapped"] / 1e9,
            extra_params=n_wrapped - n_plain,
            pair_ratios=[w / p for p, w in zip(times["plain"], times[key])],
        )
        for key in steps if key != "plain"
    ]


def table(rows: list[Measurement]) -> str:
    lines = [
        "| case | mode | plain ms | wrapped ms | time ratio (quartiles) | plain GFLOP "
        "| wrapped GFLOP | FLOP ratio | time ratio / FLOP ratio | rounds: min–max "
        "| extra params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        lo, hi = m.ratio_quartiles
        rounds = m.round_ratios or [m.ratio]
        lines.append(
            f"| {m.case} | {m.mode} | {m.plain_ms:.1f} | {m.wrapped_ms:.1f} | {m.ratio:.2f} "
            f"({lo:.2f}–{hi:.2f}) | {m.plain_gflops:.2f} | {m.wrapped_gflops:.2f} "
            f"| {m.flop_ratio:.2f} | {m.ratio / m.flop_ratio:.2f} "
            f"| {len(rounds)}: {min(rounds) / m.flop_ratio:.2f}–{max(rounds) / m.flop_ratio:.2f} "
            f"| {m.extra_params:,} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per model (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole measurement (fresh models); the table shows the "
                        "median round and the range over rounds (the machine's state drifts)")
    p.add_argument("--adam", choices=list(ADAM_KINDS), default="default",
                   help="torch.optim.Adam implementation for both models (default: torch's "
                        "choice, the per-tensor loop on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the loss (forward + backward) of both models; the "
                        "warm-up steps include compilation")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="call latent_aug.allocator.keep_freed_memory() first (glibc keeps "
                        "freed blocks instead of returning them to the system and faulting "
                        "them in again: what the grid's CPU workers do); both models run "
                        "in the same process, so it applies to both")
    p.add_argument("--compare", nargs="+", choices=list(VARIANTS), default=[],
                   metavar="VARIANT",
                   help="also time the same wrapped model with an earlier decoder handling, "
                        "in the same alternation (a side-by-side A/B): late-layouts (layout "
                        "converted only at each transpose), native-single-channel (PyTorch's "
                        "native kernel for a single-channel transpose)")
    p.add_argument("--late-layouts", action="append_const", dest="compare",
                   const="late-layouts", help="same as --compare late-layouts")
    p.add_argument("--batch", type=int, default=100, help="batch size (paper: 100)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                   metavar="CASE", help=f"any of: {', '.join(CASES)}")
    p.add_argument("--write", nargs="?", const=str(RESULTS / "overhead.md"), default=None,
                   metavar="PATH",
                   help=f"write the table to PATH (default {RESULTS.name}/overhead.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be >= 1.")
    if args.repeats < 2 or args.batch < 2:
        raise SystemExit("error: --repeats must be >= 2 (quartiles) and --batch >= 2 (batch norm).")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("error: --keep-freed-memory needs glibc (mallopt); this C library "
                         "has none. Run without the flag.")
    rows = []
    for name in args.cases:
        per_round = [measure(name, CASES[name], device, args.batch, args.repeats, args.warmup,
                             args.adam, args.compile, tuple(dict.fromkeys(args.compare)))
                     for _ in range(args.rounds)]
        for variant in zip(*per_round):  # one variant's rounds
            rounds = sorted(variant, key=lambda r: r.ratio)
            m = rounds[len(rounds) // 2]  # the median round
            m.round_ratios = [r.ratio for r in rounds]
            print(f"{name} ({m.mode}): plain {m.plain_ms:.1f} ms, wrapped {m.wrapped_ms:.1f} "
                  f"ms, ratio {m.ratio:.2f}, FLOP ratio {m.flop_ratio:.2f}", flush=True)
            rows.append(m)
    given = argv if argv is not None else sys.argv[1:]
    header = [
        "# Training-step overhead: plain vs wrapped",
        "",
        f"Command: `python benchmarks/overhead.py {' '.join(given)}`",
        f"Device: {device_name(str(device))}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; batch {args.batch}; Adam {args.adam}; "
        f"{'freed memory kept (keep_freed_memory); ' if args.keep_freed_memory else ''}"
        f"{'compiled loss; ' if args.compile else ''}"
        f"median of {args.repeats} interleaved steps after {args.warmup} warm-up steps, "
        f"median of {args.rounds} round(s); "
        f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "Step = forward + backward + Adam. FLOPs: `torch.utils.flop_counter.FlopCounterMode` "
        "over one whole step (matrix products and convolutions).",
        "",
    ]
    text = "\n".join(header) + "\n" + table(rows) + "\n"
    print()
    print(text)
    if args.write:
        atomic_write_text(args.write, text)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
