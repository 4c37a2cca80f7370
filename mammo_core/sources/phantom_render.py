"""Pixel rendering for the phantom CBIS-DDSM twin: breast, parenchyma, masses, calcifications, noise.

Why a renderer at all: the pipeline must run end to end with no download, and its experiments only
mean something if the images carry the cues a radiologist (and a CNN) uses: a breast outline with a
skin line, an MLO pectoral muscle, fibroglandular texture with a power-law spectrum whose amount follows
BI-RADS density, masses whose outline and margin follow pathology, and calcification clusters whose
morphology follows pathology. Each cue is drawn from the lesion's CSV attributes, so the table and the
pixels agree, and the attribute distributions overlap between pathologies, so classification is hard
but possible.

Everything is drawn in a canonical orientation (chest wall on the left, x = 0); the caller mirrors
right breasts. Values are float32 in [0, 1] until :func:`to_uint16`. All randomness comes from the
``numpy.random.Generator`` passed in, so a seed fixes every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# Physical scale: a DDSM film is about 240 mm tall, so the image height stands for 240 mm.
FILM_HEIGHT_MM = 240.0

# Peak lesion contrast (in the [0, 1] intensity scale) by subtlety 1..5; subtlety 0 (a CSV quirk)
# renders like 1. Fibroglandular tissue spans about 0.4, so subtlety 1 masses hide in dense breasts.
MASS_CONTRAST = (0.06, 0.06, 0.09, 0.12, 0.15, 0.19)
CALC_CONTRAST = (0.08, 0.08, 0.13, 0.19, 0.26, 0.34)
# BENIGN_WITHOUT_CALLBACK findings are the ones a reader dismisses: fainter than their subtlety says.
BWC_CONTRAST_FACTOR = 0.75


@dataclass(frozen=True)
class BreastGeometry:
    """Where the breast is: ``inside`` in [0,1] (soft edge), ``ellipse`` the normalised radius (1 = skin),
    ``pectoral`` in [0,1] (MLO only), and the nipple position, all in canonical orientation."""

    inside: np.ndarray
    ellipse: np.ndarray
    pectoral: np.ndarray
    nipple: tuple[float, float]
    axes: tuple[float, float]  # (half height, depth) in pixels


@dataclass
class MassSpec:
    """Physical description of one mass, shared by its CC and MLO renderings."""

    radius_mm: float
    aspect: float
    shape: str
    margins: str
    harmonics: list[tuple[int, float, float]] = field(default_factory=list)  # (k, amplitude, phase)
    n_spicules: int = 0
    spicule_length: float = 0.0  # in radii


@dataclass
class CalcSpec:
    """Physical description of one calcification cluster, shared by its CC and MLO renderings."""

    calc_type: str
    distribution: str
    n_calcs: int
    extent_mm: float


def power_law_field(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> np.ndarray:
    """Gaussian random field with power spectrum 1/f^beta, zero mean and unit std (float32).

    Mammographic parenchyma has a power-law spectrum with beta about 2.5-3.5 (Burgess 2001); that one
    statistic is what makes synthetic tissue look like tissue instead of noise.
    """
    h, w = shape
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** np.float32(-beta / 2.0)
    amp[0, 0] = 0.0
    spec = (rng.standard_normal(amp.shape, dtype=np.float32)
            + 1j * rng.standard_normal(amp.shape, dtype=np.float32)) * amp
    out = np.fft.irfft2(spec, s=shape).astype(np.float32)
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def breast_geometry(rng: np.random.Generator, shape: tuple[int, int], view: str) -> BreastGeometry:
    """Draw a breast outline: a half ellipse on the chest wall (CC) or a taller, tilted one reaching the
    top edge with a pectoral triangle in the upper chest-wall corner (MLO), with a wavy outline."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ax = w * rng.uniform(0.62, 0.88)
    if view == "MLO":
        cy = h * rng.uniform(0.40, 0.48)
        ay_up, ay_down = h * rng.uniform(0.58, 0.72), h * rng.uniform(0.40, 0.48)
        tilt = rng.uniform(0.10, 0.30)
    else:
        cy = h * rng.uniform(0.46, 0.54)
        ay_up = ay_down = h * rng.uniform(0.36, 0.45)
        tilt = rng.uniform(-0.05, 0.05)
    dy = yy - cy - tilt * xx
    ay = np.where(dy < 0, ay_up, ay_down).astype(np.float32)
    ell = np.sqrt((xx / ax) ** 2 + (dy / ay) ** 2)
    theta = np.arctan2(dy / ay, xx / ax)
    wobble = np.zeros_like(ell)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.0, 0.025) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    ell = ell * (1.0 + wobble)
    edge_px = 1.2
    inside = np.clip((1.0 - ell) * ax / edge_px + 0.5, 0.0, 1.0)
    pect = np.zeros_like(ell)
    if view == "MLO":
        pw, ph = w * rng.uniform(0.22, 0.42), h * rng.uniform(0.38, 0.62)
        curve = rng.uniform(0.85, 1.25)
        s = (xx / pw) ** curve + yy / ph  # < 1 inside the muscle
        pect = np.clip((1.0 - s) * min(pw, ph) / 2.0 + 0.5, 0.0, 1.0)
        inside = np.maximum(inside, pect)
    nipple = (float(cy + tilt * ax), float(ax))
    return BreastGeometry(inside=inside, ellipse=ell.astype(np.float32), pectoral=pect,
                          nipple=nipple, axes=(float(max(ay_up, ay_down)), float(ax)))


