"""Command `report`: experiments -> `reports/tables.md`, the study's Tables II-VII beside ours.

Runs come from `dvc exp show --json` (every experiment and commit that has
metrics) or from a directory holding one sub-directory per run with its
`eval.json` and/or `latency.json`. Every cell says where it came from: an
`E<n>` tag for one of our runs (listed with its name and commit under the
tables), `study Table N` for the study, `COVID-Net CXR-2 paper` for
Pavlova et al. A missing figure is shown as '—', never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import CxrError
from pipeline.fileio import atomic_write_text
from pipeline.names import MODEL_DISPLAY, MODEL_NAMES, VARIANTS
from train.report.validity import init_text, spread_section, validity_section
from train.report.experiments import Run, best_by_pair, get

TABLE_VARIANTS = tuple(reversed(VARIANTS))  # the study's tables put the equalized columns first
MISSING = "—"
PUBLISHED = Path(__file__).with_name("published_results.json")
AT_CHOICES = ("0.5", "operating")


def load_published(path: Path = PUBLISHED) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _fmt(value: Any, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _bold_best(cells: list[list[Any]], digits: int = 3) -> list[list[str]]:
    """Format a column-major block; the maximum of each column in bold (ties all bold)."""
    out = []
    for column in cells:
        shown = [_fmt(v, digits) for v in column]
        numbers = [float(s) for s in shown if s != MISSING]
        top = max(numbers) if numbers else None
        out.append([f"**{s}**" if s != MISSING and float(s) == top else s for s in shown])
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


class _Tags:
    """E1, E2, ... for our runs in order of first use."""

    def __init__(self):
        self.runs: list[Run] = []

    def __call__(self, run: Run | None) -> str:
        if run is None:
            return MISSING
        if run not in self.runs:
            self.runs.append(run)
        return f"E{self.runs.index(run) + 1}"


def _metric_table(number: str, block: str, title: str, pairs, published, tags: _Tags, prefix: str) -> str:
    study = published["study"]["tables"][number]["data"]
    header = ["Architecture", "Results"]
    for variant in TABLE_VARIANTS:
        label = "eq." if variant == "equalized" else "plain"
        header += [f"Precision ({label})", f"Recall ({label})", f"F1 ({label})", "from"]

    def ours(m: str, v: str, k: str) -> Any:
        run = pairs.get((m, v))
        return get(run.eval, f"{prefix}{block}.{k}") if run else None

    keys = ("precision", "recall", "f1")
    bold = _bold_best([[ours(m, v, k) for m in MODEL_NAMES] for v in TABLE_VARIANTS for k in keys])
    rows = []
    for i, m in enumerate(MODEL_NAMES):
        row_ours, row_study = [MODEL_DISPLAY[m], "ours"], ["", "study"]
        for j, v in enumerate(TABLE_VARIANTS):
            row_ours += [bold[3 * j + k][i] for k in range(3)] + [tags(pairs.get((m, v)))]
            ref = get(study, f"{m}.{v}") or {}
            row_study += [_fmt(ref.get(k)) for k in ("precision", "recall", "f1")] + [f"study Table {number}"]
        rows += [row_ours, row_study]
    return f"### Table {number}: {title}\n\n{_table(header, rows)}\n"


def _by_model(pairs: dict[tuple[str, str], Run], need: str) -> dict[str, Run]:
    """Per model, the best-validated run that has `need` ('eval' or 'latency') data."""
    out: dict[str, Run] = {}
    for (model, _), run in sorted(pairs.items(), key=lambda kv: -kv[1].val_f1):
        if model not in out and getattr(run, need):
            out[model] = run
    return out


def _latency_runs(runs: list[Run], pairs: dict[tuple[str, str], Run]) -> dict[str, Run]:
    """Per model, whose latency to show: the best-validated run with one, else any run with one
    (latency depends on the architecture only, not on the variant or the weights)."""
    out: dict[str, Run] = {}
    for run in runs:
        if run.latency and run.model and run.model not in out:
            out[run.model] = run
    return {**out, **_by_model(pairs, "latency")}


def _table_v(lat_runs: dict[str, Run], published: dict[str, Any], tags: _Tags) -> str:
    table_v = published["study"]["tables"]["V"]
    rows = []
    for m in MODEL_NAMES:
        lat = lat_runs[m].latency if m in lat_runs else {}
        fastest = lat.get("cpu_fastest_path")
        fastest_ms = _fmt(lat.get("cpu_fastest_ms_per_image"), 1) + (f" ({fastest})" if fastest else "")
        ms = [_fmt(lat.get(k), 1) for k in ("params_m", "cpu_ms_per_image")]
        rest = [_fmt(lat.get(k), 1) for k in ("floor_ms", "gpu_ms_per_image")]
        rows.append([MODEL_DISPLAY[m], "ours", *ms, fastest_ms, *rest, tags(lat_runs.get(m))])
        ref = table_v["data"].get(m, {})
        rows.append(["", "study", _fmt(ref.get("params_m"), 1), _fmt(ref.get("cpu_ms_per_image"), 1), MISSING, MISSING,
                     _fmt(ref.get("gpu_ms_per_image"), 1), "study Table V"])  # fmt: skip
    header = ["Architecture", "Results", "Params (M)", "CPU ms (eager)", "CPU ms (fastest path)", "fp32 floor ms",
              "GPU ms", "from"]  # fmt: skip
    hw = table_v["hardware"]
    return (
        "### Table V: complexity (parameters, inference time per image at batch 1)\n\n"
        + _table(header, rows)
        + f"\n\nStudy hardware: {hw['cpu']}, {hw['gpu']}. Ours: see the sources (CPU model, threads, torch version).\n"
    )


def _input_shown(run: Run, lat_run: Run | None) -> str:
    size = get(run.eval, "model.input_size")
    if size is None:
        return MISSING
    net = (lat_run.latency.get("network_input") if lat_run else None) or size
    return f"{size}×{size}" + (f" → {net}×{net}" if net != size else "")


def _tables_vi_vii(pairs, lat_runs: dict[str, Run], published: dict[str, Any], tags: _Tags, prefix: str) -> str:
    study, cn = published["study"]["tables"], published["covid_net_cxr2"]
    best = sorted(_by_model(pairs, "eval").items(), key=lambda kv: -kv[1].val_f1)[:3]
    rows6, rows7 = [], []
    for m, run in best:
        metric = [_fmt(get(run.eval, f"{prefix}{k}")) for k in ("positive.precision", "positive.recall", "accuracy")]
        rows6.append([MODEL_DISPLAY[m], "ours", run.variant, _input_shown(run, lat_runs.get(m)), *metric, tags(run)])
        lat = lat_runs[m].latency if m in lat_runs else {}
        rows7.append([MODEL_DISPLAY[m], "ours", _fmt(lat.get("params_m"), 1), _fmt(lat.get("gpu_ms_per_image"), 1),
                      _fmt(lat.get("cpu_ms_per_image"), 1), tags(lat_runs.get(m))])  # fmt: skip
    for m, ref in study["VI"]["data"].items():
        metric = [_fmt(ref[k]) for k in ("precision", "recall", "accuracy")]
        size = f"{ref['input']}×{ref['input']}"
        rows6.append([MODEL_DISPLAY[m], "study", ref["variant"], size, *metric, "study Table VI"])
    for m, ref in study["VII"]["data"].items():
        gpu = _fmt(ref["gpu_ms_per_image"], 1)
        rows7.append([MODEL_DISPLAY[m], "study", _fmt(ref["params_m"], 1), gpu, MISSING, "study Table VII"])
    metric = [_fmt(cn[k]) for k in ("precision_positive", "recall_positive", "accuracy")]
    size = f"{cn['input']}×{cn['input']}"
    rows6.append(["COVID-Net CXR-2", "published", MISSING, size, *metric, "COVID-Net CXR-2 paper"])
    gpu = _fmt(cn["gpu_ms_per_image_study_table_vii"], 1)
    where = "params: COVID-Net CXR-2 paper; GPU ms: study Table VII"
    rows7.append(["COVID-Net CXR-2", "published", _fmt(cn["params_m"], 1), gpu, MISSING, where])
    header6 = ["Architecture", "Results", "Variant", "Input", "Precision", "Recall", "Accuracy", "from"]
    header7 = ["Architecture", "Results", "Params (M)", "GPU ms", "CPU ms (eager)", "from"]
    return (
        "### Table VI: best models, positive class (ours: the 3 best by validation macro F1)\n\n"
        + _table(header6, rows6)
        + "\n\n### Table VII: best models, parameters and inference time\n\n"
        + _table(header7, rows7)
        + "\n"
    )


def _sources(tags: _Tags, published: dict[str, Any]) -> str:
    lines = ["## Sources\n"]
    for i, run in enumerate(tags.runs, start=1):
        ev, lat = run.eval, run.latency
        bits = [f"{run.model}/{run.variant}"]
        if ev:
            bits.append(f"init={init_text(get(ev, 'model.init'))}")
            bits.append(f"n_test={_or_missing(get(ev, 'n_test'))}")
            threshold = f"{_fmt(get(ev, 'threshold.value'))} ({_or_missing(get(ev, 'threshold.rule'))})"
            bits.append(f"operating threshold={threshold}")
        if lat:
            bits.append(f"latency on {lat.get('cpu_model', MISSING)}, {lat.get('cpu_threads', MISSING)} threads, "
                        f"torch {lat.get('torch_version', MISSING)}")  # fmt: skip
        lines.append(f"- **E{i}**: run {run.origin}: " + "; ".join(bits))
    lines.append(f"- **study Table N**: {published['study']['source']}.")
    lines.append(f"- **COVID-Net CXR-2 paper**: {published['covid_net_cxr2']['source']}.\n")
    return "\n".join(lines)


def _or_missing(value: Any) -> str:
    return MISSING if value is None else str(value)


def render(runs: list[Run], published: dict[str, Any], at: str = "0.5") -> str:
    if at not in AT_CHOICES:
        raise CxrError(f"--at must be one of {', '.join(AT_CHOICES)}, got {at!r}")
    prefix = "at_0_5." if at == "0.5" else ""
    rule = "0.5 (the study's decision rule)" if at == "0.5" else "the operating threshold chosen on validation"
    pairs = best_by_pair(runs)
    lat_runs = _latency_runs(runs, pairs)
    tags = _Tags()
    parts = [
        "# Results: our runs beside the study's tables\n",
        f"Generated by `cxr report` from {len(runs)} run(s). Bold: the best of OUR runs in a column. "
        f"Threshold-dependent metrics at {rule}. When several runs share a model and variant, the one with the "
        f"highest validation macro F1 is shown. '{MISSING}': no such run or figure.\n",
    ]
    for number, block, title in (
        ("II", "negative", "performance on the negative class"),
        ("III", "positive", "performance on the positive class (COVID-19)"),
        ("IV", "macro", "macro-averaged performance on the test set"),
    ):
        parts.append(_metric_table(number, block, title, pairs, published, tags, prefix))
    parts.append(_table_v(lat_runs, published, tags))
    parts.append(_tables_vi_vii(pairs, lat_runs, published, tags, prefix))
    shown = [pairs[k] for k in sorted(pairs, key=lambda k: (MODEL_NAMES.index(k[0]) if k[0] in MODEL_NAMES else 99, k))]
    parts += [text for text in (validity_section(shown, tags), spread_section(runs, tags)) if text]
    parts.append(_sources(tags, published))
    return "\n".join(parts)


def write_report(
    runs: list[Run], out: Path, published: dict[str, Any], at: str, skipped: Sequence[str] = ()
) -> str:
    if not runs:
        why = f" Skipped: {'; '.join(skipped[:3])}" if skipped else ""
        raise CxrError(
            "no runs with metrics found: run `dvc exp run` (or pass --runs DIR with eval.json/latency.json)." + why
        )
    text = render(runs, published, at)
    atomic_write_text(out, text)
    return text
