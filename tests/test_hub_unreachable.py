"""Without a network, loading a Hub id fails at once with one clear error that says how to work offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A closed local port: every connection is refused at once, as on a machine without a network.
CLOSED = "http://127.0.0.1:9"

LOADERS = {
    "task-model": "peft_mitp.MITPForImageTextClassification.from_pretrained('openai/clip-vit-base-patch32', num_labels=3)",
    "towers": "peft_mitp.MITPForImageTextClassification.from_text_vision_pretrained('google-bert/bert-base-uncased', "
    "'google/vit-base-patch16-224', num_labels=3)",
    "adapter": "peft_mitp.load_adapter_model('someone/mitp-adapter')",
    "processor": "peft_mitp.load_processor('openai/clip-vit-base-patch32')",
}


@pytest.mark.parametrize("call", LOADERS.values(), ids=LOADERS.keys())
def test_hub_id_without_network_fails_fast_with_one_clear_error(call, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=CLOSED, HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1")
    code = (
        "import time, peft_mitp\n"
        "start = time.monotonic()\n"
        "try:\n"
        f"    {call}\n"
        "except peft_mitp.HubUnreachableError as error:\n"
        "    print(round(time.monotonic() - start, 1)); print(error)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, message = proc.stdout.strip().split("\n", 1)  # the time is printed for a reader, not asserted
    assert "\n" not in message.strip()
    assert CLOSED in message and "unreachable" in message
    assert "HF_HUB_OFFLINE=1" in message and "local folder" in message and "build_offline_backbone" in message
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr


def test_mitp_train_on_a_hub_backbone_without_network_ends_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=CLOSED, HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "peft_mitp_cli", "train", "--backbone", "openai/clip-vit-base-patch32",
         "--max-train-samples", "64", "--max-eval-samples", "32", "--output-dir", str(tmp_path / "out")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mitp train: error:")]
    assert len(errors) == 1 and "HF_HUB_OFFLINE=1" in errors[0] and "Traceback" not in proc.stderr
