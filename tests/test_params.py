from pathlib import Path

import pytest
import yaml

from pipeline.errors import CxrError
from pipeline.names import MODEL_NAMES, VARIANTS
from pipeline.params import load_params, params_from_dict

def with_change(path: str, value):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


def test_committed_params_load_into_frozen_objects():
    p = load_params("params.yaml")
    assert p.model in MODEL_NAMES and p.variant in VARIANTS
    assert p.train.augment.scale == (0.9, 1.1)
    with pytest.raises(Exception):
        p.train.epochs = 3  # frozen


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("model", "resnet18", "must be one of"),
        ("train.epochs", "ten", "must be an integer"),
        ("train.lr", -1.0, "train.lr"),
        ("preprocess.reduced_decode", "yes", "true or false"),
        ("data.val_fraction", 1.5, "val_fraction"),
        ("train.augment.scale", [0.9], "list of 2"),
        ("data.labels.train", "../outside.txt", "directly in the dataset root"),
        ("data.labels.test", "/etc/passwd", "directly in the dataset root"),
        ("data.labels.test", None, "data.labels.test must be a string"),
    ],
)
def test_bad_values_are_errors(path, value, message):
    with pytest.raises(CxrError, match=message):
        params_from_dict(with_change(path, value))


def test_unknown_and_missing_keys_are_errors():
    raw = with_change("train.epoch", 3)  # typo next to train.epochs
    with pytest.raises(CxrError, match="unknown key.*train.epoch"):
        params_from_dict(raw)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    del raw["data"]["root"]
    with pytest.raises(CxrError, match="missing key.*data.root"):
        params_from_dict(raw)


def test_label_files_default_to_the_published_names_and_take_cxr3s():
    p = load_params("params.yaml")
    assert (p.data.labels.train, p.data.labels.val, p.data.labels.test) == ("train.txt", "val.txt", "test.txt")
    cxr3 = params_from_dict(with_change("data.labels.train", "train_COVIDx_CXR-3B.txt"))
    assert cxr3.data.labels.train == "train_COVIDx_CXR-3B.txt"
    assert params_from_dict(with_change("data.labels.val", None)).data.labels.val is None


def test_null_lr_means_per_model_default_and_numbers_coerce():
    p = params_from_dict(with_change("train.lr", None))
    assert p.train.lr is None
    assert params_from_dict(with_change("train.lr", 1)).train.lr == 1.0


def test_missing_file(tmp_path):
    with pytest.raises(CxrError, match="not found"):
        load_params(tmp_path / "nope.yaml")
