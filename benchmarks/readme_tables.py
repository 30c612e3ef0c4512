"""Rewrite the README's result tables that are copies of the reports' tables.

    python benchmarks/readme_tables.py           # rewrite README.md in place
    python benchmarks/readme_tables.py --check   # exit 1 if README.md is not in sync

A CIFAR-10 run lands every hour or two, and each one changes cells of the reports
(``benchmarks/results/*.md``, rewritten by ``reproduce.py --report-only``). The README shows
some of those tables; this script copies them over so that nobody retypes a cell, and
``tests/test_readme_results.py`` fails when the README and the reports disagree. Tables: the
MNIST and CIFAR-10 Table 1 means (as ``mean (paper)``), the CIFAR-10 means against
feed-forward, for each appendix report its measured table, its paired input-noise table
and the count line under it, and (from ``table1-cifar-cpu.csv``, as no report has it) the
CIFAR-10 ``all`` column set by set.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import mean

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.reproduce import (
    feed_forward_base,
    label,
    labels_in_order,
    method_of,
    paired_differences,
    paper_difference,
    paper_value,
    signed,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def table_at(lines: list[str], below: str, header: str) -> tuple[int, int]:
    """``(start, end)`` line indices of the first table whose header line starts with
    ``header``, after the first line that contains ``below``."""
    try:
        anchor = next(i for i, line in enumerate(lines) if below in line)
        start = next(i for i in range(anchor, len(lines)) if lines[i].startswith(header))
    except StopIteration:
        raise SystemExit(f"error: no table '{header}' below '{below}'") from None
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return start, end


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def row(values: list[str]) -> str:
    return "| " + " | ".join(values) + " |"


def readme_label(report_label: str) -> str:
    """A report label as the README writes it: ``proposed_base [noise_range=batch;y_space=logits]``
    -> ``proposed_base``, ``noise_range=batch``, ``y_space=logits``, each in backticks."""
    method, _, options = report_label.partition(" [")
    parts = [method, *(options.rstrip("]").split(";") if options else [])]
    return ", ".join(f"`{part}`" for part in parts)


def mean_and_paper(cell: str) -> str:
    """A report cell ``55.76 ± 0.52 (58.05; -2.30) [sets 1,2]`` as ``55.76 (58.05), sets 1,2``
    (an empty cell, a size the method did not run, stays empty)."""
    if not cell:
        return ""
    match = re.fullmatch(r"([\d.]+)(?: ± [\d.]+)? \(([\d.]+); [-+][\d.]+\)"
                         r"(?: \[sets ([\d,]+)\])?", cell)
    if not match:
        raise SystemExit(f"error: unexpected report cell {cell!r}")
    sets = match[3]
    where = f", set{'s' if ',' in sets else ''} {sets}" if sets else ""
    return f"{match[1]} ({match[2]}){where}"


def measured_table(report: list[str], section: str, shown: list[str]) -> list[str]:
    """The report's Table-1 layout with ``mean (paper)`` cells and README labels."""
    start, end = table_at(report, section, "| method |")
    return report[start:start + 2] + [
        row([readme_label(c[0]), *map(mean_and_paper, c[1:])])
        for c in map(cells, report[start + 2:end])]


def paired_table(title: str) -> Callable[[list[str], str, list[str]], list[str]]:
    """The report's paired table under ``## <dataset>: <title>``, as it is."""
    def build(report: list[str], section: str, shown: list[str]) -> list[str]:
        start, end = table_at(report, f"{section}: {title}", "| per class | method |")
        return report[start:end]
    return build


def paired_means(title: str) -> Callable[[list[str], str, list[str]], list[str]]:
    """The mean column of a paired table, as a method × size matrix with the README's rows
    and columns (the methods and sizes the README chose to show)."""
    def build(report: list[str], section: str, shown: list[str]) -> list[str]:
        start, end = table_at(report, f"{section}: {title}", "| per class | method |")
        means = {(readme_label(c[1]), c[0]): c[2] for c in map(cells, report[start + 2:end])}
        sizes = cells(shown[0])[1:]
        return shown[:2] + [row([c[0], *(means.get((c[0], s), "") for s in sizes)])
                            for c in map(cells, shown[2:])]
    return build


