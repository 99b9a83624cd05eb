"""What the yes/no questions need, read off the frozen offline backbone's cached features.

easy-VQA's yes/no questions ask whether the image's colour (or shape) is the one the question names, possibly negated
("is there not a red shape?"). This script checks, on the offline job's splits and the standardised pooled features of
the frozen backbone (as `benchmarks/probes.py` computes them):

1. whether the question's colour/shape word and its negation can be read off the **text** features by a linear map
   (trained on the yes/no questions of the training split, scored on validation);
2. how fast heads with different inductive biases learn the yes/no questions from the labels: a linear head, the
   late-fusion MLP, a low-rank bilinear head (`[t, v, (P t) * (Q v)]`) and a cosine-similarity head (the memory hub's
   consolidation: `k` similarities between projections of `t` and `v`, divided by a temperature), each for 1 and 3
   epochs at two rates, scored on validation.

Run:

    python benchmarks/yes_no_heads.py            # about 3 minutes on one core; writes benchmarks/results/yes_no_heads/

docs/benchmarks.md, "Does the interaction carry the task?", quotes the report.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

WORDS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow", "circle", "rectangle", "triangle")


def question_word(text: str) -> int:
    """Index in `WORDS` of the colour or shape a question names (-1: none)."""
    return next((i for i, w in enumerate(WORDS) if re.search(rf"\b{w}\b", text)), -1)


def negated(text: str) -> int:
    """1 for a negated question ("is there not ...", "is no ... present")."""
    return int(bool(re.search(r"\b(not|no)\b", text)))


class BilinearHead(nn.Module):
    """Linear head on `[t, v, (P t) * (Q v)]`: a low-rank bilinear interaction of the two towers' features."""

    def __init__(self, width: int, num_labels: int, rank: int = 256) -> None:
        super().__init__()
        self.width = width
        self.p, self.q = nn.Linear(width, rank), nn.Linear(width, rank)
        self.out = nn.Linear(2 * width + rank, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, v = x[:, : self.width], x[:, self.width :]
        return self.out(torch.cat([x, self.p(t) * self.q(v)], dim=-1))


class SimilarityHead(nn.Module):
    """Linear head on `[t, v, cos(P_i t, Q_i v) / tau for i < k]`: the memory hub's consolidation as a head."""

    def __init__(self, width: int, num_labels: int, k: int = 16, rank: int = 64, tau: float = 0.1) -> None:
        super().__init__()
        self.width, self.k, self.rank, self.tau = width, k, rank, tau
        self.p, self.q = nn.Linear(width, k * rank), nn.Linear(width, k * rank)
        self.out = nn.Linear(2 * width + k, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, v = x[:, : self.width], x[:, self.width :]
        a = nn.functional.normalize(self.p(t).view(-1, self.k, self.rank), dim=-1)
        b = nn.functional.normalize(self.q(v).view(-1, self.k, self.rank), dim=-1)
        return self.out(torch.cat([x, (a * b).sum(-1) / self.tau], dim=-1))


def make(kind: str, width: int, num_labels: int) -> nn.Module:
    """One of the compared heads."""
    if kind == "linear":
        return nn.Linear(2 * width, num_labels)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(2 * width, 512), nn.GELU(), nn.Linear(512, num_labels))
    if kind == "bilinear":
        return BilinearHead(width, num_labels)
    if kind == "similarity":
        return SimilarityHead(width, num_labels)
    raise ValueError(kind)


def fit(head: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, epochs: int, seed: int = 0) -> nn.Module:
    """AdamW, batch 32, 5% warm-up then cosine decay (the offline job's schedule)."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(y) / 32)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.05 * steps), steps)
    order = harness.batch_order(len(y), 32, seed)
    for _ in range(steps):
        rows = next(order)
        nn.functional.cross_entropy(head(x[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return head.eval()


def run(threads: int = 1) -> dict[str, Any]:
    """The whole check (see the module docstring); returns the report as a dict."""
    from benchmarks.probes import pooled_features
    from peft_mitp.data import get_label_names, load_easy_vqa
    from peft_mitp.offline_backbone import build_offline_backbone, offline_processor

    with harness.torch_threads(threads):
        data = load_easy_vqa(max_train=8000, max_test=1000, seed=0)
        processor = offline_processor()
        splits = {name: harness.encode_split(data[name], processor) for name in ("train", "validation")}
        backbone = build_offline_backbone()
        features = {name: pooled_features(backbone, split) for name, split in splits.items()}
        mean, std = features["train"].mean(0), features["train"].std(0).clamp_min(1e-6)
        features = {name: (f - mean) / std for name, f in features.items()}
        width = features["train"].shape[1] // 2
        num_labels = len(get_label_names(data))
        report: dict[str, Any] = {"machine": harness.machine_info(), "text_readout": {}, "heads": []}

        yes_no = {name: [i for i, g in enumerate(s.groups) if g == "yes/no"] for name, s in splits.items()}
        for target, label, classes in (("word", question_word, len(WORDS)), ("negation", negated, 2)):
            y = {name: torch.tensor([label(data[name]["text"][i]) for i in rows]) for name, rows in yes_no.items()}
            torch.manual_seed(0)
            head = fit(nn.Linear(width, classes), features["train"][yes_no["train"], :width], y["train"],
                       lr=1e-2, epochs=20)
            with torch.no_grad():
                predicted = head(features["validation"][yes_no["validation"], :width]).argmax(-1)
            report["text_readout"][target] = float((predicted == y["validation"]).float().mean())

        val_yes_no = torch.tensor([g == "yes/no" for g in splits["validation"].groups])
        for kind in ("linear", "mlp", "bilinear", "similarity"):
            for lr in (3e-3, 1e-2):
                for epochs in (1, 3):
                    torch.manual_seed(0)
                    head = fit(make(kind, width, num_labels), features["train"], splits["train"].labels,
                               lr=lr, epochs=epochs)
                    with torch.no_grad():
                        correct = (head(features["validation"]).argmax(-1) == splits["validation"].labels).float()
                    report["heads"].append({
                        "head": kind, "learning_rate": lr, "epochs": epochs,
                        "validation": float(correct.mean()), "validation_yes/no": float(correct[val_yes_no].mean()),
                    })
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    lines = [
        "Linear read-out from the text features alone (yes/no questions, validation accuracy): question word "
        f"{report['text_readout']['word']:.3f}, negation {report['text_readout']['negation']:.3f}.",
        "",
        "| head | lr | epochs | validation | validation yes/no |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["heads"]:
        lines.append(f"| {r['head']} | {r['learning_rate']:g} | {r['epochs']} | {r['validation']:.3f} | "
                     f"{r['validation_yes/no']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: run the check and write `report.md` and `results.json`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "yes_no_heads")
    args = parser.parse_args(argv)
    report = run(args.threads)
    harness.write_report(args.output, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
