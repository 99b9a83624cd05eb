"""Sharing adapters: push to and load from a real Hub-compatible server, the model card, several adapters, bf16 files.

The Hub tests run the real `huggingface_hub` client against `tests/hubserver.py`'s `LocalHub` on 127.0.0.1 and load
the pushed adapters in a fresh Python process, by repo id only.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import clip_inputs, run_python, tiny_clip
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load, load_file, save_file
from transformers import Trainer, TrainingArguments

import peft_mitp
from peft_mitp import MITPConfig, MITPForImageTextClassification

try:  # rootdir-relative import when `tests/` is a package, plain import when pytest puts `tests/` on sys.path
    from tests.hubserver import LocalHub, client_env, configure_client
except ImportError:
    from hubserver import LocalHub, client_env, configure_client

TOKEN, USER = "hf_test_token", "testuser"
SMALL = dict(prompt_length=4, num_interaction_layers=2, hub_dim=16)
LABELS = {0: "soup", 1: "salad", 2: "cake"}


@pytest.fixture(scope="module", autouse=True)
def loopback_only():
    """Fail loudly if anything in this process tries to reach a non-loopback address (e.g. huggingface.co)."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise OSError(f"network access outside 127.0.0.1 attempted: {address}")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        yield


def _train(model, steps=3, seed=0, lr=5e-2):
    """A few optimiser steps on fixed random data, so the adapter differs from its initialisation."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = clip_inputs(seed=seed + 20)
    labels = torch.arange(4) % model.get_base_model().config.num_labels
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the model card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


# ---------------------------------------------------------------------------------------------------- the Hub
@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Push two tiny bases and three adapters to a LocalHub, then load them by repo id in one fresh process."""
    root = tmp_path_factory.mktemp("sharing")
    with LocalHub(root / "hub", tokens={TOKEN: USER}) as hub, pytest.MonkeyPatch.context() as mp:
        configure_client(mp, hub.endpoint, root / "hf_home", token=TOKEN)
        # A saved task model and a bare dual encoder as bases, both on the Hub, so a fresh process can rebuild them.
        MITPForImageTextClassification.from_backbone(tiny_clip(), id2label=LABELS).push_to_hub(f"{USER}/tiny-task")
        tiny_clip(seed=3).push_to_hub(f"{USER}/tiny-clip")

        model = get_peft_model(MITPForImageTextClassification.from_pretrained(f"{USER}/tiny-task"), MITPConfig(**SMALL))
        _train(model)
        info = {"dataset": "testuser/toy-food", "metrics": {"test_accuracy": 0.5}, "epochs": 1, "license": "mit"}
        first = model.push_to_hub(f"{USER}/mitp-toy", training_info=info)
        first_card = hub.read_file(f"{USER}/mitp-toy", "README.md").decode()
        first_logits = _logits(model, clip_inputs(seed=99))
        # Someone edits the card on the Hub: metadata the plugin does not write must survive the next push.
        edited = first_card.replace("library_name: peft", "language: en\nlibrary_name: peft").encode()
        HfApi().upload_file(path_or_fileobj=edited, path_in_repo="README.md", repo_id=f"{USER}/mitp-toy")
        _train(model, seed=1)  # train on, then push again: a new commit updates the repo
        info["metrics"]["test_accuracy"] = 0.75
        second = model.push_to_hub(f"{USER}/mitp-toy", training_info=info, commit_message="More training")

        bare = MITPForImageTextClassification.from_pretrained(f"{USER}/tiny-clip", num_labels=3)
        bare_model = _train(get_peft_model(bare, MITPConfig(**SMALL, similarity="cosine")))
        bare_model.push_to_hub(f"{USER}/mitp-bare")
        private_model = _train(get_peft_model(MITPForImageTextClassification.from_pretrained(f"{USER}/tiny-task"),
                                              MITPConfig(**SMALL)), seed=2)
        private_model.push_to_hub(f"{USER}/mitp-private", private=True)

        inputs = clip_inputs(seed=99)
        save_file(inputs, str(root / "inputs.safetensors"))
        expected = {
            "toy": _logits(model, inputs),
            "toy_first_commit": first_logits,
            "bare": _logits(bare_model, inputs),
            "private": _logits(private_model, inputs),
        }
        card = hub.read_file(f"{USER}/mitp-toy", "README.md").decode()
        snippet = _python_blocks(card)[0]
        (root / "snippet.py").write_text(snippet)
        run_python(
            f"""
import runpy
namespace = runpy.run_path("snippet.py")  # the card's usage snippet, verbatim, first thing in a fresh interpreter
import torch
from safetensors.torch import load, load_file, save_file
inputs = load_file("inputs.safetensors")
def logits(model):
    with torch.no_grad():
        return model(**inputs).logits.contiguous()
import peft_mitp
from peft import AutoPeftModel, PeftModel
out = {{"snippet": logits(namespace["model"])}}
base = peft_mitp.MITPForImageTextClassification.from_pretrained("{USER}/tiny-task")
out["peft"] = logits(PeftModel.from_pretrained(base, "{USER}/mitp-toy"))
out["auto"] = logits(AutoPeftModel.from_pretrained("{USER}/mitp-toy", import_allowlist=["peft_mitp"]))
out["loader"] = logits(peft_mitp.load_adapter_model("{USER}/mitp-toy"))
out["first_commit"] = logits(peft_mitp.load_adapter_model("{USER}/mitp-toy", revision="{first.oid}"))
out["bare_auto"] = logits(AutoPeftModel.from_pretrained("{USER}/mitp-bare", import_allowlist=["peft_mitp"]))
out["bare_loader"] = logits(peft_mitp.load_adapter_model("{USER}/mitp-bare"))
out["private"] = logits(peft_mitp.load_adapter_model("{USER}/mitp-private"))
save_file(out, "reloaded.safetensors")
""",
            cwd=root,
            env=client_env(hub.endpoint, root / "hf_home_fresh", token=TOKEN),
        )
        yield SimpleNamespace(
            hub=hub,
            root=root,
            commits=(first.oid, second.oid),
            first_card=first_card,
            card=card,
            adapter=model,
            expected=expected,
            reloaded=load_file(root / "reloaded.safetensors"),
        )


