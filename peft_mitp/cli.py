"""The `mitp` command line: train, evaluate, predict, explain, convert.

Every `train` option is also a key of a YAML or JSON config file (`mitp train --config run.yaml`); flags given on
the command line override the file.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from .training import OFFLINE_BACKBONE, TrainOptions


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=argparse.SUPPRESS,
                        help="easy_vqa (default; offline), food101, mmimdb, snli_ve, or a converted folder")
    parser.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS,
                        help="folder of the public distribution of a paper data set (or a converted folder)")
    parser.add_argument("--max-train-samples", dest="max_train_samples", type=int, default=argparse.SUPPRESS)
    parser.add_argument("--max-eval-samples", dest="max_eval_samples", type=int, default=argparse.SUPPRESS)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=argparse.SUPPRESS)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file with any of these options (flags override it)")
    parser.add_argument("--backbone", default=argparse.SUPPRESS,
                        help=f"dual-encoder checkpoint (Hub id or folder), or '{OFFLINE_BACKBONE}' (default: packaged "
                        "MiniLM + EfficientNet-Lite0 backbone)")
    parser.add_argument("--text-backbone", dest="text_backbone", default=argparse.SUPPRESS,
                        help="separately pre-trained text encoder (with --vision-backbone)")
    parser.add_argument("--vision-backbone", dest="vision_backbone", default=argparse.SUPPRESS,
                        help="separately pre-trained vision encoder (with --text-backbone)")
    _add_data_options(parser)
    mitp = parser.add_argument_group("MITP adapter (see docs/method.md)")
    mitp.add_argument("--prompt-length", dest="prompt_length", type=int, default=argparse.SUPPRESS)
    mitp.add_argument("--text-layers", dest="text_layers", type=int, nargs="+", default=argparse.SUPPRESS)
    mitp.add_argument("--vision-layers", dest="vision_layers", type=int, nargs="+", default=argparse.SUPPRESS)
    mitp.add_argument("--num-interaction-layers", dest="num_interaction_layers", type=int, default=argparse.SUPPRESS)
    mitp.add_argument("--hub-dim", dest="hub_dim", type=int, default=argparse.SUPPRESS)
    mitp.add_argument("--similarity", choices=["scaled_dot", "cosine", "dot"], default=argparse.SUPPRESS)
    mitp.add_argument("--temperature", type=float, default=argparse.SUPPRESS)
    mitp.add_argument("--activation", choices=["softmax", "hard"], default=argparse.SUPPRESS)
    mitp.add_argument("--consolidation", choices=["cross", "joint"], default=argparse.SUPPRESS,
                      help="what each prompt's activation softmax runs over: the other modality, or both")
    mitp.add_argument("--gate-init", dest="gate_init", type=float, default=argparse.SUPPRESS,
                      help="initial value of the hub's gates on the cross-modal term")
    mitp.add_argument("--no-interaction", dest="interaction", action="store_false", default=argparse.SUPPRESS,
                      help="ablation: no cross-modal term in the hub")
    mitp.add_argument("--no-memory", dest="memory", action="store_false", default=argparse.SUPPRESS,
                      help="ablation: do not carry a tower's read-out to the next interaction layer")
    run = parser.add_argument_group("training")
    run.add_argument("--epochs", type=float, default=argparse.SUPPRESS)
    run.add_argument("--max-steps", dest="max_steps", type=int, default=argparse.SUPPRESS)
    run.add_argument("--learning-rate", dest="learning_rate", type=float, default=argparse.SUPPRESS)
    run.add_argument("--weight-decay", dest="weight_decay", type=float, default=argparse.SUPPRESS)
    run.add_argument("--eval-steps", dest="eval_steps", type=int, default=argparse.SUPPRESS)
    run.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=argparse.SUPPRESS)
    run.add_argument("--seed", type=int, default=argparse.SUPPRESS)
    run.add_argument("--output-dir", dest="output_dir", default=argparse.SUPPRESS)
    run.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO_ID", default=argparse.SUPPRESS,
                     help="push the adapter and its model card to this Hub repo after training")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or JSON file; keys may use dashes or underscores."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """Merge config file and flags into `TrainOptions`, refusing unknown keys."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "command", "func", "adapter", "split", "verbose")})
    known = {f.name for f in fields(TrainOptions)} - {"extra"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: unknown option(s) {unknown}; valid options: {sorted(known)}")
    return TrainOptions(**values)


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    options = options_from_args(args)
    metrics = train(options)
    print(json.dumps(metrics, indent=2))
    print(f"adapter, model card, metrics and plots written to {options.output_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .training import evaluate_adapter, load_training_info

    info = load_training_info(args.adapter)
    values = {k: v for k, v in info["options"].items() if k in ("dataset", "data_dir", "seed")}
    values.update({k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainOptions)}})
    options = TrainOptions(**values)
    metrics = evaluate_adapter(args.adapter, options, split=args.split)
    print(json.dumps(metrics, indent=2))
    return 0


