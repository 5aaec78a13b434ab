"""Drive preprocessing over a dataset with Ray Data (`map_batches` on an actor pool).

Each actor holds the recipe and a device (one GPU per actor when CUDA is there, CPU
otherwise) and runs the same kernels inference uses. Output, addressed by the recipe's
digest so recipes never overwrite each other:

- `prepared/<recipe_id>.zarr`: arrays `fundus` [N, 3, S, S] and `oct` [N, D, H, W], uint8,
  one chunk per scan; each row is written by exactly one actor;
- `prepared/<recipe_id>.parquet`: one row per scan (row, FOV, quality, gradable, reason,
  and the catalog's label columns);
- `prepared/<recipe_id>.state/`: the recipe, the row assignment, and one result file per
  finished scan (its completion mark: an interrupted run resumes from them).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr

from eyehub.compute import start_ray
from eyehub.errors import DatasetError, UsageError
from eyehub.storage import atomic_path, chunk_codec, write_text_atomic
from ingest.catalog import CATALOG, label_columns
from ingest.store import read_pixels
from preprocess.kernel import PreparedScan, prepare_scans
from preprocess.recipe import Recipe, recipe_id

log = logging.getLogger(__name__)

PREPARED = "prepared"


@dataclass
class PreprocessSummary:
    recipe_id: str
    scans: int = 0
    prepared: int = 0
    already_done: int = 0
    ungradable: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    zarr_path: Path | None = None
    parquet_path: Path | None = None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use auto or cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cuda or cpu (got {device!r})")
    return device


@dataclass
class _StoredScan:
    modality: str
    pixels: np.ndarray
    spacing_mm: tuple[float, ...] | None


class Preparer:
    """The Ray Data actor: read a batch of scans from the store, call the preparation
    kernel (`preprocess.kernel.prepare_scans`), write each scan's row and result file."""

    def __init__(self, dataset: str, rid: str, recipe: dict[str, Any], device: str) -> None:
        self.dataset = Path(dataset)
        self.recipe = Recipe.from_dict(recipe)
        self.device = torch.device(device)
        root = self.dataset / PREPARED / f"{rid}.zarr"
        self.arrays = {
            m: zarr.open_array(root / m, mode="r+")
            for m in ("fundus", "oct")
            if (root / m / "zarr.json").exists()
        }
        self.results = self.dataset / PREPARED / f"{rid}.state" / "results"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        readable: list[tuple[dict[str, Any], _StoredScan]] = []
        done: list[tuple[dict[str, Any], PreparedScan]] = []
        for it in items:
            try:
                pixels = read_pixels(self.dataset, it["scan_id"])
            except Exception:  # a damaged or removed array: marked, never stops the run
                done.append((it, PreparedScan(it["modality"], None, _UNREADABLE)))
                continue
            spacing = tuple(float(s) for s in it["spacing_mm"]) or None
            readable.append((it, _StoredScan(it["modality"], pixels, spacing)))
        prepared = prepare_scans([scan for _, scan in readable], self.recipe, self.device)
        done += [(it, res) for (it, _), res in zip(readable, prepared, strict=True)]
        for it, res in done:
            if res.tensor is not None:
                self.arrays[res.modality][int(it["row"])] = res.tensor
            self._finish(it, res.record)
        return {
            "scan_id": np.array([it["scan_id"] for it, _ in done]),
            "gradable": np.array([res.gradable for _, res in done]),
            "traceback": np.array([res.traceback or "" for _, res in done]),
        }

    def _finish(self, item: dict[str, Any], values: dict[str, Any]) -> None:
        record = {
            "scan_id": item["scan_id"],
            "modality": item["modality"],
            "row": int(item["row"]),
            **values,
        }
        # the scan's completion mark, written after its row
        write_text_atomic(self.results / f"{item['scan_id']}.json", json.dumps(record))


_UNREADABLE = {"gradable": False, "reason": "store_unreadable"}


def _layout(dataset: Path, rid: str, recipe: Recipe, catalog: pd.DataFrame) -> dict[str, int]:
    """Assign rows (kept across runs; new scans appended) and size the arrays."""
    state = dataset / PREPARED / f"{rid}.state"
    (state / "results").mkdir(parents=True, exist_ok=True)
    (state / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1), encoding="utf-8")
    rows_file = state / "rows.json"
    rows: dict[str, int] = json.loads(rows_file.read_text()) if rows_file.exists() else {}
    counts = {}
    for modality in ("fundus", "oct"):
        scan_ids = set(catalog.scan_id[catalog.modality == modality])
        taken = [rows[s] for s in scan_ids if s in rows]
        # new scans go after every row this modality has used (rows are never reused)
        counts[modality] = max(taken, default=-1) + 1
        for scan_id in sorted(scan_ids - rows.keys()):
            rows[scan_id] = counts[modality]
            counts[modality] += 1
    write_text_atomic(rows_file, json.dumps(rows))
    root = zarr.open_group(dataset / PREPARED / f"{rid}.zarr", mode="a", zarr_format=3)
    root.attrs.update({"eyehub": {"recipe_id": rid, "recipe": recipe.to_dict()}})
    f, o = recipe.fundus, recipe.oct
    shapes = {"fundus": (3, f.size, f.size), "oct": tuple(o.shape)}
    axes = {"fundus": ["n", "c", "y", "x"], "oct": ["n", "z", "y", "x"]}
    for modality, n in counts.items():
        if n == 0:
            continue
        shape = (n, *shapes[modality])
        if modality in root:
            arr = root[modality]
            if isinstance(arr, zarr.Array) and arr.shape[0] < n:
                arr.resize(shape)
        else:
            root.create_array(
                modality,
                shape=shape,
                dtype="uint8",
                chunks=(1, *shapes[modality]),
                compressors=[chunk_codec("uint8")],
                dimension_names=axes[modality],
                fill_value=0,
            )
    return rows