def test_push_uploads_adapter_files_and_the_mitp_model_card(pushed):
    files = pushed.hub.files(f"{USER}/mitp-toy")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "mitp_training.json"} <= set(files)
    card = ModelCard(pushed.card)  # parses as YAML front matter + markdown
    meta = _front_matter(pushed.card)
    assert meta == card.data.to_dict()
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == f"{USER}/tiny-task"
    assert {"mitp", "peft", "image-text-classification", "clip", f"base_model:adapter:{USER}/tiny-task"} <= set(
        meta["tags"]
    )
    assert meta["license"] == "mit" and meta["datasets"] == ["testuser/toy-food"] and meta["metrics"] == ["accuracy"]
    assert "generic" not in card.text and "More Information Needed" not in card.text  # not peft's template
    assert "| test_accuracy | 0.7500 |" in card.text
    config = json.loads(pushed.hub.read_file(f"{USER}/mitp-toy", "adapter_config.json"))
    assert config["base_model_name_or_path"] == f"{USER}/tiny-task"
    assert config["num_labels"] == 3 and config["id2label"] == {str(k): v for k, v in LABELS.items()}
    bare = json.loads(pushed.hub.read_file(f"{USER}/mitp-bare", "adapter_config.json"))
    assert bare["base_model_name_or_path"] == f"{USER}/tiny-clip" and bare["num_labels"] == 3  # a bare dual encoder


def test_pushing_again_makes_a_new_commit_that_updates_the_repo(pushed):
    first, second = pushed.commits
    assert first != second and pushed.hub.head(f"{USER}/mitp-toy") == second
    assert "| test_accuracy | 0.5000 |" in pushed.first_card and "| test_accuracy | 0.7500 |" in pushed.card
    assert _front_matter(pushed.card)["language"] == "en"  # added on the Hub between the pushes: kept
    stored = load(pushed.hub.read_file(f"{USER}/mitp-toy", "adapter_model.safetensors"))
    current = get_peft_model_state_dict(pushed.adapter)  # the adapter after the second round of training
    assert set(stored) == set(current) and all(torch.equal(stored[k], current[k]) for k in current)


def test_fresh_process_loads_the_pushed_adapter_by_repo_id_with_identical_logits(pushed):
    for way in ("peft", "auto", "loader"):
        assert torch.equal(pushed.reloaded[way], pushed.expected["toy"]), way
    assert torch.equal(pushed.reloaded["private"], pushed.expected["private"])
    # `revision=` reaches the adapter's older commit, which still holds the adapter as first pushed.
    assert torch.equal(pushed.reloaded["first_commit"], pushed.expected["toy_first_commit"])
    assert not torch.equal(pushed.expected["toy_first_commit"], pushed.expected["toy"])