def _read_pairs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.inputs:
        path = Path(args.inputs)
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        if not rows or any("image" not in r or "text" not in r for r in rows):
            raise SystemExit(f"error: {path} needs an 'image' and a 'text' field in every row")
        base = path.parent
        return [str(base / r["image"]) if not Path(r["image"]).is_absolute() else r["image"] for r in rows], [
            r["text"] for r in rows
        ]
    if not args.image or not args.text or len(args.image) != len(args.text):
        raise SystemExit("error: give --image and --text (the same number of each), or --inputs FILE")
    return args.image, args.text


def _open_images(paths: list[str]) -> list[Any]:
    from PIL import Image

    images = []
    for path in paths:
        if not Path(path).exists():
            raise SystemExit(f"error: image {path} does not exist")
        images.append(Image.open(path).convert("RGB"))
    return images


def _cmd_predict(args: argparse.Namespace) -> int:
    from .training import load_trained, predict

    paths, texts = _read_pairs(args)
    images = _open_images(paths)
    model, processor, info = load_trained(args.adapter)
    results = predict(model, processor, info["label_names"], images, texts, info["multi_label"], args.top_k)
    for path, text, result in zip(paths, texts, results, strict=True):
        shown = ", ".join(f"{label} ({score:.3f})" for label, score in result)
        print(f"{path}\t{text}\t{shown}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from .plots import drawable_activations, plot_activations
    from .training import ImageTextCollator, load_trained

    model, processor, info = load_trained(args.adapter)
    images = _open_images([args.image])
    batch = ImageTextCollator(processor)([{"image": images[0], "text": args.text}])
    with torch.no_grad():
        out = model(**batch, output_hub_activations=True)
    label = info["label_names"][int(out.logits.argmax(-1))]
    if not drawable_activations(out.attentions):
        raise SystemExit(
            f"error: prediction: {label}; but this adapter has no hub activation maps to draw (it was trained without "
            "interaction, or with one interaction pair)"
        )
    path = plot_activations(out.attentions, args.output, title=f"{args.text} -> {label}")
    print(f"prediction: {label}; hub activation maps written to {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .data import DATASETS

    rows = DATASETS[args.dataset].converter(args.source, args.output)
    print(json.dumps(rows, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `mitp` argument parser."""
    parser = argparse.ArgumentParser(prog="mitp", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune an MITP adapter (default: offline easy-VQA job)",
                           description="Fine-tune an MITP adapter with transformers.Trainer, evaluate it, and save "
                           "the adapter, model card, metrics.json and plots. With no arguments: the offline default.")
    _add_train_options(train)
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a trained adapter on a split",
                              description="Evaluate an adapter saved by `mitp train` on a split of a data set.")
    evaluate.add_argument("adapter", help="the output dir of `mitp train` (or its adapter/ folder)")
    evaluate.add_argument("--split", default="test")
    _add_data_options(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)

    predict = sub.add_parser("predict", help="labels and scores for image-text pairs",
                             description="Print the top labels with scores for image + text pairs.")
    predict.add_argument("adapter", help="the output dir of `mitp train` (or its adapter/ folder)")
    predict.add_argument("--image", nargs="+", help="image file(s)")
    predict.add_argument("--text", nargs="+", help="text(s), one per image")
    predict.add_argument("--inputs", help="a .jsonl or .csv file with 'image' and 'text' per row")
    predict.add_argument("--top-k", dest="top_k", type=int, default=3)
    predict.set_defaults(func=_cmd_predict)

    explain = sub.add_parser("explain", help="plot the memory hub's activation maps for one example",
                             description="Write a PNG of which prompts of one modality each prompt of the other "
                             "attended to, per interaction pair, for one image + text.")
    explain.add_argument("adapter", help="the output dir of `mitp train` (or its adapter/ folder)")
    explain.add_argument("--image", required=True)
    explain.add_argument("--text", required=True)
    explain.add_argument("--output", default="hub_activations.png")
    explain.set_defaults(func=_cmd_explain)

    convert = sub.add_parser("convert", help="convert a paper data set to local parquet",
                             description="Convert the public distribution of Food-101, MM-IMDB or SNLI-VE to a "
                             "folder `datasets` loads (see docs/data.md).")
    convert.add_argument("dataset", choices=["food101", "mmimdb", "snli_ve"])
    convert.add_argument("source", help="folder of the public distribution")
    convert.add_argument("output", help="where to write the converted data set")
    convert.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mitp` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.verbose:
        import transformers

        transformers.logging.set_verbosity_info()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
