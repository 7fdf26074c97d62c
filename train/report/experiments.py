"""Where the report's runs come from: `dvc exp show --json`, or a directory of
saved metrics, one sub-directory per run; and which run stands for each
(model, variant) pair.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import CxrError


@dataclass(frozen=True)
class Run:
    label: str  # experiment name, branch, or directory name
    rev: str | None  # commit of the experiment, when known
    model: str | None
    variant: str | None
    eval: dict[str, Any]
    latency: dict[str, Any]
    directory: Path | None = None  # the run's folder, for runs read with --runs DIR
    external: dict[str, dict[str, Any]] = field(default_factory=dict)  # external set name -> its metrics

    @property
    def origin(self) -> str:
        return f"`{self.label}` (commit {self.rev[:7]})" if self.rev else f"`{self.label}`"

    @property
    def val_f1(self) -> float:
        value = get(self.eval, "val.macro.f1")
        return float("-inf") if value is None else value


def get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


EXTERNAL_DIR = "metrics/external/"


def _make_run(label: str, rev: str | None, ev: dict, lat: dict, params: dict, directory: Path | None = None,
              external: dict | None = None) -> Run:  # fmt: skip
    model = get(ev, "model.name") or lat.get("model") or params.get("model")
    variant = get(ev, "model.variant") or lat.get("variant") or params.get("variant")
    return Run(label, rev, model, variant, ev, lat, directory, external or {})


def _external_files(files: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """metrics/external/<name>.json entries of one exp-show revision -> {name: metrics}."""
    out = {}
    for path, entry in files.items():
        rel = path.replace("\\", "/")
        if rel.startswith(EXTERNAL_DIR) and rel.endswith(".json") and (entry or {}).get("data"):
            out[rel[len(EXTERNAL_DIR) : -len(".json")]] = entry["data"]
    return out


# A run's per-image predictions and weights: where `dvc.yaml` puts them in an
# experiment, and their names in a --runs DIR folder.
ARTIFACTS = {
    "predictions": ("metrics/predictions_test.csv", "predictions_test.csv"),
    "checkpoint": ("models/best.pt", "best.pt"),
}


def run_artifact(run: Run, kind: str, repo: Path) -> bytes:
    """The bytes of a run's predictions CSV or checkpoint.

    Experiments' outputs come from the DVC cache at the experiment's commit
    (`dvc.api`), the workspace's from disk, a --runs folder's from that folder.
    """
    in_repo, in_dir = ARTIFACTS[kind]
    if run.directory is not None or run.rev is None:
        path = run.directory / in_dir if run.directory is not None else repo / in_repo
        if not path.is_file():
            raise CxrError(f"run {run.label}: no {path}")
        return path.read_bytes()
    import dvc.api

    try:
        return dvc.api.read(in_repo, repo=str(repo), rev=run.rev, mode="rb")
    except Exception as exc:  # dvc raises several types for an output missing from the cache or the commit
        raise CxrError(f"run {run.label}: cannot read {in_repo} at commit {run.rev[:7]}: {exc}") from None


def runs_from_exp_show(data: list[dict], eval_name: str, latency_name: str) -> tuple[list[Run], list[str]]:
    """Runs in `dvc exp show --json` output (dvc 3.x): experiments first, then commits, then the workspace.

    Returns the runs and, for entries skipped, why (a failed experiment, or a
    metrics file DVC could not read: e.g. `cache: false` metrics under a
    git-ignored folder never reach the experiment commits). DVC drops lists
    and nulls from metrics there, hence intervals are {low, high} scalars.
    External metrics files (`metrics/external/<name>.json`) come along as `Run.external`.
    The workspace usually repeats the last experiment applied to it, so runs
    with identical metrics are kept once, under the first name seen.
    """
    found: list[tuple[int, str, str | None, dict]] = []
    for commit in data:
        rev = commit.get("rev")
        is_workspace = rev == "workspace"
        label = commit.get("name") or (rev or "")[:7]
        found.append((2 if is_workspace else 1, label, None if is_workspace else rev, commit))
        for exp in commit.get("experiments") or []:
            for exp_rev in exp.get("revs") or []:
                label = exp_rev.get("name") or exp.get("name") or exp_rev.get("rev", "")[:7]
                found.append((0, label, exp_rev.get("rev"), exp_rev))
    runs, skipped, seen = [], [], set()
    for _, label, rev, entry in sorted(found, key=lambda f: f[0]):
        if entry.get("error") or not entry.get("data"):
            skipped.append(f"{label}: {get(entry, 'error.msg') or 'no data'}")
            continue
        files = entry["data"].get("metrics") or {}
        ev = (files.get(eval_name) or {}).get("data")
        lat = (files.get(latency_name) or {}).get("data")
        if not ev and not lat:
            errors = [f"{name}: {get(files.get(name), 'error.msg')}" for name in (eval_name, latency_name)
                      if get(files.get(name), "error.msg")]  # fmt: skip
            skipped.append(f"{label}: " + ("; ".join(errors) or f"no {eval_name} or {latency_name}"))
            continue
        params = ((entry["data"].get("params") or {}).get("params.yaml") or {}).get("data") or {}
        signature = json.dumps([ev, lat], sort_keys=True)
        if signature in seen:
            continue
        seen.add(signature)
        runs.append(_make_run(label, rev, ev or {}, lat or {}, params or {}, external=_external_files(files)))
    return runs, skipped


def exp_show_json(repo: Path) -> list[dict]:
    try:
        proc = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise CxrError("dvc is not installed: pass --runs DIR or --exp-json FILE instead") from None
    if proc.returncode != 0:
        raise CxrError(f"`dvc exp show --json` failed in {repo}: {proc.stderr.strip()[:500]}")
    return json.loads(proc.stdout or "[]")


def runs_from_dir(directory: Path) -> list[Run]:
    """DIR/<run>/eval.json and/or DIR/<run>/latency.json (and DIR/<run>/external/<name>.json),
    one sub-directory per run."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CxrError(f"no run directory at {directory}")
    runs = []
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        files = {name: sub / f"{name}.json" for name in ("eval", "latency")}
        loaded = {k: json.loads(p.read_text()) for k, p in files.items() if p.is_file()}
        external = {p.stem: json.loads(p.read_text()) for p in sorted((sub / "external").glob("*.json"))}
        if loaded:
            runs.append(_make_run(sub.name, None, loaded.get("eval", {}), loaded.get("latency", {}), {}, sub, external))
    return runs