def test_autopeftmodel_rebuilds_a_bare_dual_encoder_base_with_the_head_the_adapter_recorded(pushed):
    assert torch.equal(pushed.reloaded["bare_auto"], pushed.expected["bare"])
    assert torch.equal(pushed.reloaded["bare_loader"], pushed.expected["bare"])


def test_model_card_usage_snippet_runs_in_a_fresh_process(pushed):
    snippet = _python_blocks(pushed.card)[0]
    assert "import peft_mitp" in snippet and f'"{USER}/mitp-toy"' in snippet
    assert torch.equal(pushed.reloaded["snippet"], pushed.expected["toy"])
    for block in _python_blocks(pushed.card)[1:]:
        compile(block, "model card block", "exec")  # the other blocks need an image or a second model: syntax only


def test_private_adapter_is_not_readable_without_a_token(pushed, tmp_path, monkeypatch):
    configure_client(monkeypatch, pushed.hub.endpoint, tmp_path / "hf_home", token=None)
    with pytest.raises(RepositoryNotFoundError, match="private or gated repo"):
        peft_mitp.load_adapter_model(f"{USER}/mitp-private")


def test_push_without_a_token_is_refused_with_a_clear_message(pushed, tmp_path, monkeypatch):
    configure_client(monkeypatch, pushed.hub.endpoint, tmp_path / "hf_home", token=None)
    with pytest.raises(HfHubHTTPError) as excinfo:
        pushed.adapter.push_to_hub(f"{USER}/mitp-anonymous")
    message = str(excinfo.value)
    assert excinfo.value.response.status_code == 401
    assert "refused (401): no valid token was sent" in message and "hf auth login" in message
    with pytest.raises(KeyError):
        pushed.hub.files(f"{USER}/mitp-anonymous")


def test_push_to_hub_takes_every_form_of_its_arguments_and_always_uploads_the_mitp_card(tmp_path):
    import inspect

    from transformers.utils.hub import PushToHubMixin

    model = get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3), MITPConfig(**SMALL))
    # One valid value for every keyword of transformers' `push_to_hub` (the LocalHub has no branches: revision=None).
    keywords = {
        "commit_message": "Upload with a message",
        "commit_description": "why",
        "private": False,
        "token": TOKEN,
        "revision": None,
        "create_pr": False,
        "max_shard_size": "1GB",
        "tags": ["my-tag"],
    }
    assert set(inspect.signature(PushToHubMixin.push_to_hub).parameters) - {"self", "repo_id"} <= set(keywords)
    forms = {
        "positional": ((f"{USER}/positional",), {}),
        "repo-id-keyword": ((), {"repo_id": f"{USER}/repo-id-keyword"}),
        "all-keywords": ((f"{USER}/all-keywords",), keywords),
        "safe-serialization": ((f"{USER}/safe-serialization",), {"safe_serialization": True}),
        "unsafe-serialization": ((f"{USER}/unsafe-serialization",), {"safe_serialization": False}),
        "mitp-extras": ((f"{USER}/mitp-extras",), {"dtype": torch.bfloat16, "training_info": {"epochs": 1}}),
    }
    with LocalHub(tmp_path / "hub", tokens={TOKEN: USER}) as hub, pytest.MonkeyPatch.context() as mp:
        configure_client(mp, hub.endpoint, tmp_path / "hf_home", token=TOKEN)
        for name, (args, kwargs) in forms.items():
            if name == "unsafe-serialization":
                with pytest.warns(UserWarning, match="always saved as safetensors"):
                    model.push_to_hub(*args, **kwargs)
            else:
                model.push_to_hub(*args, **kwargs)
            repo = f"{USER}/{name}"
            files = hub.files(repo)
            assert "adapter_model.safetensors" in files and "adapter_model.bin" not in files, name
            card = hub.read_file(repo, "README.md").decode()
            assert "## MITP configuration" in card, name
        assert "my-tag" in _front_matter(hub.read_file(f"{USER}/all-keywords", "README.md").decode())["tags"]
        repo = hub._get_repo("model", f"{USER}/all-keywords")
        assert repo.resolve("main").message.startswith("Upload with a message")
        assert load(hub.read_file(f"{USER}/mitp-extras", "adapter_model.safetensors"))[
            next(iter(get_peft_model_state_dict(model)))
        ].dtype == torch.bfloat16
        # A call transformers' own `push_to_hub` refuses is refused the same way.
        with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_keyword'"):
            model.push_to_hub(f"{USER}/refused", not_a_keyword=1)


