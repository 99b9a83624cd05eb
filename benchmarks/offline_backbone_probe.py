"""Probe the frozen offline backbone on easy-VQA: how much of the task its pooled features carry, and how fast it is.

For each design variant of ``peft_mitp.offline_backbone.build_offline_backbone`` this script

1. computes the pooled (projected) features once per distinct image (4,000 train + 1,000 test) and
   once per distinct question text (easy-VQA has only ~100), then gathers them per question;
2. fits, on the 38,575 training questions, and scores on the 9,673 test questions:
   (i) ``text_lr``: a text-only logistic-regression probe, (ii) ``image_lr``: an image-only one,
   (iii) ``concat_lr``: one on the concatenated pooled features, (iv) ``concat_mlp``: a one-hidden-layer
   MLP on the concatenation (the only probe that can combine the modalities non-additively, which
   most easy-VQA questions need), and ``head250_raw``: a linear head on the *un-normalised*
   concatenation after the default MITP job's budget (250 AdamW steps of 32 on 8,000 questions),
   i.e. how quickly a head can use the features;
3. as diagnostics of the vision tower alone, fits logistic regressions that read each image's shape
   (3 classes) and colour (8 classes), labels recovered from the questions, from the pooled CLS state
   (``*_cls``), from the read-out of one N(0, 0.02) prompt token appended before the last vision
   layer (``*_prompt``, what a temporal prompt stores), and from the stem's average-pooled map
   (``*_stem``, the ceiling set by the CNN);
4. times one batch of 64 image+question pairs through the whole backbone without grad (``fwd64_s``)
   and a prompt-training-like step (``fwdbwd64_s``): no grad through all but the last
   ``--grad-layers`` layers of both towers, then forward and backward through those layers. Timing
   runs round-robin over the variants and keeps each one's fastest run, so that load from other
   processes on a shared machine does not land on one variant only.

Run from the repository root: ``python benchmarks/offline_backbone_probe.py`` (the default variants,
about 30 minutes on 2 free cores); ``--variants s4-minilm-orth s3-minilm-orth`` for a subset,
``--timing-only`` to skip the probes, ``--list`` for the variant names.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.masking_utils import create_bidirectional_mask

from peft_mitp.offline_backbone import build_offline_backbone, offline_processor, pixel_values_from_arrays


@dataclass(frozen=True)
class Variant:
    """One backbone design: the keyword arguments of ``build_offline_backbone``."""

    name: str
    image_size: int = 64
    stem_stage: int = 5
    vision_layers: str = "minilm"
    projection: str = "pca"


VARIANTS = {
    v.name: v
    for v in [
        Variant("s5-minilm-orth", projection="orthogonal"),
        Variant("s5-random-orth", vision_layers="random", projection="orthogonal"),
        Variant("s5-minilm-pca"),
        Variant("s5-random-pca", vision_layers="random"),
        Variant("s3-minilm-orth", stem_stage=3, projection="orthogonal"),
        Variant("s4-minilm-orth", stem_stage=4, projection="orthogonal"),
        Variant("s4-random-orth", stem_stage=4, vision_layers="random", projection="orthogonal"),
        Variant("s8-minilm-orth", stem_stage=8, projection="orthogonal"),
        Variant("s3-minilm-pca", stem_stage=3),
        Variant("s4-minilm-pca", stem_stage=4),
        Variant("s8-minilm-pca", stem_stage=8),
        Variant("s5-minilm-orth-128px", image_size=128, projection="orthogonal"),
    ]
}
DEFAULT_VARIANTS = [
    "s4-minilm-orth",
    "s4-random-orth",
    "s4-minilm-pca",
    "s3-minilm-orth",
    "s5-minilm-orth",
    "s5-random-orth",
    "s8-minilm-orth",
]

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def load_easy_vqa() -> dict:
    """Questions, answers and images of easy-VQA as arrays (images as uint8, keyed by split)."""
    from easy_vqa import (
        get_answers,
        get_test_image_paths,
        get_test_questions,
        get_train_image_paths,
        get_train_questions,
    )
    from PIL import Image

    answers = get_answers()
    index = {a: i for i, a in enumerate(answers)}
    data = {"answers": answers}
    for split, questions_fn, paths_fn in (
        ("train", get_train_questions, get_train_image_paths),
        ("test", get_test_questions, get_test_image_paths),
    ):
        questions, answer_texts, image_ids = questions_fn()
        paths = paths_fn()
        ids = sorted(paths)
        position = {image_id: i for i, image_id in enumerate(ids)}
        data[split] = {
            "questions": list(questions),
            "labels": np.array([index[a] for a in answer_texts]),
            "image_index": np.array([position[i] for i in image_ids]),
            "images": np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in ids]),
        }
        data[split]["shape"], data[split]["color"] = image_attributes(
            questions, answer_texts, image_ids, ids, position
        )
    return data


def image_attributes(questions, answer_texts, image_ids, ids, position) -> tuple[np.ndarray, np.ndarray]:
    """Per-image shape and colour labels (-1 where no question reveals them), read off the Q/A pairs."""
    shape = np.full(len(ids), -1)
    color = np.full(len(ids), -1)
    for question, answer, image_id in zip(questions, answer_texts, image_ids, strict=True):
        if answer in SHAPES and re.search(r"\bshape\b", question):
            shape[position[image_id]] = SHAPES.index(answer)
        if answer in COLORS and "color" in question:
            color[position[image_id]] = COLORS.index(answer)
        match = re.match(r"(?:is|does) (?:there|the image contain) an? (\w+)", question)
        if match and match.group(1) in SHAPES and answer == "yes":
            shape[position[image_id]] = SHAPES.index(match.group(1))
    return shape, color


@torch.no_grad()
def image_features(model, images: np.ndarray, image_size: int, batch: int = 250) -> dict[str, np.ndarray]:
    """Per image: pooled projected features, the stem's global-average-pooled map, and a prompt read-out.

    The read-out is what a temporal prompt would store: one N(0, 0.02) token (fixed seed) appended to the
    input of the last vision layer, read at its position after that layer.
    """
    vision = model.vision_model
    layers = vision.encoder.layer
    prompt = torch.randn(1, 1, vision.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    stem_maps: list[torch.Tensor] = []
    hook = vision.embeddings.stem.register_forward_hook(lambda module, args, output: stem_maps.append(output))
    out: dict[str, list[torch.Tensor]] = {"pooled": [], "stem": [], "prompt": []}
    try:
        for start in range(0, len(images), batch):
            pixel_values = pixel_values_from_arrays(images[start : start + batch])
            if image_size != pixel_values.shape[-1]:
                pixel_values = torch.nn.functional.interpolate(
                    pixel_values, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
                )
            hidden = vision.embeddings(pixel_values)
            out["stem"].append(stem_maps.pop().mean((2, 3)))
            for layer in layers[:-1]:
                hidden = layer(hidden, None)
            out["pooled"].append(model.visual_projection(layers[-1](hidden, None)[:, 0]))
            with_prompt = torch.cat([hidden, prompt.expand(len(hidden), -1, -1)], dim=1)
            out["prompt"].append(layers[-1](with_prompt, None)[:, -1])
    finally:
        hook.remove()
    return {key: torch.cat(value).numpy() for key, value in out.items()}


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str]) -> np.ndarray:
    """Pooled projected text features, per text."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return model.get_text_features(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).pooler_output.numpy()


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return (
        torch.as_tensor((x_train - mean) / std, dtype=torch.float32),
        torch.as_tensor((x_test - mean) / std, dtype=torch.float32),
    )


