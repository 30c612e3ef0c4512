"""The README's result tables match the committed results files.

The CIFAR-10 ``all`` column of Table 1 is copied into two README tables by hand; one of them
once kept showing set 1 after set 2 had landed. The appendix and paired tables come from the
reports, which a finishing run rewrites (the CIFAR-10 appendix's without its paired section
unless regenerated with ``--paired-with``). These tests compare the README with the CSVs and
the reports, and the reports with what their command lines write from the CSVs.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = ROOT / "benchmarks" / "results" / "table1-cifar-cpu.csv"
APPENDIX = ROOT / "benchmarks" / "results" / "appendix-cifar-cpu.md"
MNIST_APPENDIX = ROOT / "benchmarks" / "results" / "appendix-mnist-cpu.md"
TABLE1_REPORT = RESULTS.with_suffix(".md")


def _all_column() -> dict[tuple[str, str], dict[int, float]]:
    """``{(method, options): {split: test error}}`` of the CSV's rows at ``all``."""
    runs: dict[tuple[str, str], dict[int, float]] = {}
    with RESULTS.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["per_class"] == "all":
                key = (row["method"], row["options"])
                runs.setdefault(key, {})[int(row["split"])] = float(row["test_error"])
    return runs


def _rows_after(header: str, below: str = "", text: str = README) -> list[list[str]]:
    """The cells of the first table of ``text`` whose header starts with ``header``, below
    the line that holds ``below``."""
    lines = text.splitlines()
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


def _report(path: Path) -> tuple[str, str]:
    """A committed report, and the same report written now from its CSV and the
    ``--paired-with`` CSVs its command line names."""
    import shlex
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.reproduce import paired_rows, parser, report
    from latent_aug.grid import ResultStore

    committed = path.read_text(encoding="utf-8")
    header = next(line for line in committed.splitlines() if line.startswith("Command: `"))
    args = parser().parse_args(shlex.split(header.removeprefix("Command: `").rstrip("`"))[2:])
    rows = ResultStore(path.with_suffix(".csv")).rows()
    bases = paired_rows([str(ROOT / p) for p in args.paired_with])
    return committed, report(path.stem, rows, header, bases)


@pytest.mark.parametrize("path", [APPENDIX, TABLE1_REPORT, MNIST_APPENDIX], ids=lambda p: p.stem)
def test_reports_are_written_from_the_committed_csvs(path: Path):
    committed, fresh = _report(path)
    assert "paired by set" in committed, (
        f"{path.name} lacks its paired table: regenerate it with the command on its "
        "`Command:` line and --report-only (the CIFAR-10 appendix also needs --paired-with "
        "benchmarks/results/table1-cifar-cpu.csv)"
    )
    assert committed.split("![plot]")[0].rstrip() == fresh.rstrip(), (
        f"{path.name} is not the report of the committed CSVs: regenerate it with the "
        "command on its `Command:` line and --report-only"
    )


def test_readme_feed_forward_table_is_the_reports_mean_column():
    committed = TABLE1_REPORT.read_text(encoding="utf-8")
    means = {}
    for cells in _rows_after("| per class | method |", below="against feed-forward, paired",
                             text=committed):
        means[cells[1], cells[0]] = cells[2]
    lines = README.splitlines()
    anchor = next(i for i, line in enumerate(lines)
                  if line.startswith("**Paired by set against feed-forward**"))
    header = next(line for line in lines[anchor:] if line.startswith("| method | 10 |"))
    sizes = [cell.strip() for cell in header.strip("|").split("|")][1:]
    rows = _rows_after("| method | 10 |", below="**Paired by set against feed-forward**")
    assert rows, "the README lost its table of differences from feed-forward"
    for cells in rows:
        expected = [means.get((cells[0], size), "") for size in sizes]
        assert cells[1:] == expected, (
            f"README row {cells[0]} against feed-forward: {cells[1:]}, the report has {expected}"
        )


def _readme_label(report_label: str) -> str:
    """``recon_all_denoise [l2_reduction=mean]`` as the README writes it."""
    method, _, options = report_label.partition(" [")
    return f"`{method}`" + (f", `{options.rstrip(']')}`" if options else "")


APPENDIX_TABLES = [  # report, its table's section, the README's anchors of the two tables
    (APPENDIX, "## cifar10", "**The CIFAR-10 appendix", "What input noise does, paired by set"),
    (MNIST_APPENDIX, "## mnist", "**Appendix on CPU** (MNIST", "**Input noise on MNIST, paired"),
]


@pytest.mark.parametrize("path, section, measured_at, paired_at", APPENDIX_TABLES,
                         ids=lambda x: x.stem if isinstance(x, Path) else "")
def test_readme_appendix_tables_are_the_reports(path, section, measured_at, paired_at):
    committed = path.read_text(encoding="utf-8")
    measured = _rows_after("| method | 10 |", below=section, text=committed)
    shown = _rows_after("| method | 10 |", below=measured_at, text=README)
    expected = []
    for cells in measured:
        row = [_readme_label(cells[0])]
        for cell in cells[1:]:
            match = re.fullmatch(r"([\d.]+)(?: ± [\d.]+)? \(([\d.]+); [-+][\d.]+\)"
                                 r"(?: \[sets ([\d,]+)\])?", cell)
            assert match, f"{path.name} cell {cell!r}"
            sets = match[3]
            where = "" if not sets else f", set{'s' if ',' in sets else ''} {sets}"
            row.append(f"{match[1]} ({match[2]}){where}")
        expected.append(row)
    assert shown == expected, f"the README's table of {path.name} is not the report's"

    paired = _rows_after("| per class | method |", below="input noise, paired by set",
                         text=committed)
    shown = _rows_after("| per class | method |", below=paired_at, text=README)
    assert shown == paired, f"the README's paired input-noise table is not {path.name}'s"
    (total,) = [line for line in committed.splitlines() if line.startswith("Input noise is")]
    assert total in README, f"the README lacks {path.name}'s count: {total!r}"


@pytest.mark.parametrize("report", ["table1-cifar-cpu.md", "table1-mnist-merged.md"])
def test_readme_counts_class_conditional_against_random_as_the_report(report: str):
    text = (ROOT / "benchmarks" / "results" / report).read_text(encoding="utf-8")
    (line,) = [x for x in text.splitlines() if x.startswith("Class-conditional noise is ahead")]
    match = re.search(r"[:;] perturb_class_conditional (\d+ of \d+) \((\d+ of \d+)\)", line)
    assert match, line
    claim = f"ahead of random noise on {match[1]} set pairs (the paper {match[2]}"
    assert claim in " ".join(README.split()), (
        f"the README does not give {report}'s count: {match[1]} ({match[2]})"
    )