# ---------------------------------------------------------------------------------------------------- the card
def test_save_pretrained_writes_the_mitp_card_with_configuration_size_and_training(tmp_path):
    MITPForImageTextClassification.from_backbone(tiny_clip(), id2label=LABELS).save_pretrained(tmp_path / "base")
    base = MITPForImageTextClassification.from_pretrained(tmp_path / "base")
    config = MITPConfig(prompt_length=3, vision_prompt_length=5, num_interaction_layers=2, hub_dim=16,
                        similarity="cosine", memory=False)
    model = get_peft_model(base, config)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    info = {"dataset": "UPMC Food-101 (local)", "metrics": {"test_accuracy": 0.875, "test_f1_macro": 0.5},
            "epochs": 2, "base_model": str(tmp_path / "base")}
    (adapter_dir / "mitp_training.json").write_text(json.dumps(info))
    model.save_pretrained(adapter_dir)

    text = (adapter_dir / "README.md").read_text()
    meta = _front_matter(text)
    assert ModelCard.load(adapter_dir / "README.md").data.to_dict() == meta
    # A local folder is no Hub id: the Hub would refuse it as `base_model` or a `datasets` entry.
    assert "base_model" not in meta and "datasets" not in meta
    assert meta["metrics"] == ["accuracy", "f1"] and "mitp" in meta["tags"]
    assert "text 2 with vision 3, text 3 with vision 4" in text
    assert "3 per text interaction layer and 5 per vision interaction layer" in text
    assert "width 16" in text and "cosine similarity" in text and "temperature 0.1" in text
    assert "interaction on" in text and "memory **off**" in text
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    adapter_params = sum(t.numel() for t in saved.values())
    whole = adapter_params + sum(p.numel() for n, p in base.backbone.named_parameters() if "mitp_" not in n)
    assert f"**{adapter_params:,}**" in text and f"{100 * adapter_params / whole:.2f}% of the {whole:,}" in text
    assert "- **Data set**: UPMC Food-101 (local)" in text and "| test_accuracy | 0.8750 |" in text
    assert "0: soup, 1: salad, 2: cake" in text
    assert f'load_adapter_model("{adapter_dir}")' in _python_blocks(text)[0]


def test_saving_over_a_readme_of_ones_own_keeps_its_text_and_regenerates_only_the_mitp_block(tmp_path):
    model = get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3), MITPConfig(**SMALL))
    (tmp_path / "README.md").write_text("---\nlanguage: en\n---\n\n# My food adapter\n\nTrained on my photos.\n")
    model.save_pretrained(tmp_path)
    first = (tmp_path / "README.md").read_text()
    assert "# My food adapter\n\nTrained on my photos." in first and "## MITP configuration" in first
    assert first.index("Trained on my photos.") < first.index(peft_mitp.card.CARD_BEGIN)
    assert _front_matter(first)["language"] == "en" and "mitp" in _front_matter(first)["tags"]

    # Text added after the block survives the next save; the block is regenerated once, not appended again.
    (tmp_path / "README.md").write_text(first + "\n## Notes\n\nCheck the label order.\n")
    model.add_adapter("second", MITPConfig(**SMALL))
    model.save_pretrained(tmp_path)
    second = (tmp_path / "README.md").read_text()
    assert second.count("Trained on my photos.") == 1 and second.count("## MITP configuration") == 1
    assert "## Notes\n\nCheck the label order." in second
    assert "| second |" in second  # regenerated from the model


def test_generated_cards_are_replaced_whole(tmp_path):
    model = get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3), MITPConfig(**SMALL))
    (tmp_path / "README.md").write_text("# Model Card\n\n<!-- Provide a quick summary of what the model is/does. -->\n"
                                        "\n[More Information Needed]\n")
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "More Information Needed" not in text and text.count("## MITP configuration") == 1


def test_card_lists_the_other_adapters_saved_in_subfolders(tmp_path):
    model = get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3), MITPConfig(**SMALL))
    model.add_adapter("wide", MITPConfig(prompt_length=6, num_interaction_layers=3, hub_dim=8))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert (tmp_path / "wide" / "adapter_model.safetensors").exists()
    wide = sum(t.numel() for t in load_file(tmp_path / "wide" / "adapter_model.safetensors").values())
    assert f"| wide | 3 | 6/6 | 8 | {wide:,} |" in text


