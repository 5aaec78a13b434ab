"""Model cards: what a registered version is for, what it was tested on, how well it does.

`write_model_card(name, version, tracking_uri, out_dir)` reads the version's run from the
tracking store (the same record `eyehub compare` reads: predictions, resolved config,
metrics with their intervals, the per-task evaluation reports `evaluation/<task>.json`) and
writes `<name>-v<version>.md` and `.html` into `out_dir`. It also logs both into the run
under `model_card/` and sets the version's description (which the MLflow UI shows as
Markdown): the whole card when it fits the registry's 5000 characters, else its summary
with where the full card is.

Sections (after Mitchell et al., "Model Cards for Model Reporting", 2019): intended use and
users; data (dataset digest, split sizes, label prevalence, sites and devices); tasks;
metrics with intervals; subgroup performance; calibration; operating points with
sensitivity and specificity; the quality gate (the recipe's gradability thresholds);
limitations (among them "trained on synthetic data" when every sample comes from the
synthetic generator's devices, or the run's tag `eyehub.synthetic` says so); the
preprocessing recipe; and, once promoted, the promotion record.

A card holds counts and figures only: no scan or patient pseudonym.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from eyehub.errors import NotFoundError
from inference.compare import (
    MAIN_METRIC,
    Alert,
    Block,
    Bullets,
    Cell,
    Code,
    Figures,
    Heading,
    Para,
    RunRecord,
    Table,
    client_for,
    evaluation_settings,
    interval,
    load_run,
    number,
    to_html,
    to_markdown,
)

log = logging.getLogger(__name__)

ARTIFACT_DIR = "model_card"
DESCRIPTION_LIMIT = 5000  # characters of a registered version's description (MLflow's column)
SYNTHETIC_TAG = "eyehub.synthetic"
INPUTS = {
    "fundus": "a colour fundus photograph",
    "oct": "an OCT volume",
    "fusion": "a colour fundus photograph and an OCT volume of the same eye and visit",
}
_METRIC_NAMES = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ece": "ECE (calibrated)",
    "ece_uncalibrated": "ECE (before calibration)",
    "brier": "Brier score",
    "qwk": "quadratic-weighted kappa",
    "accuracy": "accuracy",
    "referral_auroc": "referral AUROC",
    "mae": "MAE",
    "r2": "R²",
}


def write_model_card(
    name: str, version: str, tracking_uri: str, out_dir: Path
) -> tuple[Path, Path]:
    """Write the card of registered version `version` of `name` (see the module docstring);
    returns the Markdown and HTML paths."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise NotFoundError(
            f"no registered model {name!r} with version {version} in the tracking store"
        ) from None
    record = load_run(client, f"models:/{name}/{version}", "model")
    card = ModelCard(record, dict(mv.tags or {}), _reports(client, record))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-v{version}"
    md_path, html_path = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    from eyehub.storage import write_text_atomic

    full = card.blocks()
    write_text_atomic(md_path, to_markdown(full))
    write_text_atomic(
        html_path,
        to_html(card.title, card.blocks(figures=True), footer="eyehub model card"),
    )
    for path in (md_path, html_path):
        client.log_artifact(record.run_id, str(path), ARTIFACT_DIR)
    description = to_markdown(full)
    if len(description) > DESCRIPTION_LIMIT:
        description = to_markdown(card.summary_blocks(f"{ARTIFACT_DIR}/{stem}.md"))
    client.update_model_version(name, str(version), description=description[:DESCRIPTION_LIMIT])
    log.debug("model card of %s version %s: %s", name, version, md_path)
    return md_path, html_path


def _reports(client: Any, record: RunRecord) -> dict[str, dict[str, Any]]:
    """The run's per-task evaluation reports (`evaluation/<task>.json`), recomputed from
    its predictions where the run has none."""
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="eyehub-card-") as tmp:
        try:
            folder = Path(client.download_artifacts(record.run_id, "evaluation", tmp))
            for path in sorted(folder.glob("*.json")):
                data = json.loads(path.read_text(encoding="utf-8"))
                reports[str(data.get("task", path.stem))] = data
        except Exception:  # no evaluation folder: recomputed below
            log.debug("run %s has no evaluation reports", record.run_id)
    missing = [t for t in record.tasks.values() if t.name not in reports]
    if missing:
        from training.evaluate import evaluate_task

        settings = evaluation_settings(record.config, None)
        for task in missing:
            frame = record.test[record.test["task"] == task.name]
            reports[task.name] = evaluate_task(task, frame, settings).to_dict()
    return reports


