"""The ablation report: paired differences by set, and the reference of a combination."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import ablation  # noqa: E402


def _row(tag: str, method: str, split: int, err: float, n: int = 100) -> dict[str, str]:
    return {"per_class": str(n), "tag": tag, "method": method, "split": str(split),
            "test_error": str(err), "device": "cpu", "torch": "t", "epochs": "120"}


def _line(text: str, tag: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {tag} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_pairs_by_common_sets_and_combos_fall_back_to_their_y_reading():
    rows = [
        _row("base", "feed_forward", 1, 6.0),
        _row("base", "proposed_base", 1, 5.0),
        _row("base", "proposed_base", 2, 5.2),
        _row("y=probs", "proposed_base", 1, 4.4),
        _row("y=probs", "proposed_base", 2, 4.2),
        _row("y=probs", "perturb_random", 1, 4.3),
        _row("y=probs", "perturb_class_conditional", 1, 4.0),
        _row("y=probs", "perturb_class_conditional", 2, 4.1),
        _row("combo: y_space=probs,noise_range=batch", "perturb_class_conditional", 2, 3.9),
        _row("range per batch", "perturb_class_conditional", 1, 4.5),
    ]
    text = ablation.report(rows)
    probs = _line(text, "y=probs")
    assert probs[5] == "-0.25 (sets 1,2)"  # (4.0-4.4 + 4.1-4.2) / 2
    assert probs[6] == "-0.30 (sets 1)"  # random ran on set 1 only
    combo = _line(text, "combo: y_space=probs,noise_range=batch")
    assert combo[5] == "-0.30 (sets 2, vs y=probs pb)"
    assert combo[6] == ""
    assert _line(text, "range per batch")[5] == "-0.50 (sets 1, vs base pb)"