def test_non_mitp_adapters_keep_peft_and_transformers_behaviour(tmp_path):
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    text_model = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, vocab_size=20))
    lora = get_peft_model(text_model, LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path)
    assert "## MITP configuration" not in (tmp_path / "README.md").read_text()
    assert not peft_mitp.sharing.is_mitp_model(lora)


# ---------------------------------------------------------------------------------------------------- the head
def test_adapter_brings_its_own_head_size_and_refuses_a_base_of_another_problem_type(tmp_path):
    model = get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3), MITPConfig(**SMALL))
    model.eval().save_pretrained(tmp_path)
    inputs = clip_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    other = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5)
    loaded = PeftModel.from_pretrained(other, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)  # its own 3-label head, not the base's 5
        with loaded.disable_adapter():
            assert loaded(**inputs).logits.shape == (4, 5)
    multi = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3,
                                                         problem_type="multi_label_classification")
    with pytest.raises(ValueError, match=r"single_label_classification with 3 labels.*multi_label_classification"):
        PeftModel.from_pretrained(multi, tmp_path)


def test_a_placeholder_head_is_sized_by_a_loaded_adapter_but_refused_for_a_new_one(tmp_path):
    tiny_clip().save_pretrained(tmp_path / "clip")
    base = MITPForImageTextClassification.from_pretrained(tmp_path / "clip", id2label=LABELS)
    model = _train(get_peft_model(base, MITPConfig(**SMALL)))
    model.save_pretrained(tmp_path / "adapter")
    inputs = clip_inputs(seed=5)

    placeholder = MITPForImageTextClassification.from_pretrained(tmp_path / "clip")  # no num_labels
    assert placeholder.mitp_head_pending
    with pytest.raises(ValueError, match=r"placeholder.*pass `num_labels=`"):
        get_peft_model(placeholder, MITPConfig(**SMALL))
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(MITPForImageTextClassification.from_pretrained(tmp_path / "clip"),
                                           tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
        assert loaded.config.id2label == LABELS and loaded.config.num_labels == 3
        assert not any(p.is_meta for p in loaded.parameters())  # the original head too (used by disable_adapter)
        assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))


def test_load_adapter_model_needs_a_base_when_none_was_recorded(tmp_path):
    model = get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3), MITPConfig(**SMALL))
    _train(model).save_pretrained(tmp_path)  # built from a config: no base_model_name_or_path
    with pytest.raises(ValueError, match="does not record its base model.*base_model="):
        peft_mitp.load_adapter_model(tmp_path)
    loaded = peft_mitp.load_adapter_model(
        tmp_path, base_model=MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3)
    )
    inputs = clip_inputs(seed=6)
    assert not loaded.training and torch.equal(_logits(loaded, inputs), _logits(model, inputs))


# ---------------------------------------------------------------------------------------------------- several adapters
def _task_dataset(task: str, n: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two toy tasks on the same inputs: 'text' labels by the first token, 'image' by the image's brightness."""
    batch = clip_inputs(batch=n, length=6, seed=seed)
    brightness = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    pixels = batch["pixel_values"] * 0.5 + brightness[:, None, None, None]
    labels = batch["input_ids"][:, 0] % 3 if task == "text" else torch.bucketize(brightness, torch.tensor([-0.4, 0.4]))
    return [
        {"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i], "pixel_values": pixels[i],
         "labels": labels[i]}
        for i in range(n)
    ]


def _trainer_adapter(tmp_path, task: str, config: MITPConfig) -> tuple[PeftModel, Trainer]:
    model = get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3), config)
    args = TrainingArguments(output_dir=str(tmp_path / task), per_device_train_batch_size=8, learning_rate=3e-2,
                             max_steps=3, report_to=[], label_names=["labels"], save_strategy="no", seed=0,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_task_dataset(task))
    trainer.train()
    return model.eval(), trainer


