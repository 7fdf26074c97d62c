"""The report's honest-numbers section: test and external sets side by side, with intervals.

One row per (run, data set): the in-distribution test split, then each external
set the `external` stage scored. Intervals are printed with their method:
`[a, b]` a cluster bootstrap over patients, `W[a, b]` a Wilson score interval
(image counts). Calibration is Brier/ECE after (before) Platt scaling. An
external set's per-source rows follow, since a site-specific failure hides in a
pooled number.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

from train.report.experiments import Run, get

MISSING = "—"


def _num(value: Any, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _ci(ci: Any, tag: str = "") -> str:
    if not isinstance(ci, dict) or ci.get("low") is None or ci.get("high") is None:
        return ""
    return f" {tag}[{ci['low']:.3f}, {ci['high']:.3f}]"


def _row(name: str, m: dict[str, Any], tag: str) -> list[str]:
    sens, spec = m.get("sensitivity") or {}, m.get("specificity") or {}
    adjusted = m.get("at_prevalence") or {}
    cal = m.get("calibration") or {}
    return [
        tag,
        name,
        f"{_num(m.get('n_test'), 0)} / {_num(get(m, 'intervals.n_patients'), 0)}",
        _num(m.get("roc_auc")) + _ci(m.get("roc_auc_ci95")),
        _num(sens.get("value")) + _ci(sens.get("ci95")) + _ci(sens.get("ci95_wilson"), "W"),
        _num(spec.get("value")) + _ci(spec.get("ci95")) + _ci(spec.get("ci95_wilson"), "W"),
        _num(get(adjusted, "ppv.value")) + _ci(get(adjusted, "ppv.ci95")),
        _num(get(adjusted, "npv.value")) + _ci(get(adjusted, "npv.ci95")),
        f"{_num(cal.get('brier'))} ({_num(cal.get('brier_uncalibrated'))})",
        f"{_num(cal.get('ece'))} ({_num(cal.get('ece_uncalibrated'))})",
    ]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def validity_section(runs: list[Run], tag: Callable[[Run], str]) -> str:
    """Markdown: every run with metrics, its test split and its external sets."""
    rows, by_source = [], []
    prevalence = None
    for run in runs:
        if not run.eval and not run.external:
            continue
        t = f"{tag(run)} {run.model}/{run.variant}"
        if run.eval:
            rows.append(_row("test (in-distribution)", run.eval, t))
            prevalence = prevalence or get(run.eval, "at_prevalence.prevalence")
        for name, m in sorted(run.external.items()):
            rows.append(_row(f"external: {name}", m, t))
            prevalence = prevalence or get(m, "at_prevalence.prevalence")
            for source, s in sorted((m.get("by_source") or {}).items()):
                by_source.append([t, name, source, _num(s.get("n"), 0), _num(s.get("accuracy")),
                                  _num(s.get("sensitivity")), _num(s.get("specificity"))])  # fmt: skip
    if not rows:
        return ""
    at = f"at prevalence {prevalence:g}" if prevalence is not None else "at evaluate.prevalence"
    header = ["run", "data", "images / patients", "ROC AUC", "sensitivity", "specificity", f"PPV {at}",
              f"NPV {at}", "Brier (uncal.)", "ECE (uncal.)"]  # fmt: skip
    text = (
        "### In-distribution and external validation, with intervals\n\n"
        "Operating threshold chosen on validation, probabilities calibrated on validation (Platt). "
        "`[a, b]`: 95% cluster bootstrap over patients; `W[a, b]`: 95% Wilson score interval on image counts "
        "(stays below 1 at a 100% estimate). ECE: 10 equal-width bins.\n\n" + _table(header, rows) + "\n"
    )
    if by_source:
        text += "\n#### External sets by source\n\n" + _table(
            ["run", "external set", "source", "images", "accuracy", "sensitivity", "specificity"], by_source
        ) + "\n"
    return text


SPREAD_METRICS = (
    ("test ROC AUC", "roc_auc"),
    ("test sensitivity", "sensitivity.value"),
    ("test specificity", "specificity.value"),
    ("test Brier", "calibration.brier"),
    ("test ECE", "calibration.ece"),
)


def _spread(values: list[float]) -> str:
    if not values:
        return MISSING
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def init_text(init: dict[str, Any] | None) -> str:
    """'scratch', 'imagenet (ResNet50_Weights.IMAGENET1K_V2)', 'checkpoint 1a2b3c4d5e6f, backbone frozen'."""
    if not init:
        return MISSING
    text = {"imagenet": f"imagenet ({init.get('weights')})",
            "checkpoint": f"checkpoint {str(init.get('sha256'))[:12]}"}.get(init.get("kind"), str(init.get("kind")))
    return text + (", backbone frozen" if init.get("freeze") == "backbone" else "")


def spread_section(runs: list[Run], tag: Callable[[Run], str]) -> str:
    """Mean ± sample SD over every run of a (model, variant, init), e.g. several seeds: the noise a reader
    should weigh a single number against. External sets get the same columns (ROC AUC, sensitivity).
    Runs from different starting weights (train.init) are never pooled; an eval.json without `model.init`
    comes from before train.init existed, when every run started from scratch."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        if run.eval and run.model and run.variant:
            start = init_text(get(run.eval, "model.init") or {"kind": "scratch"})
            groups.setdefault((run.model, run.variant, start), []).append(run)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return ""
    names = sorted({name for rs in groups.values() for r in rs for name in r.external})
    header = ["model/variant", "runs"] + [h for h, _ in SPREAD_METRICS]
    header += [f"{n}: {h}" for n in names for h in ("ROC AUC", "sensitivity")]
    rows = []
    for (model, variant, start), rs in sorted(groups.items()):
        name = f"{model}/{variant}" + ("" if start == "scratch" else f", init {start}")
        row = [name, ", ".join(tag(r) for r in rs)]
        for _, key in SPREAD_METRICS:
            row.append(_spread([v for r in rs if (v := get(r.eval, key)) is not None]))
        for n in names:
            for key in ("roc_auc", "sensitivity.value"):
                row.append(_spread([v for r in rs if (v := get(r.external.get(n), key)) is not None]))
        rows.append(row)
    return (
        "### Spread over runs (e.g. seeds)\n\nMean ± sample standard deviation over all runs of a model, "
        "variant and starting weights (train.init); each run also differs in whatever else its parameters "
        "changed.\n\n" + _table(header, rows) + "\n"
    )
