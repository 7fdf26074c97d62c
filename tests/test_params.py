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


# One bad value per key of params.yaml (issue 21): each is refused when params.yaml is read, in one
# line naming the key and its allowed range, before any work starts.
BAD_VALUES = [
    ("seed", -1, r"seed must be an integer in \[0, 2\*\*63\)"),
    ("seed", 2**63, r"seed must be an integer in \[0, 2\*\*63\)"),
    ("data.root", "", r"data.root must be a non-empty path"),
    ("data.val_fraction", float("nan"), r"data.val_fraction must be a finite number in \(0, 1\)"),
    ("data.max_reject_fraction", float("inf"), r"data.max_reject_fraction must be a finite number in \[0, 1\]"),
    ("sample.train_per_class", 1, r"sample.train_per_class must be an integer in \[2, "),
    ("sample.test_per_class", 0, r"sample.test_per_class must be an integer in \[2, "),
    ("sample.shifted_test_per_class", -3, r"sample.shifted_test_per_class must be an integer in \[2, "),
    ("preprocess.top_crop", 0.5, r"preprocess.top_crop must be a finite number in \[0, 0.5\)"),
    ("preprocess.size", 1025, r"preprocess.size must be an integer in \[32, 1024\]"),
    ("preprocess.size", 31, r"preprocess.size must be an integer in \[32, 1024\]"),
    ("preprocess.clahe_clip", 0.0, r"preprocess.clahe_clip must be a finite number in \(0, "),
    ("preprocess.clahe_clip", float("nan"), r"preprocess.clahe_clip must be a finite number"),
    ("preprocess.max_pixels", 0, r"preprocess.max_pixels must be an integer in \[1, "),
    ("preprocess.max_decoded_bytes", -1, r"preprocess.max_decoded_bytes must be an integer in \[1, "),
    ("preprocess.min_side", 0, r"preprocess.min_side must be an integer in \[1, "),
    ("preprocess.min_side", 225, r"preprocess.min_side must be <= preprocess.size \(224\)"),
    ("shard.max_count", 0, r"shard.max_count must be an integer in \[1, 1000000000\]"),
    ("shard.max_bytes", 2 * 10**9, r"shard.max_bytes must be an integer in \[1, 1000000000\]"),
    ("shard.workers", -1, r"shard.workers must be an integer in \[0, "),
    ("train.epochs", 0, r"train.epochs must be an integer in \[1, "),
    ("train.patience", -1, r"train.patience must be an integer in \[0, "),
    ("train.batch_size", 0, r"train.batch_size must be an integer in \[1, "),
    ("train.lr", float("inf"), r"train.lr must be null or a finite number in \(0, "),
    ("train.lr", 0.0, r"train.lr must be null or a finite number in \(0, "),
    ("train.max_steps", 0, r"train.max_steps must be null or an integer in \[1, "),
    ("train.num_workers", -2, r"train.num_workers must be an integer in \[0, "),
    ("train.shuffle_buffer", 0, r"train.shuffle_buffer must be an integer in \[1, "),
    ("train.aux_weight", -0.1, r"train.aux_weight must be a finite number in \[0, "),
    ("train.aux_weight", float("nan"), r"train.aux_weight must be a finite number"),
    ("train.augment.scale", [0.0, 1.1], r"train.augment.scale\[0\] must be a finite number in \(0, "),
    ("train.augment.scale", [0.9, float("inf")], r"train.augment.scale\[1\] must be a finite number in \(0, "),
    ("train.augment.scale", [1.2, 1.1], r"train.augment.scale must be \[low, high\] with low <= high"),
    ("train.augment.translate", 1.0, r"train.augment.translate must be a finite number in \[0, 1\)"),
    ("train.augment.rotate", 181.0, r"train.augment.rotate must be a finite number in \[0, 180\]"),
    ("train.augment.rotate", float("nan"), r"train.augment.rotate must be a finite number in \[0, 180\]"),
    ("train.init", " ", r"train.init must be scratch, imagenet or a checkpoint path"),
    ("evaluate.target_sensitivity", 0.0, r"evaluate.target_sensitivity must be a finite number in \(0, 1\]"),
    ("evaluate.bootstrap", -1, r"evaluate.bootstrap must be an integer in \[0, "),
    ("evaluate.batch_size", -5, r"evaluate.batch_size must be an integer in \[1, "),
    ("evaluate.prevalence", float("nan"), r"evaluate.prevalence must be a finite number in \(0, 1\)"),
    ("evaluate.ood_dim", 0, r"evaluate.ood_dim must be an integer in \[1, 1024\]"),
    ("evaluate.ood_dim", 2000, r"evaluate.ood_dim must be an integer in \[1, 1024\]"),
    ("evaluate.ood_quantile", 1.5, r"evaluate.ood_quantile must be a finite number in \[0.5, 1\]"),
    ("evaluate.ood_quantile", float("nan"), r"evaluate.ood_quantile must be a finite number"),
    ("evaluate.external", {"a b": "x"}, r"evaluate.external names must be letters"),
    ("evaluate.external", {"x": ""}, r"evaluate.external.x must be a non-empty path"),
    ("latency.threads", -1, r"latency.threads must be an integer in \[0, "),
    ("latency.warmup", -1, r"latency.warmup must be an integer in \[0, "),
    ("latency.runs", 0, r"latency.runs must be an integer in \[1, "),
    ("latency.batch", 0, r"latency.batch must be an integer in \[1, "),
]


@pytest.mark.parametrize("path,value,message", BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES])
def test_every_key_has_a_range_named_in_one_line(path, value, message):
    with pytest.raises(CxrError, match=f"^params: {message}") as caught:
        params_from_dict(with_change(path, value))
    assert "\n" not in str(caught.value)


def test_every_numeric_key_of_params_yaml_has_a_bad_value_above():
    """A key added to params.yaml without a range would be missing from BAD_VALUES: this test names it."""
    def numeric_keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and key != "external":
                yield from numeric_keys(value, f"{prefix}{key}.")
            elif not isinstance(value, (bool, str)) or key in ("root", "init", "external"):
                yield prefix + key
    tested = {path for path, _, _ in BAD_VALUES}
    assert set(numeric_keys(yaml.safe_load(Path("params.yaml").read_text()))) - tested == set()


def test_the_input_size_bound_is_the_checkpoints():
    from train.checkpoint import MAX_INPUT_SIZE
    from pipeline.params import INPUT_SIZE_RANGE

    assert INPUT_SIZE_RANGE[1] == MAX_INPUT_SIZE
    assert params_from_dict(with_change("preprocess.size", MAX_INPUT_SIZE)).preprocess.size == MAX_INPUT_SIZE
