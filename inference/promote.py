"""`eyehub promote`: move an alias (`champion`) to a registered version, behind a guard.

The guard compares the version with the alias's current holder on the metric that guards
the model: `test/<primary task>/<main metric>` (AUROC for a yes/no task, QWK for a grade,
MAE for a number; the primary task is the version's tag `eyehub.primary_task`, from the
training config), or the one `--metric` names. Both versions' runs are read as
`eyehub compare` reads them and the metric is measured on the test samples both were
tested on, with the paired patient bootstrap of `training.evaluate.compare_models`.

It refuses (`PromotionRefusedError`, exit status 4), changing nothing, when

- the two were not tested on the same samples: the dataset digests differ, or the test
  sample sets do (a comparison on other samples says nothing about which model is better);
- the version is *worse by more than the margin*: its measured difference from the
  champion (version minus champion, sign turned for metrics where lower is better) is below
  `-margin`. The point estimate decides, on the shared samples, and the paired interval and
  p-value are reported and recorded beside it: an interval wholly below `-margin` is always
  a refusal, and a version whose interval reaches below `-margin` but whose estimate does
  not is promoted with the note that non-inferiority is not shown at this test size.

`--force` overrides either refusal and needs a `--reason`. A promotion records on the
version who (`eyehub.promoted_by`), when (`eyehub.promoted_at`, UTC), why
(`eyehub.promotion_reason`), whether it was forced (`eyehub.forced`), the previous holder
(`eyehub.promoted_from`) and the comparison (`eyehub.promotion_comparison`, JSON), and moves
the previous holder of `champion` to alias `previous` (of another alias A: `A-previous`),
so it stays reachable. With no champion yet, the first promotion needs no comparison.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eyehub.errors import (
    DatasetError,
    NotFoundError,
    PromotionRefusedError,
    UsageError,
)
from inference.compare import (
    MAIN_METRIC,
    RunRecord,
    client_for,
    evaluation_settings,
    higher_is_better,
    jsonable,
    load_run,
    p_text,
    shared_samples,
)

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
DEFAULT_MARGIN = 0.01
RESERVED_ALIASES = ("previous", "candidate")

TAG_BY = "eyehub.promoted_by"
TAG_AT = "eyehub.promoted_at"
TAG_REASON = "eyehub.promotion_reason"
TAG_COMPARISON = "eyehub.promotion_comparison"
TAG_FORCED = "eyehub.forced"
TAG_FROM = "eyehub.promoted_from"
TAG_ALIAS = "eyehub.promoted_to"


@dataclass
class Promotion:
    """What a promotion did."""

    name: str
    version: str
    alias: str
    previous: str | None  # the version that held the alias before (None: first promotion)
    previous_alias: str | None  # where that version is kept
    forced: bool
    reason: str
    user: str
    at: str
    comparison: dict[str, Any] | None
    changed: bool = True  # False: the version already held the alias
    card: tuple[Path, Path] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        if not self.changed:
            return f"{self.name} version {self.version} already is @{self.alias}; nothing changed"
        if self.previous is None:
            return (
                f"promoted {self.name} version {self.version} to @{self.alias} "
                f"(the first: there was no @{self.alias} to compare with)"
            )
        how = "forced: " + self.reason if self.forced else "the guard passed"
        return (
            f"promoted {self.name} version {self.version} to @{self.alias} ({how}); "
            f"version {self.previous} is now @{self.previous_alias}"
        )


def parse_metric(text: str) -> tuple[str, str]:
    """`test/<task>/<metric>` (or `<task>/<metric>`) as (task, metric)."""
    parts = text.strip().split("/")
    if parts and parts[0] == "test":
        parts = parts[1:]
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"--metric must look like test/<task>/<metric> (got {text!r})")
    return parts[0], parts[1]


def previous_alias(alias: str) -> str:
    """Where the alias's previous holder is kept."""
    return PREVIOUS if alias == CHAMPION else f"{alias}-{PREVIOUS}"


