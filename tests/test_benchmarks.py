"""The benchmark harness and baselines (benchmarks/): every method trains and evaluates, and the measurements measure.

Smoke tests on tiny backbones built from configs; the real runs are `benchmarks/compare.py`, `cost_growth.py`,
`paper_scale.py` and `gpu_clip_large.py` (docs/benchmarks.md). No assertion here depends on timing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_clip
from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.baselines import EarlyFusionForImageTextClassification, PMFForImageTextClassification  # noqa: E402
from benchmarks.methods import METHODS, build_lora, build_mitp  # noqa: E402

NUM_LABELS = 3


def tiny_bert_vit(seed: int = 0) -> VisionTextDualEncoderModel:
    """BERT + ViT, 3 layers of width 32 each: the offline backbone's structure (BERT-layer towers) at toy size."""
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8),
        BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=99,
                   max_position_embeddings=64),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    model = VisionTextDualEncoderModel(config)
    model.requires_grad_(False)
    return model.eval()


def tiny_split(rows: int = 12, token_type_ids: bool = True) -> harness.EncodedSplit:
    """A handful of random image-question rows in two groups, one question padded."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (5, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return harness.EncodedSplit(
        pixel_values=torch.randn(4, 3, 32, 32, generator=generator),
        image_index=torch.arange(rows) % 4,
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=torch.zeros_like(ids) if token_type_ids else None,
        text_index=torch.arange(rows) % 5,
        labels=torch.arange(rows) % NUM_LABELS,
        groups=["yes/no", "color"] * (rows // 2),
    )


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_its_own_parameters_and_evaluates_per_group(name):
    method = METHODS[name]
    torch.manual_seed(0)
    model = method.build(tiny_bert_vit(), NUM_LABELS)
    split = tiny_split()
    before = _snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    losses = harness.train(
        model, split, steps=3, batch_size=4, learning_rate=method.learning_rate,
        backbone_learning_rate=method.backbone_learning_rate,
    )
    metrics = harness.evaluate(model, split, batch_size=5)

    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    moved = {n for n in trainable if not torch.equal(before[n], after[n])}
    assert moved, f"{name}: no trainable parameter changed in 3 steps"
    frozen_moved = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert frozen_moved == [], f"{name}: frozen parameters changed: {frozen_moved[:3]}"
    assert set(metrics) == {"accuracy", "accuracy_yes/no", "accuracy_color"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


@pytest.mark.parametrize("name", [n for n in METHODS if n != "early-fusion"])
def test_every_method_but_early_fusion_runs_on_clip(name):
    method = METHODS[name]
    torch.manual_seed(0)
    model = method.build(tiny_clip(), NUM_LABELS)
    split = tiny_split(token_type_ids=False)  # CLIP's tokenizer has no segments, and its model refuses them
    harness.train(model, split, steps=2, batch_size=4, learning_rate=method.learning_rate)
    assert harness.evaluate(model, split)["accuracy"] >= 0.0


def test_early_fusion_refuses_a_text_tower_it_cannot_feed_tokens_into():
    with pytest.raises(ValueError, match="BERT-like text tower.*'clip_text_model'"):
        EarlyFusionForImageTextClassification(tiny_clip(), NUM_LABELS)


def test_mitp_records_no_autograd_graph_below_its_first_interaction_layer():
    torch.manual_seed(0)
    model = build_mitp(tiny_clip(), NUM_LABELS, num_interaction_layers=2)
    config = model.peft_config["default"]
    layers = harness.autograd_layers(model, tiny_split(token_type_ids=False).batch([0, 1, 2]))
    assert layers == {
        "text": list(range(config.text_layers[0], 4)),
        "vision": list(range(config.vision_layers[0], 6)),
    }
    full = METHODS["full-ft"].build(tiny_clip(), NUM_LABELS)
    assert harness.autograd_layers(full, tiny_split(token_type_ids=False).batch([0, 1])) == {
        "text": [0, 1, 2, 3],
        "vision": [0, 1, 2, 3, 4, 5],
    }


def test_pmf_wraps_the_top_fusion_layers_and_counts_pmfs_parameters():
    backbone = tiny_bert_vit()
    model = PMFForImageTextClassification(backbone, NUM_LABELS, fusion_layers=2, prompt_length=4)
    width, hidden = 32, 16  # translators: half the width, as PMF's 384 for width 768
    prompts = 2 * 2 * 3 * 4 * width  # fusion layers x towers x (Q, QC, FC) x length x width
    translators = 2 * 2 * (width * hidden + hidden + hidden * width + width)
    heads = 2 * (24 * NUM_LABELS + NUM_LABELS) + 2 * 24  # two linear heads + the image head's LayerNorm
    assert harness.trainable_parameters(model)[0] == prompts + translators + heads
    assert [type(layer).__name__ for layer in backbone.text_model.encoder.layer] == ["BertLayer", "PMFLayer", "PMFLayer"]


def test_lora_targets_the_query_and_value_projections_of_both_towers():
    model = build_lora(tiny_bert_vit(), NUM_LABELS, rank=2)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    towers = {n.split(".backbone.")[1].split(".")[0] for n in lora}
    assert towers == {"text_model", "vision_model"}
    per_module = 2 * (2 * 32)  # A (r x in) + B (out x r), r = 2, in = out = 32
    head = 48 * NUM_LABELS + NUM_LABELS
    assert harness.trainable_parameters(model)[0] == 2 * 3 * 2 * per_module + head  # towers x layers x (q, v)


def test_question_prior_answers_each_question_with_its_most_frequent_training_answer():
    def split(texts: list[int], labels: list[int]) -> harness.EncodedSplit:
        ids = torch.tensor([[101, 7, 102], [101, 8, 102], [101, 9, 102]])
        return harness.EncodedSplit(
            pixel_values=torch.zeros(1, 3, 4, 4), image_index=torch.zeros(len(texts), dtype=torch.long),
            input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=None,
            text_index=torch.tensor(texts), labels=torch.tensor(labels), groups=["yes/no"] * len(texts),
        )

    train = split([0, 0, 0, 1, 1, 1], [1, 1, 0, 2, 2, 2])  # question 0 -> mostly 1, question 1 -> 2; 2 is most frequent
    test = split([0, 0, 1, 2], [1, 0, 2, 2])  # question 2 is new: the overall most frequent answer (2)
    assert harness.question_prior(train, test) == {"accuracy": 0.75, "accuracy_yes/no": 0.75}


def test_trainable_parameters_counts_a_shared_parameter_once():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, shared)
    model[0].bias.requires_grad_(False)
    assert harness.trainable_parameters(model) == (16, 20)


def test_encoded_split_gives_exactly_what_the_image_text_collator_gives():
    from peft_mitp.data import load_easy_vqa
    from peft_mitp.offline_backbone import offline_processor
    from peft_mitp.training import ImageTextCollator

    data = load_easy_vqa(max_train=200, max_test=8)["test"]
    processor = offline_processor()
    split = harness.encode_split(data, processor)
    rows = [0, 3, 5]
    ours = split.batch(rows)
    theirs = ImageTextCollator(processor)([data[i] for i in rows])
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert split.groups == data["question_type"]


def test_tensor_memory_tracker_counts_new_tensors_until_freed_and_not_views():
    weight = torch.ones(1000, 1000)
    with harness.TensorMemoryTracker() as tracker:
        view = weight.t()  # a view of existing memory: nothing new
        assert tracker.live_bytes == 0
        product = view @ weight  # 4 MB of new memory
        assert tracker.live_bytes == 4_000_000
        del product
    assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 4_000_000


def test_peak_rss_sees_a_large_allocation_inside_the_measured_call():
    def allocate() -> None:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block.add_(1)

    measured = harness.measure_peak_rss(allocate)
    assert measured["peak_mib"] >= 60
    assert measured["absolute_peak_mib"] >= measured["baseline_mib"] + 60


def test_profiler_breakdown_finds_the_optimizer_state_and_the_step_peak():
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(64, 256), torch.randint(0, 4, (64,))

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    breakdown = harness.profile_step_memory(step)
    if not breakdown:
        pytest.skip("torch's private memory-timeline API is not available")
    params_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    assert breakdown["optimizer_state_mib"] == pytest.approx(2 * params_mib, rel=0.01)
    assert breakdown["step_peak_mib"] >= breakdown["optimizer_state_mib"]


def _report_row(acc: float, step: float, memory: float, inference: float) -> dict:
    """A compare.py result row with the given accuracy (at the longer of budgets 10 and 20) and costs."""
    runs = [{"seed": 0, "steps": s, "train_s": 1.0, "final_loss": 1.0, "accuracy": acc - 0.1 * (s == 10),
             "accuracy_yes/no": acc, "accuracy_color": acc, "accuracy_shape": acc} for s in (10, 20)]
    return {"trainable": 100, "total": 1000, "step_s": step, "inference_s_per_sample": inference,
            "memory": {"peak_mib": memory}, "memory_breakdown": {"step_peak_mib": memory},
            "autograd_layers": {"text": [3, 4, 5], "vision": [3, 4, 5]},
            "interaction_layers": {"text": [3, 4, 5], "vision": [3, 4, 5]}, "runs": runs}


def _report_results(rows: dict[str, dict]) -> dict:
    """compare.py results around `rows` (plus the frozen backbone's), as `run_all` returns them."""
    return {
        "settings": {"budgets": [10, 20], "batch_size": 8, "seeds": [0], "repeats": 3, "threads": 2, "memory_steps": 2,
                     "methods": [n for n in rows]},
        "data": {"train_rows": 90, "test_rows": 30, "test_rows_per_type": {"yes/no": 10, "color": 10, "shape": 10},
                 "majority_test_accuracy": 0.3},
        "machine": {"cpu": "cpu", "nproc": 2, "loadavg": (1.0, 1.0, 1.0), "python": "3", "torch": "t",
                    "transformers": "x", "peft": "p", "date": "today"},
        "loadavg_end": (1.0, 1.0, 1.0),
        "wall_s": 60.0,
        "rows": {"backbone": {"trainable": 0, "total": 1000, "inference_s_per_sample": 0.010}, **rows},
    }


def test_compare_report_states_targets_ratios_and_budgets():
    from benchmarks import compare

    results = _report_results({
        "mitp": {**_report_row(0.80, 0.4, 30.0, 0.011),
                 "paired": {"inference_vs_backbone": 1.2, "step_vs_full_finetuning": 0.45,
                            "inference_flops_vs_backbone": 1.1}},
        "linear-probe": _report_row(0.85, 0.2, 10.0, 0.010),
        "mitp-cosine": _report_row(0.82, 0.4, 30.0, 0.011),
        "full-ft": _report_row(0.90, 1.0, 100.0, 0.010),
    })
    report = compare.markdown(results)
    assert "| mitp | 100 | 1.00x | 0.800 |" in report
    assert "| 1.20x | 1.10x |" in report  # inference time and FLOPs against the frozen backbone, side by side
    assert "| 20 steps (1.8 epochs) |" in report  # budgets also as passes over the 90 training rows, batch 8
    assert "| training step time <= 0.5x full fine-tuning (one after the other) | 0.40x (0.4 vs 1) | yes |" in report
    assert "| training step time <= 0.5x full fine-tuning (timed in alternation) | 0.45x | yes |" in report
    assert "| peak training memory <= 0.4x full fine-tuning (RSS above the built model) | 0.30x (30 vs 100) | yes |" in report
    assert "| inference time <= 1.15x the frozen backbone alone (timed in alternation) | 1.20x | **no** |" in report
    # The accuracy target, missed, with the better baseline; MITP's own ablations are named but do not decide it.
    assert "baselines above: linear-probe 0.850; ablations above: mitp-cosine 0.820 | **no** |" in report
    del results["rows"]["linear-probe"]
    assert "| MITP 0.800; no baseline above it; ablations above: mitp-cosine 0.820 | yes |" in compare.markdown(results)
    assert "no gradient below the first interaction layer" in report


def test_merged_report_takes_each_method_once_and_says_where_it_came_from(tmp_path):
    import json

    from benchmarks import compare

    first = _report_results({"mitp": _report_row(0.80, 0.4, 30.0, 0.011), "pmf": _report_row(0.7, 0.5, 40.0, 0.012)})
    second = _report_results({"mitp": _report_row(0.80, 0.9, 35.0, 0.02), "full-ft": _report_row(0.9, 1.0, 100.0, 0.01)})
    for index, run in enumerate((first, second)):
        (tmp_path / f"run{index}").mkdir()
        (tmp_path / f"run{index}" / "results.json").write_text(json.dumps(run))
    merged = compare.main(["--merge", str(tmp_path / "run0"), str(tmp_path / "run1" / "results.json"),
                           "--output", str(tmp_path / "merged")])
    assert list(merged["rows"]) == ["backbone", "mitp", "pmf", "full-ft"]
    assert merged["rows"]["mitp"]["step_s"] == 0.4  # MITP's row from the first run
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "Merged from 2 runs" in report
    assert "- run 2: today, load average at start 1.00, 1.0 min: full-ft (also ran, same accuracies: mitp)" in report
    assert "| peak training memory <= 0.4x full fine-tuning (RSS above the built model) | 0.30x (30 vs 100) | yes |" in report


def test_merge_refuses_runs_that_are_not_the_same_setting(tmp_path, capsys):
    from benchmarks import compare

    base = _report_results({"mitp": _report_row(0.80, 0.4, 30.0, 0.011)})
    other_accuracy = _report_results({"mitp": _report_row(0.75, 0.4, 30.0, 0.011)})
    with pytest.raises(ValueError, match="mitp trained to different results in run 1 and run 2"):
        compare.merge([base, other_accuracy])
    other_budgets = {**base, "settings": {**base["settings"], "budgets": [10, 40]}}
    with pytest.raises(ValueError, match="Run 2 was made with other settings or data"):
        compare.merge([base, other_budgets])
    with pytest.raises(SystemExit):
        compare.main(["--merge", str(tmp_path / "nowhere")])
    assert f"no results file at ['{tmp_path / 'nowhere'}']" in capsys.readouterr().err


def test_cost_growth_measures_both_methods_and_reports_their_ratio(tmp_path):
    from benchmarks import cost_growth

    torch.manual_seed(0)
    models = {
        # The paper-budget adapter: on this tiny backbone the read-out's fusion MLP alone would be a large share of it.
        "mitp": (build_mitp(tiny_bert_vit(), NUM_LABELS, num_interaction_layers=1, token_consolidation=False,
                            fusion_hidden_size=0), 3e-3, None),
        "full-ft": (METHODS["full-ft"].build(tiny_bert_vit(), NUM_LABELS), 3e-3, 5e-5),
    }
    measured = cost_growth.measure_point(models, tiny_split().batch([0, 1, 2, 3]), repeats=1)
    assert measured["full-ft"]["optimizer_mib"] > 50 * measured["mitp"]["optimizer_mib"]
    assert measured["mitp"]["memory_mib"] < measured["full-ft"]["memory_mib"]
    rows = [{"variable": "batch_size", "value": 4, "method": m, **v} for m, v in measured.items()]
    table = cost_growth.markdown(rows)
    ratio = measured["mitp"]["memory_mib"] / measured["full-ft"]["memory_mib"]
    assert "| batch size | 4 |" in table and f"{ratio:.2f}x |" in table
    cost_growth.plot(rows, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 0


def test_paper_scale_counts_mitps_default_and_the_papers_two_million_and_pmfs_two_and_a_half_on_bert_vit():
    from benchmarks import paper_scale

    # The default adds the hub's read-out to the head (0.79M on CLIP-L, docs/method.md "Parameter budget"); the
    # paper-budget configuration has the paper's 2.0M.
    clip = paper_scale.build_mitp_default(paper_scale.clip_vit_large_14(), 101)
    assert 2.8e6 <= harness.trainable_parameters(clip)[0] <= 2.9e6
    from peft import get_peft_model

    import peft_mitp

    base = peft_mitp.MITPForImageTextClassification.from_backbone(paper_scale.clip_vit_large_14(), num_labels=101)
    paper = get_peft_model(base, peft_mitp.MITPConfig(token_consolidation=False, fusion_hidden_size=0,
                                                      memory_gate_init=None))
    assert 1.8e6 <= harness.trainable_parameters(paper)[0] <= 2.2e6
    pmf = PMFForImageTextClassification(paper_scale.bert_base_vit_b16(), 101)
    assert 2.4e6 <= harness.trainable_parameters(pmf)[0] <= 2.7e6


@pytest.mark.slow
def test_paper_scale_script_measures_memory_and_flops_on_the_meta_device():
    from benchmarks import paper_scale

    results = paper_scale.main(["--shapes", "bert-base+vit-b16", "--batch-size", "2"])
    methods = results["bert-base+vit-b16"]["methods"]
    assert set(methods) == {"mitp", "pmf", "lora", "linear-probe", "full-ft"}
    assert methods["mitp"]["peak_gib"] < methods["full-ft"]["peak_gib"]
    assert methods["full-ft"]["optimizer_gib"] == pytest.approx(2 * methods["full-ft"]["param_gib"], rel=0.01)
    assert methods["linear-probe"]["train_flops"] < methods["mitp"]["train_flops"] < methods["full-ft"]["train_flops"]


@pytest.mark.slow
def test_gpu_script_smoke_mode_runs_on_the_cpu():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_clip_large.py"), "--device", "cpu", "--tiny"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for method in ("frozen backbone", "mitp", "lora", "full-ft"):
        assert f"| {method} |" in proc.stdout
    assert "MITP / full FT: step time" in proc.stdout


@pytest.mark.slow
def test_compare_runs_end_to_end_on_a_few_samples(tmp_path):
    from benchmarks import compare

    results = compare.main([
        "--quick", "--methods", "linear-probe", "--budgets", "1", "--max-train", "40", "--max-test", "12",
        "--repeats", "1", "--batch-size", "4", "--threads", "1", "--output", str(tmp_path),
    ])
    rows = results["rows"]
    assert set(rows) == {"backbone", "mitp", "linear-probe"}
    assert rows["mitp"]["memory"]["peak_mib"] > 0
    assert rows["mitp"]["autograd_layers"]["text"][0] == rows["mitp"]["interaction_layers"]["text"][0]
    assert (tmp_path / "report.md").read_text().count("| mitp |") >= 3
    # Counted compute: the probe adds only its head to the backbone; MITP's prompts lengthen every interaction layer.
    probe_flops = rows["linear-probe"]["paired"]["inference_flops_vs_backbone"]
    assert 1.0 <= probe_flops < 1.01
    assert rows["mitp"]["paired"]["inference_flops_vs_backbone"] > 1.05
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 0


def test_hub_scale_logs_the_generated_term_of_both_hub_designs(tmp_path):
    from benchmarks import hub_scale

    results = {
        hub: hub_scale.main(["--hub", hub, "--steps", "3", "--max-train", "64", "--max-test", "16", "--batch-size", "8",
                             "--output", str(tmp_path)])
        for hub in ("shipped", "before-fix")
    }
    for hub, result in results.items():
        assert result["pairs"] == 2  # 3 interaction layers: the hub runs between pairs 0-1 and 1-2
        assert len(result["records"]) == 3 * 2
        first = result["records"][0]
        # Both designs start as temporal prompts without interaction: nothing generated before the first update.
        assert first["generated_text"] == 0 and first["generated_vision"] == 0
        assert first["readout_text"] > 1
        assert (tmp_path / f"hub_scale-{hub}.md").read_text().startswith(f"Hub: {hub}; 3 steps")
    # After two updates the first design's term has grown unbounded by the read-out; the shipped one stays a small
    # fraction of it (its gates moved by about two learning-rate steps).
    last = {hub: r["records"][-1] for hub, r in results.items()}
    assert last["before-fix"]["generated_vision"] > 10 * last["shipped"]["generated_vision"] > 0


def test_torch_threads_sets_the_count_inside_and_restores_it_after_an_error():
    before = torch.get_num_threads()
    inside = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="inside"), harness.torch_threads(inside):
        assert torch.get_num_threads() == inside
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with harness.torch_threads(None):  # None leaves the count alone
        assert torch.get_num_threads() == before


@pytest.mark.slow
def test_fair_run_chooses_each_rate_on_validation_and_reports_test_at_it(tmp_path):
    from benchmarks import fair

    fair.main(["--methods", "lora", "--steps", "1", "--max-train", "120",
               "--max-test", "40", "--seeds", "0", "1", "--lrs", "1e-3", "1e-1", "--output", str(tmp_path)])
    runs = fair.read_runs(tmp_path)
    search = [r for r in runs if r["seed"] == 0]
    assert sorted(r["learning_rate"] for r in search) == [1e-3, 1e-1]
    best = max(search, key=lambda r: (r["validation"]["accuracy"], -r["learning_rate"]))["learning_rate"]
    # The second seed ran only at the rate chosen on validation; the report quotes test at that rate.
    assert [r["learning_rate"] for r in runs if r["seed"] == 1] == [best]
    report = (tmp_path / "report.md").read_text()
    assert f"| lora | {best:g} |" in report
    assert {"accuracy", "accuracy_yes/no", "accuracy_color", "accuracy_shape"} <= set(runs[0]["test"])
    # A rerun skips what is done.
    fair.main(["--methods", "lora", "--steps", "1", "--max-train", "120", "--max-test", "40", "--seeds", "0", "1",
               "--lrs", "1e-3", "1e-1", "--output", str(tmp_path)])
    assert len(fair.read_runs(tmp_path)) == len(runs)


def test_fair_variants_parse_into_mitp_config_changes():
    from benchmarks import fair

    assert fair.parse_variant("all:text_layers=0-5,gate_init=1.0,consolidation=joint") == (
        "all", {"text_layers": [0, 1, 2, 3, 4, 5], "gate_init": 1.0, "consolidation": "joint"}
    )


@pytest.mark.slow
def test_probes_standardise_cached_features_and_choose_on_validation(tmp_path):
    from benchmarks import probes

    report = probes.main(["--quick", "--output", str(tmp_path)])
    for kind in ("linear", "mlp"):
        head = report["heads"][kind]
        chosen = head["chosen"]
        assert chosen == max(head["search"], key=lambda r: (r["validation"], -r["epochs"]))
        assert set(head["by_epochs"]) >= {chosen["epochs"]}
        run = head["by_epochs"][chosen["epochs"]]["runs"][0]
        assert 0 <= run["accuracy"] <= 1 and "accuracy_yes/no" in run and run["head_seconds"] > 0
    assert report["feature_seconds_train"] > 0
    assert "(chosen)" in (tmp_path / "report.md").read_text()


def test_yes_no_heads_read_the_question_word_and_negation_and_build_every_head():
    from benchmarks import yes_no_heads as y

    assert y.WORDS[y.question_word("is there not a red shape?")] == "red"
    assert y.WORDS[y.question_word("does the image contain a triangle?")] == "triangle"
    assert y.negated("is no yellow shape present?") == 1 and y.negated("is there a blue shape?") == 0
    x = torch.randn(5, 8)
    for kind in ("linear", "mlp", "bilinear", "similarity"):
        head = y.make(kind, 4, 3)
        assert head(x).shape == (5, 3)
    # The similarity head's extra features are cosines / tau: bounded by 1 / tau.
    head = y.SimilarityHead(4, 3, k=2, rank=3, tau=0.5)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.weight[0, 8] = 1.0
        head.out.bias.zero_()
    assert head(x)[:, 0].abs().max() <= 2.0 + 1e-6