def set_cell(error: str | None, against: float | None) -> str:
    """``22.93 (+0.63)``: a set's test error and its difference from feed-forward's on the
    same set (feed-forward's own cell, or a set feed-forward lacks, without one); ``—`` for a
    set that has not run. Each set's comparison in the table, so the prose need not retype it."""
    if error is None:
        return "—"
    return error if against is None else f"{error} ({signed(against, None)})"


def per_set_table(size: str = "all") -> Callable[[list[str], str, list[str]], list[str]]:
    """From a results CSV (the lines in place of a report's): each method's test error set by
    set at ``size`` (with its difference from feed-forward's on that set), and its mean minus
    feed-forward's over the same sets, the difference of the paper's numbers in brackets. A
    column the reports do not have: their cells are means and their paired tables
    differences, and at ``all`` a set is an hour or more of CPU."""
    def build(csv_lines: list[str], section: str, shown: list[str]) -> list[str]:
        dataset = section.removeprefix("## ")
        runs = [r for r in csv.DictReader(csv_lines)
                if r["dataset"] == dataset and r["per_class"] == size]
        errors = {(label(r), int(r["split"])): r["test_error"] for r in runs}
        against = paired_differences(runs, (), feed_forward_base)
        lines = shown[:2]
        for name in labels_in_order(dataset, summarize(runs)):
            method = method_of(name)
            by_set = against.get((dataset, name, size), {})
            versus = signed(mean(by_set.values()),
                            paper_difference(dataset, method, "feed_forward", size, None)
                            ) if by_set else "—"
            paper = paper_value(dataset, method, size, [1, 2, 3])  # Table 1; none for a peer
            lines.append(row([readme_label(name) + (f" ({paper:.2f})" if paper is not None else ""),
                              *(set_cell(errors.get((name, s)), by_set.get(s))
                                for s in (1, 2, 3)), versus]))
        return lines
    return build


COUNT = "Input noise is worse on"  # the count line under a paired input-noise table

# (report, its dataset section, README text above the table, table header, builder, the
# first line under the table that starts like this is the report's line that starts so)
TABLES = [
    ("table1-mnist-merged.md", "## mnist", "**MNIST Table 1, all 162 runs**", "| method |",
     measured_table, None),
    ("table1-cifar-cpu.md", "## cifar10", "**CIFAR-10 on CPU**", "| method |", measured_table,
     None),
    ("table1-cifar-cpu.csv", "## cifar10", "At `all` the runs take", "| method (paper) |",
     per_set_table(), None),
    ("table1-cifar-cpu.md", "## cifar10", "**Paired by set against feed-forward**", "| method |",
     paired_means("against feed-forward"), None),
    ("appendix-mnist-cpu.md", "## mnist", "**Appendix on CPU** (MNIST", "| method |",
     measured_table, None),
    ("appendix-mnist-cpu.md", "## mnist", "**Input noise on MNIST, paired", "| per class |",
     paired_table("input noise"), COUNT),
    ("appendix-cifar-cpu.md", "## cifar10", "**The CIFAR-10 appendix", "| method |",
     measured_table, None),
    ("appendix-cifar-cpu.md", "## cifar10", "What input noise does, paired by set",
     "| per class |", paired_table("input noise"), COUNT),
]


def rewrite(readme: str, results: Path = RESULTS, tables: list[tuple] = TABLES) -> str:
    """``readme`` with every table of ``tables``, and the line named under each, copied from
    the reports in ``results``."""
    lines = readme.split("\n")
    for name, section, below, header, build, line_under in tables:
        report = (results / name).read_text(encoding="utf-8").splitlines()
        start, end = table_at(lines, below, header)
        lines[start:end] = build(report, section, lines[start:end])
        if line_under:
            (text,) = [line for line in report if line.startswith(line_under)]
            at = next(i for i in range(start, len(lines)) if lines[i].startswith(line_under))
            lines[at] = text
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="only compare: exit 1 (naming the fix) if README.md is not in sync")
    args = p.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    synced = rewrite(current)
    if args.check:
        if synced != current:
            print("README.md's result tables differ from the reports: run "
                  "python benchmarks/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if synced != current:
        README.write_text(synced, encoding="utf-8")
        print("README.md: result tables rewritten from the reports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