def guard_metric(record: RunRecord, metric: str | None) -> tuple[str, str]:
    """The (task, metric) that guards the promotion of `record`'s version."""
    if metric is not None:
        task, name = parse_metric(metric)
    else:
        task = record.primary_task or ""
        if not task:
            raise DatasetError(
                f"{record.reference} has no primary task (tag eyehub.primary_task); name the "
                "metric with --metric test/<task>/<metric>"
            )
        if task not in record.tasks:
            raise DatasetError(f"{record.reference}: its primary task {task!r} has no predictions")
        name = MAIN_METRIC[record.tasks[task].kind]
    if task not in record.tasks:
        raise UsageError(
            f"{record.reference} has no task {task!r} (it has {', '.join(record.tasks)})"
        )
    return task, name


def compare_versions(
    candidate: RunRecord,
    champion: RunRecord,
    task: str,
    metric: str,
    margin: float,
    bootstrap: int | None = None,
) -> dict[str, Any]:
    """The guard's comparison: `metric` of the candidate minus the champion's on the test
    samples of `task` they share, with the paired bootstrap, and the guard's verdict."""
    from training.evaluate import compare_models

    if task not in champion.tasks:
        raise DatasetError(f"the champion ({champion.reference}) has no task {task!r}")
    spec = candidate.tasks[task]
    frames = {
        "candidate": candidate.test[candidate.test["task"] == task],
        "champion": champion.test[champion.test["task"] == task],
    }
    shared = shared_samples(task, frames)
    same_dataset = (
        candidate.dataset_digest is not None and candidate.dataset_digest == champion.dataset_digest
    )
    up = higher_is_better(metric)
    out: dict[str, Any] = {
        "metric": f"test/{task}/{metric}",
        "task": task,
        "higher_is_better": up,
        "candidate_version": candidate.model_version,
        "champion_version": champion.model_version,
        "candidate_run": candidate.run_id,
        "champion_run": champion.run_id,
        "same_dataset": same_dataset,
        "samples": shared.to_dict(),
        "margin": margin,
    }
    out["same_samples"] = same_dataset and out["samples"]["same"]
    if shared.shared == 0:
        return {**out, "verdict": "no shared samples", "worse_by_more_than_margin": None}
    settings = evaluation_settings(candidate.config, bootstrap)
    try:
        diff = compare_models(
            spec, shared.frames["candidate"], shared.frames["champion"], metric, settings
        )
    except DatasetError as exc:
        raise DatasetError(
            f"test/{task}/{metric} cannot compare the two versions on their shared samples: {exc}"
        ) from None
    iv = diff.difference
    sign = 1.0 if up else -1.0  # > 0: the candidate is better
    gain, low, high = sign * iv.estimate, sign * iv.ci_low, sign * iv.ci_high
    if not up:
        low, high = high, low
    worse = gain < -margin or (math.isfinite(high) and high < -margin)
    shown = math.isfinite(low) and low >= -margin
    if worse:
        verdict = "worse by more than the margin"
    elif shown:
        verdict = "not worse by more than the margin (shown: the interval's bound is within it)"
    else:
        verdict = (
            "not worse by more than the margin by its estimate; non-inferiority not shown "
            "at this test size (the interval reaches below -margin)"
        )
    return {
        **out,
        "test": f"paired bootstrap over patients, {iv.resamples} resamples",
        "candidate": diff.a,
        "champion": diff.b,
        "difference": iv.estimate,
        "ci_low": iv.ci_low,
        "ci_high": iv.ci_high,
        "confidence": iv.confidence,
        "valid_resamples": iv.valid,
        "p_value": diff.p_value,
        "worse_by_more_than_margin": worse,
        "non_inferiority_shown": shown,
        "verdict": verdict,
    }


def comparison_text(c: dict[str, Any]) -> str:
    """The comparison in one line: the figures, the interval, p and the samples."""
    samples = c["samples"]
    where = f"on {samples['shared']} shared test samples ({samples['shared_patients']} patients)"
    if "difference" not in c:
        return f"{c['metric']}: no comparison ({c['verdict']}) {where}"
    conf = round(100 * c["confidence"])
    lower = "" if c["higher_is_better"] else ", lower is better"
    return (
        f"{c['metric']}: version {c['candidate_version']} {c['candidate']:.3f} vs champion "
        f"version {c['champion_version']} {c['champion']:.3f}, difference {c['difference']:+.3f} "
        f"({conf}% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, p {p_text(c)}, "
        f"{c['test']}{lower}) {where}"
    )


