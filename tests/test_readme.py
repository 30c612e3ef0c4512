"""The README's examples run, so the README never lies.

Convention: a fenced block opened with ```` ```python ```` whose *first line* is exactly
``# test: run`` is executed; every other block (other languages, or Python without the marker,
e.g. snippets that need real data or a GPU) is only shown. Each marked block is a separate
test, runs on its own in a fresh namespace (import what you use in every block), in a temporary
working directory, after ``torch.manual_seed(0)``, and must finish in a few seconds on a CPU.
Where the block sits in the README does not matter; tests are named after the heading above it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "# test: run"
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")


class Block(NamedTuple):
    """A runnable block: the code, the README line of its first code line, its heading."""

    code: str
    line: int
    heading: str


def runnable_blocks(markdown: str) -> list[Block]:
    """Every ```` ```python ```` block of ``markdown`` whose first line is :data:`MARKER`."""
    blocks: list[Block] = []
    heading = "top"
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            h = _HEADING.match(lines[i])
            if h:
                heading = h.group("title")
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip().lower()
        start = i + 1
        end = start
        closing = re.compile(re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*")
        while end < len(lines) and not closing.fullmatch(lines[end].strip()):
            end += 1
        body = lines[start:end]
        language = info.split()[0] if info else ""
        if language in ("python", "py") and body and body[0].strip() == MARKER:
            blocks.append(Block("\n".join(body) + "\n", start + 1, heading))
        i = end + 1
    return blocks


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "block"


def _params() -> list:
    if not README.exists():
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"{README.name} does not exist yet; its '{MARKER}' blocks will run here"))]
    blocks = runnable_blocks(README.read_text(encoding="utf-8"))
    if not blocks:
        return [pytest.param(None, id="no-runnable-blocks")]
    return [pytest.param(b, id=f"{_slug(b.heading)}-line{b.line}") for b in blocks]


@pytest.mark.parametrize("block", _params())
def test_readme_block_runs(block: Block | None, tmp_path, monkeypatch):
    if block is None:
        pytest.fail(
            f"{README} has no runnable example: mark at least the quick start with a first "
            f"line '{MARKER}' inside its ```python block."
        )
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    code = compile(block.code, f"{README}:{block.line}", "exec")
    exec(code, {"__name__": "__main__"})  # noqa: S102 - running our own documentation


SAMPLE = """\
# Title

```python
# test: run
a = 1
```

## Quick start

Text.

```python
import this_is_only_shown
```

````python
# test: run
b = 2
```
still inside the four-backtick fence
````

```bash
# test: run
echo not python
```

### Details
```py
# test: run
c = 3
```
"""


def test_parser_finds_only_marked_python_blocks():
    blocks = runnable_blocks(SAMPLE)
    assert [b.heading for b in blocks] == ["Title", "Quick start", "Details"]
    assert [b.code.splitlines()[1] for b in blocks] == ["a = 1", "b = 2", "c = 3"]
    assert "still inside" in blocks[1].code
    lines = SAMPLE.splitlines()
    assert all(lines[b.line - 1] == MARKER for b in blocks)  # line numbers are the README's
