"""Smoke test of ``benchmarks/overhead.py``: the table it writes (timings are not asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import overhead  # noqa: E402


def test_overhead_writes_a_table_with_pairwise_ratio_and_flops(tmp_path):
    out = tmp_path / "o.md"
    args = ["--cases", "mnist", "--repeats", "3", "--warmup", "0", "--batch", "4", "--rounds", "3"]
    assert overhead.main([*args, "--write", str(out)]) == 0
    text = out.read_text()
    assert "Command: `python benchmarks/overhead.py --cases mnist" in text
    row = next(line for line in text.splitlines() if line.startswith("| mnist"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    flop_ratio = float(cells[7])
    assert 1.9 < flop_ratio < 2.2  # the tied decoder mirrors the encoder
    assert "–" in cells[4]  # quartiles of the per-repetition ratios
    assert cells[9].startswith("3: ")  # three rounds, their range


def test_overhead_rejects_too_few_repeats():
    with pytest.raises(SystemExit, match="--repeats must be >= 2"):
        overhead.main(["--cases", "mnist", "--repeats", "1"])


def test_pair_ratio_is_the_median_of_adjacent_steps():
    m = overhead.Measurement("c", "m", 1.0, 2.0, 1.0, 2.0, 0, pair_ratios=[1.0, 3.0, 2.0, 10.0])
    assert m.ratio == 2.5
    lo, hi = m.ratio_quartiles
    assert lo <= m.ratio <= hi


def test_overhead_keep_freed_memory_is_named_in_the_header(tmp_path):
    out = tmp_path / "o.md"
    args = ["--cases", "mnist", "--repeats", "2", "--warmup", "0", "--batch", "4"]
    assert overhead.main([*args, "--keep-freed-memory", "--write", str(out)]) == 0
    assert "freed memory kept (keep_freed_memory)" in out.read_text()


def test_overhead_late_layouts_adds_a_row_timed_in_the_same_alternation(tmp_path):
    out = tmp_path / "o.md"
    # one round: both rows then come from the same plain steps (with several rounds each
    # variant reports its own median round)
    args = ["--cases", "mnist", "--repeats", "2", "--warmup", "0", "--batch", "4", "--rounds", "1"]
    assert overhead.main([*args, "--late-layouts", "--write", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| mnist")]
    assert len(rows) == 2
    assert "layout converted at each transpose" in rows[1]
    assert rows[0].split("|")[3] == rows[1].split("|")[3]  # the same plain steps


def test_late_layouts_switches_the_decoders_off_for_the_step_only():
    from latent_aug import MnistNet, wrap

    model = wrap(MnistNet(), split="fc1")
    decoder = model.input_decoder
    assert decoder.layout_at  # the MNIST decoder converts before its ReLUs
    seen = []
    late = overhead._late_layouts(model, lambda: seen.append(dict(decoder.layout_at)))
    late()
    assert seen == [{}]
    assert decoder.layout_at  # restored


def test_native_single_channel_variant_swaps_the_kernel_for_the_step_only():
    from torch.utils._python_dispatch import TorchDispatchMode

    from latent_aug import MnistNet, wrap
    from latent_aug.decoders import TiedConv

    called: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.slow_conv_transpose2d.default:
                called.append("native")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = wrap(MnistNet(), split="fc1").train()
    x, t = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    outputs = []

    def step() -> None:
        with Record():
            model(x)
            outputs.append(model.losses(t).recon_input.detach())

    overhead.VARIANTS["native-single-channel"][0](model, step)()
    assert called == ["native"]
    step()
    assert called == ["native"]  # the current step runs the phase kernel
    torch.testing.assert_close(outputs[0], outputs[1])  # the same transpose
    (single,) = [m for m in model.input_decoder.modules()
                 if isinstance(m, TiedConv) and m.source.in_channels == 1]
    assert "_cpu_2d" not in vars(single) and "preferred_layout" not in vars(single)


def test_overhead_compare_rows_are_labelled(tmp_path):
    out = tmp_path / "o.md"
    args = ["--cases", "mnist", "--repeats", "2", "--warmup", "0", "--batch", "4"]
    assert overhead.main([*args, "--compare", "native-single-channel", "late-layouts",
                          "--write", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| mnist")]
    assert [("native kernel" in r, "each transpose" in r) for r in rows] == [
        (False, False), (True, False), (False, True)]  # in the order asked
