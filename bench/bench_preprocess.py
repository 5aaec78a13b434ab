"""Benchmark fundus and OCT preparation (not pass/fail).

Fundus 2048 x 1536 -> 512 with FOV crop, mask and Graham normalisation, images/s:
eyehub's batched torch kernels against a straightforward per-image OpenCV implementation
of the same steps, both on the same cores. OCT volumes/s for the default recipe.
Target (preprocess issue): >= 1x OpenCV on 2 CPU cores. Also the time of a rerun with
nothing left to do at 5k and 20k scans (the bookkeeping must grow linearly).

    .venv/bin/python bench/bench_preprocess.py [--images 64] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from eyehub.synth.fundus import render_fundus
from eyehub.synth.oct import OctGeometry, render_oct
from eyehub.synth.phenotype import make_patient
from preprocess import FundusRecipe, OctRecipe, Recipe, prepare_fundus, prepare_oct, recipe_id

SIZE = 512


def opencv_prepare(image: np.ndarray) -> np.ndarray:
    """The same steps, per image, the way one would write them with OpenCV."""
    h, w = image.shape[:2]
    f = max(1, round(max(h, w) / 256))
    small = cv2.resize(image.max(axis=2), (w // f, h // f), interpolation=cv2.INTER_AREA)
    thresh = max(6.0, 0.15 * float(np.percentile(small, 99)))
    mask = (small > thresh).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    (cx, cy), r = cv2.minEnclosingCircle(max(contours, key=cv2.contourArea))
    cx, cy, r = cx * f, cy * f, r * f
    x0, y0, side = round(cx - r), round(cy - r), round(2 * r)
    pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    crop = padded[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
    out = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    circle = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(circle, (SIZE // 2, SIZE // 2), SIZE // 2 - 1, 1, -1)
    blur = cv2.GaussianBlur(out, (0, 0), SIZE / 30)
    out = cv2.addWeighted(out, 4, blur, -4, 128)
    return out * circle[..., None]


def _images(n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        p = make_patient(9, i, 2)
        ev = p.visits[0][1][i % 2]
        img, _ = render_fundus(
            ev.signs,
            ev.eye,
            p.identity_seed,
            p.pigmentation,
            1536,
            2048,
            0.55,
            np.random.default_rng(i),
        )
        out.append(img)
    return out


def rerun_seconds(rows: int, work: Path) -> tuple[float, float]:
    """A rerun over a dataset of `rows` scans that are all prepared already: (seconds of
    the whole `run_preprocess`, seconds of its row layout). No scan is read; this is the
    bookkeeping a rerun costs, which must grow linearly with the catalog."""
    from ingest.catalog import CATALOG_SCHEMA
    from preprocess.run import PREPARED, _layout, run_preprocess

    dataset = work / f"rerun-{rows}"
    recipe = Recipe(fundus=FundusRecipe(size=64), oct=OctRecipe(shape=(4, 32, 32)))
    rid = recipe_id(recipe)
    ids = [f"S{i:08d}" for i in range(rows)]
    modality = ["fundus" if i % 2 == 0 else "oct" for i in range(rows)]
    table = pa.Table.from_pydict(
        {
            f.name: {"scan_id": ids, "modality": modality, "patient_id": ids}.get(
                f.name, [None] * rows
            )
            for f in CATALOG_SCHEMA
        },
        schema=CATALOG_SCHEMA,
    )
    dataset.mkdir(parents=True)
    pq.write_table(table, dataset / "catalog.parquet")
    catalog = table.to_pandas()
    _layout(dataset, rid, recipe, catalog)  # the first run's layout
    results = dataset / PREPARED / f"{rid}.state" / "results"
    rows_map = json.loads((dataset / PREPARED / f"{rid}.state" / "rows.json").read_text())
    for scan_id, m in zip(ids, modality, strict=True):
        record = {"scan_id": scan_id, "modality": m, "row": rows_map[scan_id]}
        record.update(gradable=True, reason=None)
        (results / f"{scan_id}.json").write_text(json.dumps(record))
    t = time.perf_counter()
    _layout(dataset, rid, recipe, catalog)
    layout_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = run_preprocess(dataset, recipe, device="cpu")
    total_s = time.perf_counter() - t
    assert summary.prepared == 0 and summary.already_done == rows
    return total_s, layout_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rerun-rows", type=int, nargs="*", default=[5000, 20000], help="rerun cases"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eyehub-bench-preprocess-") as tmp:
        for rows in args.rerun_rows:
            total_s, layout_s = rerun_seconds(rows, Path(tmp))
            print(
                f"rerun with nothing to do, {rows} scans: {total_s:.2f} s "
                f"(row layout {layout_s:.3f} s)"
            )
    torch.set_num_threads(args.threads)
    images = _images(args.images)
    print(
        f"{args.images} fundus images 2048x1536 -> {SIZE}, {os.cpu_count()} CPUs, "
        f"torch {args.threads} threads on {args.device}"
    )

    with mp.get_context("spawn").Pool(args.threads) as pool:
        pool.map(opencv_prepare, images[:2])  # warm the workers
        t = time.perf_counter()
        pool.map(opencv_prepare, images, chunksize=4)
        cv_s = time.perf_counter() - t

    recipe = FundusRecipe(size=SIZE)
    device = torch.device(args.device)
    batches = [
        torch.from_numpy(np.stack(images[i : i + args.batch])).permute(0, 3, 1, 2)
        for i in range(0, len(images), args.batch)
    ]
    prepare_fundus(batches[0][:2].to(device), recipe)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches:
        out = prepare_fundus(b.to(device, non_blocking=True), recipe)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del out
    ours_s = time.perf_counter() - t
    print(f"OpenCV per image ({args.threads} processes): {args.images / cv_s:7.1f} images/s")
    print(
        f"eyehub batched torch ({args.device}):        {args.images / ours_s:7.1f} images/s "
        f"-> {cv_s / ours_s:.2f}x OpenCV (target >= 1x on 2 CPU cores)"
    )

    p = make_patient(9, 0, 2)
    ev = p.visits[0][1][0]
    vol, _ = render_oct(
        ev.signs, "R", (128, 885, 512), OctGeometry(6, 6, 2.3), np.random.default_rng(0)
    )
    spacing = (6 / 128, 2.3 / 885, 6 / 512)
    v = torch.from_numpy(vol).to(device)
    prepare_oct(v, spacing, OctRecipe())
    n = 5
    t = time.perf_counter()
    for _ in range(n):
        prepare_oct(v, spacing, OctRecipe())
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(
        f"OCT 128x885x512 -> 32x256x256 ({args.device}): "
        f"{n / (time.perf_counter() - t):.2f} volumes/s"
    )


if __name__ == "__main__":
    main()
