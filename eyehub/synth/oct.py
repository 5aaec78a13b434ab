"""Render a macular OCT volume: layered retina with foveal pit, speckle, and disease signs.

Axes follow the dataset contract: (z, y, x) = (B-scan, depth, A-scan). Layer thicknesses
are physical (mm), so the same eye rendered at another size keeps its anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eyehub.synth.phenotype import EyeSigns

# intensity of each band from the vitreous down to the choroid (0-1, before speckle)
_BANDS = (
    ("vitreous", 0.03),
    ("rnfl", 0.78),
    ("gcl", 0.42),
    ("ipl", 0.56),
    ("inl", 0.24),
    ("opl", 0.50),
    ("onl", 0.14),
    ("ellipsoid", 0.85),
    ("interdigitation", 0.35),
    ("rpe", 0.95),
    ("choroid", 0.42),
)
_SCLERA = 0.06  # below the choroid
# normal thickness (mm) of each retinal band between the ILM and the choroid, parafoveal
_THICKNESS = {
    "rnfl": 0.030,
    "gcl": 0.045,
    "ipl": 0.035,
    "inl": 0.035,
    "opl": 0.030,
    "onl": 0.075,
    "ellipsoid": 0.020,
    "interdigitation": 0.012,
    "rpe": 0.022,
}
_INNER = ("rnfl", "gcl", "ipl", "inl", "opl")


@dataclass(frozen=True)
class OctGeometry:
    """Physical extent of a volume: width and height of the scan area and imaged depth (mm)."""

    scan_width_mm: float
    scan_height_mm: float
    depth_mm: float


@dataclass(frozen=True)
class OctTruth:
    fovea_bscan: int
    central_thickness_mm: float  # ILM to RPE base at the fovea
    mean_rnfl_mm: float
    choroid_mm: float  # Bruch's membrane to the sclera at the fovea


def render_oct(
    signs: EyeSigns,
    eye: str,
    shape: tuple[int, int, int],
    geometry: OctGeometry,
    rng: np.random.Generator,
    signal: float = 1.0,
) -> tuple[np.ndarray, OctTruth]:
    """Render a uint8 OCT volume of `shape` = (B-scans, depth, A-scans)."""
    n_z, n_y, n_x = shape
    xs = (np.arange(n_x) - (n_x - 1) / 2) * geometry.scan_width_mm / n_x
    zs = (np.arange(n_z) - (n_z - 1) / 2) * geometry.scan_height_mm / max(n_z, 1)
    fx, fz = rng.normal(0, 0.08, 2)
    X, Z = np.meshgrid(xs - fx, zs - fz)  # (n_z, n_x) mm from the fovea
    rho2 = X**2 + Z**2
    pit = np.exp(-rho2 / (2 * 0.38**2))  # foveal pit profile (1 at the centre)
    # the RNFL thickens towards the disc, which is nasal: +x in the right eye's scan
    nasal = X if eye == "R" else -X
    rnfl = _THICKNESS["rnfl"] * signs.rnfl_factor * (1.0 + 0.5 * np.clip(nasal, -1, 3)) * (1 - pit)
    rnfl = np.clip(rnfl, 0.002, None)

    thick = {}
    for name in _THICKNESS:
        t = np.full_like(X, _THICKNESS[name])
        if name in _INNER:
            t = t * (1 - 0.95 * pit)
        if name == "onl":
            t = t * (1 + 0.45 * pit)
        thick[name] = t
    thick["rnfl"] = rnfl
    # DME: central thickening of the outer nuclear / inner nuclear layers
    if signs.central_thickening_mm > 0:
        swell = signs.central_thickening_mm * np.exp(-rho2 / (2 * 0.9**2))
        thick["onl"] = thick["onl"] + 0.6 * swell
        thick["inl"] = thick["inl"] + 0.4 * swell
    # AMD: drusen lift the RPE off Bruch's membrane
    elevation = np.zeros_like(X)
    if signs.drusen > 2:
        for _ in range(max(3, signs.drusen // 3)):
            cx, cz = rng.normal(0, 0.7, 2)
            h = rng.uniform(0.03, 0.08)
            w = rng.uniform(0.08, 0.18)
            elevation += h * np.exp(-((X - cx) ** 2 + (Z - cz) ** 2) / (2 * w**2))

    # Bruch's membrane follows the globe: a shallow bowl, slightly tilted. The retina is
    # stacked upwards from it, so a thinner centre gives the foveal pit and drusen lift
    # everything above them.
    tilt = rng.normal(0, 0.02)
    bruch = 0.52 * geometry.depth_mm - 0.018 * (X**2 + Z**2) + tilt * X
    total = sum(thick.values())
    ilm = bruch - elevation - total
    tops = []  # (mm) top of each band below the vitreous
    depth = ilm
    for name, _ in _BANDS[1:-1]:
        tops.append(depth.copy())
        depth = depth + thick[name]
    tops.append(bruch)  # the choroid begins at Bruch's membrane
    bounds = np.stack(tops)  # (n_bands - 1, n_z, n_x)

    # choroidal thickness (it differs by sex): thickest under the fovea, thinner nasally
    choroid = signs.choroid_mm * (1.0 - 0.1 * np.clip(nasal, 0, 3)) * (0.95 + 0.05 * pit)

    levels = np.array([b[1] for b in _BANDS], np.float32)
    dy = geometry.depth_mm / n_y
    depth_axis = (np.arange(n_y, dtype=np.float32) + 0.5) * dy
    vol = np.empty((n_z, n_y, n_x), np.uint8)
    cysts = _cysts(rng, signs) if signs.macular_fluid else []
    for k in range(n_z):
        b = bounds[:, k, :].astype(np.float32)  # (n_b, n_x)
        band = (depth_axis[None, :, None] >= b[:, None, :]).sum(axis=0)  # (n_y, n_x)
        img = levels[band]
        # the drusen's material between the lifted RPE and Bruch's membrane
        under = (depth_axis[:, None] >= (b[-2] + thick["rpe"][k])[None, :]) & (
            depth_axis[:, None] < b[-1][None, :]
        )
        img = np.where(under, 0.5, img)
        # the choroid fades with depth and ends at the darker sclera
        below = depth_axis[:, None] - b[-1][None, :]
        img = np.where(band == len(levels) - 1, img * np.exp(-np.clip(below, 0, None) / 0.35), img)
        img = np.where(below > choroid[k][None, :], _SCLERA, img)
        for cz, cx, cy, rx, ry in cysts:  # intraretinal fluid: dark cystoid spaces
            dz = (zs[k] - cz) / rx
            if abs(dz) < 1:
                centre = ilm[k, :] + cy
                e = ((xs[None, :] - cx) / rx) ** 2 + (
                    (depth_axis[:, None] - centre[None, :]) / ry
                ) ** 2
                img = np.where(e + dz**2 < 1, 0.04, img)
        speckle = rng.gamma(4.0, 0.25, size=img.shape).astype(np.float32)
        out = img * speckle * signal + rng.normal(0, 0.025, size=img.shape).astype(np.float32)
        vol[k] = np.clip(out * 215.0, 0, 255).astype(np.uint8)

    kz = int(np.argmin(np.abs(zs - fz)))
    kx = int(np.argmin(np.abs(xs - fx)))
    central = float(total[kz, kx])
    return vol, OctTruth(
        fovea_bscan=kz,
        central_thickness_mm=central,
        mean_rnfl_mm=float(rnfl.mean()),
        choroid_mm=float(choroid[kz, kx]),
    )


def _cysts(
    rng: np.random.Generator, signs: EyeSigns
) -> list[tuple[float, float, float, float, float]]:
    out = []
    for _ in range(int(rng.integers(3, 7))):
        cz, cx = rng.normal(0, 0.5, 2)
        cy = rng.uniform(0.12, 0.12 + signs.central_thickening_mm)  # below the ILM, in the INL/ONL
        out.append(
            (
                float(cz),
                float(cx),
                float(cy),
                float(rng.uniform(0.08, 0.2)),
                float(rng.uniform(0.03, 0.06)),
            )
        )
    return out
