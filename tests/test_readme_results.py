"""The README's CIFAR-10 ``all`` numbers match the committed results file.

That column fills one multi-hour run at a time, and its numbers are copied into two README
tables by hand; one of them once kept showing set 1 after set 2 had landed. These tests
compare both tables with ``benchmarks/results/table1-cifar-cpu.csv``.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = ROOT / "benchmarks" / "results" / "table1-cifar-cpu.csv"


def _all_column() -> dict[tuple[str, str], dict[int, float]]:
    """``{(method, options): {split: test error}}`` of the CSV's rows at ``all``."""
    runs: dict[tuple[str, str], dict[int, float]] = {}
    with RESULTS.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["per_class"] == "all":
                key = (row["method"], row["options"])
                runs.setdefault(key, {})[int(row["split"])] = float(row["test_error"])
    return runs


def _rows_after(header: str, below: str = "") -> list[list[str]]:
    """The cells of the first table whose header starts with ``header``, below text ``below``."""
    lines = README.splitlines()
    anchor = next(i for i, line in enumerate(lines) if below in line)
    start = next(i for i in range(anchor, len(lines)) if lines[i].startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _key(label: str) -> tuple[str, str]:
    """A README method label (``recon_all, `l2_reduction=mean```) as a CSV ``(method, options)``."""
    method, _, options = label.partition(",")
    return method.strip("` "), options.strip("` ")


def test_per_set_table_matches_the_results_file():
    runs = _all_column()
    shown_keys = set()
    for cells in _rows_after("| method (paper) | set 1 | set 2 | set 3 |"):
        label = re.sub(r" \([\d.]+\)$", "", cells[0])
        key = (label.split(" ")[0].strip("`"), "l2_reduction=mean" if "(mean L2)" in label else "")
        sets = runs.get(key, {})
        shown = [None if cell == "—" else float(cell) for cell in cells[1:4]]
        assert shown == [sets.get(split) for split in (1, 2, 3)], (
            f"README per-set `all` row of {label}: {cells[1:4]}, the CSV has {sets}"
        )
        shown_keys.add(key)
    assert shown_keys == set(runs), f"the per-set table shows {shown_keys}, the CSV has {set(runs)}"


def test_summary_table_all_column_is_the_mean_of_the_sets_run():
    runs = _all_column()
    rows = _rows_after("| method | 10 | 20 |", below="**CIFAR-10 on CPU**")
    checked = 0
    for cells in rows:
        sets = runs.get(_key(cells[0]), {})
        if not sets:
            assert cells[-1] == "", f"README summary row {cells[0]}: {cells[-1]!r} without runs"
            continue
        match = re.fullmatch(r"([\d.]+) \([\d.]+\), sets? ([\d–, ]+)", cells[-1])
        assert match, f"README summary row {cells[0]}: `all` cell {cells[-1]!r}"
        splits = sorted(sets)
        contiguous = splits == list(range(splits[0], splits[-1] + 1))
        named = (
            str(splits[0])
            if len(splits) == 1
            else f"{splits[0]}–{splits[-1]}"
            if contiguous
            else ", ".join(map(str, splits))
        )
        assert match[2] == named, (
            f"{cells[0]}: the cell names sets {match[2]}, the CSV has {splits}"
        )
        assert match[1] == f"{statistics.mean(sets.values()):.2f}", (
            f"{cells[0]}: the cell says {match[1]}, the CSV's mean is "
            f"{statistics.mean(sets.values()):.4f}"
        )
        checked += 1
    assert checked == len(runs)
