"""Data-parallel training: Trainer under `torchrun` with 2 CPU processes (DDP, gloo) matches one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume import final_adapter, train_env, write_train_script

# 16 samples: one global batch of 16 per step, as 2 processes x 8 or 1 process x 16. Every step sees the whole data
# set in both runs, so shuffling cannot make them differ; only the order of float additions does.
GLOBAL_BATCH = ["--samples", "16", "--max-steps", "6", "--save-steps", "100"]


def _torchrun(script: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [*command, str(script), "--out", str(out), *GLOBAL_BATCH, "--batch", "8", *extra],
        env=train_env(), cwd=script.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(process: subprocess.Popen) -> None:
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output


def _run_info(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_two_cpu_processes_give_the_adapter_of_one_process_with_the_same_global_batch(tmp_path):
    script = write_train_script(tmp_path)
    runs = {
        "ddp": _torchrun(script, tmp_path / "ddp"),
        # Non-reentrant gradient checkpointing recomputes layers during backward, inside DDP's backward.
        "ddp_checkpointed": _torchrun(script, tmp_path / "ddp_checkpointed", "--gradient-checkpointing"),
        "single": subprocess.Popen(
            [sys.executable, str(script), "--out", str(tmp_path / "single"), *GLOBAL_BATCH, "--batch", "16"],
            env=train_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ),
    }
    for process in runs.values():
        _finish(process)

    assert _run_info(tmp_path / "single")["world_size"] == 1
    expected = final_adapter(tmp_path / "single")
    # The hub's gates start at zero: they moved far beyond the tolerance below, so the cross-modal term took part.
    assert expected["base_model.mitp_hub.text_gate"].abs().max() > 1e-3
    for name in ("ddp", "ddp_checkpointed"):
        info = _run_info(tmp_path / name)
        # Really data-parallel: DDP over gloo, 2 ranks, and no search for unused parameters (DDP would fail a step if
        # a trainable tensor got no gradient, e.g. the hub's maps while its gates are still zero).
        assert (info["world_size"], info["wrapper"], info["backend"]) == (2, "DistributedDataParallel", "gloo")
        assert info["find_unused_parameters"] is False
        assert (info["checkpointed_layers"] > 0) == (name == "ddp_checkpointed")
        got = final_adapter(tmp_path / name)
        assert set(got) == set(expected)
        # Gradients are averaged over the ranks in a different order of additions than one process sums them:
        # after 6 AdamW steps the adapters agree to ~6e-7 (observed).
        for key, tensor in expected.items():
            torch.testing.assert_close(got[key], tensor, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


@pytest.mark.slow
def test_missing_modality_adapter_with_modality_dropout_trains_under_ddp(tmp_path):
    script = write_train_script(tmp_path)
    ddp = _torchrun(script, tmp_path / "ddp", "--missing-modality")
    _finish(ddp)
    info = _run_info(tmp_path / "ddp")
    # The stand-ins take part in every training step (zero gradient when no sample lacks a modality): DDP without
    # `find_unused_parameters` accepts them, whatever the dropout drew on each rank.
    assert (info["world_size"], info["find_unused_parameters"]) == (2, False)
    adapter = final_adapter(tmp_path / "ddp")
    assert {"base_model.mitp_hub.stand_ins.features.vision", "base_model.mitp_hub.stand_ins.readouts.text"} <= set(
        adapter
    )
    assert torch.count_nonzero(adapter["base_model.mitp_hub.stand_ins.features.vision"]) > 0  # trained from zero