def _oriented_field(rng: np.random.Generator, shape: tuple[int, int], nipple: tuple[float, float],
                    beta: float, stretch: float, factor: int = 1) -> np.ndarray:
    """Power-law field whose structures radiate from the chest wall to the nipple (ducts, ligaments).

    The field is drawn on a (radius, angle) grid and stretched along the radius, then sampled back.
    ``factor`` > 1 draws it at a lower resolution and upsamples: the low frequencies are all that a
    beta > 3 field has, so this saves time and loses nothing visible.
    """
    h, w = shape
    lh, lw = -(-h // factor), -(-w // factor)
    base = power_law_field(rng, (lh, lw), beta)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    oy, ox = nipple[0] / factor, -0.35 * lw  # a focus behind the chest wall
    r = np.hypot(yy - oy, xx - ox)
    ang = np.arctan2(yy - oy, xx - ox)
    offset = rng.uniform(0, lh)
    coords = np.stack([(ang * (0.9 * lh) + offset) % lh, (r / stretch) % lw])
    out = ndimage.map_coordinates(base, coords, order=1, mode="grid-wrap").astype(np.float32)
    return _upsample(out, shape, factor)


def _upsample(field: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    if factor == 1:
        return field
    up = ndimage.zoom(field, factor, order=1, grid_mode=True, mode="nearest")
    return np.ascontiguousarray(up[: shape[0], : shape[1]])


# Fraction of the breast covered by fibroglandular tissue, BI-RADS density 1..4 (ACR 4th edition).
_DENSE_FRACTION = {1: 0.12, 2: 0.35, 3: 0.60, 4: 0.85}


def render_breast(rng: np.random.Generator, geom: BreastGeometry, density: int) -> np.ndarray:
    """Breast tissue in [0, 1]: fat, fibroglandular tissue by density, thickness roll-off, skin, pectoral."""
    h, w = geom.inside.shape
    ell = geom.ellipse
    depth = geom.axes[1]
    nipple = geom.nipple
    # Cloudy patches (isotropic) mixed with structures converging on the nipple (oriented).
    lowres = max(1, h // 256)
    low = 0.75 * _oriented_field(rng, (h, w), nipple, beta=3.2, stretch=2.2, factor=lowres) \
        + 0.65 * _upsample(power_law_field(rng, (-(-h // lowres), -(-w // lowres)), 3.4), (h, w), lowres)
    fine = 0.6 * _oriented_field(rng, (h, w), nipple, beta=2.4, stretch=1.8, factor=2) \
        + 0.8 * power_law_field(rng, (h, w), 2.4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Glandular tissue sits behind the nipple, away from skin (subcutaneous fat) and chest wall.
    prior = _smoothstep(0.97, 0.55, ell) * _smoothstep(0.0, 0.18, xx / depth)
    score = low - 2.4 * (1.0 - prior)
    breast = geom.inside > 0.5
    sample = score[breast][::7]
    frac = _DENSE_FRACTION.get(int(density), 0.35)
    thresh = np.quantile(sample, 1.0 - frac) if sample.size else 0.0
    gland = 1.0 / (1.0 + np.exp(-(score - thresh) / 0.45))
    gland = gland * (0.8 + 0.2 * np.clip(low * 0.5 + 0.5, 0, 1))
    thick = np.clip((1.0 - ell) * depth / (0.10 * depth), 0.0, 1.0) ** 0.5
    fat_level = rng.uniform(0.26, 0.34)
    gland_amp = rng.uniform(0.34, 0.42)
    tissue = fat_level * (0.45 + 0.55 * thick) + gland_amp * gland * thick
    tissue += 0.035 * fine * (0.35 + gland) * thick
    # Skin line: a thin denser band just inside the outline.
    skin_px = max(1.0, 0.004 * h)
    dist_px = (1.0 - ell) * depth
    tissue += 0.10 * np.exp(-((dist_px - 1.5 * skin_px) / skin_px) ** 2)
    # A few vessels: faint curved lines from the chest wall toward the nipple.
    tissue += _vessels(rng, (h, w), nipple, geom.axes) * thick
    if geom.pectoral.any():
        # Muscle: dense, brightest at the corner, with its own faint fibre texture.
        corner = np.exp(-np.hypot(yy / h, xx / w) * 1.5)
        muscle = rng.uniform(0.74, 0.82) + 0.08 * corner + 0.02 * low + 0.015 * fine
        tissue = tissue * (1.0 - geom.pectoral) + muscle * geom.pectoral
    return (tissue * geom.inside).astype(np.float32)


def _vessels(rng: np.random.Generator, shape: tuple[int, int], nipple: tuple[float, float],
             axes: tuple[float, float]) -> np.ndarray:
    h, w = shape
    out = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        y0 = nipple[0] + rng.uniform(-0.6, 0.6) * axes[0]
        y1 = nipple[0] + rng.uniform(-0.25, 0.25) * axes[0]
        x1 = axes[1] * rng.uniform(0.5, 0.9)
        n = 200
        t = np.linspace(0.0, 1.0, n, dtype=np.float32)
        bend = rng.uniform(-0.08, 0.08) * h
        ys = y0 + (y1 - y0) * t + bend * np.sin(np.pi * t)
        xs = x1 * t
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        rows, cols = ys[ok].astype(int), xs[ok].astype(int)
        width = max(0.6, 0.0012 * h * rng.uniform(0.7, 1.3))
        gain = rng.uniform(0.02, 0.04)
        if not len(rows):
            continue  # nothing inside the image: the whole-image filter gave zeros, adding nothing
        win = _blur_window(shape, rows, cols, width)
        img = np.zeros((win[0].stop - win[0].start, win[1].stop - win[1].start), np.float32)
        img[rows - win[0].start, cols - win[1].start] = 1.0
        img = ndimage.gaussian_filter(img, width)
        out[win] += gain * img / (img.max() + 1e-6)
    return out


def _blur_window(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, sigma: float) -> tuple[slice, slice]:
    """The box around the marked pixels, widened by twice the Gaussian's reach, where blurring them matters.

    Why: filtering the whole 1024 x 640 image for a thin line cost about a tenth of the phantom's render
    time. Farther than the reach from a marked pixel the whole-image result is exactly zero, and within the
    box every tap sees the same values in the same order (zeros where the box edge reflects, since the
    margin is twice the reach; the image's own edges reflect as before), so the result is bit-identical.
    """
    reach = int(4.0 * float(sigma) + 0.5)  # gaussian_filter's default truncate=4.0 radius
    margin = 2 * reach + 2
    h, w = shape
    return (slice(max(0, int(rows.min()) - margin), min(h, int(rows.max()) + margin + 1)),
            slice(max(0, int(cols.min()) - margin), min(w, int(cols.max()) + margin + 1)))


def px_per_mm(shape: tuple[int, int]) -> float:
    return shape[0] / FILM_HEIGHT_MM


def _window(shape: tuple[int, int], cy: float, cx: float, half: float) -> tuple[slice, slice]:
    h, w = shape
    y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 2)
    x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 2)
    return slice(y0, y1), slice(x0, x1)


def mass_extent_px(spec: MassSpec, scale: float) -> float:
    """Radius in pixels that bounds the mass including its spicules (for placement)."""
    r = spec.radius_mm * scale * (1.0 + sum(abs(a) for _, a, _ in spec.harmonics))
    return r * (1.0 + spec.spicule_length) + 4.0


def render_mass(canvas: np.ndarray, rng: np.random.Generator, spec: MassSpec, cy: float, cx: float,
                contrast: float) -> np.ndarray:
    """Add one mass to ``canvas`` in place; return its binary mask (core outline, no spicules).

    Shape gives the outline (round/oval: ellipse; lobulated: few big lobes; irregular: many harmonics),
    margins the edge (circumscribed: sharp; obscured: partly blurred; ill-defined: soft; microlobulated:
    fine undulations; spiculated: radiating lines). The CC and MLO views differ by a rotation.
    """
    shape = canvas.shape
    scale = px_per_mm(shape)
    radius = max(3.0, spec.radius_mm * scale)
    sl = _window(shape, cy, cx, mass_extent_px(spec, scale) + 3)
    yy, xx = np.mgrid[sl[0], sl[1]].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    rot = rng.uniform(0, 2 * np.pi)
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / spec.aspect
    d = np.hypot(u, v)
    th = np.arctan2(v, u)
    rb = np.ones_like(d)
    for k, a, ph in spec.harmonics:
        rb += a * np.cos(k * th + ph)
    rb *= radius
    margins = spec.margins
    if "SPICULATED" in margins:
        width = 0.08 * radius + 0.6
    elif "ILL_DEFINED" in margins or margins == "NA":
        width = 0.16 * radius + 0.6
    elif "OBSCURED" in margins:
        phase = rng.uniform(0, 2 * np.pi)
        width = 0.6 + 0.22 * radius * (0.5 + 0.5 * np.cos(th - phase)) ** 2
    else:  # CIRCUMSCRIBED, MICROLOBULATED
        width = 0.6 + 0.01 * radius
    inside = 1.0 / (1.0 + np.exp(np.clip((d - rb) / width, -30, 30)))
    dome = np.sqrt(np.clip(1.0 - (d / (rb * 1.08)) ** 2, 0.0, 1.0))
    body = inside * (0.55 + 0.45 * dome)
    shp = spec.shape
    if "LYMPH_NODE" in shp:  # fatty hilum: a lucent notch on one side
        hil = np.hypot(u - 0.55 * radius, v) < 0.45 * radius
        body = body * np.where(hil, 0.35, 1.0)
    if "ASYMMETRIC" in shp:  # asymmetric density: broad, faint, ill-defined
        body = body * 0.55
    if shp.startswith("ARCHITECTURAL_DISTORTION"):
        body = body * 0.35  # distortion: little central mass, mostly radiating lines
    value = body
    if spec.n_spicules:
        spic = np.zeros_like(d)
        for _ in range(spec.n_spicules):
            a = rng.uniform(0, 2 * np.pi)
            length = radius * (1.0 + spec.spicule_length * rng.uniform(0.5, 1.0))
            ca, sa = np.cos(a), np.sin(a)
            along = dx * ca + dy * sa
            perp = np.abs(-dx * sa + dy * ca)
            t = np.clip(along / length, 0.0, 1.0)
            w0 = max(0.9, 0.12 * radius * rng.uniform(0.6, 1.2))
            wt = w0 * (1.0 - 0.75 * t) + 0.35
            s = np.exp(-((perp / wt) ** 2)) * (1.0 - t) ** 0.7 * (along > 0)
            np.maximum(spic, s.astype(np.float32), out=spic)
        value = value + 1.1 * spic * (1.0 - inside)
    canvas[sl] += (contrast * value).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[sl] = d <= rb
    return mask


def _disk(d: np.ndarray, r: float) -> np.ndarray:
    """Anti-aliased disk profile from a distance map."""
    return np.clip(r + 0.5 - d, 0.0, 1.0)


def _calc_points(rng: np.random.Generator, spec: CalcSpec, scale: float, nipple_dir: float
                 ) -> np.ndarray:
    """Positions (dy, dx) in pixels of the calcifications of a cluster, by distribution."""
    n = spec.n_calcs
    ext = spec.extent_mm * scale / 2.0
    dist = spec.distribution
    if "LINEAR" in dist or "SEGMENTAL" in dist:
        # along (or around) a duct pointing toward the nipple
        ang = nipple_dir + rng.normal(0, 0.35)
        t = rng.uniform(-1, 1, n)
        spread = 0.12 if "LINEAR" in dist else 0.35
        off = rng.normal(0, spread, n) * (0.5 + 0.5 * (1 - np.abs(t)))
        py = ext * (t * np.sin(ang) + off * np.cos(ang))
        px = ext * (t * np.cos(ang) - off * np.sin(ang))
        return np.stack([py, px], 1)
    if dist in ("REGIONAL", "DIFFUSELY_SCATTERED"):
        r = ext * np.sqrt(rng.uniform(0, 1, n))
    else:  # CLUSTERED, NA
        r = ext * np.clip(np.abs(rng.normal(0, 0.5, n)), 0, 1)
    a = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.sin(a), r * np.cos(a)], 1)


def _branch_points(rng: np.random.Generator, spec: CalcSpec, scale: float, nipple_dir: float
                   ) -> list[tuple[float, float, float, float]]:
    """Short segments (y0, x0, y1, x1) along a branching duct tree: fine linear branching calcs."""
    ext = spec.extent_mm * scale / 2.0
    segs: list[tuple[float, float, float, float]] = []
    n_branch = int(rng.integers(2, 5))
    for _ in range(n_branch):
        y, x = rng.normal(0, 0.25 * ext, 2)
        ang = nipple_dir + rng.normal(0, 0.8)
        for _ in range(max(2, spec.n_calcs // n_branch)):
            seg_len = scale * rng.uniform(0.6, 2.2)
            ny, nx = y + seg_len * np.sin(ang), x + seg_len * np.cos(ang)
            if rng.uniform() < 0.75:
                segs.append((y, x, ny, nx))
            gap = scale * rng.uniform(0.3, 1.0)
            y, x = ny + gap * np.sin(ang), nx + gap * np.cos(ang)
            ang += rng.normal(0, 0.35)
    return segs


def calc_extent_px(spec: CalcSpec, scale: float) -> float:
    return spec.extent_mm * scale / 2.0 + 3.0 * scale + 4.0


def render_calcs(canvas: np.ndarray, rng: np.random.Generator, spec: CalcSpec, cy: float, cx: float,
                 contrast: float, nipple_dir: float) -> np.ndarray:
    """Add one calcification cluster to ``canvas``; return the cluster's ROI mask (hull of the calcs).

    Morphology follows the calc type: punctate/amorphous tiny dots, round-and-regular bigger dots,
    lucent-centred and eggshell rings, coarse/dystrophic popcorn, rod-like segments, vascular
    tram-tracks, pleomorphic dots of mixed size and elongation, fine-linear-branching duct casts.
    """
    shape = canvas.shape
    scale = px_per_mm(shape)
    half = calc_extent_px(spec, scale)
    sl = _window(shape, cy, cx, half)
    yy, xx = np.mgrid[sl[0], sl[1]].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    acc = np.zeros_like(dy)
    points: list[tuple[float, float]] = []
    ctype = spec.calc_type
    minr = 0.55

    def seg_profile(y0: float, x0: float, y1: float, x1: float, width: float) -> np.ndarray:
        vy, vx = y1 - y0, x1 - x0
        ln2 = vy * vy + vx * vx + 1e-6
        t = np.clip(((dy - y0) * vy + (dx - x0) * vx) / ln2, 0.0, 1.0)
        dd = np.hypot(dy - (y0 + t * vy), dx - (x0 + t * vx))
        return _disk(dd, width)

    if "VASCULAR" in ctype:  # tram-track: two parallel dashed lines along a curved vessel
        length = spec.extent_mm * scale
        ang = nipple_dir + rng.normal(0, 0.5)
        sep = max(1.2, 0.6 * scale)
        bend = rng.normal(0, 0.15)
        n = max(6, int(length / max(1.0, scale)))
        for i in range(n):
            if rng.uniform() < 0.3:
                continue
            t0, t1 = -0.5 + i / n, -0.5 + (i + 0.8) / n
            for side in (-1, 1):
                a0, a1 = ang + bend * t0, ang + bend * t1
                y0 = length * t0 * np.sin(a0) + side * sep * np.cos(ang)
                x0 = length * t0 * np.cos(a0) - side * sep * np.sin(ang)
                y1 = length * t1 * np.sin(a1) + side * sep * np.cos(ang)
                x1 = length * t1 * np.cos(a1) - side * sep * np.sin(ang)
                np.maximum(acc, 0.8 * seg_profile(y0, x0, y1, x1, max(minr, 0.15 * scale)), out=acc)
                points.append((y0, x0))
    if "FINE_LINEAR_BRANCHING" in ctype:
        for y0, x0, y1, x1 in _branch_points(rng, spec, scale, nipple_dir):
            w = max(minr, scale * rng.uniform(0.10, 0.22))
            np.maximum(acc, rng.uniform(0.7, 1.0) * seg_profile(y0, x0, y1, x1, w), out=acc)
            points.append((y0, x0))
            points.append((y1, x1))
    dot_types = [t for t in ctype.split("-") if t not in ("VASCULAR", "FINE_LINEAR_BRANCHING")]
    if dot_types or not points:
        pts = _calc_points(rng, spec, scale, nipple_dir)
        for (py, px) in pts:
            kind = dot_types[int(rng.integers(len(dot_types)))] if dot_types else "PUNCTATE"
            bright = rng.uniform(0.65, 1.0)
            if kind in ("PUNCTATE", "SKIN"):
                prof = _disk(np.hypot(dy - py, dx - px), max(minr, scale * rng.uniform(0.12, 0.25)))
            elif kind == "AMORPHOUS":
                prof = 0.6 * _disk(np.hypot(dy - py, dx - px), max(minr, scale * rng.uniform(0.08, 0.2)))
            elif kind == "ROUND_AND_REGULAR":
                prof = _disk(np.hypot(dy - py, dx - px), max(minr, scale * rng.uniform(0.3, 0.7)))
            elif kind in ("LUCENT_CENTER", "LUCENT_CENTERED", "EGGSHELL"):
                rr = max(1.2, scale * rng.uniform(0.6, 1.6))
                dd = np.hypot(dy - py, dx - px)
                thick = 0.35 if kind == "EGGSHELL" else 0.55
                prof = _disk(dd, rr) - 0.85 * _disk(dd, rr * (1 - thick))
            elif kind in ("COARSE", "DYSTROPHIC"):
                prof = np.zeros_like(dy)
                for _ in range(int(rng.integers(2, 5))):
                    oy, ox = rng.normal(0, 0.6 * scale, 2)
                    rr = max(minr, scale * rng.uniform(0.4, 1.1))
                    np.maximum(prof, _disk(np.hypot(dy - py - oy, dx - px - ox), rr), out=prof)
            elif kind == "LARGE_RODLIKE":
                a = nipple_dir + rng.normal(0, 0.3)
                ln = scale * rng.uniform(1.5, 4.0)
                prof = seg_profile(py, px, py + ln * np.sin(a), px + ln * np.cos(a),
                                   max(minr, scale * rng.uniform(0.25, 0.45)))
            else:  # PLEOMORPHIC: mixed size and elongation
                a = rng.uniform(0, 2 * np.pi)
                ln = scale * rng.uniform(0.0, 0.7)
                prof = seg_profile(py, px, py + ln * np.sin(a), px + ln * np.cos(a),
                                   max(minr, scale * rng.uniform(0.08, 0.3)))
            np.maximum(acc, bright * prof, out=acc)
            points.append((py, px))
    canvas[sl] += (contrast * acc).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[sl] = _hull_mask(dy, dx, np.asarray(points, np.float32), pad=max(2.0, 1.0 * scale))
    return mask


def _hull_mask(dy: np.ndarray, dx: np.ndarray, pts: np.ndarray, pad: float) -> np.ndarray:
    """Convex hull of the points, grown by ``pad`` pixels: how CBIS outlines a calcification ROI."""
    if len(pts) < 3:
        d = np.full(dy.shape, np.inf, np.float32)
        for py, px in pts:
            d = np.minimum(d, np.hypot(dy - py, dx - px))
        return d <= pad + 2
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(pts)
    except QhullError:  # collinear points: fall back to disks
        return _hull_mask(dy, dx, pts[:2], pad)
    # Signed distance to each hull facet: inside when all (n . p + c) <= pad.
    inside = np.ones(dy.shape, bool)
    for ny, nx, c in hull.equations:
        inside &= (ny * dy + nx * dx + c) <= pad
    return inside


def add_noise(rng: np.random.Generator, img: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Quantum (signal-dependent, Poisson-like) plus electronic noise, then a slight detector blur."""
    sig = np.clip(img, 0.0, None)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noisy = img + noise * (0.008 * np.sqrt(sig) + 0.0015)
    noisy = ndimage.gaussian_filter(noisy, 0.5)
    # Outside the breast the film is near black: keep only a faint electronic floor there.
    return np.where(inside > 0.0, noisy, np.abs(noise) * 0.0015).astype(np.float32)


def to_uint16(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 65535.0).astype(np.uint16)