def promote(
    name: str,
    version: str,
    tracking_uri: str,
    *,
    alias: str = CHAMPION,
    metric: str | None = None,
    margin: float = DEFAULT_MARGIN,
    force: bool = False,
    reason: str | None = None,
    bootstrap: int | None = None,
    card_dir: Path | None = None,
    user: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Promotion:
    """Move `alias` to `version` of registered model `name` through the guard (see the
    module docstring); write the version's model card when `card_dir` is given."""
    from mlflow.exceptions import MlflowException

    note = on_note or (lambda text: log.info("%s", text))
    reason = (reason or "").strip()
    if force and not reason:
        raise UsageError("--force needs --reason TEXT: a forced promotion records why")
    if not math.isfinite(margin) or margin < 0:
        raise UsageError(f"--margin must be zero or positive (got {margin})")
    if alias in RESERVED_ALIASES or alias.endswith(f"-{PREVIOUS}"):
        raise UsageError(f"@{alias} is kept by eyehub itself; promote to another alias")
    version = str(version).strip()
    client = client_for(tracking_uri)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise NotFoundError(
            f"no registered model {name!r} with version {version} in the tracking store"
        ) from None
    current = _holder(client, name, alias)
    who = user or _user()
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if current == version:
        return Promotion(name, version, alias, current, None, False, reason, who, at, None, False)
    candidate = load_run(client, f"models:/{name}/{version}", "candidate")
    comparison: dict[str, Any] | None = None
    refusal: str | None = None
    if current is not None:
        champion = load_run(client, f"models:/{name}/{current}", "champion")
        task, metric_name = guard_metric(candidate, metric)
        note(f"comparing version {version} with @{alias} (version {current}) on {task}")
        comparison = compare_versions(candidate, champion, task, metric_name, margin, bootstrap)
        refusal = _refusal(comparison, version, current, alias)
        if refusal is not None and not force:
            raise PromotionRefusedError(
                f"refused: {refusal}. {comparison_text(comparison)}. Compare them with "
                f"`eyehub compare models:/{name}/{current} models:/{name}/{version}`; to "
                "promote anyway, add --force --reason TEXT",
                comparison,
            )
    forced = force and refusal is not None
    record = {
        TAG_BY: who,
        TAG_AT: at,
        TAG_REASON: reason,
        TAG_FORCED: "true" if forced else "false",
        TAG_FROM: current or "",
        TAG_ALIAS: alias,
        TAG_COMPARISON: json.dumps(
            jsonable(
                comparison
                if comparison is not None
                else {"first": True, "verdict": f"no @{alias} before: nothing to compare with"}
            )
            | ({"overridden": refusal} if forced else {}),
            separators=(",", ":"),
        ),
    }
    kept = previous_alias(alias) if current is not None else None
    if current is not None and kept is not None:
        client.set_registered_model_alias(name, kept, current)
    client.set_registered_model_alias(name, alias, version)
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value[:5000])
    result = Promotion(
        name, version, alias, current, kept, forced, reason, who, at, comparison, True
    )
    if forced:
        result.notes.append(f"overridden: {refusal}")
    if comparison is not None and not comparison.get("non_inferiority_shown", True):
        result.notes.append(
            "non-inferiority is not shown at this test size: the interval reaches below "
            f"-{margin:g}"
        )
    log.debug(
        "%s version %s promoted to @%s by %s%s",
        name,
        version,
        alias,
        who,
        " (forced)" if forced else "",
    )
    if card_dir is not None:
        from inference.card import write_model_card

        result.card = write_model_card(name, version, tracking_uri, card_dir)
    return result


def _refusal(comparison: dict[str, Any], version: str, current: str, alias: str) -> str | None:
    """Why the guard refuses (None: it does not)."""
    samples = comparison["samples"]
    if not comparison["same_dataset"]:
        return (
            f"version {version} and @{alias} (version {current}) were tested on different "
            "datasets (their dataset digests differ)"
        )
    if not samples["same"]:
        only = ", ".join(f"{n} only in the {k}" for k, n in samples["only"].items())
        return (
            f"version {version} and @{alias} (version {current}) were not tested on the same "
            f"samples ({only})"
        )
    if comparison.get("worse_by_more_than_margin"):
        return (
            f"version {version} is worse than @{alias} (version {current}) on "
            f"{comparison['metric']} by more than the margin {comparison['margin']:g}"
        )
    return None


def _holder(client: Any, name: str, alias: str) -> str | None:
    """The version `alias` points at (None when it points nowhere)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (some containers)
        return "unknown"
