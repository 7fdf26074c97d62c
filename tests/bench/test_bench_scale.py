"""bench-scale: the generated datasets, what counts as disk written, the ratios and projection, and the whole run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.bench.bench_scale import (
    CXR4_IMAGES,
    METRICS_REPEAT,
    MAX_ROUNDS,
    STAGES,
    _snapshot,
    best_of,
    check_aims,
    generate_dataset,
    repeated,
    split_sizes,
    stage_summary,
    written_bytes,
)
from pipeline.errors import CxrError
from pipeline.labels import parse_label_file
from pipeline.params import load_params
from train.bench.bench_scale import private_bytes

REPO = Path(__file__).resolve().parents[2]


def test_generated_dataset_has_a_tenth_test_and_long_sides_in_range(tmp_path):
    counts = generate_dataset(tmp_path / "raw", 40, seed=3, min_side=96, max_side=160, workers=1)
    assert counts == {"train": 36, "test": 4} == {"train": 2 * split_sizes(40)[0], "test": 2 * split_sizes(40)[1]}
    for split, n in counts.items():
        # parsed as ingest parses them (patient ids with spaces, names with several dots)
        lines, rejects = parse_label_file(tmp_path / "raw" / f"{split}.txt")
        names = [line.filename for line in lines]
        assert rejects == [] and len(names) == len(set(names)) == n
        assert sorted(names) == sorted(p.name for p in (tmp_path / "raw" / split).iterdir())
        for name in names:
            img = cv2.imread(str(tmp_path / "raw" / split / name), cv2.IMREAD_UNCHANGED)
            assert 96 <= max(img.shape[:2]) <= 160, name


def test_sizes_below_forty_images_are_refused():
    with pytest.raises(CxrError, match="at least 40"):
        split_sizes(39)


def test_disk_written_counts_new_and_changed_files_only(tmp_path):
    (tmp_path / "kept").write_bytes(b"x" * 10000)
    (tmp_path / "changed").write_bytes(b"x" * 10000)
    (tmp_path / "raw").mkdir()
    before = _snapshot(tmp_path, "raw")
    (tmp_path / "changed").write_bytes(b"y" * 20000)
    (tmp_path / "new").write_bytes(b"z" * 30000)
    (tmp_path / "raw" / "ignored").write_bytes(b"r" * 50000)
    after = _snapshot(tmp_path, "raw")
    expected = sum(os.lstat(tmp_path / n).st_blocks * 512 for n in ("changed", "new"))
    assert expected >= 50000 and written_bytes(before, after) == expected


def test_private_bytes_counts_copies_not_links(tmp_path):
    cache, work = tmp_path / "cache", tmp_path / "work"
    cache.mkdir()
    work.mkdir()
    (cache / "a").write_bytes(os.urandom(40000))
    shutil.copyfile(cache / "a", work / "copied")
    os.link(cache / "a", work / "hardlinked")
    (work / "symlinked").symlink_to(cache / "a")
    assert private_bytes(work) == os.lstat(work / "copied").st_blocks * 512 >= 40000


def _size(images, seconds, rss=100e6, disk=1):
    return {"images": images, "seconds": seconds, "peak_rss_bytes": rss, "disk_written_bytes": disk}


def test_ratios_and_the_cxr4_line_come_from_the_measured_sizes():
    s = stage_summary([_size(100, 10.0, 100e6, 1000), _size(400, 50.0, 110e6, 4000)])
    assert s["time_per_image_ratio"] == pytest.approx((50 / 400) / (10 / 100))
    assert s["peak_rss_ratio"] == pytest.approx(1.1)
    assert s["disk_written_ratio"] == pytest.approx(4.0)
    assert s["rss_growth_bytes_per_image"] == pytest.approx(10e6 / 300)
    assert s["projected_cxr4"]["seconds"] == pytest.approx(10 + (40 / 300) * (CXR4_IMAGES - 100))
    assert s["projected_cxr4"]["disk_written_bytes"] == pytest.approx(1000 + 10 * (CXR4_IMAGES - 100))
    assert s["time_vs_linear_ratio"] is None  # needs three sizes
    # a stage measured faster at the larger size (noise) is projected level, never below what was measured
    assert stage_summary([_size(100, 10.0), _size(400, 9.0)])["projected_cxr4"]["seconds"] == 10.0
    # time follows the two largest sizes, past a one-off step at the smallest
    three = stage_summary([_size(100, 1.0, 90e6), _size(400, 2.0, 96e6), _size(1600, 3.0, 96.1e6)])
    assert three["projected_cxr4"]["seconds"] == pytest.approx(2.0 + 1.0 / 1200 * (CXR4_IMAGES - 400))


def test_rss_growth_is_the_least_squares_slope_over_all_sizes():
    # the metrics stage's run of issue 23: a 34 MiB dip at the middle size, which the two largest
    # sizes alone turned into 45 kB per image
    mib = 2**20
    s = stage_summary([_size(200, 1.0, 921.5 * mib), _size(800, 1.0, 887.5 * mib), _size(1600, 1.0, 922.0 * mib)])
    xs, ys = np.array([200, 800, 1600]), np.array([921.5, 887.5, 922.0]) * mib
    expected = np.polyfit(xs, ys, 1)[0]
    assert s["rss_growth_bytes_per_image"] == pytest.approx(expected) and expected < (922.0 - 887.5) * mib / 800 / 10
    assert s["projected_cxr4"]["peak_rss_bytes"] == pytest.approx(922.0 * mib + expected * (CXR4_IMAGES - 1600))
    # another basis (the metrics stage: test images evaluated, its own peak) is fitted the same way
    by = [_size(n, 1.0) | {"evaluated_images": 2 * n, "own": 1e6 + 300.0 * 2 * n} for n in (100, 400, 1600)]
    own = stage_summary(by, x="evaluated_images", rss="own", cxr4=8000)
    assert own["rss_growth_bytes_per_image"] == pytest.approx(300.0) and own["rss_growth_per"] == "test image evaluated"
    # projected from the largest size's peak as measured outside, at `cxr4` test images evaluated
    assert own["projected_cxr4"]["peak_rss_bytes"] == pytest.approx(100e6 + 300.0 * (8000 - 3200))


def test_the_line_through_the_two_smallest_sizes_sees_through_start_up_costs():
    def sizes(cost):
        return [_size(n, cost(n)) for n in (100, 400, 1600)]

    linear = stage_summary(sizes(lambda n: 5.0 + 0.01 * n))  # 5 s of start-up: time per image falls 0.06 -> 0.013 s
    assert linear["time_per_image_ratio"] < 0.3 and linear["time_vs_linear_ratio"] == pytest.approx(1.0)
    quadratic = stage_summary(sizes(lambda n: 5.0 + 1e-5 * n * n))  # the per-image ratio (0.32) would hide it
    predicted = 5.1 + (6.6 - 5.1) / 300 * 1500
    assert quadratic["time_per_image_ratio"] < 1 and quadratic["time_vs_linear_ratio"] == pytest.approx(30.6 / predicted)
    flat = stage_summary(sizes(lambda n: 6.0))  # a size-independent stage is on its line
    assert flat["time_vs_linear_ratio"] == pytest.approx(1.0)


def test_best_of_repeated_runs_keeps_the_least_of_each_figure():
    runs = [_size(100, 9.0, 120e6, 5), _size(100, 7.0, 130e6, 5), _size(100, 8.0, 110e6, 6)]
    assert best_of(runs) == {"images": 100, "seconds": 7.0, "peak_rss_bytes": 110e6, "disk_written_bytes": 5,
                             "rounds": 3}  # fmt: skip


def test_runs_repeat_until_they_add_up_to_the_measured_seconds():
    def run_of(seconds, made):  # each run a little faster than the one before
        return lambda: made.append(_size(100, seconds - 0.01 * len(made))) or made[-1]

    short, long, tiny, exact = [], [], [], []
    best = repeated(run_of(4.0, short), rounds=2, measured_s=30.0)
    repeated(run_of(20.0, long), rounds=2, measured_s=30.0)
    repeated(run_of(0.5, tiny), rounds=2, measured_s=30.0)
    repeated(run_of(0.5, exact), rounds=3, measured_s=0.0)
    assert len(short) == 8 > len(long) == 2  # 8 x ~4 s reach 30 s; two 20-second runs already do
    assert len(tiny) == MAX_ROUNDS and len(exact) == 3
    assert best["rounds"] == len(short) and best["seconds"] == short[-1]["seconds"]  # the least, from an extra round


def test_aims_flag_what_misses():
    flat = stage_summary([_size(100, 10.0), _size(400, 40.0)])
    stages = {name: flat for name in STAGES}
    assert all(a["holds"] for a in check_aims(stages))
    stages["shard_plain"] = stage_summary([_size(100, 10.0), _size(400, 80.0)])
    stages["ingest"] = stage_summary([_size(100, 10.0, 100e6), _size(400, 40.0, 101e6)])  # 3.3 kB/image
    missed = {a["aim"] for a in check_aims(stages) if not a["holds"]}
    assert missed == {"shard_plain: time per image ratio", "ingest: peak RSS growth, bytes per image"}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("git") is None, reason="reads /proc, needs git")
def test_bench_scale_json_holds_every_stage_with_ratios_of_its_own_figures(tmp_path):
    raw = json.loads(json.dumps(load_params(REPO / "params.yaml").to_dict()))
    raw["evaluate"]["bootstrap"] = 50
    raw["train"]["num_workers"] = 0
    raw["shard"]["workers"] = 1
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench-scale", "--sizes", "40,80", "--min-side", "96",
                           "--max-side", "128", "--rounds", "1", "--measured-s", "0", "--json",
                           "--params", str(tmp_path / "params.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["sizes"] == [40, 80] and result["test_images"] == [4, 8] and result["rounds"] == 1
    assert all(b["rounds"] == 1 for s in result["stages"].values() for b in s["by_size"])
    assert set(result["stages"]) == set(STAGES)
    for name, s in result["stages"].items():
        small, large = s["by_size"]
        assert (small["images"], large["images"]) == (40, 80)
        assert s["time_per_image_ratio"] == pytest.approx((large["seconds"] / 80) / (small["seconds"] / 40)), name
        assert s["peak_rss_ratio"] == pytest.approx(large["peak_rss_bytes"] / small["peak_rss_bytes"]), name
        assert small["seconds"] > 0 and small["peak_rss_bytes"] > 10 * 2**20, name
    # shards are written, and a queued experiment with linked outputs writes less than one that copies them
    assert result["stages"]["shard_plain"]["by_size"][1]["disk_written_bytes"] > 0
    copy, linked = (result["stages"][k]["by_size"][1]["disk_written_bytes"] for k in ("exp_setup_copy", "exp_setup"))
    assert linked < copy
    assert {a["aim"].split(":")[0] for a in result["aims"]} == set(STAGES)
    # the metrics stage evaluated its test split METRICS_REPEAT times over and measured its own peak
    metrics = result["stages"]["metrics"]
    assert [b["evaluated_images"] for b in metrics["by_size"]] == [4 * METRICS_REPEAT, 8 * METRICS_REPEAT]
    assert all(0 < b["own_peak_rss_bytes"] < b["peak_rss_bytes"] for b in metrics["by_size"])
