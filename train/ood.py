"""The out-of-distribution gate: is an image like the radiographs the model was trained on?

A screening output is no basis for a decision on an image unlike anything the network saw (a
photo, a document, noise): the network still answers, often confidently. The gate models the
network's penultimate features (the global-pooled vector the final linear layer reads) on the
training images: PCA down to `dim` components, then a Gaussian with Ledoit-Wolf shrinkage (a
full covariance from a few hundred images is singular). An image's score is its Mahalanobis
distance to that Gaussian, with one more term for how far it lies off the PCA subspace (its
residual's squared norm over the training images' mean one): an image whose features the
components cannot express at all, e.g. a blank one, would otherwise project near the mean and
pass. The threshold is the `quantile` of the validation images' scores, so
about that share of in-distribution images pass. Above it: `out_of_distribution`, still scored,
never decided.

The gate's numbers live in the checkpoint meta: `ood` (a small JSON-able summary: threshold,
quantile, dims, counts) and `ood_params` (tensors: center, components, precision, residual_scale), validated on
load. `GatedNet` computes (logit, ood_score) in one graph, so the ONNX export carries the gate as a
second output and ONNX Runtime scores it as fast as the logit.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import CxrError
from train.models import ScreeningNet, model_input

SUMMARY_KEY = "ood"
PARAMS_KEY = "ood_params"
OUTPUT_NAME = "ood_score"  # the ONNX graph's second output
METHOD = "mahalanobis(pca+ledoit_wolf) on penultimate features"
MAX_FEATURES = 1 << 16  # no torchvision head reads more; a crafted meta must not allocate more
MAX_DIM = 1024
OOD_TOLERANCE = 1e-3  # ONNX vs PyTorch, relative: float32 sums over thousands of features


class _Features(nn.Module):
    """`net`'s forward up to its final linear layer: (B, 1, H, W) in [0, 1] -> (B, F)."""

    def __init__(self, net: ScreeningNet, backbone: nn.Module):
        super().__init__()
        self.prepare = net.prepare  # a bound method: standardisation and upsampling stay net's own
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.prepare(x))


def split_at_head(net: ScreeningNet) -> tuple[nn.Module, nn.Module]:
    """(body, head): `body(x)` gives the penultimate features (B, F), `head(features)` the logits (B, 1).

    The body's backbone is a structural copy of `net`'s with the final linear layer replaced by
    Identity; it shares every parameter and buffer with `net`, so nothing is duplicated and `net`
    (which Grad-CAM keeps using) is left as it is.
    """
    head_path = net.spec.heads[0]  # the main classifier; InceptionV3's AuxLogits.fc runs in training only
    head = net.backbone.get_submodule(head_path)
    if not isinstance(head, nn.Linear):
        raise CxrError(f"{net.name}: {head_path} is not a linear layer; no penultimate features to gate on")
    shared = {id(t): t for t in [*net.backbone.parameters(), *net.backbone.buffers()]}
    backbone = copy.deepcopy(net.backbone, memo=shared)
    backbone.set_submodule(head_path, nn.Identity())
    return _Features(net, backbone).train(net.training), head