def synthetic_reason(record: RunRecord) -> str | None:
    """Why the data is synthetic (None: nothing says it is)."""
    flag = record.tags.get(SYNTHETIC_TAG, "").strip().lower()
    if flag in ("true", "1", "yes"):
        return f"the run's tag {SYNTHETIC_TAG} says so"
    if flag in ("false", "0", "no"):
        return None
    from eyehub.synth.cohort import SITES

    generated = {(s.device.manufacturer, s.device.model) for s in SITES}
    frames = [f for f in (record.test, record.val) if f is not None and not f.empty]
    if not frames or not all({"manufacturer", "model"} <= set(f.columns) for f in frames):
        return None
    rows = pd.concat([f[["manufacturer", "model"]] for f in frames])
    devices = {(str(a).strip(), str(b).strip()) for a, b in rows.itertuples(index=False)}
    if devices and devices <= generated:
        return "every sample comes from a device of eyehub's synthetic cohort generator"
    return None


class ModelCard:
    """The card's content as document blocks."""

    def __init__(
        self,
        record: RunRecord,
        version_tags: Mapping[str, str],
        reports: Mapping[str, Mapping[str, Any]],
    ) -> None:
        self.record = record
        self.tags = dict(version_tags)
        self.reports = dict(reports)
        self.config = record.config
        self.tasks = list(record.tasks.values())
        primary = record.primary_task
        if primary in record.tasks:  # the primary task first
            self.tasks.sort(key=lambda t: t.name != primary)
        self.synthetic = synthetic_reason(record)
        evaluation = self.config.get("evaluation") or {}
        self.confidence = float(evaluation.get("ci", 0.95))
        self.conf = f"{round(100 * self.confidence)}%"

    @property
    def title(self) -> str:
        r = self.record
        return f"Model card: {r.model_name} version {r.model_version}"

    # -- pieces -----------------------------------------------------------------------

    def _metric(self, task: str, metric: str, tag: str = "") -> dict[str, float] | None:
        key = f"test/{task}/{metric}{tag}"
        m = self.record.metrics
        if key not in m:
            return None
        return {
            "estimate": m[key],
            "ci_low": m.get(f"{key}/ci_low", math.nan),
            "ci_high": m.get(f"{key}/ci_high", math.nan),
        }

    def _split(self, split: str, what: str) -> str:
        value = self.record.metrics.get(f"split/{split}/{what}")
        return "-" if value is None else str(round(value))

    def _inputs(self) -> str:
        model = self.config.get("model") or {}
        return INPUTS.get(str(model.get("input", "fundus")), "an ophthalmic image")

    def _devices(self) -> list[tuple[str, int, int]]:
        """(device, test samples, validation samples) of the primary task's rows."""
        counts: dict[str, list[int]] = {}
        primary = self.record.primary_task or (self.tasks[0].name if self.tasks else "")
        from training.evaluate import EvaluationSettings, subgroup_values

        settings = EvaluationSettings()  # its default `site`: "manufacturer model"
        for i, frame in enumerate((self.record.test, self.record.val)):
            if frame is None or frame.empty:
                continue
            rows = frame[frame["task"] == primary]
            sites = subgroup_values(rows, settings).get("site")
            if sites is None:
                continue
            for device, n in sites.value_counts().items():
                counts.setdefault(str(device), [0, 0])[i] += int(n)
        return sorted(((d, c[0], c[1]) for d, c in counts.items()), key=lambda x: -x[1])

    def _prevalence(self, frame: pd.DataFrame | None, task: Any) -> str:
        if frame is None or frame.empty:
            return "-"
        y = pd.to_numeric(frame.loc[frame["task"] == task.name, "label"], errors="coerce")
        y = y.dropna()
        if y.empty:
            return "no labels"
        if task.kind == "binary":
            return f"{int(y.sum())} of {len(y)} ({100 * y.mean():.1f}%)"
        if task.kind == "ordinal":
            counts = y.astype(int).value_counts().sort_index()
            text = ", ".join(f"{k}: {v}" for k, v in counts.items())
            if task.refer_from is not None:
                referable = int((y >= task.refer_from).sum())
                text += f" (referable {referable} of {len(y)}, {100 * referable / len(y):.1f}%)"
            return text
        return f"mean {y.mean():.3g}, SD {y.std():.3g} (n {len(y)})"

    def limitations(self) -> list[str]:
        out = []
        r = self.record
        if self.synthetic:
            out.append(
                "Trained and tested on synthetic data ("
                + self.synthetic
                + "): its figures describe the generator, not patients, and say nothing about "
                "clinical performance."
            )
        patients = r.metrics.get("split/test/patients")
        primary = r.primary_task
        main = self._main(primary) if primary else None
        if patients is not None:
            width = ""
            finite = main and math.isfinite(main["ci_low"]) and math.isfinite(main["ci_high"])
            if primary and main and finite:
                width = (
                    f"; the {self.conf} interval of the primary {self._main_name(primary)} spans "
                    f"{main['ci_high'] - main['ci_low']:.3f}"
                )
            out.append(
                f"The test set is {round(patients)} patients from the same dataset as training "
                f"(an internal, retrospective split){width}. It has not been validated "
                "externally or prospectively."
            )
        devices = [d for d, _, _ in self._devices()]
        if devices:
            out.append(
                "Seen only images from: "
                + "; ".join(devices)
                + ". Other devices, sites and populations are untested."
            )
        chance = []
        for task in self.tasks:
            metric = {"binary": "auroc", "ordinal": "referral_auroc"}.get(task.kind)
            iv = self._metric(task.name, metric) if metric else None
            if iv and math.isfinite(iv["ci_low"]) and iv["ci_low"] <= 0.5:
                chance.append(task.name)
        if chance:
            out.append(
                "No evidence of skill beyond chance for "
                + ", ".join(chance)
                + " (the AUROC interval includes 0.5): do not use those outputs."
            )
        small = sorted(
            {
                f"{s['group']} {s['value']}"
                for t in self.tasks
                for s in self.reports.get(t.name, {}).get("subgroups", [])
                if s.get("status") == "too_small" and t.name == primary
            }
        )
        if small:
            out.append(
                "Subgroups too small to measure for the primary task: " + ", ".join(small) + "."
            )
        warning = r.tags.get("eyehub.control_warning")
        if warning:
            out.append("Control warning from training: " + warning)
        out.append(
            "Calibration (temperature) and thresholds were fitted on the validation split of "
            "the same dataset; a new site or device needs them checked, and refitted if off."
        )
        out.append(
            "Scans failing the quality gate are reported ungradable, not scored; the model "
            "has not been tested on them."
        )
        return out

    def _main(self, task_name: str) -> dict[str, float] | None:
        task = self.record.tasks.get(task_name)
        if task is None:
            return None
        return self._metric(task_name, MAIN_METRIC[task.kind])

    def _main_name(self, task_name: str) -> str:
        task = self.record.tasks[task_name]
        return _METRIC_NAMES[MAIN_METRIC[task.kind]]

    def _operating_points(self) -> list[list[Cell]]:
        rows: list[list[Cell]] = []
        for task in self.tasks:
            frame = self.record.test[self.record.test["task"] == task.name]
            threshold = pd.to_numeric(frame.get("threshold"), errors="coerce").dropna()
            if task.kind == "binary":
                sens = self._metric(task.name, "sensitivity")
                spec = self._metric(task.name, "specificity")
                rows.append(
                    [
                        task.name,
                        "called positive",
                        (number(threshold.iloc[0]) if not threshold.empty else "-", "num"),
                        (interval(sens), "num"),
                        (interval(spec), "num"),
                    ]
                )
            elif task.kind == "ordinal" and task.refer_from is not None and not threshold.empty:
                sens_v, spec_v = _rates(frame, task.refer_from, float(threshold.iloc[0]))
                rows.append(
                    [
                        task.name,
                        f"referred (grade {task.refer_from} or above)",
                        (number(threshold.iloc[0]), "num"),
                        (f"{number(sens_v)} (point estimate)", "num"),
                        (f"{number(spec_v)} (point estimate)", "num"),
                    ]
                )
        return rows

    def _target(self) -> str:
        target = (self.config.get("evaluation") or {}).get("target_sensitivity")
        chosen = (
            f"on the validation split, to reach sensitivity {number(float(target), 2)}"
            if target is not None
            else "on the validation split"
        )
        return (
            f"Thresholds were chosen {chosen}; sensitivity and specificity are measured at "
            "them on test."
        )

    def _quality_gate(self) -> list[list[Cell]]:
        recipe = self.config.get("preprocess") or {}
        model_input = str((self.config.get("model") or {}).get("input", "fundus"))
        parts = {"fundus": ["fundus"], "oct": ["oct"], "fusion": ["fundus", "oct"]}.get(
            model_input, ["fundus"]
        )
        from preprocess.recipe import FundusRecipe, OctRecipe

        names = {
            "fundus": [k for k in FundusRecipe.model_fields if k.startswith(("min_", "max_"))],
            "oct": [k for k in OctRecipe.model_fields if k.startswith(("min_", "max_"))],
        }
        defaults = {"fundus": FundusRecipe(), "oct": OctRecipe()}
        rows: list[list[Cell]] = []
        for part in parts:
            given = recipe.get(part) or {}
            for key in names[part]:
                value = given.get(key, getattr(defaults[part], key))
                rows.append([part, key, (str(value), "num")])
        return rows

    def _figures(self) -> list[tuple[str, bytes]]:
        """The primary task's ROC and reliability diagrams (training's own plots)."""
        from training.evaluate import task_figures

        primary = self.record.primary_task
        task = self.record.tasks.get(primary or "")
        if task is None:
            return []
        frame = self.record.test[self.record.test["task"] == task.name]
        try:
            figures = task_figures(task, frame, settings=evaluation_settings(self.config, 0))
        except Exception as exc:  # a card without figures is still a card
            log.warning("no figures for the model card: %s", exc)
            return []
        wanted = ("roc.png", "referral_roc.png", "reliability.png", "scatter.png")
        return [
            (f"{task.name}: {k[:-4].replace('_', ' ')}", figures[k]) for k in wanted if k in figures
        ]

    # -- the card -------------------------------------------------------------------------

    def header(self) -> list[Block]:
        r = self.record
        aliases = ", ".join(f"@{a}" for a in r.aliases) or "none"
        blocks: list[Block] = [
            Heading(1, self.title),
            Para(
                f"Registered model {r.model_name}, version {r.model_version} (aliases: "
                f"{aliases}), from MLflow run {r.run_name} ({r.run_id}) in experiment "
                f"{r.experiment}; training config {self.config.get('name', '-')}"
                + (f": {self.config['description']}" if self.config.get("description") else "")
                + "."
            ),
        ]
        if self.synthetic:
            blocks.append(Alert("Trained and tested on synthetic data: not for clinical use."))
        return blocks

    def promotion(self) -> list[Block]:
        t = self.tags
        if "eyehub.promoted_at" not in t:
            return []
        items = [
            f"promoted to @{t.get('eyehub.promoted_to', 'champion')} at {t['eyehub.promoted_at']} "
            f"by {t.get('eyehub.promoted_by', '-')}"
            + (" (forced)" if t.get("eyehub.forced") == "true" else ""),
        ]
        if t.get("eyehub.promoted_from"):
            items.append(f"previous holder: version {t['eyehub.promoted_from']}")
        if t.get("eyehub.promotion_reason"):
            items.append(f"reason: {t['eyehub.promotion_reason']}")
        try:
            comparison = json.loads(t.get("eyehub.promotion_comparison", "{}"))
        except json.JSONDecodeError:
            comparison = {}
        if "difference" in comparison:
            items.append(
                f"comparison on {comparison['metric']}: difference "
                f"{comparison['difference']:+.3f} ({comparison['ci_low']:+.3f} to "
                f"{comparison['ci_high']:+.3f}) against version {comparison['champion_version']} "
                f"on {comparison['samples']['shared']} shared test samples; "
                f"{comparison['verdict']}"
            )
        elif comparison.get("verdict"):
            items.append(str(comparison["verdict"]))
        return [Heading(2, "Promotion"), Bullets(items)]

    def blocks(self, figures: bool = False) -> list[Block]:
        """The whole card."""
        r = self.record
        tasks = ", ".join(t.name for t in self.tasks)
        primary = r.primary_task or "-"
        blocks = self.header()
        blocks += [
            Heading(2, "Intended use and users"),
            Bullets(
                [
                    f"Use: decision support in eye screening. From {self._inputs()} of one eye it "
                    f"estimates calibrated probabilities (grades, values) for {tasks}; "
                    f"{primary} is the primary task, and its referral decision is the "
                    "probability at or above the threshold under Operating points.",
                    "Users: ophthalmologists, optometrists and trained graders, who read each "
                    "result with its heat map and the image; reviewers who compare and promote "
                    "models.",
                    "Not for: diagnosis without a clinician; images, devices or populations "
                    "unlike those under Data; scans the quality gate calls ungradable.",
                    "Status: a research model, not a medical device.",
                ]
            ),
            Heading(2, "Data"),
            Bullets(
                [
                    f"Dataset digest (SHA-256 of catalog.parquet): {r.dataset_digest or 'unknown'}",
                    "Synthetic: " + (f"yes, {self.synthetic}" if self.synthetic else "no"),
                    "Patients (samples) per split: "
                    + ", ".join(
                        f"{s} {self._split(s, 'patients')} ({self._split(s, 'samples')})"
                        for s in ("train", "val", "test")
                    )
                    + "; split by patient, ungradable scans left out: "
                    + ", ".join(
                        f"{s} {self._split(s, 'ungradable')}" for s in ("train", "val", "test")
                    ),
                ]
            ),
            Table(
                ["task", "test: label prevalence", "validation: label prevalence"],
                [
                    [t.name, self._prevalence(r.test, t), self._prevalence(r.val, t)]
                    for t in self.tasks
                ],
                caption="positives of yes/no tasks, grade counts, or the mean and SD of a value",
            ),
            Table(
                ["site / device (manufacturer model)", "test samples", "validation samples"],
                [[d, (str(a), "num"), (str(b), "num")] for d, a, b in self._devices()],
            ),
            Heading(2, "Tasks"),
            Table(
                ["task", "kind", "what it is", "output"],
                [
                    [
                        t.name + (" (primary)" if t.name == primary else ""),
                        t.kind,
                        _describe(t.name),
                        _output(t),
                    ]
                    for t in self.tasks
                ],
            ),
            Heading(2, f"Metrics on the test set ({self.conf} intervals)"),
            Table(
                ["task", "metric", "estimate (interval)", "samples (patients)"],
                self._metric_rows(),
                caption="intervals: percentile bootstrap over patients (a patient's eyes and "
                "visits drawn together)",
            ),
            Heading(2, "Subgroup performance"),
            Table(
                ["task", "group", "value", "samples (patients)", "metric", "estimate (interval)"],
                self._subgroup_rows(),
            ),
            Heading(2, "Calibration"),
            Para(
                "Each probability is temperature-scaled on the validation split; the expected "
                "calibration error (ECE, 10 equal-width bins) before and after, and the Brier "
                "score, on test:"
            ),
            Table(
                ["task", "ECE calibrated", "ECE before calibration", "Brier score"],
                [
                    [
                        t.name,
                        (interval(self._metric(t.name, "ece")), "num"),
                        (interval(self._metric(t.name, "ece_uncalibrated")), "num"),
                        (interval(self._metric(t.name, "brier")), "num"),
                    ]
                    for t in self.tasks
                    if t.kind == "binary"
                ],
            ),
        ]
        if figures:
            images = self._figures()
            if images:
                blocks.append(Figures(images))
        blocks += [
            Heading(2, "Operating points"),
            Para(self._target()),
            Table(
                ["task", "decision", "threshold", "sensitivity", "specificity"],
                self._operating_points(),
            ),
            Heading(2, "Quality gate"),
            Para(
                "A scan is gradable when every threshold of the model's preprocessing recipe "
                "holds (quality measured on the prepared image, 0-1 units); otherwise it is "
                "reported ungradable with its reason and not scored."
            ),
            Table(["image", "threshold", "value"], self._quality_gate()),
            Heading(2, "Limitations"),
            Bullets(self.limitations()),
            Heading(2, "Preprocessing recipe"),
            Para(
                f"Recipe id {r.recipe_id or '-'}: the model carries this recipe and scoring "
                "applies exactly it."
            ),
            Code(_yaml(self.config.get("preprocess") or {})),
        ]
        blocks += self.promotion()
        return blocks

    def _metric_rows(self) -> list[list[Cell]]:
        rows: list[list[Cell]] = []
        for t in self.tasks:
            n = self.record.metrics.get(f"test/{t.name}/n")
            p = self.record.metrics.get(f"test/{t.name}/n_patients")
            size = "-" if n is None else f"{round(n)} ({round(p) if p is not None else '-'})"
            names = {
                "binary": ("auroc", "auprc", "sensitivity", "specificity"),
                "ordinal": ("qwk", "accuracy", "referral_auroc"),
                "regression": ("mae", "r2"),
            }[t.kind]
            for metric in names:
                iv = self._metric(t.name, metric)
                if iv is None:
                    continue
                rows.append([t.name, _METRIC_NAMES[metric], (interval(iv), "num"), (size, "num")])
        return rows

    def _subgroup_rows(self) -> list[list[Cell]]:
        rows: list[list[Cell]] = []
        for t in self.tasks:
            metric = MAIN_METRIC[t.kind]
            for s in self.reports.get(t.name, {}).get("subgroups", []):
                size = (f"{s['n']} ({s['n_patients']})", "num")
                head: list[Cell] = [t.name, s["group"], s["value"], size, _METRIC_NAMES[metric]]
                if s.get("status") != "ok":
                    rows.append([*head, (s.get("reason") or "too small", "muted")])
                    continue
                found = s.get("metrics", {}).get(metric)
                why = s.get("skipped", {}).get(metric, "-")
                rows.append([*head, (interval(found), "num") if found else (why, "muted")])
        return rows

    def summary_blocks(self, full: str) -> list[Block]:
        """The card in short, for the registry's description (which holds 5000 characters)."""
        r = self.record
        primary = r.primary_task
        blocks = self.header()
        items = [
            f"Use: decision support in eye screening from {self._inputs()}; research model, "
            "not a medical device.",
            f"Data: dataset {str(r.dataset_digest or 'unknown')[:16]}, test "
            f"{self._split('test', 'patients')} patients ({self._split('test', 'samples')} "
            "samples)" + ("; synthetic" if self.synthetic else "") + ".",
        ]
        if primary and primary in r.tasks:
            task = r.tasks[primary]
            main = self._main(primary)
            items.append(
                f"Primary task {primary}: {self._main_name(primary)} {interval(main)}"
                + (
                    f"; sensitivity {interval(self._metric(primary, 'sensitivity'))}, "
                    f"specificity {interval(self._metric(primary, 'specificity'))} at the "
                    f"threshold; ECE {interval(self._metric(primary, 'ece'))}"
                    if task.kind == "binary"
                    else ""
                )
            )
        others = [
            f"{t.name} {_METRIC_NAMES[MAIN_METRIC[t.kind]]} "
            f"{number((self._main(t.name) or {}).get('estimate'))}"
            for t in self.tasks
            if t.name != primary
        ]
        if others:
            items.append("Other tasks: " + "; ".join(others) + ".")
        blocks += [Bullets(items), Heading(2, "Limitations"), Bullets(self.limitations())]
        blocks += self.promotion()
        blocks.append(
            Para(
                f"The full card (subgroups, calibration, operating points, quality gate, "
                f"recipe) is the run's artifact {full}, with an HTML version beside it."
            )
        )
        return blocks


