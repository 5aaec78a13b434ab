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
from ingest import CATALOG, read_pixels
from preprocess.fundus import prepare_fundus
from preprocess.oct import prepare_oct
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


class Preparer:
    """The Ray Data actor: read scans from the store, prepare, write their rows."""

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

    def _pixels(self, scan_id: str) -> np.ndarray:
        return read_pixels(self.dataset, scan_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = []
        items = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        fundus = [it for it in items if it["modality"] == "fundus"]
        # photographs of one size go through the kernels together
        by_shape: dict[tuple[int, ...], list[tuple[dict[str, Any], np.ndarray]]] = {}
        for it in fundus:
            try:
                px = self._pixels(it["scan_id"])
                by_shape.setdefault(px.shape, []).append((it, px))
            except Exception as exc:
                done.append(
                    self._finish(
                        it, {"gradable": False, "reason": f"unreadable_{type(exc).__name__}"}
                    )
                )
        for group in by_shape.values():
            images = torch.from_numpy(np.stack([px for _, px in group])).to(self.device)
            if images.dtype == torch.uint16:
                images = images.float() / 257.0
            out = prepare_fundus(images, self.recipe.fundus)
            prepared = out.images.cpu().numpy()
            for i, (it, _) in enumerate(group):
                self.arrays["fundus"][int(it["row"])] = prepared[i]
                done.append(
                    self._finish(
                        it,
                        {
                            "fov_cx": float(out.fov.cx[i]),
                            "fov_cy": float(out.fov.cy[i]),
                            "fov_radius": float(out.fov.radius[i]),
                            "fov_fraction": float(out.quality.fov_fraction[i]),
                            "sharpness": float(out.quality.sharpness[i]),
                            "illumination": float(out.quality.illumination[i]),
                            "unevenness": float(out.quality.unevenness[i]),
                            "gradable": out.reasons[i] is None,
                            "reason": out.reasons[i],
                        },
                    )
                )
        for it in items:
            if it["modality"] != "oct":
                continue
            try:
                px = self._pixels(it["scan_id"])
                spacing = tuple(float(s) for s in it["spacing_mm"])
                if px.ndim != 3 or len(spacing) != 3 or min(px.shape) < 2:
                    raise ValueError("not a volume")
                maxv = 65535.0 if px.dtype == np.uint16 else 255.0
                res = prepare_oct(
                    torch.from_numpy(px.astype(np.float32)).to(self.device),
                    spacing,
                    self.recipe.oct,
                    maxv,
                )
                self.arrays["oct"][int(it["row"])] = res.volume.cpu().numpy()
                done.append(
                    self._finish(
                        it,
                        {
                            "oct_signal": res.quality.signal,
                            "empty_share": res.quality.empty_share,
                            "saturated_share": res.quality.saturated_share,
                            "central_bscan": res.central_bscan,
                            "gradable": res.reason is None,
                            "reason": res.reason,
                        },
                    )
                )
            except Exception as exc:  # a bad scan is marked, never stops the run
                done.append(
                    self._finish(
                        it, {"gradable": False, "reason": f"unreadable_{type(exc).__name__}"}
                    )
                )
        return {
            "scan_id": np.array([d["scan_id"] for d in done]),
            "gradable": np.array([d["gradable"] for d in done]),
        }

    def _finish(self, item: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        record = {
            "scan_id": item["scan_id"],
            "modality": item["modality"],
            "row": int(item["row"]),
            **values,
        }
        # the scan's completion mark, written after its row
        write_text_atomic(self.results / f"{item['scan_id']}.json", json.dumps(record))
        return record


def _layout(dataset: Path, rid: str, recipe: Recipe, catalog: pd.DataFrame) -> dict[str, int]:
    """Assign rows (kept across runs; new scans appended) and size the arrays."""
    state = dataset / PREPARED / f"{rid}.state"
    (state / "results").mkdir(parents=True, exist_ok=True)
    (state / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1), encoding="utf-8")
    rows_file = state / "rows.json"
    rows: dict[str, int] = json.loads(rows_file.read_text()) if rows_file.exists() else {}
    counts = {
        m: sum(1 for r in rows if r in set(catalog.scan_id[catalog.modality == m]))
        for m in ("fundus", "oct")
    }
    for modality in ("fundus", "oct"):
        for scan_id in sorted(catalog.scan_id[catalog.modality == modality]):
            if scan_id not in rows:
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
            for batch in prepared.iter_batches(batch_size=None):
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
    keep = ["scan_id", "patient_id", "eye", "study_date", "study_uid", "linked_scan_ids"]
    labels = [
        c
        for c in catalog.columns
        if c
        not in {
            "modality",
            "sop_class_uid",
            "shape",
            "axes",
            "dtype",
            "spacing_mm",
            "manufacturer",
            "model",
            "acquisition_date",
            "transfer_syntax_uid",
            "lossy",
            "fov_fraction",
            "source_sha256",
        }
        and c not in keep
    ]
    merged = table.merge(catalog[keep + labels], on="scan_id", how="left")
    merged = merged.sort_values(["modality", "row"]).reset_index(drop=True)
    path = dataset / PREPARED / f"{rid}.parquet"
    with atomic_path(path) as tmp:
        merged.to_parquet(tmp, index=False)
    return path
