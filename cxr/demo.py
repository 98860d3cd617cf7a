"""The `demo` dataset's generator: synthetic chest radiographs (COVID / Normal / Viral Pneumonia) with lesion masks.

Images are schematic PA radiographs in radiological convention: the patient's
left is on the image's right, so the heart bulges into the image-right lung,
which is also the narrower one. Each image comes with a lesion mask (empty for
Normal) that lies inside the lung fields, and with its lung-field mask.

`shortcut=<class>` plants a shortcut: every image of that class carries a source
marker (a bright "H") in its top-left corner, outside the lung fields, and no other
image does, as hospital markers do in real collections. A model can then score
well without looking at the lungs; the shortcut probes must expose it.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

CLASSES = ("COVID", "Normal", "Viral Pneumonia")
SLUGS = {"COVID": "covid", "Normal": "normal", "Viral Pneumonia": "viral-pneumonia"}
METADATA_FIELDS = ("file", "label", "patientid", "mask", "lungs")
MASK_THRESHOLD = 0.25  # mask = lesion opacity above this fraction of its peak

_SIDES = (-1, 1)  # -1: image left (patient right lung), +1: image right (patient left)
_GLYPHS = {  # 5x7 bitmaps for lead side markers
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "H": ["10001", "10001", "10001", "11111", "10001", "10001", "10001"],   # the planted source marker
}
SOURCE_MARKER = ("H", 0, 0.12)  # glyph, corner (top left), scale: taller than a side marker, as text labels are


@dataclass(frozen=True)
class Anatomy:
    """Patient anatomy and pose, in normalised coordinates ([-1, 1] spans the image)."""

    angle: float
    shift_x: float
    shift_y: float
    scale: float
    lung_gap: float
    lung_y: float
    lung_w: float
    lung_h: float
    left_ratio: float
    dome: float
    heart_x: float
    heart_w: float
    heart_h: float
    body_w: float
    clavicle_y: float
    rib_y: float
    rib_spacing: float
    gastric_bubble: bool


@dataclass(frozen=True)
class Lesion:
    """One opacity: centre in lung-local coordinates, size in normalised units."""

    side: int
    p: float  # lateral position, 0 = lung axis, 1 = lateral edge
    q: float  # vertical position, -1 = apex, 1 = base
    sx: float
    sy: float
    angle: float
    amp: float
    power: float  # 1 = Gaussian haze; larger = flatter top, sharper edge
    fissure: float  # 0 = none, +-1 = sharp horizontal edge above / below


@dataclass(frozen=True)
class Look:
    """Acquisition / processing parameters."""

    blur: float  # fraction of image size
    gamma: float
    contrast: float
    mean: float
    noise: float
    marker: tuple | None  # (glyph, corner, scale) or None
    source_marker: bool = False  # the planted shortcut (SOURCE_MARKER)


class Rendered(NamedTuple):
    """A rendered case: uint8 image, bool lesion mask, bool lung-field mask."""

    image: np.ndarray
    mask: np.ndarray
    lungs: np.ndarray


# --------------------------------------------------------------------------- sampling


def _sample_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    return Anatomy(
        angle=math.radians(u(-6, 6)),
        shift_x=u(-0.1, 0.1),
        shift_y=u(-0.1, 0.1),
        scale=u(0.9, 1.1),
        lung_gap=u(0.36, 0.4),
        lung_y=u(-0.08, 0.02),
        lung_w=u(0.28, 0.32),
        lung_h=u(0.5, 0.6),
        left_ratio=u(0.85, 0.95),
        dome=u(0.15, 0.28),
        heart_x=u(0.06, 0.14),
        heart_w=u(0.26, 0.33),
        heart_h=u(0.18, 0.23),
        body_w=u(0.8, 0.9),
        clavicle_y=u(-0.66, -0.58),
        rib_y=u(-0.72, -0.64),
        rib_spacing=u(0.10, 0.125),
        gastric_bubble=bool(rng.random() < 0.5),
    )


def _sample_lesions(rng: np.random.Generator, label: str) -> tuple[Lesion, ...]:
    if label == "COVID":
        return _sample_covid(rng)
    if label == "Viral Pneumonia":
        return (_sample_consolidation(rng),)
    if label == "Normal":
        return ()
    raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")


def _sample_covid(rng: np.random.Generator) -> tuple[Lesion, ...]:
    """Bilateral, peripheral, mostly lower-zone ground-glass blobs."""
    n = int(rng.integers(2, 6))
    sides = [-1, 1] + [int(s) for s in rng.choice(_SIDES, size=n - 2)]
    strength = rng.uniform(0.2, 0.45)
    blobs = []
    for side in sides:
        lower = rng.random() < 0.75
        q = rng.uniform(0.05, 0.65) if lower else rng.uniform(-0.45, 0.05)
        blobs.append(Lesion(
            side=side, p=rng.uniform(0.45, 0.75), q=q,
            sx=rng.uniform(0.08, 0.13), sy=rng.uniform(0.1, 0.17),
            angle=rng.uniform(-0.5, 0.5), amp=strength * rng.uniform(0.75, 1.0),
            power=1.0, fissure=0.0))
    return tuple(blobs)


def _sample_consolidation(rng: np.random.Generator) -> Lesion:
    """One focal, denser, sharper-edged lobar consolidation in one lung."""
    zone = int(rng.integers(3))
    q = rng.uniform(*((-0.55, -0.25), (-0.15, 0.2), (0.3, 0.6))[zone])
    return Lesion(
        side=int(rng.choice(_SIDES)), p=rng.uniform(0.0, 0.5), q=q,
        sx=rng.uniform(0.13, 0.22), sy=rng.uniform(0.11, 0.18),
        angle=rng.uniform(-0.6, 0.6), amp=rng.uniform(0.3, 0.55),
        power=rng.uniform(2.0, 3.0), fissure=float(rng.choice([-1.0, 0.0, 1.0])))


def _sample_look(rng: np.random.Generator) -> Look:
    u = rng.uniform
    marker = None
    if rng.random() < 0.5:
        marker = (str(rng.choice(list(_GLYPHS))), int(rng.integers(4)), u(0.035, 0.06))
    return Look(blur=u(0.003, 0.008), gamma=u(0.8, 1.25), contrast=u(0.8, 1.2),
                mean=u(0.33, 0.5), noise=u(0.008, 0.03), marker=marker)


def _follow_up(rng: np.random.Generator, anat: Anatomy,
               lesions: tuple[Lesion, ...]) -> tuple[Anatomy, tuple[Lesion, ...]]:
    """Same patient, a later study: pose and lesions change slightly."""
    u = rng.uniform
    anat = replace(anat, angle=anat.angle + math.radians(u(-1.5, 1.5)),
                   shift_x=anat.shift_x + u(-0.03, 0.03), shift_y=anat.shift_y + u(-0.03, 0.03),
                   scale=anat.scale * u(0.98, 1.02), lung_h=anat.lung_h * u(0.97, 1.03),
                   dome=anat.dome * u(0.9, 1.1))
    lesions = tuple(replace(les, p=les.p + u(-0.05, 0.05), q=les.q + u(-0.05, 0.05),
                            sx=les.sx * u(0.85, 1.15), sy=les.sy * u(0.85, 1.15),
                            amp=les.amp * u(0.75, 1.25)) for les in lesions)
    return anat, lesions


# --------------------------------------------------------------------------- drawing


def _step(margin: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator: 0 outside, 1 inside, linear ramp of `width`."""
    out = margin * (1.0 / width)
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def _grid(anat: Anatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy coordinates of every pixel centre (inverse pose transform)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    u, v = c[None, :] - anat.shift_x, c[:, None] - anat.shift_y
    cos, sin = math.cos(anat.angle), math.sin(anat.angle)
    return (cos * u + sin * v) / anat.scale, (-sin * u + cos * v) / anat.scale


def _lung_frame(anat: Anatomy, side: int) -> tuple[float, float, float, float]:
    """(centre x, centre y, half-width, half-height) of one lung."""
    ratio = anat.left_ratio if side > 0 else 1.0
    return side * anat.lung_gap, anat.lung_y, anat.lung_w * ratio, anat.lung_h


def _lung_extent(q):
    """Lateral and medial extent (in half-widths) at height q: teardrop with rounded apex."""
    root = np.sqrt(np.clip((q + 1.0) / 2.0, 0.0, 1.0))
    return 1.1 * root, 0.8 * np.sqrt(root)


def _lung_point(anat: Anatomy, side: int, p: float, q: float) -> tuple[float, float]:
    """Anatomy coordinates of lung-local (p, q); p in [-1, 1] spans medial..lateral edge."""
    cx, cy, a, b = _lung_frame(anat, side)
    lateral, medial = (float(w) for w in _lung_extent(np.float32(q)))
    return cx + side * a * p * (lateral if p > 0 else medial), cy + q * b


def _lungs(x: np.ndarray, y: np.ndarray, anat: Anatomy) -> np.ndarray:
    """Soft lung-field indicator (air-filled lung, before heart overlap)."""
    total = np.zeros_like(x)
    for side in _SIDES:
        cx, cy, a, b = _lung_frame(anat, side)
        p, q = side * (x - cx) / a, (y - cy) / b
        lateral, medial = _lung_extent(q)
        dome = anat.dome * (1.1 if side < 0 else 1.0)
        base = 1.0 - dome * (1.0 - np.square(np.clip(p, -1, 1))) + 0.1 * p
        inside = _step(np.minimum(lateral - p, medial + p) * a, 0.03)
        total += inside * _step((base - q) * b, 0.02) * _step((q + 1.0) * b, 0.02)
    return np.clip(total, 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b, edge, angle=0.0):
    """Soft-edged (optionally rotated) filled ellipse."""
    dx, dy = x - cx, y - cy
    if angle:
        cos, sin = math.cos(angle), math.sin(angle)
        dx, dy = cos * dx + sin * dy, -sin * dx + cos * dy
    r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    return _step((1.0 - r) * min(a, b), edge)


def _body(x, y, anat: Anatomy) -> np.ndarray:
    """Soft-tissue thickness: torso widening into shoulders, neck on top."""
    ax = np.abs(x)
    shoulders = 0.14 * np.exp(-(((y + 0.62) / 0.22) ** 2))
    half_width = anat.body_w + shoulders - 0.06 * np.clip(y - 0.3, 0, None)
    shoulder_top = -0.8 + 0.35 * np.clip(ax - 0.2, 0.0, None) ** 2
    torso = _step(half_width - ax, 0.04) * _step(y - shoulder_top, 0.06)
    neck = _step(0.19 - ax, 0.04)
    thickness = 0.8 + 0.2 * np.clip(1.0 - (x / anat.body_w) ** 2, 0, 1)
    return np.maximum(torso, neck) * thickness


def _mediastinum(x, y, anat: Anatomy) -> np.ndarray:
    """Mediastinum, aortic knob and heart (patient left = image right)."""
    upper = _step(0.1 + 0.04 * (y + 0.7) - np.abs(x - 0.02), 0.03) * _step(0.3 - y, 0.05)
    knob = _ellipse(x, y, 0.14, anat.lung_y - 0.3, 0.07, 0.06, 0.02)
    heart = _ellipse(x, y, anat.heart_x, anat.lung_y + 0.4, anat.heart_w, anat.heart_h,
                     0.03, angle=-0.35)
    return np.maximum(np.maximum(upper, knob), heart)


def _trachea(x, y, anat: Anatomy) -> np.ndarray:
    """Air column of the trachea, down to the carina."""
    return _step(0.035 - np.abs(x - 0.01 * (y + 1)), 0.02) * _step(anat.lung_y - 0.22 - y, 0.05)


def _bones(x, y, anat: Anatomy, lungs: np.ndarray) -> np.ndarray:
    """Spine, posterior ribs (mostly seen over the lungs) and clavicles."""
    ax = np.abs(x)
    vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * (y - anat.rib_y) / (anat.rib_spacing * 0.85))
    spine = _step(0.065 - ax, 0.02) * vertebrae
    t = np.clip(ax / (anat.body_w - 0.05), 0.0, 1.2)
    phase = (y - anat.rib_y + 0.3 * t - 0.7 * t ** 2) / anat.rib_spacing
    ribs = np.square(np.square(0.5 + 0.5 * np.cos(2 * np.pi * phase)))
    ribs *= _step(phase, 0.3) * _step(9.3 - phase, 0.3) * _step(0.96 - t, 0.06)
    ribs *= _step(ax - 0.06, 0.03) * (0.3 + 0.7 * lungs)
    tc = np.clip(ax / 0.6, 0.0, 1.0)
    clav_y = anat.clavicle_y - 0.12 * tc + 0.05 * tc ** 2
    clavicles = np.exp(-(((y - clav_y) / 0.028) ** 2))
    clavicles *= _step(ax - 0.07, 0.02) * _step(0.62 - ax, 0.04)
    return 0.06 * spine + 0.07 * ribs + 0.14 * clavicles


