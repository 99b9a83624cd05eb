"""Every code block of README.md and docs/*.md that is marked runnable runs as written, offline.

The convention: a fenced block with the info string `python`, on the line right after an HTML comment
`<!-- runnable -->` (invisible when rendered). Each such block runs in a fresh Python process, in an empty
temporary folder, with `HF_HUB_OFFLINE=1`, and must exit with status 0. Blocks without the marker are examples that
need something this machine lacks (the Hub, a GPU, a data set) and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- runnable -->"
BLOCK = re.compile(r"^" + re.escape(MARKER) + r"\n```python\n(.*?)^```$", re.M | re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    """(`file:line`, code) of every marked block."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return found


BLOCKS = runnable_blocks()


def test_the_readme_quickstart_is_marked_runnable():
    assert any(where.startswith("README.md:") for where, _ in BLOCKS)
    # A marker must sit right above a python block: a misplaced one would silently test nothing.
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        markers = len(re.findall(r"^" + re.escape(MARKER) + r"$", text, flags=re.M))
        assert markers == len(BLOCK.findall(text)), f"{path.name}: a {MARKER} line not right above ```python"


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_runnable_block_runs_as_written(where, code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