def logistic_probe(x_train, y_train, x_test, y_test, l2: float = 1e-4, iterations: int = 200) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (full-batch L-BFGS).

    Rows labelled -1 are ignored (used by the per-image attribute probes).
    """
    keep_train, keep_test = y_train >= 0, y_test >= 0
    xtr, xte = _standardise(x_train[keep_train], x_test[keep_test])
    ytr = torch.as_tensor(y_train[keep_train])
    linear = torch.nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xtr), ytr) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(xte).argmax(1).numpy() == y_test[keep_test]).mean())


def mlp_probe(x_train, y_train, x_test, y_test, hidden: int = 512, epochs: int = 20, seed: int = 0) -> float:
    """Test accuracy of a one-hidden-layer MLP (AdamW, standardised inputs) trained for ``epochs``.

    The learning rate decays linearly to zero, so that the score is that of a converged model rather than
    of wherever the last steps happened to land.
    """
    torch.manual_seed(seed)
    xtr, xte = _standardise(x_train, x_test)
    ytr = torch.as_tensor(y_train)
    net = torch.nn.Sequential(
        torch.nn.Linear(xtr.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, int(ytr.max()) + 1)
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    total = epochs * math.ceil(len(xtr) / 512)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr)).split(512):
            loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return float((net(xte).argmax(1).numpy() == y_test).mean())


def short_head_probe(
    x_train, y_train, x_test, y_test, samples: int = 8000, steps: int = 250, batch: int = 32, seed: int = 0
) -> float:
    """Test accuracy of a linear head on the *raw* features after the default job's budget of steps.

    The default MITP job trains its head on un-normalised pooled features for one epoch of 8,000
    questions in batches of 32 (AdamW, lr 3e-3): features that a head can use quickly matter as much as
    features that carry the answer. This probe mimics that budget (the backbone itself stays frozen).
    """
    samples = min(samples, len(x_train))
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(x_train))[:samples]
    xtr, ytr = torch.as_tensor(x_train[rows], dtype=torch.float32), torch.as_tensor(y_train[rows])
    torch.manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], int(y_train.max()) + 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    batches = [b for _ in range(math.ceil(steps * batch / samples)) for b in torch.randperm(samples).split(batch)]
    for idx in batches[:steps]:
        loss = torch.nn.functional.cross_entropy(head(xtr[idx]), ytr[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((head(torch.as_tensor(x_test, dtype=torch.float32)).argmax(1).numpy() == y_test).mean())


def time_backbone(model, tokenizer, data, image_size: int, grad_layers: int, repeats: int = 7) -> tuple[float, float]:
    """Seconds per batch of 64 pairs: full no-grad forward, and a forward+backward through the last layers.

    Reports the fastest of ``repeats`` runs: on a shared machine that is the best estimate of the cost itself.
    """
    split = data["train"]
    rng = np.random.default_rng(0)
    rows = rng.choice(len(split["questions"]), 64, replace=False)
    pixel_values = pixel_values_from_arrays(split["images"][split["image_index"][rows]])
    if image_size != pixel_values.shape[-1]:
        pixel_values = torch.nn.functional.interpolate(pixel_values, size=(image_size, image_size), mode="bilinear")
    text = tokenizer([split["questions"][r] for r in rows], padding=True, return_tensors="pt")

    def forward() -> None:
        with torch.no_grad():
            model.get_image_features(pixel_values=pixel_values)
            model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])

    def forward_backward() -> None:
        # What a prompt-tuning step costs: frozen extraction layers without autograd, then the last
        # `grad_layers` layers of each tower with a graph (inputs require grad, as prompts would).
        vision, bert = model.vision_model, model.text_model
        with torch.no_grad():
            hv = vision.embeddings(pixel_values)
            for layer in vision.encoder.layer[:-grad_layers]:
                hv = layer(hv, None)
            ht = bert.embeddings(input_ids=text["input_ids"])
            mask = create_bidirectional_mask(
                config=bert.config, inputs_embeds=ht, attention_mask=text["attention_mask"]
            )
            for layer in bert.encoder.layer[:-grad_layers]:
                ht = layer(ht, mask)
        hv, ht = hv.requires_grad_(), ht.requires_grad_()
        for layer in vision.encoder.layer[-grad_layers:]:
            hv = layer(hv, None)
        for layer in bert.encoder.layer[-grad_layers:]:
            ht = layer(ht, mask)
        (hv[:, 0].sum() + bert.pooler(ht).sum()).backward()

    results = []
    for fn in (forward, forward_backward):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results.append(min(times))
    return results[0], results[1]


def extract_features(model, data: dict, tokenizer, image_size: int) -> dict[str, np.ndarray]:
    """Pooled features per distinct question text; per image: pooled features, stem map pooled, prompt read-out."""
    texts = sorted(set(data["train"]["questions"]) | set(data["test"]["questions"]))
    features = {"texts": np.array(texts), "text": text_features(model, tokenizer, texts)}
    for split in ("train", "test"):
        per_image = image_features(model, data[split]["images"], image_size)
        features[f"image_{split}"] = per_image["pooled"]
        features[f"stem_{split}"] = per_image["stem"]
        features[f"prompt_{split}"] = per_image["prompt"]
    return features


def run_variant(
    variant: Variant,
    data: dict,
    tokenizer,
    mlp_epochs: int,
    cache_dir: Path | None = None,
    probes: bool = True,
) -> tuple[dict, torch.nn.Module]:
    """Build one variant, extract (or load cached) features and fit every probe; return a table row and the model."""
    start = time.perf_counter()
    model = build_offline_backbone(
        image_size=variant.image_size,
        stem_stage=variant.stem_stage,
        vision_layers=variant.vision_layers,
        projection=variant.projection,
    )
    row = {"variant": variant.name, "tokens": model.vision_model.embeddings.num_patches + 1}
    row["build_s"] = time.perf_counter() - start
    if not probes:
        return row, model
    cache = cache_dir / f"{variant.name}.npz" if cache_dir is not None else None
    start = time.perf_counter()
    features = dict(np.load(cache)) if cache is not None and cache.exists() else {}
    if "prompt_test" not in features:  # absent, or cached by an older version of this script
        features = extract_features(model, data, tokenizer, variant.image_size)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **features)
    row["extract_s"] = time.perf_counter() - start
    text_row = {t: i for i, t in enumerate(features["texts"].tolist())}

    def gather(split: str) -> tuple[np.ndarray, np.ndarray]:
        d = data[split]
        return features["text"][[text_row[q] for q in d["questions"]]], features[f"image_{split}"][d["image_index"]]

    (ttr, vtr), (tte, vte) = gather("train"), gather("test")
    ytr, yte = data["train"]["labels"], data["test"]["labels"]
    row["text_lr"] = logistic_probe(ttr, ytr, tte, yte)
    row["image_lr"] = logistic_probe(vtr, ytr, vte, yte)
    row["concat_lr"] = logistic_probe(np.hstack([ttr, vtr]), ytr, np.hstack([tte, vte]), yte)
    row["head250_raw"] = short_head_probe(np.hstack([ttr, vtr]), ytr, np.hstack([tte, vte]), yte)
    row["concat_mlp"] = mlp_probe(np.hstack([ttr, vtr]), ytr, np.hstack([tte, vte]), yte, epochs=mlp_epochs)
    for attribute in ("shape", "color"):
        for source, key in (("cls", "image"), ("prompt", "prompt"), ("stem", "stem")):
            row[f"{attribute}_{source}"] = logistic_probe(
                features[f"{key}_train"], data["train"][attribute], features[f"{key}_test"], data["test"][attribute]
            )
    return row, model


COLUMNS = [
    ("variant", "{:<20}"),
    ("tokens", "{:>6}"),
    ("text_lr", "{:>8.3f}"),
    ("image_lr", "{:>8.3f}"),
    ("concat_lr", "{:>9.3f}"),
    ("head250_raw", "{:>11.3f}"),
    ("concat_mlp", "{:>10.3f}"),
    ("shape_cls", "{:>9.3f}"),
    ("shape_prompt", "{:>12.3f}"),
    ("shape_stem", "{:>10.3f}"),
    ("color_cls", "{:>9.3f}"),
    ("color_prompt", "{:>12.3f}"),
    ("color_stem", "{:>10.3f}"),
    ("fwd64_s", "{:>8.3f}"),
    ("fwdbwd64_s", "{:>10.3f}"),
    ("build_s", "{:>7.1f}"),
    ("extract_s", "{:>9.1f}"),
]


def print_table(rows: list[dict], columns: list[tuple[str, str]], header: bool = True) -> None:
    """Print the results as a fixed-width table."""
    if header:
        print(" ".join(f"{name:>{len(fmt.format(rows[0][name]))}}" for name, fmt in columns))
    for row in rows:
        print(" ".join(fmt.format(row[name]) for name, fmt in columns))


def main() -> None:
    """Parse arguments, run the chosen variants, time them round-robin and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, help="variant names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--grad-layers", type=int, default=3, help="layers per tower with a graph in the timing")
    parser.add_argument("--mlp-epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    parser.add_argument("--timing-rounds", type=int, default=4, help="round-robin timing rounds (0: no timing)")
    parser.add_argument("--timing-only", action="store_true", help="skip the probes")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache extracted features here (.npz)")
    args = parser.parse_args()
    if args.list:
        for variant in VARIANTS.values():
            print(variant)
        return
    torch.set_num_threads(args.threads)
    data = load_easy_vqa()
    tokenizer = offline_processor().tokenizer
    majority = np.bincount(data["train"]["labels"]).argmax()
    print(
        f"easy-VQA: {len(data['train']['questions'])} train / {len(data['test']['questions'])} test questions; "
        f"majority-class test accuracy {np.mean(data['test']['labels'] == majority):.3f}"
    )
    rows, models = [], []
    for name in args.variants:
        row, model = run_variant(
            VARIANTS[name], data, tokenizer, args.mlp_epochs, args.cache_dir, not args.timing_only
        )
        rows.append(row)
        models.append(model)
        if not args.timing_only:
            print_table(rows[-1:], [c for c in COLUMNS if c[0] in row], header=len(rows) == 1)
    # Timing round-robin over the variants, keeping each one's fastest run: on a shared machine, load bursts
    # then hit every variant alike instead of whichever happened to be timed during one.
    for row in rows:
        row["fwd64_s"] = row["fwdbwd64_s"] = float("inf") if args.timing_rounds else float("nan")
    for _ in range(args.timing_rounds):
        for row, model, name in zip(rows, models, args.variants, strict=True):
            fwd, fwdbwd = time_backbone(model, tokenizer, data, VARIANTS[name].image_size, args.grad_layers, repeats=3)
            row["fwd64_s"], row["fwdbwd64_s"] = min(row["fwd64_s"], fwd), min(row["fwdbwd64_s"], fwdbwd)
    print()
    print_table(rows, [c for c in COLUMNS if c[0] in rows[0]])


if __name__ == "__main__":
    main()
