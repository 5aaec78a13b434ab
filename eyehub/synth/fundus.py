"""Render a colour fundus photograph: FOV disc on black, optic disc, vessels, macula, lesions.

Geometry is drawn in "canonical" coordinates where +x points temporally (from the optic
disc towards the macula) and then mirrored for right eyes, so the optic disc sits on the
side laterality implies (right eye: disc on the image's right, as photographed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from eyehub.synth.phenotype import EyeSigns


@dataclass(frozen=True)
class FundusTruth:
    """Ground truth of one rendered fundus image, in source pixels."""

    fov_cx: float
    fov_cy: float
    fov_radius: float
    disc_x: float
    disc_y: float
    disc_radius: float
    macula_x: float
    macula_y: float


@dataclass(frozen=True)
class _Vessel:
    points: np.ndarray  # (n, 2) canonical coordinates, units of FOV radius, origin at disc
    width: float  # at the start, units of FOV radius
    artery: bool


def vessel_tree(identity_seed: int) -> list[_Vessel]:
    """The patient's vessel pattern: identical for every image of the patient (identity)."""
    rng = np.random.default_rng([identity_seed, 77])
    vessels: list[_Vessel] = []

    def grow(
        start: np.ndarray,
        angle: float,
        turn: float,
        length: float,
        width: float,
        artery: bool,
        depth: int,
    ) -> None:
        n = max(4, int(length / 0.025))
        step = length / n
        pts = [start]
        a = angle
        for _ in range(n):
            a += turn * step + rng.normal(0, 0.06)
            nxt = pts[-1] + step * np.array([math.cos(a), math.sin(a)])
            pts.append(nxt)
        arr = np.array(pts)
        vessels.append(_Vessel(arr, width, artery))
        if depth <= 0:
            return
        n_branch = int(rng.integers(2, 4))
        for _ in range(n_branch):
            k = int(rng.integers(n // 5, max(n // 5 + 1, 4 * n // 5)))
            side = 1 if rng.random() < 0.5 else -1
            grow(
                arr[k],
                a_at(arr, k) + side * rng.uniform(0.4, 0.9),
                rng.normal(0, 0.6),
                length * rng.uniform(0.35, 0.55),
                width * 0.62,
                artery,
                depth - 1,
            )

    def a_at(arr: np.ndarray, k: int) -> float:
        d = arr[min(k + 1, len(arr) - 1)] - arr[max(k - 1, 0)]
        return math.atan2(d[1], d[0])

    origin = np.zeros(2)
    for artery in (True, False):
        jitter = rng.normal(0, 0.08, size=4)
        w = 0.020 if artery else 0.027
        off = np.array([0.0, 0.015 if artery else -0.015])
        # temporal arcades sweep around the macula; nasal vessels head away from it
        grow(origin + off, -1.35 + jitter[0], 1.05, 1.55, w, artery, 2)
        grow(origin - off, 1.35 + jitter[1], -1.05, 1.55, w, artery, 2)
        grow(origin + off, -2.2 + jitter[2], -0.4, 0.75, w * 0.7, artery, 1)
        grow(origin - off, 2.2 + jitter[3], 0.4, 0.75, w * 0.7, artery, 1)
    return vessels


TESSELLATION_CONTRAST = 0.3  # brightness swing of the choroidal pattern at tessellation 1


def choroidal_pattern(
    identity_seed: int, eye: str, shape: tuple[int, int], fovea: np.ndarray, r: float, sign: float
) -> np.ndarray:
    """The eye's choroidal vessels as seen through the retina: 1 on a vessel, 0 between.

    Curved lines running out from the posterior pole (the zero crossings of a smooth random
    field in polar coordinates about the fovea, stretched along the radius), about 0.04 FOV
    radii wide and 0.08 apart half-way out, on an image of `shape` (rows, columns) with the
    fovea at `fovea` (x, y); `sign` mirrors right eyes. Seeded by the patient and eye: the
    same at every visit and image size. Large images get the pattern computed on a grid of
    about 160 points per FOV radius, then interpolated.
    """
    rng = np.random.default_rng([identity_seed, 0xC40, 0 if eye == "R" else 1])
    n_angle, n_radius = 48, 8
    field = rng.normal(0, 1, size=(n_radius, n_angle)).astype(np.float32)
    height, width = shape
    k = max(1, round(r / 160))
    ys, xs = np.mgrid[0 : -(-height // k), 0 : -(-width // k)].astype(np.float32)
    dx = (xs + 0.5) * k - 0.5 - np.float32(fovea[0])
    dy = (ys + 0.5) * k - 0.5 - np.float32(fovea[1])
    u = (np.arctan2(dy, sign * dx) + np.pi) * np.float32(n_angle / (2 * np.pi))
    v = np.minimum(np.hypot(dx, dy) / np.float32(0.5 * r), np.float32(n_radius - 1.01))
    value = cv2.remap(field, u, v, cv2.INTER_CUBIC, borderMode=cv2.BORDER_WRAP)
    out: np.ndarray = np.exp(-((value / np.float32(0.3)) ** 2))
    if k > 1:
        out = cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def _supersample(min_side: int) -> int:
    return int(np.clip(math.ceil(1024 / max(min_side, 1)), 1, 4))


def render_fundus(
    signs: EyeSigns,
    eye: str,
    identity_seed: int,
    pigmentation: tuple[float, float, float],
    height: int,
    width: int,
    fov_scale: float,
    rng: np.random.Generator,
    illumination: float = 1.0,
    uneven: float = 0.0,
) -> tuple[np.ndarray, FundusTruth]:
    """Render an RGB uint8 fundus image of shape (height, width, 3).

    Args:
        fov_scale: FOV radius as a fraction of the image height; above 0.5 the circle is cut
            at the top and bottom, as on many 4:3 cameras.
        illumination: global gain (below 1 gives a dark image).
        uneven: strength of a left-right illumination gradient (0 = even).
    """
    ss = _supersample(min(height, width))
    H, W = height, width
    r = fov_scale * height
    cx = (W - 1) / 2 + rng.normal(0, 0.01) * r
    cy = (H - 1) / 2 + rng.normal(0, 0.01) * r
    sign = -1.0 if eye == "R" else 1.0  # canonical +x is temporal; mirror for right eyes

    # optic disc and macula centres (about 2.5 disc diameters apart; the disc's size and
    # its distance from the fovea differ by sex, see phenotype.SEX_ANATOMY)
    disc_dy = rng.normal(0, 0.02) * r
    mac_c = np.array([cx + sign * 0.05 * r, cy + rng.normal(0, 0.015) * r])
    disc_c = np.array([mac_c[0] - sign * 0.47 * signs.disc_fovea_scale * r, cy + disc_dy])
    disc_r = 0.095 * signs.disc_scale * r

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    d_fov = np.hypot(xx - cx, yy - cy) / r
    # anti-aliased FOV edge
    fov = np.clip((1.0 - d_fov) * r + 0.5, 0.0, 1.0)

    pig = np.array(pigmentation, dtype=np.float32)
    # choroidal texture: low-frequency noise
    tex = cv2.resize(
        rng.normal(0, 1, size=(24, 24)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC
    )
    shade = (1.0 - 0.38 * d_fov**2) * (1.0 + 0.035 * tex)
    d_mac = np.hypot(xx - mac_c[0], yy - mac_c[1]) / r
    if signs.tessellation > 0:
        # tessellation: the choroidal vessels show through a thinner pigment layer outside
        # the macula; the pattern is the eye's own, its mean brightness unchanged
        pattern = choroidal_pattern(identity_seed, eye, (H, W), mac_c, r, sign)
        away = np.clip((d_mac - 0.22) / 0.3, 0.0, 1.0)
        pattern -= float((pattern * away).sum() / max(float(away.sum()), 1.0))
        shade *= 1.0 + TESSELLATION_CONTRAST * signs.tessellation * away * pattern
    # macula: darker, with a small foveal reflex
    shade *= 1.0 - 0.32 * np.exp(-(d_mac**2) / (2 * 0.11**2))
    img = shade[..., None] * pig
    img += (0.10 * np.exp(-(d_mac**2) / (2 * 0.008**2)))[..., None]

    def blend(mask: np.ndarray, colour: np.ndarray | tuple[float, ...], alpha: float) -> None:
        nonlocal img
        m = (alpha * mask)[..., None]
        img = img * (1 - m) + np.asarray(colour, np.float32) * m

    # optic disc and cup (soft edges, analytic)
    d_disc = np.hypot(xx - disc_c[0], yy - disc_c[1])
    blend(np.clip((disc_r - d_disc) / max(0.1 * disc_r, 0.7) + 0.5, 0, 1), (0.97, 0.72, 0.48), 1.0)
    cup_r = signs.cup_disc_ratio * disc_r
    blend(np.clip((cup_r - d_disc) / max(0.15 * disc_r, 0.7) + 0.5, 0, 1), (1.0, 0.93, 0.78), 1.0)

    # vessels and lesions are drawn into coverage masks at `ss` times the resolution and
    # area-averaged down, so calibre changes below a pixel still show in the intensities
    def canvas() -> np.ndarray:
        return np.zeros((H * ss, W * ss), np.float32)

    def down(mask: np.ndarray) -> np.ndarray:
        return mask if ss == 1 else cv2.resize(mask, (W, H), interpolation=cv2.INTER_AREA)

    def px(p: np.ndarray) -> tuple[int, int]:
        return int((p[0] + 0.5) * ss), int((p[1] + 0.5) * ss)

    art, ven = canvas(), canvas()
    for vessel in vessel_tree(identity_seed):
        pts = vessel.points.copy()
        pts[:, 0] *= sign
        pts = pts * r + disc_c
        calibre = signs.arteriole_calibre if vessel.artery else signs.venule_calibre
        target = art if vessel.artery else ven
        n = len(pts)
        for i in range(n - 1):
            w = vessel.width * calibre * r * ss * (1.0 - 0.45 * i / n)
            cv2.line(target, px(pts[i]), px(pts[i + 1]), 1.0, max(1, round(w)), cv2.LINE_8)
    if signs.neovascularisation:
        for _ in range(6):
            p0 = disc_c + rng.normal(0, 0.5, 2) * disc_r
            pts = (p0 + np.cumsum(rng.normal(0, 0.02 * r, size=(14, 2)), axis=0) + 0.5) * ss
            cv2.polylines(ven, [pts.astype(np.int32)], False, 1.0, max(1, round(0.004 * r * ss)))
    blend(down(art), (0.78, 0.16, 0.10), 0.85)
    blend(down(ven), (0.52, 0.07, 0.07), 0.9)

    # lesions, placed in the posterior pole away from the disc
    def spots(
        count: int,
        spread: float,
        radius: tuple[float, float],
        colour: tuple[float, ...],
        alpha: float,
        blur: bool = False,
    ) -> None:
        if count <= 0:
            return
        layer = canvas()
        for _ in range(count):
            p = mac_c
            for _attempt in range(10):
                p = mac_c + rng.normal(0, spread, 2) * r
                away = np.hypot(*(p - disc_c)) > 1.4 * disc_r
                if away and np.hypot(p[0] - cx, p[1] - cy) < 0.9 * r:
                    break
            rad = max(1, round(rng.uniform(*radius) * r * ss))
            cv2.circle(layer, px(p), rad, 1.0, -1, cv2.LINE_8)
        small = down(layer)
        if blur:
            small = cv2.GaussianBlur(small, (0, 0), max(0.6, 0.008 * r))
        blend(small, colour, alpha)

    spots(signs.microaneurysms, 0.30, (0.005, 0.008), (0.45, 0.04, 0.04), 0.95)
    spots(signs.haemorrhages, 0.32, (0.014, 0.03), (0.42, 0.05, 0.04), 0.9)
    spots(
        signs.exudates,
        0.16 if signs.macular_fluid else 0.25,
        (0.005, 0.012),
        (1.0, 0.93, 0.45),
        0.95,
    )
    spots(signs.cotton_wool_spots, 0.3, (0.02, 0.035), (0.95, 0.92, 0.85), 0.8, blur=True)
    spots(signs.drusen, 0.10, (0.008, 0.02), (0.98, 0.88, 0.50), 0.75, blur=True)

    # illumination and media yellowing with age (the lens filters blue, lowers contrast)
    y = signs.yellowing
    gain = illumination * (1.0 + uneven * (xx - cx) / r)
    img *= gain[..., None]
    img *= np.array(
        [1.0 - 0.15 * y, (1.0 - 0.12 * y) * (1 - 0.15 * y), (1.0 - 0.5 * y) * (1 - 0.15 * y)],
        np.float32,
    )
    img += 0.15 * y * np.array([0.55, 0.42, 0.08], np.float32)
    if y > 0.3:  # lens opacity blurs the older eye slightly
        img = cv2.GaussianBlur(img, (0, 0), 0.4 + 0.8 * (y - 0.3))
    img += rng.normal(0, 0.008, size=img.shape).astype(np.float32)
    img *= fov[..., None]
    out = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    truth = FundusTruth(
        fov_cx=float(cx),
        fov_cy=float(cy),
        fov_radius=float(r),
        disc_x=float(disc_c[0]),
        disc_y=float(disc_c[1]),
        disc_radius=float(disc_r),
        macula_x=float(mac_c[0]),
        macula_y=float(mac_c[1]),
    )
    return out, truth


def burn_in_text(image: np.ndarray, truth: FundusTruth, lines: tuple[str, str]) -> None:
    """Burn the patient's name and the date into image corners outside the FOV, in place.

    Real cameras do this; ingest must clear it. Text is shrunk until it lies wholly outside
    the FOV circle (with a margin), so clearing outside the FOV removes all of it.
    """
    h, w = image.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i, text in enumerate(lines):
        scale = h / 700.0
        while scale > 0.12:
            thick = max(1, round(scale * 1.6))
            (tw, th), base = cv2.getTextSize(text, font, scale, thick)
            x0 = 3 if i == 0 else w - tw - 3
            y0 = th + 3
            # distance from the FOV centre to the nearest point of the text box
            nx = min(max(truth.fov_cx, x0), x0 + tw)
            ny = min(max(truth.fov_cy, 0), y0 + base)
            if math.hypot(nx - truth.fov_cx, ny - truth.fov_cy) > truth.fov_radius + 4:
                cv2.putText(image, text, (x0, y0), font, scale, (235, 235, 235), thick, cv2.LINE_AA)
                break
            scale *= 0.85