def test_adapters_trained_on_different_tasks_switch_to_exactly_their_own_logits(tmp_path):
    text_task, trainer = _trainer_adapter(tmp_path, "text", MITPConfig(**SMALL))
    image_task, _ = _trainer_adapter(
        tmp_path, "image",
        MITPConfig(prompt_length=2, vision_prompt_length=3, num_interaction_layers=3, hub_dim=8, similarity="cosine"),
    )
    text_task.save_pretrained(tmp_path / "text-adapter")
    image_task.save_pretrained(tmp_path / "image-adapter")
    inputs = clip_inputs(seed=42)
    own = {"text": _logits(text_task, inputs), "image": _logits(image_task, inputs)}
    assert not torch.allclose(own["text"], own["image"])

    torch.manual_seed(0)
    base = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3)
    plain = _logits(base, inputs)
    model = PeftModel.from_pretrained(base, tmp_path / "text-adapter", adapter_name="text")
    model.load_adapter(tmp_path / "image-adapter", adapter_name="image")
    model.add_adapter("fresh", MITPConfig(**SMALL))  # a third, untrained adapter must not disturb the others
    for name in ("image", "text", "image", "text"):
        model.set_adapter(name)
        assert torch.equal(_logits(model, inputs), own[name]), name
    with model.disable_adapter():
        assert torch.equal(_logits(model, inputs), plain)  # the base model: no prompts, the original head
    model.delete_adapter("text")
    model.set_adapter("image")
    assert torch.equal(_logits(model, inputs), own["image"])
    assert set(model.peft_config) == {"image", "fresh"} and set(model.base_model.mitp_hub) == {"image", "fresh"}


# ---------------------------------------------------------------------------------------------------- half precision
def _payload_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (the file minus its JSON header)."""
    data = path.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    return len(data) - 8 - header


def test_bf16_save_halves_the_file_and_loads_back_to_a_float32_adapter(tmp_path):
    model = _train(get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3),
                                  MITPConfig(prompt_length=8, num_interaction_layers=2, hub_dim=64)))
    model.save_pretrained(tmp_path / "fp32")
    (bf16_file,) = peft_mitp.save_adapter(model, tmp_path / "bf16", dtype=torch.bfloat16)
    fp32_file = tmp_path / "fp32" / "adapter_model.safetensors"
    assert 2 * _payload_bytes(bf16_file) == _payload_bytes(fp32_file)
    assert bf16_file.stat().st_size < 0.6 * fp32_file.stat().st_size
    assert all(t.dtype == torch.bfloat16 for t in load_file(bf16_file).values())
    assert "## MITP configuration" in (tmp_path / "bf16" / "README.md").read_text()

    inputs = clip_inputs(seed=8)
    expected = _logits(model, inputs)
    for low_cpu_mem_usage in (False, True):
        base = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3)
        loaded = PeftModel.from_pretrained(base, tmp_path / "bf16", low_cpu_mem_usage=low_cpu_mem_usage)
        adapter = {n: p for n, p in loaded.named_parameters() if "mitp_" in n or "modules_to_save" in n}
        assert adapter and all(p.dtype == torch.float32 for p in adapter.values()), low_cpu_mem_usage
        torch.testing.assert_close(_logits(loaded, inputs), expected, atol=2e-2, rtol=2e-2)


def test_load_adapter_model_builds_the_base_from_the_recorded_path_in_the_requested_dtype(tmp_path):
    from transformers import CLIPModel

    tiny_clip().save_pretrained(tmp_path / "clip")
    # `from_backbone` records the backbone's own `_name_or_path` as the adapter's base.
    base = MITPForImageTextClassification.from_backbone(CLIPModel.from_pretrained(tmp_path / "clip"), num_labels=3)
    model = _train(get_peft_model(base, MITPConfig(**SMALL)))
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "clip")
    model.save_pretrained(tmp_path / "adapter")

    loaded = peft_mitp.load_adapter_model(tmp_path / "adapter", dtype=torch.bfloat16, device="cpu")
    backbone = loaded.get_base_model().backbone
    assert all(p.dtype == torch.bfloat16 for n, p in backbone.named_parameters() if "mitp_" not in n)
    assert all(p.dtype == torch.float32 for n, p in loaded.named_parameters() if "mitp_" in n)
    inputs = clip_inputs(seed=4)
    bf16_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    # Measured: 0.23 at most (5e-2 before the hub's read-out to the head, whose standardisers divide by the pooled
    # features' spread over inputs, small on this tiny random CLIP against bfloat16's rounding; docs/reliability.md).
    torch.testing.assert_close(_logits(loaded, bf16_inputs).float(), _logits(model, inputs), atol=0.3, rtol=5e-2)


def test_trainer_model_card_is_the_mitp_card_with_the_trainers_metadata(tmp_path):
    model, trainer = _trainer_adapter(tmp_path, "text", MITPConfig(**SMALL))
    trainer.save_model()
    trainer.create_model_card()  # what Trainer.push_to_hub writes: its card, then peft's update (our hook)
    text = (tmp_path / "text" / "README.md").read_text()
    meta = _front_matter(text)
    assert "## MITP configuration" in text and "generated_from_trainer" in meta["tags"] and "mitp" in meta["tags"]
    assert "model-index" in meta  # the Trainer's own metadata is kept
