"""Fine-tune an MITP adapter on SNLI-VE (Flickr30k premise image + hypothesis text, 3 classes) with Trainer.

Bring the public files (snli_ve_{train,dev,test}.jsonl and flickr30k_images/<id>.jpg).

    python examples/snli_ve.py --data-dir /data/snli-ve --backbone openai/clip-vit-large-patch14
"""

import argparse
from pathlib import Path

from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_mitp  # registers MITP with peft
from peft_mitp.data import convert_snli_ve, get_label_names, load_prepared
from peft_mitp.metrics import make_compute_metrics
from peft_mitp.training import ImageTextCollator, build_task_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", required=True)
parser.add_argument("--backbone", default="openai/clip-vit-large-patch14", help="a dual encoder, or 'offline'")
parser.add_argument("--epochs", type=float, default=2.0)
parser.add_argument("--max-steps", type=int, default=-1)
parser.add_argument("--output-dir", default="snli-ve-mitp")
args = parser.parse_args()

prepared = Path(args.output_dir) / "data"
if not (prepared / "mitp_dataset.json").exists():
    convert_snli_ve(args.data_dir, prepared)
data = load_prepared(prepared)
base, processor = build_task_model(get_label_names(data), multi_label=False, backbone=args.backbone)
model = get_peft_model(base, peft_mitp.MITPConfig())
model.print_trainable_parameters()

trainer = Trainer(
    model=model,
    args=TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        label_names=["labels"],
        remove_unused_columns=False,
        report_to=[],
    ),
    train_dataset=data["train"],
    eval_dataset=data["validation"],
    data_collator=ImageTextCollator(processor, max_length=77),
    compute_metrics=make_compute_metrics(multi_label=False),
)
trainer.train()
print(trainer.evaluate(data["test"], metric_key_prefix="test"))
model.save_pretrained(f"{args.output_dir}/adapter")
