"""A bare PyTorch training loop: the control experiment for the Trainer path.

    python scripts/train_bare.py [ARGS.yaml] [--flag value ...]

It takes the same arguments as ``hf-tumor train`` and shares its data, split,
augmentation, model, learning-rate schedule, model folder and evaluation; only the loop differs, and
it differs the way a hand-written loop does: ``torch.optim.AdamW(model.parameters())`` (every bias
and norm decayed), no gradient clipping, BatchNorm running averages as training leaves them, the last
epoch's weights kept. A gap between the two on one argument file is a gap in the loop, not the recipe.
The default recipe already decays every parameter, clips nothing and keeps the last epoch, so with
the defaults the two differ by precise BN and by the Trainer's own machinery only.
Ignored here, and recorded in ``train_args.json`` as what the loop does: early stopping, precise BN,
``--max_grad_norm``, ``--decay_norm_and_bias``, ``--load_best_model_at_end``; there are no checkpoints
and no resuming.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader

from hf_tumor.contract import CONFIG_FILE
from hf_tumor.errors import UserError
from hf_tumor.serving.model import create_model, save_model_atomically
from hf_tumor.training.data import attach_transforms, collate
from hf_tumor.training.evaluation import classification_metrics, evaluate_model, predict_logits
from hf_tumor.training.runtime import setup_logging
from hf_tumor.training.train import parse_args, prepare_data, save_resolved_args

logger = logging.getLogger("hf_tumor")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               device: torch.device, bf16: bool, label_smoothing: float = 0.0) -> float:
    """One step of a hand-written loop (forward under optional bf16 autocast, backward, update); returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
    loss = F.cross_entropy(logits.float(), batch["labels"].to(device), label_smoothing=label_smoothing)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_bare(argv: Sequence[str]) -> Path:
    """Train and evaluate a model folder with a bare loop; returns its path."""
    data_args, model_args, augment, training_args = parse_args(argv)
    # The flags this loop ignores, set to what it does, so that train_args.json and the model card tell the truth.
    training_args.max_grad_norm, training_args.load_best_model_at_end = 0.0, False
    model_args.decay_norm_and_bias, model_args.precise_bn_images, model_args.early_stopping_patience = True, 0, 0
    setup_logging(training_args.should_log)
    output_dir = Path(training_args.output_dir)
    if (output_dir / CONFIG_FILE).exists():  # no checkpoints to resume from: never overwrite a finished run
        raise SystemExit(f"error: {output_dir} already holds a model; choose another --output_dir")
    transformers.set_seed(training_args.seed)
    data = prepare_data(data_args, model_args, training_args)
    device = training_args.device

    model = create_model(model_args.model_name, data.names, data_args.image_size, model_args.init, model_args.drop_rate)
    model = model.to(device)
    if model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        attach_transforms(data.splits["train"], data.pretrained_cfg, augment),
        batch_size=training_args.per_device_train_batch_size, shuffle=True, collate_fn=collate,
        num_workers=training_args.dataloader_num_workers, generator=torch.Generator().manual_seed(training_args.seed),
    )
    validation = attach_transforms(data.splits["validation"], data.pretrained_cfg)
    epochs = int(training_args.num_train_epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training_args.learning_rate, weight_decay=training_args.weight_decay)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, training_args.warmup_steps, epochs * len(loader))

    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for batch in loader:
            losses.append(train_step(model, optimizer, batch, device, training_args.bf16, training_args.label_smoothing_factor))
            schedule.step()
        logits, labels = predict_logits(model, validation, training_args.per_device_eval_batch_size)
        report = classification_metrics(np.argmax(logits, axis=-1), labels, data.names)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_accuracy": report["accuracy"],
                        "validation_f1_macro": report["f1_macro"], "seconds": round(time.perf_counter() - start, 1)})
        logger.info("epoch %d/%d: train loss %.4f, validation accuracy %.4f", epoch, epochs, history[-1]["train_loss"],
                    report["accuracy"])
    wall = time.perf_counter() - start

    output_dir.mkdir(parents=True, exist_ok=True)
    save_model_atomically(model.cpu(), output_dir)
    results = {"epoch": epochs, "train_wall_seconds": round(wall, 1), "loop": "bare", "history": history}
    (output_dir / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    save_resolved_args(output_dir, argv, data_args, model_args, augment, training_args, program="python scripts/train_bare.py")
    logger.info("model folder written to %s", output_dir)
    if data_args.evaluate_test:
        evaluate_model(output_dir, data.data_dir, audit=data.audit)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        train_bare(argv)
    except (UserError, OSError) as err:  # as `hf-tumor train` reports them: the message, no traceback
        print(f"train_bare.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
