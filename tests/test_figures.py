"""The study's data figures and the training curves: each PNG exists, has its size and shows something."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import CxrError
from pipeline.figures import CURVES_NAME, FIGURE_NAMES, training_curves, write_data_figures
from pipeline.manifest import build_manifest
from pipeline.params import ShardParams, load_params
from pipeline.sample import generate_sample
from pipeline.shards import write_variant
from tests.conftest import REPO, data_params, sample_params


def assert_picture(path: Path, size: tuple[int, int], ink: float = 0.05) -> np.ndarray:
    """Exists, is `size` (w, h) pixels, and is not blank: ink covers at least `ink` of it, in many shades."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.size == size, f"{path.name}: {img.size} != {size}"
        grey = np.asarray(img.convert("L"), dtype=np.float64)
    assert (grey < 200).mean() > ink, f"{path.name} is nearly empty"
    assert len(np.unique(grey)) > 32, f"{path.name} is flat"
    return grey


@pytest.fixture(scope="module")
def data_figures(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("fig")
    params = load_params(REPO / "params.yaml")
    generate_sample(d / "ds", sample_params(10, 6), seed=2)
    build_manifest(d / "ds", d / "m.jsonl", d / "r.json", data_params(), seed=2)
    for variant in ("plain", "equalized"):
        write_variant(d / "m.jsonl", d / "r.json", d / "shards" / variant, variant, params.preprocess,
                      ShardParams(max_count=100, max_bytes=10**8, workers=1), data_params(), 2,
                      show_progress=False)  # fmt: skip
    return d, write_data_figures(d / "m.jsonl", d / "r.json", d / "shards", d / "figures", per_split=1, sheet=16)


@pytest.mark.slow
def test_every_data_figure_is_written_at_its_size_and_is_not_blank(data_figures):
    d, written = data_figures
    assert set(written) == set(FIGURE_NAMES)
    sizes = {"dimensions": (1600, 600), "negative": (1600, 960), "positive": (1600, 960),
             "plain": (1000, 1060), "equalized": (1000, 1060)}  # fmt: skip  # 3 splits x 1 example: 0.6 + 3 x 3 in
    for name, size in sizes.items():
        assert Path(written[name]) == d / "figures" / FIGURE_NAMES[name]
        assert_picture(Path(written[name]), size)


def test_the_two_contact_sheets_differ_as_equalization_does(data_figures):
    d, _ = data_figures
    plain = np.asarray(Image.open(d / "figures" / FIGURE_NAMES["plain"]).convert("L"), dtype=np.float64)
    equalized = np.asarray(Image.open(d / "figures" / FIGURE_NAMES["equalized"]).convert("L"), dtype=np.float64)
    assert np.abs(plain - equalized).mean() > 5  # the same images, but other pixels


def test_dimension_figure_needs_header_sizes(data_figures, tmp_path):
    d, _ = data_figures
    stripped = tmp_path / "m.jsonl"
    rows = [json.loads(line) for line in (d / "m.jsonl").read_text().splitlines()]
    stripped.write_text("".join(json.dumps({**r, "width": None, "height": None}) + "\n" for r in rows))
    with pytest.raises(CxrError, match="rerun `ingest`"):
        write_data_figures(stripped, d / "r.json", d / "shards", tmp_path / "figures")


def test_training_curves_from_dvclive_files(tmp_path):
    from dvclive import Live

    live = Live(dir=str(tmp_path / "live"), save_dvc_exp=False, dvcyaml=False)
    for epoch in range(6):
        live.log_metric("train_loss", 0.7 - 0.08 * epoch)
        live.log_metric("val_loss", 0.72 - 0.05 * epoch + 0.02 * max(0, epoch - 3))
        live.log_metric("val_auc", 0.5 + 0.07 * epoch)
        live.log_metric("val_accuracy", 0.5 + 0.05 * epoch)
        live.next_step()
    live.end()
    out = training_curves(tmp_path / "live", tmp_path / CURVES_NAME)
    assert_picture(out, (1600, 500), ink=0.01)  # line charts: mostly white by nature


def test_training_curves_without_a_training_run_say_what_to_run(tmp_path):
    with pytest.raises(CxrError, match="run the train stage first"):
        training_curves(tmp_path / "nothing", tmp_path / CURVES_NAME)
