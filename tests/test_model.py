"""Model construction: config contents, the three init modes, refusal of unsafe checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import CLASSES
from hf_tumor.serving.model import ModelInitError, create_model


@pytest.fixture(scope="module")
def scratch():
    return create_model("resnetv2_50", CLASSES, 64, init="scratch", drop_rate=0.3)


def test_config_carries_labels_preprocessing_and_dropout(scratch):
    config = scratch.config
    assert [config.id2label[i] for i in range(4)] == CLASSES
    assert config.label2id == {c: i for i, c in enumerate(CLASSES)}
    assert config.pretrained_cfg["input_size"] == [3, 64, 64]
    assert config.pretrained_cfg["crop_mode"] == "squash" and config.pretrained_cfg["crop_pct"] == 1.0
    assert config.model_args == {"drop_rate": 0.3}
    assert scratch.timm_model.drop_rate == 0.3
    assert scratch.timm_model.get_classifier().out_channels == 4


def test_scratch_uses_timm_init_not_transformers_default(scratch):
    # transformers' generic init would give every conv std 0.02; timm's fan-based init does not
    std = scratch.timm_model.stages[0].blocks[0].conv1.weight.std().item()
    assert std > 0.05


def test_imagenet_offline_fails_clearly_without_fallback():
    with pytest.raises(ModelInitError, match="--init scratch.*--init PATH"):
        create_model("resnetv2_50", CLASSES, 64, init="imagenet")


def test_init_from_local_safetensors_and_folder(scratch, tmp_path):
    state = {f"timm_model.{k}": v for k, v in scratch.timm_model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    loaded = create_model("resnetv2_50", CLASSES, 64, init=str(tmp_path / "w.safetensors"))
    for key, value in scratch.timm_model.state_dict().items():
        assert torch.equal(loaded.timm_model.state_dict()[key], value), key
    scratch.save_pretrained(tmp_path / "folder")
    from_folder = create_model("resnetv2_50", CLASSES, 64, init=str(tmp_path / "folder"))
    assert torch.equal(from_folder.timm_model.stem.conv.weight, scratch.timm_model.stem.conv.weight)


def test_init_with_other_head_keeps_backbone(scratch, tmp_path):
    state = scratch.timm_model.state_dict()
    state["head.fc.weight"] = torch.zeros(10, *state["head.fc.weight"].shape[1:])
    state["head.fc.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "ten_classes.pth")
    model = create_model("resnetv2_50", CLASSES, 64, init=str(tmp_path / "ten_classes.pth"))
    assert torch.equal(model.timm_model.stem.conv.weight, scratch.timm_model.stem.conv.weight)
    assert model.timm_model.get_classifier().weight.shape[0] == 4


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(ModelInitError, match="weights-only"):
        create_model("resnetv2_50", CLASSES, 64, init=str(path))


@pytest.mark.parametrize("init", ["/nonexistent/weights.safetensors", "not-a-mode"])
def test_unknown_init_is_an_error(init):
    with pytest.raises(ModelInitError, match="no such file"):
        create_model("resnetv2_50", CLASSES, 64, init=init)


def test_wrong_architecture_checkpoint_is_an_error(tmp_path):
    save_file({"foo.weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelInitError, match="does not fit"):
        create_model("resnetv2_50", CLASSES, 64, init=str(tmp_path / "other.safetensors"))


def test_precise_bn_replaces_running_stats_by_the_exact_average():
    from hf_tumor.training.train import recompute_batchnorm_stats

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, pixel_values):
            return self.bn(pixel_values)

    model = Tiny().eval()
    model.bn.running_mean.fill_(7.0)  # stale statistics
    batches = [torch.randn(4, 3, 8, 8) * 2 + 3 for _ in range(5)]
    assert recompute_batchnorm_stats(model, batches) == 20
    expected = torch.cat(batches).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn.running_mean, expected, rtol=1e-4, atol=1e-4)
    assert model.bn.momentum == 0.1 and not model.training
