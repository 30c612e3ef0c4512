"""The README's result tables match the committed results files.

The README's result tables are copies, by ``benchmarks/readme_tables.py``, of the reports'
tables (which a finishing run rewrites; the CIFAR-10 appendix's without its paired section
unless regenerated with ``--paired-with``) and of the CIFAR-10 ``all`` column set by set, from
its CSV. When they were copied by hand one of them kept showing set 1 after set 2 had landed.
These tests compare the README with the reports and the CSV, the reports with what their
command lines write from the CSVs, and the counts the README's prose quotes with the reports.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from latent_aug.grid import ResultStore

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
APPENDIX = ROOT / "benchmarks" / "results" / "appendix-cifar-cpu.md"
MNIST_APPENDIX = ROOT / "benchmarks" / "results" / "appendix-mnist-cpu.md"
TABLE1_REPORT = ROOT / "benchmarks" / "results" / "table1-cifar-cpu.md"


def _readme_tables():
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks import readme_tables

    return readme_tables


def _report(path: Path) -> tuple[str, str]:
    """A committed report, and the same report written now from its CSV and the
    ``--paired-with`` CSVs its command line names."""
    import shlex
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.reproduce import paired_rows, parser, report

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


def test_readme_tables_are_the_reports():
    """The feed-forward matrix and both appendices' tables and counts (``python
    benchmarks/readme_tables.py`` rewrites them)."""
    assert _readme_tables().rewrite(README) == README, (
        "the README's result tables differ from the reports: run "
        "python benchmarks/readme_tables.py"
    )


def test_readme_tables_copies_each_kind_of_table(tmp_path: Path):
    tables = _readme_tables()
    report = [
        "## cifar10", "", "| method | 10 | 2000 |", "|---|---|---|",
        "| recon_all_denoise [l2_reduction=mean] | 73.41 ± 0.67 (75.76; -2.35) | "
        "31.59 ± 0.16 (30.54; +1.05) [sets 1,2] |", "",
        "## cifar10: input noise, paired by set", "", "| per class | method | mean (paper) |",
        "|---|---|---:|", "| 10 | recon_all_denoise [l2_reduction=mean] | +0.32 (+2.43) |", "",
        "Input noise is worse on 2 of 3 set pairs.", "",
        "## cifar10: against feed-forward, paired by set", "",
        "| per class | method | mean (paper) |", "|---|---|---:|",
        "| 10 | proposed_base | -0.36 (-2.20) |", "| all | proposed_base | +0.75 (-0.35) |",
    ]
    (tmp_path / "r.md").write_text("\n".join(report))
    readme = "\n".join([
        "**A**", "| method | 10 |", "|---|---|", "| old | 1 (2) |", "",
        "**B**", "| per class | method |", "|---|---|", "| 10 | old |", "",
        "Input noise is worse on 0 of 3 set pairs.", "",
        "**C**", "| method | 10 | 20 | all |", "|---|---|---|---|",
        "| `proposed_base` | x | y | z |",
    ])
    out = tables.rewrite(readme, tmp_path, [
        ("r.md", "## cifar10", "**A**", "| method |", tables.measured_table, None),
        ("r.md", "## cifar10", "**B**", "| per class |", tables.paired_table("input noise"),
         tables.COUNT),
        ("r.md", "## cifar10", "**C**", "| method |",
         tables.paired_means("against feed-forward"), None),
    ]).splitlines()
    assert out[:4] == ["**A**", "| method | 10 | 2000 |", "|---|---|---|",
                       "| `recon_all_denoise`, `l2_reduction=mean` | 73.41 (75.76) | "
                       "31.59 (30.54), sets 1,2 |"]
    assert out[6:9] == report[8:11]  # the paired table as it is
    assert out[10] == "Input noise is worse on 2 of 3 set pairs."
    assert out[-3:] == ["| method | 10 | 20 | all |", "|---|---|---|---|",
                        "| `proposed_base` | -0.36 (-2.20) |  | +0.75 (-0.35) |"]


def test_per_set_table_is_the_csv_set_by_set(tmp_path: Path):
    tables = _readme_tables()
    runs = [("feed_forward", "", 1, "22.30"), ("feed_forward", "", 2, "21.89"),
            ("feed_forward", "", 3, "22.20"), ("proposed_base", "", 2, "22.76"),
            ("proposed_base", "", 1, "22.93"), ("recon_all", "l2_reduction=mean", 1, "22.64"),
            ("proposed_base", "", 3, "9.99"),  # at 2000 below, not at all
            ("manifold_mixup", "", 1, "21.50")]  # a peer: no paper number
    lines = ["dataset,method,per_class,split,test_error,device,epochs,options"]
    lines += [f"cifar10,{m},{'2000' if e == '9.99' else 'all'},{s},{e},cpu,120,{o}"
              for m, o, s, e in runs]
    lines += ["mnist,proposed_base,all,3,1.00,cpu,120,"]  # another dataset
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    readme = "\n".join(["**D**", "| method (paper) | set 1 | set 2 | set 3 | mean |",
                        "|---|---:|---:|---:|---:|", "| stale | 1 | 2 | 3 | 4 |"])
    out = tables.rewrite(readme, tmp_path, [
        ("r.csv", "## cifar10", "**D**", "| method (paper) |", tables.per_set_table(), None),
    ]).splitlines()
    assert out[3:] == [
        "| `feed_forward` (17.80) | 22.30 | 21.89 | 22.20 | — |",
        "| `recon_all`, `l2_reduction=mean` (22.71) | 22.64 (+0.34) | — | — | +0.34 (+4.91) |",
        "| `proposed_base` (17.45) | 22.93 (+0.63) | 22.76 (+0.87) | — | +0.75 (-0.35) |",
        "| `manifold_mixup` | 21.50 (-0.80) | — | — | -0.80 |",
    ]


def test_readme_run_times_at_all_are_the_csvs():
    """The README's range of CIFAR-10 run times at ``all`` is the CSV's: it went stale twice
    when a slower run landed and nobody retyped it."""
    path = TABLE1_REPORT.with_suffix(".csv")
    seconds = [float(r["seconds"]) for r in ResultStore(path).rows() if r["per_class"] == "all"]
    span = f"{round(min(seconds) / 60)}–{round(max(seconds) / 60)} minutes"
    text = " ".join(README.split())
    for claim in (f"to {span} at `all`", f"At `all` the runs take {span} each"):
        assert claim in text, f"the README does not say: {claim} (from {path.name})"


@pytest.mark.parametrize("report, line_start, method, phrase, close", [
    ("table1-cifar-cpu.md", "Class-conditional noise is ahead", "perturb_class_conditional",
     "ahead of random noise on", ""),
    ("table1-mnist-merged.md", "Class-conditional noise is ahead", "perturb_class_conditional",
     "ahead of random noise on", ""),
    ("table1-cifar-cpu.md", "The methods are ahead of feed", "proposed_base",
     "`proposed_base` is ahead of feed-forward on", ")"),
    ("table1-cifar-cpu.md", "The methods are ahead of feed", "perturb_random",
     "random noise on", ")"),
    ("table1-cifar-cpu.md", "The methods are ahead of feed", "perturb_class_conditional",
     "class-conditional noise on", ")"),
])
def test_readme_counts_of_set_pairs_are_the_reports(report, line_start, method, phrase, close):
    text = (ROOT / "benchmarks" / "results" / report).read_text(encoding="utf-8")
    (line,) = [x for x in text.splitlines() if x.startswith(line_start)]
    match = re.search(rf"[:;] {method} (\d+ of \d+) \((\d+ of \d+)\)", line)
    assert match, line
    claim = f"{phrase} {match[1]} set pairs (the paper {match[2]}{close}"
    assert claim in " ".join(README.split()), f"the README does not say ({report}): {claim}"


def test_readme_count_of_class_conditional_ahead_from_50_per_class_is_the_reports():
    """The README's count over 50-2000 per class, a slice of the report's count line."""
    tables = _readme_tables()
    lines = TABLE1_REPORT.read_text(encoding="utf-8").splitlines()
    start, end = tables.table_at(lines, "class-conditional against random noise",
                                 "| per class | method |")
    measured, paper = [0, 0], [0, 0]
    for cell in map(tables.cells, lines[start + 2:end]):
        if cell[1] != "perturb_class_conditional" or cell[0] == "all" or int(cell[0]) < 50:
            continue
        for text in filter(None, cell[3:]):
            here, there = re.fullmatch(r"([-+][\d.]+) \(([-+][\d.]+)\)", text).groups()
            measured[0] += float(here) < 0
            measured[1] += 1
            paper[0] += float(there) < 0
            paper[1] += 1
    paper_text = "all" if paper[0] == paper[1] else f"{paper[0]} of"
    claim = (f"From 50 to 2000 per class the paper has it ahead on {paper_text} {paper[1]} set "
             f"pairs, here on {measured[0]} of {measured[1]}")
    assert claim in " ".join(README.split()), f"the README does not say: {claim}"
