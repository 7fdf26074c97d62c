"""`cxr bench-ood`: how well a model's out-of-distribution gate separates radiographs from everything else.

Radiographs: a COVIDx-layout root's test split (covidx-mini by default). Everything else: what
scikit-image ships offline (`skimage.data`: photographs, documents, microscopy and fundus images, a
CT head phantom, textures and patterns) plus uniform and Gaussian noise and blank images. Each side
goes through exactly what `cxr predict` runs (the Python API, train/screen/api.py), so a flagged share
here is what a user of `predict` sees. Reported: the gate's ROC AUC (score = Mahalanobis distance,
positives = non-radiographs), the share flagged on each side and per kind, and the share of
non-radiographs the model would have called COVID-19 positive without the gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from pipeline.errors import CxrError
from pipeline.labels import parse_label_file

# skimage.data images that need no download, by kind (brain MRI slices and the like need pooch and a
# network, which these machines lack; logo is RGBA, lfw_subset 25 px, both not images `predict` takes)
SKIMAGE = {
    "photo": ("astronaut", "camera", "cat", "coffee", "rocket", "moon", "clock", "coins", "hubble_deep_field"),
    "document": ("text", "page"),
    "medical, not a radiograph": ("shepp_logan_phantom", "cell", "retina", "immunohistochemistry",
                                  "microaneurysms"),  # fmt: skip
    "texture or pattern": ("brick", "grass", "gravel", "checkerboard", "binary_blobs", "horse", "colorwheel"),
}
NOISE_SIZE = 512
NOISE_SEEDS = (0, 1, 2)


def _as_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    if img.dtype.kind == "f":  # skimage's float images are in [0, 1]
        return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return img.astype(np.uint8)


def non_radiographs() -> list[tuple[str, str, np.ndarray]]:
    """(kind, name, pixels) for every non-radiograph of the benchmark, in a fixed order."""
    import skimage.data

    out = []
    for kind, names in SKIMAGE.items():
        out += [(kind, name, _as_uint8(getattr(skimage.data, name)())) for name in names]
    for seed in NOISE_SEEDS:
        rng = np.random.default_rng(seed)
        out.append(("noise", f"uniform-{seed}", rng.integers(0, 256, (NOISE_SIZE, NOISE_SIZE), dtype=np.uint8)))
        gauss = rng.normal(128, 40, (NOISE_SIZE, NOISE_SIZE)).clip(0, 255)
        out.append(("noise", f"gaussian-{seed}", gauss.astype(np.uint8)))
    for level in (0, 128, 255):
        out.append(("blank", f"level-{level}", np.full((NOISE_SIZE, NOISE_SIZE), level, np.uint8)))
    return out


def radiographs(root: Path) -> list[Path]:
    """The test split's images of a COVIDx-layout root, as its test.txt lists them."""
    labels = root / "test.txt"
    if not labels.is_file():
        raise CxrError(f"{root}: no test.txt (a COVIDx-layout root is needed; see README 'Your data')")
    good, _ = parse_label_file(labels)
    paths = sorted(root / "test" / line.filename for line in good if (root / "test" / line.filename).is_file())
    if not paths:
        raise CxrError(f"{root}: test.txt lists no image that exists under {root / 'test'}")
    return paths


def run_ood_benchmark(model: Path, root: Path, *, engine: str = "auto", device: str = "cpu",
                      batch_size: int = 32) -> dict[str, Any]:  # fmt: skip
    from train.screen.api import Screener

    screener = Screener(model, device=device, engine=engine)
    gate = screener.ood_gate
    if gate is None:
        raise CxrError(f"{model} has no out-of-distribution gate (trained before it existed): retrain it "
                       "with `cxr train` / `dvc repro`")  # fmt: skip
    inside = screener.predict([str(p) for p in radiographs(root)], batch_size=batch_size)
    others = non_radiographs()
    outside = screener.predict([pixels for _, _, pixels in others], batch_size=batch_size)
    failed = [r for r in inside + outside if r.ood_score is None]
    if failed:  # an unreadable radiograph or a broken output: the measurement would be of fewer images
        raise CxrError(f"{len(failed)} image(s) were not scored, e.g. {failed[0].path}: {failed[0].error}")
    in_scores = np.array([r.ood_score for r in inside])
    out_scores = np.array([r.ood_score for r in outside])
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    scores = np.nan_to_num(np.r_[in_scores, out_scores], nan=np.inf)  # a NaN score is flagged: rank it last
    kinds: dict[str, dict[str, Any]] = {}
    for (kind, name, _), r in zip(others, outside):
        entry = kinds.setdefault(kind, {"n": 0, "flagged": 0, "names_passed": []})
        entry["n"] += 1
        entry["flagged"] += bool(r.out_of_distribution)
        if not r.out_of_distribution:
            entry["names_passed"].append(name)
    for entry in kinds.values():
        entry["flagged_share"] = entry["flagged"] / entry["n"]
    return {
        "model": screener.identity,
        "engine": screener.engine,
        "gate": gate,
        "radiographs": {"root": str(root), "n": len(inside),
                        "flagged_share": float(np.mean([bool(r.out_of_distribution) for r in inside])),
                        "ood_score_median": float(np.median(in_scores))},  # fmt: skip
        "non_radiographs": {"n": len(outside),
                            "flagged_share": float(np.mean([bool(r.out_of_distribution) for r in outside])),
                            "ood_score_median": float(np.median(out_scores)),
                            # what the model alone says of them: why the gate is there
                            "positive_share_without_gate": float(np.mean(
                                [r.probability >= screener.threshold for r in outside])),
                            "by_kind": kinds},  # fmt: skip
        "auroc": float(roc_auc_score(y, scores)),
    }
