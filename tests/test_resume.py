"""Kill and resume: a Trainer run killed with SIGKILL mid-training and resumed ends at the uninterrupted adapter."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parent

# One training script for the kill-and-resume test here and the data-parallel and FSDP tests in test_distributed.py.
# It runs as a plain process or as one rank under `torchrun`; the tiny CLIP and its inputs come from conftest.
TRAIN_SCRIPT = r'''
"""Train a tiny MITP adapter with transformers.Trainer on a small synthetic data set."""
import argparse
import contextlib
import json
import os
import signal

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from conftest import clip_inputs, make_model
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_mitp

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--max-steps", type=int, default=20)
parser.add_argument("--save-steps", type=int, default=5)
parser.add_argument("--batch", type=int, default=8, help="batch size per process")
parser.add_argument("--samples", type=int, default=64)
parser.add_argument("--hold-at-step", type=int, default=0, help="after this step, write HELD and wait for a kill")
parser.add_argument("--resume", action="store_true", help="resume from the last complete checkpoint in --out")
parser.add_argument("--missing-modality", action="store_true", help="adapter with stand-ins and modality dropout")
parser.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant gradient checkpointing")
parser.add_argument("--fsdp", action="store_true", help="FSDP2 with fsdp_config=peft_mitp.prepare_fsdp(model)")
parser.add_argument(
    "--fsdp-activation-checkpointing", action="store_true", help="with --fsdp: FSDP's activation checkpointing"
)
args = parser.parse_args()
torch.set_num_threads(1)


def dataset(n):
    """Label = (first token is even) + 2 * (image brightness > 0): needs both modalities."""
    batch = clip_inputs(batch=n, length=6, seed=11)
    brightness = torch.randn(n, generator=torch.Generator().manual_seed(12)).sign()
    labels = (batch["input_ids"][:, 0] % 2 == 0).long() + 2 * (brightness > 0).long()
    return Dataset.from_dict(
        {
            "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "pixel_values": (batch["pixel_values"] * 0.5 + brightness[:, None, None, None]).tolist(),
            "labels": labels.tolist(),
        }
    ).with_format("torch")


class CPUFSDPTrainer(Trainer):
    """Trainer that runs FSDP on CPU processes.

    accelerate 1.15 turns FSDP on only for accelerator devices: on CPU (`MULTI_CPU`) it keeps the FSDP plugin aside
    and silently trains with DDP. This sets the FSDP state for CPU as `AcceleratorState` sets it on a GPU (its
    distributed type, in its own and `PartialState`'s shared state, and the plugin), so that Trainer and accelerate
    take their FSDP2 paths (`fully_shard`, full-state-dict saving) unchanged.
    """

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True


def fsdp_layout(wrapped):
    """What FSDP did to the model: its units and checkpoint wrappers (by class) and the share of weights held here."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    def original(module):
        return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__

    units = sorted(original(m) for m in wrapped.modules() if isinstance(m, FSDPModule))
    checkpointed = sorted(original(m._checkpoint_wrapped_module) for m in wrapped.modules()
                          if hasattr(m, "_checkpoint_wrapped_module"))
    frozen = [p for p in wrapped.parameters() if not p.requires_grad]
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in frozen)
    return {
        "fsdp_units": units,
        "checkpoint_wrapped": checkpointed,
        "frozen_local_fraction": local / sum(p.numel() for p in frozen),
    }


class HoldAfterStep(TrainerCallback):
    def on_step_end(self, training_args, state, control, **kwargs):
        if state.global_step == args.hold_at_step:
            open(os.path.join(args.out, "HELD"), "w").close()
            signal.pause()  # in the middle of training, checkpoints on disk: wait here until killed


config = peft_mitp.MITPConfig(prompt_length=4, num_interaction_layers=2, hub_dim=16)
if args.missing_modality:
    config = peft_mitp.MITPConfig(
        prompt_length=4, num_interaction_layers=2, hub_dim=16, missing_modality=True, modality_dropout=0.5
    )
model = make_model(config, num_labels=4)
fsdp_config = None
if args.fsdp:
    fsdp_config = peft_mitp.prepare_fsdp(
        model, {"activation_checkpointing": True} if args.fsdp_activation_checkpointing else None
    )