def _rates(frame: pd.DataFrame, refer_from: int, threshold: float) -> tuple[float, float]:
    """Referral sensitivity and specificity of an ordinal task's rows."""
    y = pd.to_numeric(frame["label"], errors="coerce")
    p = pd.to_numeric(frame["calibrated"], errors="coerce")
    keep = y.notna() & p.notna()
    referable = y[keep] >= refer_from
    referred = p[keep] >= threshold
    sens = float(referred[referable].mean()) if referable.any() else math.nan
    spec = float((~referred[~referable]).mean()) if (~referable).any() else math.nan
    return sens, spec


def _describe(task: str) -> str:
    from eyehub.labels import label_spec

    try:
        spec = label_spec(task)
    except Exception:  # a task the registry no longer knows
        return "-"
    return spec.description + (f" ({spec.unit})" if spec.unit else "")


def _output(task: Any) -> str:
    if task.kind == "binary":
        return "calibrated probability, and a yes/no decision at the threshold"
    if task.kind == "ordinal":
        text = f"grade 0-{task.classes - 1} with each grade's probability"
        if task.refer_from is not None:
            text += f"; referral (grade {task.refer_from} or above) at the threshold"
        return text
    return "a value"


def _yaml(data: Mapping[str, Any] | Sequence[Any]) -> str:
    import yaml

    return str(yaml.safe_dump(data, sort_keys=False))