def best_by_pair(runs: list[Run]) -> dict[tuple[str, str], Run]:
    """One run per (model, variant): the highest VALIDATION macro F1 (never chosen on test)."""
    best: dict[tuple[str, str], Run] = {}
    for run in runs:
        if not run.eval or run.model is None or run.variant is None:
            continue
        key = (run.model, run.variant)
        if key not in best or run.val_f1 > best[key].val_f1:
            best[key] = run
    return best


def shown_runs(runs: list[Run]) -> list[Run]:
    """The runs the report's tables show: per (model, variant) the best by validation, sorted by model, variant."""
    return sorted(best_by_pair(runs).values(), key=lambda r: (r.model, r.variant))


def collect_runs(runs_dir: Path | None, exp_json: Path | None, eval_name: str, latency_name: str,
                 repo: Path) -> tuple[list[Run], list[str]]:  # fmt: skip
    """The runs `cxr report` compares, and the experiments skipped with why: from a folder of runs
    (--runs), a saved `dvc exp show --json` (--exp-json), or `dvc exp show` run in `repo`."""
    if runs_dir is not None and exp_json is not None:
        raise CxrError("pass either --runs or --exp-json, not both")
    if runs_dir is not None:
        return runs_from_dir(runs_dir), []
    data = json.loads(exp_json.read_text()) if exp_json is not None else exp_show_json(repo)
    return runs_from_exp_show(data, eval_name, latency_name)
