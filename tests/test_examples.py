"""Every example script runs end to end (offline backbone, one training step, fixture data trees)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_data import _food_tree, _mmimdb_tree, _snli_tree

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "tree", "extra"),
    [("food101.py", _food_tree, ["--val-size", "6"]), ("mmimdb.py", _mmimdb_tree, []), ("snli_ve.py", _snli_tree, [])],
)
def test_paper_dataset_example_trains_and_saves_an_adapter(script, tree, extra, tmp_path):
    source = tree(tmp_path / "source")
    out = tmp_path / "out"
    stdout = _run(script, "--data-dir", str(source), "--backbone", "offline", "--max-steps", "1",
                  "--output-dir", str(out), *extra, cwd=tmp_path)
    assert "test_loss" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_offline_easy_vqa_example_runs(tmp_path):
    stdout = _run("easy_vqa_offline.py", "--max-train-samples", "64", "--max-eval-samples", "32", "--max-steps", "1",
                  "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert "test_accuracy" in stdout
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