def prepare_if_needed(
    dataset: Path,
    recipe: Recipe,
    scan_ids: pd.Series,
    note: Callable[[str], None],
    device: str = "auto",
    workers: int = 2,
    ray_address: str | None = None,
    batch_size: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, bool]:
    """The prepared index of `recipe`, preparing the dataset first (saying so through
    `note`) when the index is missing or lacks any of `scan_ids`; and whether it did."""
    rid = recipe_id(recipe)
    index_path = dataset / PREPARED / f"{rid}.parquet"
    stale = not index_path.is_file()
    if not stale:
        prepared = pd.read_parquet(index_path, columns=["scan_id"])
        stale = not set(scan_ids) <= set(prepared.scan_id)
    if stale:
        note(f"preparing the dataset with recipe {rid} ({recipe.name}) first")
        run_preprocess(
            dataset, recipe, device, workers, ray_address, batch_size, on_progress=on_progress
        )
    return pd.read_parquet(index_path), stale


def run_preprocess(
    dataset: Path,
    recipe: Recipe,
    device: str = "auto",
    workers: int = 2,
    ray_address: str | None = None,
    batch_size: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> PreprocessSummary:
    """Prepare every scan of `dataset` with `recipe`; see the module docstring."""
    start = time.perf_counter()
    catalog_path = dataset / CATALOG
    if not catalog_path.is_file():
        raise DatasetError(f"{dataset} has no {CATALOG}: run `eyehub ingest` first")
    device = resolve_device(device)
    catalog = pd.read_parquet(catalog_path)
    label_columns(catalog)  # a column the label registry does not know: refused up front
    rid = recipe_id(recipe)
    summary = PreprocessSummary(recipe_id=rid, scans=len(catalog), device=device)
    rows = _layout(dataset, rid, recipe, catalog)
    results_dir = dataset / PREPARED / f"{rid}.state" / "results"
    done = {p.stem for p in results_dir.glob("*.json")}
    todo = catalog[~catalog.scan_id.isin(done)]
    summary.already_done = len(catalog) - len(todo)
    if on_progress:
        on_progress(summary.already_done, len(catalog))
    if len(todo):
        import ray

        started = start_ray(workers, ray_address)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            items = [
                {
                    "scan_id": r.scan_id,
                    "modality": r.modality,
                    "row": rows[r.scan_id],
                    "spacing_mm": [
                        float(s) for s in (r.spacing_mm if r.spacing_mm is not None else [])
                    ],
                }
                for r in todo.itertuples()
            ]
            gpu = 1 if device == "cuda" else 0
            ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
            prepared = ds.map_batches(
                Preparer,
                fn_constructor_kwargs={
                    "dataset": str(dataset),
                    "rid": rid,
                    "recipe": recipe.to_dict(),
                    "device": device,
                },
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_gpus=gpu,
                num_cpus=1,
            )
            n = summary.already_done
            for batch in prepared.iter_batches(batch_size=None, prefetch_batches=0):
                for scan_id, tb in zip(batch["scan_id"], batch["traceback"], strict=True):
                    if tb:
                        log.error("internal error preparing scan %s:\n%s", scan_id, tb)
                summary.prepared += len(batch["scan_id"])
                n += len(batch["scan_id"])
                if on_progress:
                    on_progress(n, len(catalog))
        finally:
            if started:
                ray.shutdown()
    summary.parquet_path = _write_index(dataset, rid, catalog)
    summary.zarr_path = dataset / PREPARED / f"{rid}.zarr"
    index = pd.read_parquet(summary.parquet_path)
    reasons = index.loc[~index.gradable, "reason"].fillna("unknown")
    summary.ungradable = {str(k): int(v) for k, v in reasons.value_counts().items()}
    summary.seconds = time.perf_counter() - start
    return summary


def _write_index(dataset: Path, rid: str, catalog: pd.DataFrame) -> Path:
    results = [
        json.loads(p.read_text(encoding="utf-8"))
        for p in sorted((dataset / PREPARED / f"{rid}.state" / "results").glob("*.json"))
    ]
    table = pd.DataFrame.from_records(results)
    table = table[table.scan_id.isin(catalog.scan_id)]  # scans since removed from the catalog
    keep = ["scan_id", "patient_id", "eye", "study_date", "study_uid", "linked_scan_ids"]
    merged = table.merge(catalog[keep + label_columns(catalog)], on="scan_id", how="left")
    merged = merged.sort_values(["modality", "row"]).reset_index(drop=True)
    path = dataset / PREPARED / f"{rid}.parquet"
    with atomic_path(path) as tmp:
        merged.to_parquet(tmp, index=False)
    return path