class GatedNet(nn.Module):
    """ScreeningNet + gate: forward(x) -> (logits (B,), ood_score (B,)), the graph `cxr export` writes."""

    def __init__(self, net: ScreeningNet, params: dict[str, torch.Tensor]):
        super().__init__()
        self.body, self.head = split_at_head(net)
        self.register_buffer("center", params["center"].float())
        self.register_buffer("components", params["components"].float())
        self.register_buffer("precision", params["precision"].float())
        self.register_buffer("residual_scale", params["residual_scale"].float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        score = mahalanobis(features, self.center, self.components, self.precision, self.residual_scale)
        return self.head(features).squeeze(-1), score


def mahalanobis(features: torch.Tensor, center: torch.Tensor, components: torch.Tensor, precision: torch.Tensor,
                residual_scale: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """sqrt(z' P z + |r|^2 * residual_scale): z the PCA coordinates, r what the components leave out."""
    d = features.float() - center
    z = d @ components.T
    r = d - z @ components
    squared = ((z @ precision) * z).sum(-1) + (r * r).sum(-1) * residual_scale
    # clamp: rounding can leave it a hair below 0 for an image at the centre
    return torch.sqrt(torch.clamp(squared, min=0.0))


def fit_gate(train_features: np.ndarray, val_features: np.ndarray, dim: int,
             quantile: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:  # fmt: skip
    """Fit on training features (N, F), set the threshold on validation features (M, F).

    Returns (summary, params) for the checkpoint meta's `ood` and `ood_params`.
    """
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    train_features = np.asarray(train_features, np.float64)
    val_features = np.asarray(val_features, np.float64)
    if train_features.ndim != 2 or len(train_features) < 3:
        raise CxrError(f"the out-of-distribution gate needs >= 3 training images, got {len(train_features)}")
    if len(val_features) < 1:
        raise CxrError("the out-of-distribution gate needs validation images to set its threshold")
    if not (np.isfinite(train_features).all() and np.isfinite(val_features).all()):
        raise CxrError("the network's features are not finite: no out-of-distribution gate can be fitted")
    # PCA cannot keep more components than images - 1 (the rest have zero variance) or features
    k = max(1, min(dim, len(train_features) - 1, train_features.shape[1]))
    pca = PCA(n_components=k, svd_solver="full").fit(train_features)
    z = pca.transform(train_features)
    lw = LedoitWolf().fit(z)
    # PCA rows are orthonormal, so subtracting the Gaussian's location in PCA space equals
    # subtracting location @ components in feature space: one centre vector suffices.
    center = pca.mean_ + lw.location_ @ pca.components_
    residual = train_features - pca.mean_ - z @ pca.components_
    mean_residual = float(np.mean(np.sum(residual**2, axis=1)))
    # one training image's residual weighs as one more unit-variance dimension; none left: no term
    scale = 1.0 / mean_residual if mean_residual > 1e-12 else 0.0
    params = {"center": torch.tensor(center, dtype=torch.float32),
              "components": torch.tensor(pca.components_, dtype=torch.float32),
              "precision": torch.tensor(lw.precision_, dtype=torch.float32),
              "residual_scale": torch.tensor(scale, dtype=torch.float32)}  # fmt: skip
    val_scores = score_features(val_features, params)
    # "higher": the threshold is a validation score, so at least `quantile` of validation passes
    threshold = float(np.quantile(val_scores, quantile, method="higher"))
    summary = {
        "method": METHOD,
        "threshold": threshold,
        "quantile": quantile,
        "dim": k,
        "features": int(train_features.shape[1]),
        "shrinkage": float(lw.shrinkage_),
        "n_train": int(len(train_features)),
        "n_val": int(len(val_features)),
        "val_pass_rate": float(np.mean(val_scores <= threshold)),
    }
    return summary, params


def score_features(features: np.ndarray, params: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.inference_mode():
        return mahalanobis(torch.as_tensor(np.asarray(features, np.float32)), params["center"], params["components"],
                           params["precision"], params["residual_scale"]).double().numpy()  # fmt: skip


def penultimate_features(net: ScreeningNet, batches: Iterable[torch.Tensor | np.ndarray],
                         device: torch.device) -> np.ndarray:  # fmt: skip
    """Features (N, F) of uint8 image batches ((B, H, W) or (B, 1, H, W)), in fp32, eval mode."""
    body, _ = split_at_head(net)
    body.eval()
    out = []
    with torch.inference_mode():
        for images in batches:
            out.append(body(model_input(images, device)).float().cpu().numpy())
    if not out:
        raise CxrError("no images to compute features on")
    return np.concatenate(out)


def fit_gate_on_shards(net: ScreeningNet, summary: Any, *, dim: int, quantile: float, batch_size: int,
                       num_workers: int, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:  # fmt: skip
    """`fit_gate` on the train split's features (un-augmented, every image once) and the val split's."""
    from train.data import eval_batches

    def split(name: str) -> np.ndarray:
        return penultimate_features(net, (b["image"] for b in eval_batches(summary, name, batch_size, num_workers)),
                                    device)  # fmt: skip

    return fit_gate(split("train"), split("val"), dim, quantile)


def validate_gate(meta: dict[str, Any], where: str) -> None:
    """Checkpoint/ONNX meta's gate checked before use: both keys or neither; summary bounds; tensors' shapes
    agree and are finite. A meta without the gate (older checkpoints) is valid: it has no gate."""
    summary, params = meta.get(SUMMARY_KEY), meta.get(PARAMS_KEY)

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CxrError(f"{where}: invalid out-of-distribution gate: {what}")

    if summary is None:
        need(params is None, f"'{PARAMS_KEY}' without '{SUMMARY_KEY}'")
        return
    need(isinstance(summary, dict), f"'{SUMMARY_KEY}' must be a mapping")
    threshold, dim, feats = summary.get("threshold"), summary.get("dim"), summary.get("features")
    need(isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and np.isfinite(threshold)
         and threshold >= 0, "threshold must be a finite number >= 0")  # fmt: skip
    need(isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= MAX_DIM, f"dim must be in [1, {MAX_DIM}]")
    need(isinstance(feats, int) and not isinstance(feats, bool) and dim <= feats <= MAX_FEATURES,
         f"features must be in [dim, {MAX_FEATURES}]")  # fmt: skip
    if params is None:  # an ONNX file: the gate's tensors are in its graph, checked against `dim` there
        return
    names = ("center", "components", "precision", "residual_scale")
    need(isinstance(params, dict) and all(isinstance(params.get(k), torch.Tensor) for k in names),
         f"'{PARAMS_KEY}' must hold tensors {', '.join(names)}")  # fmt: skip
    shapes = {k: tuple(params[k].shape) for k in names}
    need(shapes == {"center": (feats,), "components": (dim, feats), "precision": (dim, dim), "residual_scale": ()},
         f"tensor shapes {shapes} do not fit dim {dim} and features {feats}")  # fmt: skip
    need(all(params[k].is_floating_point() and bool(torch.isfinite(params[k]).all()) for k in shapes),
         "tensors must be finite floats")
    need(float(params["residual_scale"]) >= 0.0, "residual_scale must be >= 0")


def ood_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """ONNX's gate scores against PyTorch's: the gate's tolerance is relative (distances are >> 1), and
    loose next to the threshold's own sampling error; written so that NaN fails."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise CxrError(f"gate scores of shape {candidate.shape} compared with {reference.shape}")
    scaled = float((np.abs(candidate - reference) / np.maximum(1.0, np.abs(reference))).max()) if len(reference) else 0.0
    return {"max_scaled_diff": scaled, "tolerance": OOD_TOLERANCE, "ok": bool(scaled <= OOD_TOLERANCE)}


def verdicts(scores: np.ndarray, summary: dict[str, Any]) -> np.ndarray:
    """Over the threshold, or not a finite score at all: out of distribution."""
    scores = np.asarray(scores, np.float64)
    return ~(np.isfinite(scores) & (scores <= float(summary["threshold"])))


def describe(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The gate as a model card shows it (JSON-able), or None when the model has none."""
    return meta.get(SUMMARY_KEY)