training_args = TrainingArguments(
    output_dir=args.out,
    per_device_train_batch_size=args.batch,
    max_steps=args.max_steps,
    learning_rate=3e-2,
    logging_steps=1,
    save_strategy="steps",
    save_steps=args.save_steps,
    report_to=[],
    label_names=["labels"],
    seed=0,
    use_cpu=True,
    disable_tqdm=True,
    # Every trainable tensor gets a gradient at every step: DDP need not search for unused parameters.
    ddp_find_unused_parameters=False,
    gradient_checkpointing=args.gradient_checkpointing,
    gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
    fsdp=args.fsdp,
    fsdp_config=fsdp_config,
)
trainer = CPUFSDPTrainer(
    model=model, args=training_args, train_dataset=dataset(args.samples), callbacks=[HoldAfterStep()]
)
resume = None
if args.resume:
    # A kill during a save leaves a folder without trainer_state.json (written last): skip those.
    complete = [
        d for d in os.listdir(args.out)
        if d.startswith("checkpoint-") and os.path.exists(os.path.join(args.out, d, "trainer_state.json"))
    ]
    resume = os.path.join(args.out, max(complete, key=lambda d: int(d.split("-")[1])))
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(os.path.join(args.out, "final"))
if trainer.is_world_process_zero():
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    info = {
        "world_size": training_args.world_size,
        "wrapper": type(trainer.model_wrapped).__name__,
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "checkpointed_layers": sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules()),
        "resumed_from": resume,
        "losses": losses,
    }
    if trainer.is_fsdp_enabled:
        info["fsdp_version"] = trainer.accelerator.state.fsdp_plugin.fsdp_version
        info.update(fsdp_layout(trainer.model_wrapped))
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(info, f)
if torch.distributed.is_initialized():
    # End the gloo process group before the interpreter exits: left to teardown, its threads can abort the process
    # ("terminate called without an active exception") after training has finished.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def write_train_script(folder: Path) -> Path:
    """Write the training script into `folder` and return its path."""
    path = folder / "train_tiny_mitp.py"
    path.write_text(TRAIN_SCRIPT)
    return path


def train_env() -> dict[str, str]:
    """Environment for a training subprocess: conftest importable, one thread, no network."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    """The adapter a run saved at its end."""
    return load_file(out / "final" / "adapter_model.safetensors")


@pytest.mark.slow
def test_sigkilled_run_resumed_from_its_last_checkpoint_ends_at_the_uninterrupted_adapter(tmp_path):
    script = write_train_script(tmp_path)
    env = train_env()
    steps = ["--max-steps", "20", "--save-steps", "5"]
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "uninterrupted"
    killed_dir.mkdir()
    # The uninterrupted run and the run to kill go side by side (one thread each).
    with contextlib.ExitStack() as stack:
        log = {name: stack.enter_context(open(tmp_path / f"{name}.log", "w")) for name in ("full", "killed")}
        full = subprocess.Popen(
            [sys.executable, str(script), "--out", str(full_dir), *steps], env=env, cwd=tmp_path,
            stdout=log["full"], stderr=subprocess.STDOUT,
        )
        stack.callback(lambda: full.poll() is None and full.kill())
        victim = subprocess.Popen(
            [sys.executable, str(script), "--out", str(killed_dir), *steps, "--hold-at-step", "7"], env=env,
            cwd=tmp_path, stdout=log["killed"], stderr=subprocess.STDOUT,
        )
        stack.callback(lambda: victim.poll() is None and victim.kill())
        # Poll the output folder: kill once a checkpoint exists and the run is past it (step 7 of 20).
        while not (killed_dir / "HELD").exists():
            if victim.poll() is not None:
                pytest.fail(f"the run to kill ended on its own:\n{(tmp_path / 'killed.log').read_text()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                victim.wait(timeout=0.2)
        assert (killed_dir / "checkpoint-5" / "trainer_state.json").exists()
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        assert sorted(p.name for p in killed_dir.glob("checkpoint-*")) == ["checkpoint-5"]
        assert not (killed_dir / "final").exists()

        resumed = subprocess.run(
            [sys.executable, str(script), "--out", str(killed_dir), *steps, "--resume"], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=300,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert full.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()

    run = json.loads((killed_dir / "run.json").read_text())
    assert run["resumed_from"].endswith("checkpoint-5")
    assert len(run["losses"]) == 20  # steps 1..5 restored from the checkpoint's log, 6..20 trained after the kill
    expected, got = final_adapter(full_dir), final_adapter(killed_dir)
    assert set(got) == set(expected) and any("mitp_hub" in k for k in got)
    # Same seed, same data order, same CPU and thread count: equal to float32 rounding (observed: bit-identical).
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
