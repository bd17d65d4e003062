"""Distillation from trained model folders (``--teachers``): soft targets, the loss, the split guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train_args
from hf_tumor.data import attach_transforms
from hf_tumor.distillation import distillation_loss, ensemble_probabilities
from hf_tumor.evaluation import predict_logits
from hf_tumor.hub import card_inputs
from hf_tumor.model import load_model
from hf_tumor.training import main, parse_args, prepare_data


def test_distillation_loss_is_zero_only_at_the_teachers_targets():
    teacher_logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 3.0, 0.0, -2.0]])
    for temperature in (1.0, 2.0, 4.0):
        targets = torch.softmax(teacher_logits / temperature, dim=-1)
        assert distillation_loss(teacher_logits, targets, temperature).item() == pytest.approx(0, abs=1e-6)
        student = torch.zeros_like(teacher_logits, requires_grad=True)
        loss = distillation_loss(student, targets, temperature)
        assert loss.item() > 0.05
        loss.backward()
        # a gradient step moves the student's logits towards the teacher's ordering
        assert torch.equal((-student.grad).argmax(-1), teacher_logits.argmax(-1))


@pytest.mark.slow
def test_ensemble_targets_undo_the_folded_calibration(trained_model: Path, tiny_data: Path, tmp_path: Path):
    data_args, model_args, _, training_args = parse_args(train_args(tiny_data, tmp_path / "x"))
    data = prepare_data(data_args, model_args, training_args)
    model = load_model(trained_model)
    assert model.config.calibration_temperature != 1.0  # evaluation folded one in
    logits, _ = predict_logits(model, attach_transforms(data.splits["train"], data.pretrained_cfg))
    probs = ensemble_probabilities([str(trained_model)] * 2, data.splits["train"], data.pretrained_cfg, temperature=2.0)
    raw = logits * model.config.calibration_temperature
    expected = torch.softmax(torch.from_numpy(raw) / 2.0, dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_student_trains_on_the_teachers_targets(trained_model: Path, tiny_data: Path, tmp_path: Path):
    def first_loss(out: Path, *extra: str) -> float:
        main(train_args(tiny_data, out, "--num_train_epochs", "1", "--logging_steps", "1", *extra))
        return json.loads((out / "trainer_state.json").read_text())["log_history"][0]["loss"]

    plain = first_loss(tmp_path / "plain", "--evaluate_test", "false")
    student = first_loss(tmp_path / "student", "--teachers", str(trained_model), "--distill_alpha", "1.0")
    # same seed, same first batch, same initial weights: only the targets differ
    assert student != pytest.approx(plain, rel=1e-3)
    resolved = json.loads((tmp_path / "student" / "train_args.json").read_text())
    assert resolved["ModelArguments"]["teachers"] == [str(trained_model)]
    assert load_model(tmp_path / "student").config.num_labels == 4
    rows = dict(card_inputs(tmp_path / "student", "someone/student")[1]["hyperparameters"])
    assert rows["knowledge distillation"].startswith(f"from {trained_model} (their mean probabilities): soft-target weight 1.0")
    assert dict(card_inputs(trained_model, "someone/teacher")[1]["hyperparameters"])["knowledge distillation"] == "none"


@pytest.mark.slow
def test_teachers_of_another_split_or_no_model_are_refused(trained_model: Path, tiny_data: Path, tmp_path: Path):
    from hf_tumor.cli import main as cli

    out = tmp_path / "student"
    with pytest.raises(SystemExit, match="another split or size: split_seed 42 .this run: 7."):
        main(train_args(tiny_data, out, "--teachers", str(trained_model), "--split_seed", "7"))
    with pytest.raises(SystemExit, match="not a model folder"):
        main(train_args(tiny_data, out, "--teachers", str(tmp_path)))
    with pytest.raises(SystemExit, match="distill_alpha must lie in"):
        main(train_args(tiny_data, out, "--teachers", str(trained_model), "--distill_alpha", "1.5"))
    with pytest.raises(SystemExit, match="bare loop does not distil"):
        cli(["train-bare", *train_args(tiny_data, out, "--teachers", str(trained_model))])
    assert not (out / "config.json").exists()