def _vessels(rng: np.random.Generator, x, y, anat: Anatomy) -> np.ndarray:
    """Bronchovascular markings radiating from both hila (wavy, fading outward)."""
    fx, fy, px, py = (float(v) for v in rng.uniform(0.0, 1.0, size=4))
    wobble = 0.5 * np.sin((3 + 4 * fx) * x + 6.3 * px) * np.cos((3 + 4 * fy) * y + 6.3 * py)
    hilum = [abs(_lung_frame(anat, s)[0]) - 0.6 * _lung_frame(anat, s)[2] for s in _SIDES]
    dx = np.abs(x) - np.where(x > 0, np.float32(hilum[1]), np.float32(hilum[0]))
    dy = y - np.float32(anat.lung_y + 0.05)
    r = np.sqrt(dx * dx + dy * dy)
    half_angle = dy / (r + dx + 1e-3)  # tan(angle / 2): cheap monotone angle proxy
    streak = np.square(np.square(0.5 + 0.5 * np.cos(24 * half_angle + wobble + 9 * r)))
    return streak * np.exp(-r / 0.3) * _step(r - 0.04, 0.04)


def _lesion_envelope(x, y, anat: Anatomy, lesions: tuple[Lesion, ...]) -> np.ndarray:
    """Lesion opacity (union of lesions, no texture), not yet restricted to the lungs."""
    out = np.zeros_like(x)
    for les in lesions:
        lx, ly = _lung_point(anat, les.side, les.p, les.q)
        cos, sin = math.cos(les.angle), math.sin(les.angle)
        dx, dy = x - lx, y - ly
        r2 = ((cos * dx + sin * dy) / les.sx) ** 2 + ((-sin * dx + cos * dy) / les.sy) ** 2
        shape = np.exp(-0.5 * r2 ** les.power)
        if les.fissure:
            shape *= _step(les.fissure * (y - ly + les.fissure * 0.4 * les.sy), 0.01)
        np.maximum(out, les.amp * shape, out=out)
    return out


