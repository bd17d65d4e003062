"""``push_dataset``'s dry run on real slices, reloaded offline with ``load_dataset``: the splits are
hf-tumor's own, the images the source files, the groups the audit's, the card's numbers the audit's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from datasets import Image, load_dataset
from huggingface_hub import DatasetCard

from conftest import BUNDLED_MODEL, CLASSES, TEST_IMAGE_SIZE, make_subset
from hf_tumor.contract import training_split_settings
from hf_tumor.errors import UserError
from hf_tumor.serving.preprocessing import make_pretrained_cfg
from hf_tumor.training.audit import run_audit, train_groups
from hf_tumor.training.data import DataError, load_splits
from hf_tumor.training.hub import PushError
from hf_tumor.training.hub_dataset import DATASET_CARD_TEMPLATE, SPLITS, build_dataset_dict, push_dataset

REPO_ID = "someone/brain-tumor-mri-audited"
CFG = make_pretrained_cfg("resnetv2_50", TEST_IMAGE_SIZE)


@pytest.fixture(scope="module")
def leaky_data(tmp_path_factory) -> Path:
    """tiny_data's images plus a byte-identical copy of a training image (a duplicate group inside
    Training) and a copy of a test image put into Training (a test image that leaks)."""
    root = make_subset(tmp_path_factory.mktemp("leaky_data"), 12, 4)
    train_image = sorted((root / "Training" / "meningioma").iterdir())[0]
    shutil.copyfile(train_image, train_image.with_name("Tr-me_copy.jpg"))
    test_image = sorted((root / "Testing" / "pituitary").iterdir())[0]
    shutil.copyfile(test_image, root / "Training" / "pituitary" / "Tr-pi_from_test.jpg")
    return root


@pytest.fixture(scope="module")
def leaky_audit(leaky_data) -> dict:
    return run_audit(leaky_data)


def _reload(folder: Path):
    return load_dataset(str(folder))


def _hf_tumor_splits(data_dir: Path, fraction: float, seed: int, audit: dict) -> dict[str, list[str]]:
    """Relative paths per split as training (load_splits) and evaluation (clean_test) see them."""
    root = data_dir.resolve()
    splits = load_splits(data_dir, CFG, fraction, seed, groups=train_groups(audit, data_dir))
    paths = {name: [str(Path(p).relative_to(root)) for p in split["path"]] for name, split in splits.items()}
    leaked = set(audit["test_with_train_twin"]["paths"])
    paths["clean_test"] = [p for p in paths["test"] if p not in leaked]
    return paths


def test_dry_run_is_the_hub_layout_and_the_splits_training_uses(tiny_data, tmp_path):
    """With a model folder the split settings are its train_args.json's; the written folder reloads offline
    with the four splits of hf-tumor's own functions, labels from the folders and the files' own bytes."""
    out = tmp_path / "out"
    plan = push_dataset(tiny_data, REPO_ID, dry_run=out, model_dir=BUNDLED_MODEL)

    assert plan.folder == out and plan.repo_id == REPO_ID
    assert sorted(plan.files) == sorted(["README.md", *(f"data/{s}-00000-of-00001.parquet" for s in SPLITS)])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(plan.files)

    data = _reload(out)
    assert list(data) == list(SPLITS)
    settings = training_split_settings(BUNDLED_MODEL)
    assert (settings["validation_fraction"], settings["split_seed"]) == (0.05, 7)
    expected = _hf_tumor_splits(tiny_data, settings["validation_fraction"], settings["split_seed"], run_audit(tiny_data))
    for split in SPLITS:
        assert data[split]["path"] == expected[split], split
        assert plan.num_rows[split] == len(expected[split])

    names = data["train"].features["label"].names
    assert names == CLASSES
    raw = data.cast_column("image", Image(decode=False))
    for split in SPLITS:
        for row in raw[split]:
            assert names[row["label"]] == row["path"].split("/")[1]
            assert row["image"]["bytes"] == (tiny_data / row["path"]).read_bytes(), row["path"]  # not re-encoded
            assert row["leaks"] is False  # tiny_data's first images have no twins across the folders
    first = data["test"][0]["image"]
    assert first.size[0] > 0 and first.mode in ("L", "RGB")

    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc0-1.0" and card.data.task_categories == ["image-classification"]
    assert {c["split"] for c in card.data.configs[0]["data_files"]} == set(SPLITS)
    assert "validation fraction 0.05, split seed 7" in card.text
    assert "{{" not in card.text and "{%" not in card.text
    # the bundled model was evaluated on the full folder: its figure does not describe this clean_test
    assert "resnetv2_50-scratch-128` scores" not in card.text


def test_groups_stay_together_and_leaks_are_marked(leaky_data, leaky_audit, tmp_path):
    copies = {"Training/meningioma/Tr-me_copy.jpg", sorted(f"Training/meningioma/{p.name}" for p in
                                                           (leaky_data / "Training" / "meningioma").iterdir())[0]}
    leaking_test = "Testing/pituitary/" + sorted(p.name for p in (leaky_data / "Testing" / "pituitary").iterdir())[0]

    for seed in range(6):  # a duplicate group is never split between train and validation, whatever the seed
        data = build_dataset_dict(leaky_data, validation_fraction=0.25, split_seed=seed, audit=leaky_audit)
        side = {p: s for s in ("train", "validation") for p in data[s]["path"]}
        groups = {}
        for s in ("train", "validation"):
            for path, group in zip(data[s]["path"], data[s]["group"]):
                groups.setdefault(group, set()).add(side[path])
        assert all(len(sides) == 1 for sides in groups.values())
        assert len({side[p] for p in copies}) == 1

    out = tmp_path / "out"
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(BUNDLED_MODEL / "train_args.json", model / "train_args.json")
    clean_count = leaky_audit["clean_test"]["count"]
    (model / "eval_results.json").write_text(json.dumps(
        {"splits": {"clean_test": {"num_images": clean_count, "accuracy": 0.9, "accuracy_ci95": [0.8, 0.95]}}}))
    push_dataset(leaky_data, REPO_ID, dry_run=out, model_dir=model, model_repo="someone/model", audit=leaky_audit)
    data = _reload(out)

    expected = _hf_tumor_splits(leaky_data, 0.05, 7, leaky_audit)
    assert {s: data[s]["path"] for s in SPLITS} == expected
    rows = {r["path"]: r for s in ("train", "validation", "test") for r in data[s].remove_columns("image")}
    assert rows["Training/meningioma/Tr-me_copy.jpg"]["group"].startswith("near-")
    assert len({rows[p]["group"] for p in copies}) == 1
    assert rows[leaking_test]["leaks"] is True
    assert rows[leaking_test]["group"] == rows["Training/pituitary/Tr-pi_from_test.jpg"]["group"]
    assert leaking_test not in data["clean_test"]["path"]
    assert not any(data["clean_test"]["leaks"]) and sum(data["test"]["leaks"]) == len(data["test"]) - len(data["clean_test"])
    lone = next(r for r in rows.values() if r["path"] not in copies and r["path"] != leaking_test
                and not r["path"].endswith("Tr-pi_from_test.jpg"))
    assert lone["group"] == lone["path"]

    # every number in the card is the audit's (or the splits'), none written by hand
    text = DatasetCard.load(out / "README.md").text
    leak, exact, near = leaky_audit["test_with_train_twin"], leaky_audit["exact_duplicates"], leaky_audit["near_duplicates"]
    num_test = leaky_audit["num_images"]["test"]
    assert exact["num_redundant"] == 2 and leak["count"] == 1 and leak["exact"] == 1  # the two copies made above
    assert f"{exact['num_redundant']} files are byte-identical copies of another file ({exact['num_groups']} groups" in text
    assert f"{near['num_images_in_groups']} images fall into {near['num_groups']} near-duplicate groups; " \
           f"{near['num_cross_split_groups']} groups span" in text
    assert f"**{leak['count']} of the {num_test} test images ({100 * leak['count'] / num_test:.1f}%) have a near twin" in text
    assert f"({leak['exact']} are byte-identical to a training file)" in text
    assert f"`clean_test`: the {clean_count} test images with no near twin" in text
    assert f"| `clean_test` | {clean_count} |" in text
    assert "`model` scores **90.00%** accuracy on `clean_test`" in text
    assert 'pipeline("image-classification", model="someone/model")' in text
    assert f'load_dataset("{REPO_ID}")' in text


def test_bad_data_folders_are_user_errors(tmp_path, tiny_data, leaky_audit):
    with pytest.raises(DataError, match="does not exist"):
        push_dataset(tmp_path / "missing", REPO_ID, dry_run=tmp_path / "out")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="has no Training/"):
        push_dataset(garbage, REPO_ID, dry_run=tmp_path / "out")
    unreadable = tmp_path / "unreadable"
    for split in ("Training", "Testing"):
        for cls in CLASSES[:2]:
            (unreadable / split / cls).mkdir(parents=True)
            (unreadable / split / cls / "slice.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="No readable images"):
        push_dataset(unreadable, REPO_ID, dry_run=tmp_path / "out")
    with pytest.raises(DataError, match="another data folder"):  # an audit of leaky_data is not tiny_data's
        build_dataset_dict(tiny_data, audit=leaky_audit)
    with pytest.raises(UserError, match="does not exist"):
        push_dataset(tiny_data, REPO_ID, dry_run=tmp_path / "out", model_dir=tmp_path / "no-model")
    assert not (tmp_path / "out" / "README.md").exists()
    assert issubclass(DataError, UserError)


def test_push_checks_token_and_hub_before_reading_any_data(tmp_path, monkeypatch):
    """Without a token, or offline, the push stops with a PushError before it looks at the data."""
    import huggingface_hub

    missing = tmp_path / "missing"  # would be a DataError if the data were read first
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PushError, match="No Hugging Face token"):
        push_dataset(missing, REPO_ID)
    with pytest.raises(PushError, match="Nothing was uploaded"):  # HF_HUB_OFFLINE=1 (conftest)
        push_dataset(missing, REPO_ID, token="hf_not_a_real_token")


def test_card_template_ships_in_the_package():
    import hf_tumor.training

    assert DATASET_CARD_TEMPLATE.is_file()
    assert DATASET_CARD_TEMPLATE.parent.parent == Path(hf_tumor.training.__file__).resolve().parent  # templates/*.md package data


def test_the_push_dataset_command_dry_run(tiny_data, tmp_path, capsys):
    from hf_tumor.cli import main as cli

    out = tmp_path / "out"
    assert cli(["push-dataset", "--repo_id", "someone/brain-tumor-mri", "--data_dir", str(tiny_data),
                "--model", str(BUNDLED_MODEL), "--dry_run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"would upload (written under {out}) to dataset repo someone/brain-tumor-mri: train ")
    reloaded = load_dataset(str(out))
    assert sorted(reloaded) == sorted(SPLITS) and sum(len(split) for name, split in reloaded.items()
                                                      if name in ("train", "validation")) == 4 * 12
    assert cli(["push-dataset", "--repo_id", "someone/x", "--data_dir", str(tmp_path / "nowhere"), "--dry_run", str(out)]) == 2