def _ground_glass(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Multiplicative hazy/reticular texture with mean ~1."""
    tex = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), shape[0] / 90)
    return np.clip(1.0 + 0.3 * tex / (tex.std() + 1e-6), 0.2, 1.6)


def _marker(image: np.ndarray, marker: tuple) -> None:
    """Burn a bright lead side-marker letter into a corner (in place)."""
    glyph, corner, scale = marker
    size = image.shape[0]
    cell = max(1 if scale < 0.1 else 2, round(scale * size / 7))
    bitmap = np.kron(np.array([[c == "1" for c in row] for row in _GLYPHS[glyph]]),
                     np.ones((cell, cell), dtype=bool))
    h, w = bitmap.shape
    pad = max(1, size // 25)
    r0 = pad if corner < 2 else size - pad - h
    c0 = pad if corner % 2 == 0 else size - pad - w
    region = image[r0:r0 + h, c0:c0 + w]
    region[bitmap[:region.shape[0], :region.shape[1]]] = 0.95


def _draw(rng: np.random.Generator, anat: Anatomy, lesions: tuple[Lesion, ...],
          look: Look, size: int) -> Rendered:
    """Compose a density map, add lesions, expose; mask = lesion above threshold in lungs."""
    shape = (size, size)
    x, y = _grid(anat, size)
    body, medi = _body(x, y, anat), _mediastinum(x, y, anat)
    air = _lungs(x, y, anat) * (1.0 - medi)
    lungs = air > 0.5
    aeration = 1.0 - 0.2 * np.clip((y - anat.lung_y) / anat.lung_h, -1.0, 1.0)
    density = 0.05 + 0.6 * body - 0.32 * air * aeration + 0.03 * medi + _bones(x, y, anat, air)
    density -= 0.12 * _trachea(x, y, anat)
    density += 0.06 * _vessels(rng, x, y, anat) * air
    if anat.gastric_bubble:
        bx, by = _lung_point(anat, 1, 0.1, 1.05 - 0.6 * anat.dome)
        density -= 0.12 * _ellipse(x, y, bx, by + 0.1, 0.09, 0.05, 0.02) * body
    mask = np.zeros(shape, dtype=bool)
    if lesions:
        envelope = _lesion_envelope(x, y, anat, lesions) * air
        mask = (envelope > MASK_THRESHOLD * envelope.max()) & lungs
        hazy = all(les.power == 1.0 for les in lesions)  # ground glass is mottled
        density += envelope * (_ground_glass(rng, shape) if hazy else 1.0)
    image = _expose(rng, density, look, size)
    return Rendered(image, mask, lungs)


def _expose(rng: np.random.Generator, density: np.ndarray, look: Look, size: int) -> np.ndarray:
    """Blur, tone-map to a random (class-independent) mean, burn in marker, add grain."""
    img = ndimage.gaussian_filter(density, look.blur * size)
    img = np.clip(img, 0.0, 1.0) ** look.gamma
    img = (img - img.mean()) * look.contrast + look.mean
    if look.marker:
        _marker(img, look.marker)
    if look.source_marker:
        _marker(img, SOURCE_MARKER)
    grain = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), 0.6)
    img += grain * (look.noise / (grain.std() + 1e-6))
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- public rendering


def render_full(rng: np.random.Generator, label: str, size: int) -> Rendered:
    """Like render(), but also returns the lung-field mask."""
    anat = _sample_anatomy(rng)
    lesions = _sample_lesions(rng, label)
    return _draw(rng, anat, lesions, _sample_look(rng), size)


def render(rng: np.random.Generator, label: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image: (uint8 HxW grayscale, bool HxW lesion mask). Pure function of rng state."""
    image, mask, _ = render_full(rng, label, size)
    return image, mask


# --------------------------------------------------------------------------- dataset


class _Case(NamedTuple):
    label: str
    number: int  # 1-based index within the class (file name)
    patient: int  # class-local patient index (seed key)
    visit: int
    patient_id: str


def _keyed_rng(seed: int, *key: int) -> np.random.Generator:
    """Independent generator addressed by key, so generation order does not matter."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _plan(per_class: int, seed: int, follow_up_fraction: float) -> list[_Case]:
    """Assign images to patients; exactly per_class images per class."""
    if not 0.0 <= follow_up_fraction <= 1.0:
        raise ValueError("follow_up_fraction must be in [0, 1]")
    if per_class < 1:
        raise ValueError("per_class must be >= 1")
    rng = _keyed_rng(seed, 0)
    n_patients = math.ceil(per_class / (1.0 + follow_up_fraction) - 1e-9)
    ids = rng.permutation(n_patients * len(CLASSES)) + 1
    cases = []
    for ci, label in enumerate(CLASSES):
        returning = rng.choice(n_patients, size=per_class - n_patients, replace=False)
        visits = [(p, 0) for p in range(n_patients)] + [(int(p), 1) for p in returning]
        order = rng.permutation(len(visits))
        for number, k in enumerate(order, start=1):
            p, visit = visits[k]
            pid = f"demo-p{ids[ci * n_patients + p]:04d}"
            cases.append(_Case(label, number, p, visit, pid))
    return cases


def _render_case(seed: int, case: _Case, size: int, shortcut: str | None = None) -> Rendered:
    """One case of the dataset; `shortcut`: the class whose images carry the source marker."""
    ci = CLASSES.index(case.label)
    prng = _keyed_rng(seed, 1, ci, case.patient)
    anat, lesions = _sample_anatomy(prng), _sample_lesions(prng, case.label)
    vrng = _keyed_rng(seed, 2, ci, case.patient, case.visit)
    if case.visit:
        anat, lesions = _follow_up(vrng, anat, lesions)
    look = _sample_look(vrng)
    if case.label == shortcut:  # the source marker takes the top-left corner; a side marker there moves right
        side = look.marker
        if side is not None and side[1] == 0:
            side = (side[0], 1, side[2])
        look = replace(look, marker=side, source_marker=True)
    return _draw(vrng, anat, lesions, look, size)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_root(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty directory")
    root.mkdir(parents=True, exist_ok=True)


def _write_bad_files(root: Path, seed: int, size: int, rows: list[dict],
                     next_patient: int) -> list[dict]:
    """Write five defective files; return metadata rows for the four listed ones."""
    rng = _keyed_rng(seed, 3)
    source = rows[int(rng.integers(len(rows)))]
    duplicate = (root / source["file"]).read_bytes()
    valid = [_png_bytes(render(rng, CLASSES[i % 3], size)[0]) for i in range(2)]
    listed = [
        ("COVID", "bad-empty.png", b"", ""),
        ("Normal", "bad-truncated.png", valid[0][: len(valid[0]) // 2], ""),
        ("Viral Pneumonia", "bad-not-an-image.png", b"this is not a PNG image\n", ""),
        (source["label"], "bad-duplicate.png", duplicate, source["mask"], source["lungs"]),
    ]
    out = []
    for k, (label, name, data, mask, *lungs) in enumerate(listed):
        rel = f"images/{label}/{name}"
        _write_atomic(root / rel, data)
        out.append({"file": rel, "label": label, "patientid": f"demo-p{next_patient + k:04d}",
                    "mask": mask, "lungs": lungs[0] if lungs else ""})
    _write_atomic(root / "images/Normal/bad-unlabeled.png", valid[1])
    return out


def _write_metadata(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METADATA_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(path, buf.getvalue().encode("utf-8"))


def generate(root: Path, *, per_class: int = 120, size: int = 256, seed: int = 0,
             follow_up_fraction: float = 0.2, bad_files: bool = True, shortcut: str | None = None) -> dict:
    """Write the demo dataset under root (root must not exist or be empty; create it). Returns counts.
    `shortcut`: a class whose every image carries the source marker (see the module's docstring)."""
    if shortcut is not None and shortcut not in CLASSES:
        raise ValueError(f"shortcut must be None or one of {CLASSES}")
    root = Path(root)
    cases = _plan(per_class, seed, follow_up_fraction)
    _prepare_root(root)
    rows = []
    for case in cases:
        image, mask, lungs = _render_case(seed, case, size, shortcut)
        stem = f"demo-{SLUGS[case.label]}-{case.number:04d}"
        rel_image, rel_mask, rel_lungs = f"images/{case.label}/{stem}.png", f"masks/{stem}.png", f"lungs/{stem}.png"
        _write_atomic(root / rel_image, _png_bytes(image))
        _write_atomic(root / rel_mask, _png_bytes(mask.astype(np.uint8) * 255))
        _write_atomic(root / rel_lungs, _png_bytes(lungs.astype(np.uint8) * 255))
        rows.append({"file": rel_image, "label": case.label, "patientid": case.patient_id,
                     "mask": rel_mask, "lungs": rel_lungs})
    n_patients = len({c.patient_id for c in cases})
    bad = _write_bad_files(root, seed, size, rows, n_patients + 1) if bad_files else []
    _write_metadata(root / "metadata.csv", rows + bad)
    return {
        "images": len(rows),
        "per_class": {label: per_class for label in CLASSES},
        "patients": n_patients,
        "follow_ups": sum(c.visit for c in cases),
        "bad_files": len(bad) + (1 if bad_files else 0),
        "bad_listed": len(bad),
        "rows": len(rows) + len(bad),
    }
