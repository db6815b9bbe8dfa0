"""Synthetic, labelled medical studies for the demo, tests and benchmarks.

Real studies cannot ship with an open-source project, yet every stage needs realistic input: DICOM
with the header variety a hospital produces (modalities, bit depths, MONOCHROME1, rescale to
Hounsfield units, RLE compression, PHI to strip), PNG/JPEG exports and zip archives. The classes
differ by anatomy and noise character; geometry, field of view, exposure, gamma and noise level are
randomised per image so that global intensity statistics (mean, std) are a weak cue and a model
has to learn shape and texture, as on real data.

Everything derives from ``seed``: the same arguments give byte-identical objects (within one
installation: Pillow's PNG/JPEG encoders and pydicom's file meta may change between versions).
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from mmpipe.config import CLASSES

#: Default class proportions, imbalanced like Table I of the paper.
TABLE_I_WEIGHTS: dict[str, float] = {
    "chest_xray": 0.30,
    "brain_mri": 0.25,
    "lung_ct": 0.20,
    "liver_ct": 0.15,
    "retinal_oct": 0.10,
}
#: Default share of patients exported in each file format.
DEFAULT_FORMATS: dict[str, float] = {"dicom": 0.8, "png": 0.12, "jpeg": 0.08}
RLE_FRACTION = 0.1  # of DICOM images, so the RLE decoder path is always exercised
MONOCHROME1_FRACTION = 0.3  # of chest X-ray patients
PNG16_FRACTION = 0.4  # of PNGs whose native data is 16-bit
MIN_SIZE = 32
DIFFICULTIES = ("realistic", "hard")
CT_PADDING_HU = (-2048, -3024)  # vendor values outside the reconstruction circle

# Shared by both CT classes on purpose: a class-specific default window would be a header shortcut.
_CT_WINDOWS = ((40.0, 400.0), (-600.0, 1500.0), (50.0, 350.0), (400.0, 1800.0))

_MODALITY = {"brain_mri": "MR", "chest_xray": "CR", "retinal_oct": "OPT", "lung_ct": "CT", "liver_ct": "CT"}
_BODY_PART = {
    "brain_mri": "HEAD",
    "chest_xray": "CHEST",
    "retinal_oct": "EYE",
    "lung_ct": "CHEST",
    "liver_ct": "ABDOMEN",
}
# OCT B-scans exported as single frames are Secondary Capture objects: the Ophthalmic Tomography IOD
# is multi-frame with functional groups this generator does not model.
_SOP_CLASS = {
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "OPT": SecondaryCaptureImageStorage,
    "CT": CTImageStorage,
}
_STUDY_DESCRIPTION = {
    "brain_mri": "MRI BRAIN WITHOUT CONTRAST",
    "chest_xray": "XR CHEST 1 VIEW",
    "retinal_oct": "OCT MACULA",
    "lung_ct": "CT CHEST",
    "liver_ct": "CT ABDOMEN LIVER",
}
_EXTENSION = {"dicom": "dcm", "png": "png", "jpeg": "jpg"}


@dataclass(frozen=True)
class SynthObject:
    """One object as it would sit in the image store."""

    key: str  # relative object key, e.g. "brain_mri/SYN-0-00012/0003.dcm" or "lung_ct/SYN-0-00040.zip"
    body: bytes
    label: str  # class name from CLASSES
    patient_id: str  # the fake PatientID written in the headers
    kind: str  # "dicom" | "png" | "jpeg" | "zip"


# --------------------------------------------------------------------------- drawing primitives


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: (rows, cols), y pointing down."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _frame(y: np.ndarray, x: np.ndarray, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates relative to (cy, cx), rotated by ``angle`` radians."""
    dy, dx = y - cy, x - cx
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return c * dy - s * dx, s * dy + c * dx


def _ell(dy: np.ndarray, dx: np.ndarray, oy: float, ox: float, ry: float, rx: float) -> np.ndarray:
    """Normalised elliptic radius around (oy, ox): below 1 inside the ellipse."""
    return np.sqrt(((dy - oy) / ry) ** 2 + ((dx - ox) / rx) ** 2)


def _inside(r: np.ndarray, edge: float = 0.04) -> np.ndarray:
    """Soft membership (1 inside, 0 outside) from a normalised radius, antialiasing the border."""
    return np.clip((1.0 - r) / edge, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance noise correlated over ~size/cells pixels (bicubic upsampling of a coarse grid)."""
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    out = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    return out / max(float(out.std()), 1e-6)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with replicated edges (Pillow cannot blur float images)."""
    radius = max(1, round(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    n_rows, n_cols = img.shape
    padded = np.pad(img, radius, mode="edge")
    rows = sum(w * padded[i : i + n_rows, :] for i, w in enumerate(taps))
    return sum(w * rows[:, i : i + n_cols] for i, w in enumerate(taps))


def _display(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-image display mapping to [0, 1]: black point, white point, then gamma.

    Scanners and export pipelines differ in all three. Black and white points are percentiles so they
    adapt to the anatomy; the gamma is chosen so that the percentile-normalised image averages a
    target drawn independently of the class, which makes mean brightness useless as a label cue.
    Percentiles commute with a monotone gamma, so the search needs one percentile computation.
    """
    sub = img[::3, ::3]
    black_pct = rng.uniform(0, 45) if rng.random() < 0.5 else 0.0
    black, white = np.percentile(sub, [black_pct, rng.uniform(97, 100)])
    scale = max(float(white - black), 1e-6)
    q = np.clip((sub - black) / scale, 0, 1)
    lo, hi = np.percentile(q, [0.5, 99.5])
    target = rng.uniform(0.08, 0.5)
    log_lo, log_hi = np.log(0.3), np.log(3.5)  # plausible display gammas
    for _ in range(14):  # bisection on log(gamma): the normalised mean falls as gamma grows
        g = float(np.exp((log_lo + log_hi) / 2))
        mean = np.clip((q**g - lo**g) / max(hi**g - lo**g, 1e-9), 0, 1).mean()
        log_lo, log_hi = (np.log(g), log_hi) if mean > target else (log_lo, np.log(g))
    return np.clip((img - black) / scale, 0, 1) ** g


def _to_uint(img: np.ndarray, peak: float, dtype: type) -> np.ndarray:
    """Scale a non-negative float image so its maximum becomes ``peak`` and quantise."""
    top = max(float(img.max()), 1e-6)
    return np.rint(np.clip(img, 0, None) * (peak / top)).astype(dtype)


# --------------------------------------------------------------------------- anatomy

_MR_SIGNAL = {  # scalp, skull, csf, grey, white; repetition time, echo time (ms)
    "T1": ((0.9, 0.06, 0.12, 0.48, 0.72), 500.0, 12.0),
    "T2": ((0.55, 0.05, 1.0, 0.62, 0.42), 4000.0, 100.0),
    "FLAIR": ((0.6, 0.05, 0.08, 0.62, 0.45), 9000.0, 120.0),
}


def _brain_mri(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """Axial head MR: scalp, dark skull ring, folded cortex, white matter, ventricles; Rician noise."""
    y, x = _grid(size)
    scale = rng.uniform(0.45, 1.05)
    dy, dx = _frame(y, x, rng.normal(0, 0.05), rng.normal(0, 0.05), rng.normal(0, 0.12))
    ry, rx = scale * rng.uniform(0.88, 1.0), scale * rng.uniform(0.7, 0.84)
    r = _ell(dy, dx, 0, 0, ry, rx)
    theta = np.arctan2(dy, dx)
    # sulci: the brain surface wobbles with angle; gyri: the grey/white boundary is blotchy
    sulci = sum(
        rng.uniform(0.005, 0.015) * np.sin(rng.uniform(8, 30) * theta + rng.uniform(0, 6.3)) for _ in range(3)
    )
    gyri = 0.06 * _smooth_noise(rng, size, max(4, size // 10))
    sequence = str(rng.choice(list(_MR_SIGNAL), p=[0.45, 0.4, 0.15]))
    signal, tr, te = _MR_SIGNAL[sequence]
    scalp, skull, csf, grey, white = (v * rng.uniform(0.8, 1.2) for v in signal)
    t_scalp, t_skull = rng.uniform(0.04, 0.08), rng.uniform(0.04, 0.09)
    brain_r = 1 - t_scalp - t_skull - 0.02
    white_r = brain_r * rng.uniform(0.55, 0.75)
    img = np.select(
        [r > 1, r > 1 - t_scalp, r > 1 - t_scalp - t_skull, r > brain_r + sulci, r + gyri > white_r],
        [0.0, scalp, skull, csf, grey],
        white,
    ).astype(np.float32)
    if rng.random() < 0.8:  # lateral ventricles (absent on slices above them)
        v = rng.uniform(0.3, 1.3)
        for side in (-1, 1):
            horn = _ell(dy, dx, -0.05 * ry, side * 0.1 * rx, 0.25 * ry * v, 0.07 * rx * v)
            img += (csf - img) * _inside(horn, 0.15)
    img = _blur(img, 0.6)
    img *= 1 + 0.15 * _smooth_noise(rng, size, 3)  # coil bias field
    img *= 1 + 0.05 * _smooth_noise(rng, size, max(4, size // 4))  # tissue texture
    sigma = rng.uniform(0.015, 0.08) * float(img.max())
    noise = rng.standard_normal((2, size, size), dtype=np.float32) * sigma
    magnitude = np.hypot(np.clip(img, 0, None) + noise[0], noise[1])  # Rician: magnitude of complex noise
    magnitude = _display(magnitude, rng)
    peak = rng.uniform(600, 4000)
    hints = {
        "sequence": sequence,
        "repetition_time": tr,
        "echo_time": te,
        "pixel_spacing": round(160.0 / (rx * size), 4),
    }
    return _to_uint(magnitude, peak, np.uint16), hints


def _chest_xray(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """PA/AP chest radiograph: torso, dark lung fields, heart and mediastinum, rib arcs; smooth noise."""
    y, x = _grid(size)
    zoom = rng.uniform(0.75, 1.2)  # above 1 the thorax overfills the detector
    Y, X = _frame(y, x, rng.normal(0, 0.06), rng.normal(0, 0.05), rng.normal(0, 0.05))
    Y, X = Y / zoom, X / zoom
    ax = np.abs(X)
    shoulder, waist = rng.uniform(0.85, 1.05), rng.uniform(0.75, 0.95)
    half = np.interp(Y, [-2.0, -0.85, -0.65, 1.5], [0.2, 0.22, shoulder, waist]).astype(np.float32)
    torso = np.clip((half - ax) / 0.04, 0, 1)
    path = np.sqrt(np.clip(1 - (ax / half) ** 2, 0, 1))  # X-ray path length through a cylinder
    img = torso * (rng.uniform(0.4, 0.6) + rng.uniform(0.15, 0.3) * path)
    lung_y, lung_x = rng.uniform(-0.1, 0.05), rng.uniform(0.38, 0.48)
    lung_ry, lung_rx = rng.uniform(0.48, 0.62), rng.uniform(0.24, 0.32)
    lungs = np.maximum(
        _inside(_ell(Y, X, lung_y, -lung_x, lung_ry, lung_rx), 0.15),
        _inside(_ell(Y, X, lung_y, lung_x, lung_ry, lung_rx * rng.uniform(0.9, 1.05)), 0.15),
    )
    heart = _inside(
        _ell(Y, X, lung_y + 0.3, rng.uniform(0.05, 0.15), rng.uniform(0.2, 0.28), rng.uniform(0.25, 0.33))
    )
    lungs *= 1 - heart
    hilum = np.exp(-(((ax - 0.2) / 0.25) ** 2 + ((Y - lung_y) / 0.3) ** 2))
    markings = 0.05 * np.clip(_smooth_noise(rng, size, max(4, size // 5)), 0, None) * (0.3 + hilum)
    img -= lungs * (rng.uniform(0.22, 0.38) - markings)
    img += 0.1 * heart + 0.08 * np.clip((0.07 - ax) / 0.02, 0, 1) * torso  # heart, spine
    spacing = rng.uniform(0.11, 0.14)
    rib_u = np.clip(ax, 0.06, None)
    # posterior ribs: level medially, arcing down laterally; ``phase`` counts ribs from the apex
    phase = (Y + 0.72 - 0.8 * np.clip(rib_u - 0.2, 0, None) ** 2) / spacing
    band = np.exp(-(((phase - np.rint(phase)) * spacing / 0.025) ** 2)) * ((phase > -0.5) & (phase < 9.5))
    img += rng.uniform(0.1, 0.2) * band * (ax > 0.07) * torso
    clavicle = np.exp(-(((Y + 0.62 - 0.3 * (ax - 0.3) ** 2) / 0.03) ** 2)) * (ax > 0.05) * (ax < 0.6)
    img += 0.15 * clavicle * torso
    img = _blur(img, 0.8)
    img *= 1 + 0.08 * _smooth_noise(rng, size, 2)  # heel effect / exposure gradient
    img += rng.uniform(0.005, 0.03) * _smooth_noise(rng, size, max(4, size // 2))
    img = np.clip(img, 0, None) + rng.uniform(0.0, 0.15)  # direct exposure is rarely pure black
    if rng.random() < 0.4:  # collimator shutters: unexposed borders processed to white or black
        fill = float(img.max()) if rng.random() < 0.5 else 0.0
        top, bottom, left, right = (int(rng.integers(0, size // 10 + 1)) for _ in range(4))
        img[:top], img[size - bottom :], img[:, :left], img[:, size - right :] = fill, fill, fill, fill
    img = _display(img, rng)
    bits = int(rng.choice([12, 14]))
    hints = {"view": str(rng.choice(["PA", "AP"], p=[0.7, 0.3])), "pixel_spacing": round(430.0 / size, 4)}
    return _to_uint(img, (2**bits - 1) * rng.uniform(0.8, 1.0), np.uint16), hints


def _retinal_oct(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """Macular OCT B-scan: wavy retinal layers (bright RNFL and RPE, dark nuclear layers), foveal pit,
    choroid fading with depth and vessel shadows; multiplicative speckle, log-compressed to 8 bits."""
    y, x = _grid(size)
    col = x[:1, :]
    depth = rng.uniform(0.5, 1.8)  # axial magnification
    fovea = np.exp(-(((col - rng.normal(0, 0.2)) / rng.uniform(0.12, 0.25)) ** 2)) * (rng.random() < 0.75)
    surface = (
        rng.uniform(-0.8, 0.0)
        + rng.normal(0, 0.12) * col
        + rng.uniform(-0.3, 0.3) * col**2
        + 0.02 * np.sin(rng.uniform(2, 6) * col + rng.uniform(0, 6.3))
        + rng.uniform(0.03, 0.09) * depth * fovea
    )
    d = (y - surface) / depth  # depth below the inner limiting membrane
    thickness = [  # RNFL, GCL+IPL, INL, OPL, ONL, ellipsoid zone, RPE
        0.035 * (1 - 0.9 * fovea) + 0.005,
        0.07 * (1 - 0.85 * fovea) + 0.005,
        0.03 * (1 - 0.7 * fovea) + 0.005,
        0.02 + 0 * col,
        0.07 + 0.04 * fovea,
        0.012 + 0 * col,
        0.025 + 0 * col,
    ]
    bounds = np.cumsum(np.stack(thickness), axis=0) * rng.uniform(0.8, 1.25)
    levels = [0.03, 0.85, 0.5, 0.18, 0.45, 0.12, 0.75, 1.0]
    jitter = rng.uniform(0.8, 1.2, len(levels))
    img = np.select(
        [d < 0, *(d < b for b in bounds)], [lv * j for lv, j in zip(levels, jitter, strict=True)], 0.0
    )
    below = d - bounds[-1]
    choroid = 0.5 * np.exp(-np.clip(below, 0, None) / rng.uniform(0.08, 0.2))
    choroid *= np.clip(1 + 0.6 * _smooth_noise(rng, size, max(4, size // 8)), 0.1, None)  # vessel lumens
    img = np.where(below > 0, choroid, img).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):  # shadows cast by retinal vessels
        shadow = 0.6 * np.exp(-(((col - rng.uniform(-0.9, 0.9)) / 0.02) ** 2))
        img *= 1 - shadow * (d > 0.04)
    looks = rng.uniform(1.0, 6.0)
    img *= rng.gamma(looks, 1 / looks, (size, size)).astype(np.float32)  # multiplicative speckle
    img = _blur(img, 0.5) + rng.uniform(0.005, 0.03) * np.abs(
        rng.standard_normal((size, size), dtype=np.float32)
    )
    gain = rng.uniform(20, 200)
    img = np.log1p(gain * img) / np.log1p(gain)  # scanners display log intensity
    img = _display(img, rng)
    hints = {"laterality": str(rng.choice(["R", "L"])), "pixel_spacing": round(6.0 / size, 4)}
    return _to_uint(img, rng.uniform(200, 255), np.uint8), hints


def _ct_torso(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, np.ndarray]:
    """Axial body section in HU: air, subcutaneous fat, muscle wall, soft tissue, spine and ribs.

    Returns (hu, dy, dx, ry, rx, cavity) where cavity is the soft mask inside the muscle wall and
    (dy, dx) are body-centred coordinates for placing organs.
    """
    y, x = _grid(size)
    scale = rng.uniform(0.5, 1.15)  # above ~0.95 the body is cut by the reconstruction field
    rx = scale * rng.uniform(0.85, 0.97)
    ry = rx * rng.uniform(0.6, 0.8)
    dy, dx = _frame(y, x, rng.uniform(-0.15, 0.02), rng.normal(0, 0.04), rng.normal(0, 0.04))
    r = _ell(dy, dx, 0, 0, ry, rx)
    fat = rng.uniform(0.04, 0.2)  # subcutaneous fat thickness (normalised radius)
    fat_hu, muscle_hu = rng.uniform(-110, -80), rng.uniform(40, 60)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu += (fat_hu + 1000) * _inside(r, 0.03)
    hu += (muscle_hu - fat_hu) * _inside(r / (1 - fat), 0.03)
    cavity = _inside(r / (1 - fat - 0.05), 0.03)
    hu += (rng.uniform(20, 40) - muscle_hu) * cavity
    vy, vr = 0.62 * ry, 0.16 * ry  # vertebral body, posterior (image bottom, patient supine)
    vert = _ell(dy, dx, vy, 0, vr, vr * 1.1)
    hu = np.where(vert < 1, np.where(vert > 0.8, rng.uniform(600, 1000), rng.uniform(150, 300)), hu)
    canal = _ell(dy, dx, vy + 1.6 * vr, 0, 0.45 * vr, 0.45 * vr) < 1
    arch = (_ell(dy, dx, vy + 1.6 * vr, 0, 0.8 * vr, 0.9 * vr) < 1) | (
        (np.abs(dx) < 0.2 * vr) & (dy > vy + 1.6 * vr) & (dy < vy + 3 * vr)
    )
    hu = np.where(arch & ~canal, rng.uniform(500, 900), np.where(canal, 20.0, hu))
    theta = np.arctan2(dy / ry, dx / rx)
    ribs = (
        (np.abs(r - (1 - fat - 0.08)) < 0.035)
        & (np.cos(rng.integers(9, 14) * theta) > 0.5)
        & (np.sin(theta) > -0.6)
    )
    hu = np.where(ribs, rng.uniform(400, 900), hu)
    return hu, dy, dx, ry, rx, cavity


def _ct_finish(
    rng: np.random.Generator, hu: np.ndarray, dy: np.ndarray, dx: np.ndarray, ry: float
) -> tuple[np.ndarray, dict]:
    """Table, scanner blur and noise, optional padding outside the reconstruction circle; int16 HU."""
    size = hu.shape[0]
    if rng.random() < 0.75:
        table = np.abs(dy - ry - rng.uniform(0.03, 0.1) + 0.15 * dx**2) < 0.025
        hu = np.where(table, rng.uniform(-300, 100), hu)
    hu = _blur(hu, 0.6)
    noise = _blur(rng.standard_normal((size, size), dtype=np.float32), 0.7)
    hu += noise * (rng.uniform(6, 30) / max(float(noise.std()), 1e-6))
    hu = np.clip(hu, -1024, 3071)
    hints: dict = {
        "kvp": float(rng.choice([100, 120, 140])),
        "window": _CT_WINDOWS[int(rng.integers(len(_CT_WINDOWS)))],
        "pixel_spacing": round(rng.uniform(350, 500) / size, 4),
        "signed": bool(rng.random() < 0.5),
        "padding": None,
    }
    if rng.random() < 0.25:
        padding = int(rng.choice(CT_PADDING_HU))
        y, x = _grid(size)
        hu = np.where(x**2 + y**2 > 1, padding, hu)
        hints.update(padding=padding, signed=True)
    return np.rint(hu).astype(np.int16), hints


def _contrast_phase(rng: np.random.Generator) -> float:
    """Extra HU in blood vessels: 0 without IV contrast, ~100-250 in arterial/portal phases."""
    return rng.uniform(100, 250) if rng.random() < 0.5 else 0.0


def _lung_ct(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """Axial chest CT: two large lung fields near -850 HU with vessels, heart/mediastinum, spine, ribs."""
    hu, dy, dx, ry, rx, cavity = _ct_torso(rng, size)
    blood = 40 + _contrast_phase(rng)
    lung_ry, lung_rx = ry * rng.uniform(0.55, 0.72), rx * rng.uniform(0.32, 0.4)
    lungs = np.maximum(
        _inside(_ell(dy, dx, -0.02 * ry, -0.47 * rx, lung_ry, lung_rx), 0.08),
        _inside(_ell(dy, dx, -0.02 * ry, 0.47 * rx, lung_ry, lung_rx * rng.uniform(0.85, 1.0)), 0.08),
    )
    heart = _inside(_ell(dy, dx, -0.12 * ry, 0.1 * rx, rng.uniform(0.3, 0.42) * ry, 0.28 * rx), 0.1)
    heart *= rng.random() < 0.7  # upper slices show the great vessels instead
    lungs *= (1 - heart) * cavity
    parenchyma = rng.uniform(-880, -820) + 20 * _smooth_noise(rng, size, max(4, size // 8))
    hilum = np.sqrt((dy / ry) ** 2 + (np.abs(dx / rx) - 0.25) ** 2)
    vessels = _smooth_noise(rng, size, max(4, size // 5)) > 1.3 + 1.5 * hilum
    hu += (np.where(vessels, blood, parenchyma) - hu) * lungs
    hu += (blood - hu) * heart
    aorta = _inside(_ell(dy, dx, 0.4 * ry, 0.1 * rx, 0.07 * rx, 0.07 * rx))
    hu += (blood - hu) * aorta
    trachea = _inside(_ell(dy, dx, -0.2 * ry, 0, 0.06 * rx, 0.07 * rx)) * (heart.max() == 0)
    hu += (-1000 - hu) * trachea
    return _ct_finish(rng, hu, dy, dx, ry)


def _liver_ct(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """Axial abdominal CT: large liver near +60 HU, spleen, stomach, aorta, spine; at most lung bases."""
    hu, dy, dx, ry, rx, cavity = _ct_torso(rng, size)
    enhancement = _contrast_phase(rng)
    blood = 40 + enhancement
    liver_hu = rng.uniform(50, 70) + 0.25 * enhancement
    liver = _inside(
        _ell(dy, dx, -0.05 * ry, -0.35 * rx, rng.uniform(0.7, 0.9) * ry, rng.uniform(0.45, 0.6) * rx), 0.06
    )
    liver *= cavity
    texture = liver_hu + 6 * _smooth_noise(rng, size, max(4, size // 6))
    hepatic = _smooth_noise(rng, size, max(4, size // 6)) > 1.8
    hu += (np.where(hepatic, liver_hu + (enhancement * 0.5 - 25), texture) - hu) * liver
    spleen = _inside(_ell(dy, dx, 0.25 * ry, 0.62 * rx, 0.3 * ry, 0.14 * rx), 0.1) * cavity
    hu += (rng.uniform(45, 55) + 0.2 * enhancement - hu) * spleen
    stomach_r = _ell(dy, dx, -0.25 * ry, 0.3 * rx, rng.uniform(0.2, 0.32) * ry, rng.uniform(0.15, 0.25) * rx)
    stomach = _inside(stomach_r, 0.1) * cavity
    level = -0.25 * ry + rng.uniform(-0.3, 0.1) * ry  # air-fluid level
    hu += (np.where(dy < level, -1000.0, rng.uniform(0, 20)) - hu) * stomach * (rng.random() < 0.7)
    if rng.random() < 0.5:
        for side in (-1, 1):
            kidney = _inside(_ell(dy, dx, 0.35 * ry, side * 0.42 * rx, 0.17 * ry, 0.1 * rx), 0.1)
            hu += (30 + 0.6 * enhancement - hu) * kidney
    hu += (blood - hu) * _inside(_ell(dy, dx, 0.38 * ry, 0.08 * rx, 0.06 * rx, 0.06 * rx))
    hu += (blood - hu) * _inside(_ell(dy, dx, 0.28 * ry, -0.14 * rx, 0.07 * rx, 0.05 * rx))  # IVC
    gas = (_smooth_noise(rng, size, max(4, size // 6)) > 2.2) & (dy < 0) & (np.abs(dx) < 0.6 * rx)
    hu = np.where(gas & (cavity > 0.5) & (liver < 0.5), -1000.0, hu)
    if rng.random() < 0.4:  # liver-dome slices catch the lung bases posteriorly
        k = rng.uniform(0.1, 0.22)
        for side in (-1, 1):
            base = _inside(_ell(dy, dx, 0.5 * ry, side * 0.6 * rx, k * ry * 1.5, k * rx), 0.1) * cavity
            hu += (rng.uniform(-880, -820) - hu) * base
    return _ct_finish(rng, hu, dy, dx, ry)


_RENDERERS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, dict]]] = {
    "brain_mri": _brain_mri,
    "chest_xray": _chest_xray,
    "retinal_oct": _retinal_oct,
    "lung_ct": _lung_ct,
    "liver_ct": _liver_ct,
}


def render(label: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """One ``size``x``size`` image in native units plus header hints for :func:`dicom_bytes`.

    CT is int16 Hounsfield units, MR and X-ray uint16 (X-ray bright where dense, i.e. MONOCHROME2),
    OCT uint8.
    """
    if label not in _RENDERERS:
        raise ValueError(f"unknown class {label!r}; expected one of {', '.join(CLASSES)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    return _RENDERERS[label](rng, size)


# --------------------------------------------------------------------------- the hard difficulty


@dataclass(frozen=True)
class _Scanner:
    """One patient's acquisition in the ``hard`` difficulty, shared by all their images: where the
    anatomy sits in the field of view, how the scanner crops, blurs, shades and adds noise."""

    zoom: float
    angle: float
    centre: tuple[float, float]
    crop: tuple[float, float]
    blur: float
    gamma: float
    bias: float
    noise: float
    field_seed: int


def _draw_scanner(rng: np.random.Generator) -> _Scanner:
    return _Scanner(
        zoom=float(np.exp(rng.uniform(np.log(0.75), np.log(1.35)))),
        angle=float(rng.uniform(-np.pi / 8, np.pi / 8)),
        centre=(float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.15, 0.15))),
        crop=(float(rng.uniform(0.75, 1.0)), float(rng.uniform(0.75, 1.0))),
        blur=float(rng.uniform(0.3, 1.2)),
        gamma=float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))),
        bias=float(rng.uniform(0.1, 0.5)),
        noise=float(rng.uniform(0.01, 0.08)),
        field_seed=int(rng.integers(2**31)),
    )


def _harden(array: np.ndarray, hints: dict, scanner: _Scanner, rng: np.random.Generator) -> np.ndarray:
    """``array`` as ``scanner`` images it, with this image's small jitter (position, angle, zoom, crop)
    and its own noise: same dtype and units, possibly a non-square crop."""
    size = array.shape[0]
    data = array.astype(np.float32)
    ct = array.dtype == np.int16
    if ct and hints.get("padding") is not None:  # resampling would smear the padding value into tissue
        data[data == hints["padding"]] = -1000.0
        hints["padding"] = None
    fill = -1000.0 if ct else 0.0
    zoom = scanner.zoom * float(np.exp(rng.normal(0, 0.05)))
    angle = scanner.angle + float(rng.normal(0, 0.05))
    cy, cx = (c + float(rng.normal(0, 0.04)) for c in scanner.centre)
    # PIL's affine maps each output pixel (u, v) to the input pixel it samples.
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    half = size / 2
    src_x, src_y = half + cx * half, half + cy * half
    coeffs = (cos, -sin, src_x - cos * half + sin * half, sin, cos, src_y - sin * half - cos * half)
    warped = Image.fromarray(data, mode="F").transform(
        (size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill
    )
    data = _blur(np.asarray(warped, dtype=np.float32), scanner.blur)
    field = _smooth_noise(np.random.default_rng(scanner.field_seed), size, 3)
    if ct:  # HU stay physical: only noise (dose) varies
        data += rng.standard_normal(data.shape, dtype=np.float32) * (800 * scanner.noise)
        low, high = -1024.0, 3071.0
    else:
        high = float(np.iinfo(array.dtype).max)
        top = max(float(data.max()), 1e-6)
        data = (np.clip(data, 0, None) / top) ** scanner.gamma * (1 + scanner.bias * field)
        data += rng.standard_normal(data.shape, dtype=np.float32) * scanner.noise
        data = np.clip(data, 0, None) * (top / max(float(data.max()), 1e-6))
        low = 0.0
    rows = max(MIN_SIZE, round(size * scanner.crop[0] * float(rng.uniform(0.95, 1.0))))
    cols = max(MIN_SIZE, round(size * scanner.crop[1] * float(rng.uniform(0.95, 1.0))))
    top_row, left = int(rng.integers(0, size - rows + 1)), int(rng.integers(0, size - cols + 1))
    data = data[top_row : top_row + rows, left : left + cols]
    return np.rint(np.clip(data, low, high)).astype(array.dtype)


# --------------------------------------------------------------------------- encoders


def _bits_needed(array: np.ndarray) -> int:
    """BitsStored for unsigned data: the smallest of 12, 14, 16 that holds the maximum."""
    top = int(array.max(initial=0))
    return next(b for b in (12, 14, 16) if top < 2**b)


def _voi_window(stored: np.ndarray) -> tuple[float, float]:
    """Default VOI window (centre, width) over the central 98% of stored values, as modalities write."""
    lo, hi = np.percentile(stored, [1, 99])
    return round(float(lo + hi) / 2, 1), round(max(float(hi - lo), 1.0), 1)


def dicom_bytes(
    array: np.ndarray,
    *,
    label: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    hints: dict,
    **phi: str,
) -> bytes:
    """A DICOM Part-10 file holding ``array`` (native units, as from :func:`render`) headed for ``label``.

    ``hints`` keys used (all optional): modality ("CR" or "DX" for chest X-rays), body_part,
    photometric ("MONOCHROME1" stores inverted values), rle, series_number, instance_number,
    pixel_spacing, window, kvp, signed and padding (CT), sequence/repetition_time/echo_time (MR),
    view (X-ray), laterality (OCT), tags (keyword -> value written last, None deletes the element).
    ``phi`` are DICOM keywords written verbatim (PatientName=...),
    so callers choose which identifying fields the file carries.
    """
    if label not in _MODALITY:
        raise ValueError(f"unknown class {label!r}; expected one of {', '.join(CLASSES)}")
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {array.shape}")
    modality = hints.get("modality", _MODALITY[label])
    if modality not in _SOP_CLASS:
        raise ValueError(f"unsupported modality {modality!r}")
    expected = {"CT": np.int16, "OPT": np.uint8}.get(modality, np.uint16)
    if array.dtype != expected:
        raise ValueError(f"{modality} images must be {np.dtype(expected).name}, got {array.dtype}")
    unknown = sorted(k for k in phi if tag_for_keyword(k) is None)
    if unknown:
        raise ValueError(f"not DICOM keywords: {', '.join(unknown)}")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.Manufacturer = "mmpipe-synth"
    # Type 2 attributes present but empty unless the caller supplies values through ``phi``.
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, "")
    ds.StudyDate = ds.StudyTime = ""
    ds.PatientID = patient_id
    ds.StudyID = "1"
    ds.SeriesNumber = int(hints.get("series_number", 1))
    ds.InstanceNumber = int(hints.get("instance_number", 1))
    ds.BodyPartExamined = hints.get("body_part", _BODY_PART[label])
    spacing = float(hints.get("pixel_spacing", 1.0))
    ds.PixelSpacing = [spacing, spacing]
    corner = [round(-spacing * array.shape[1] / 2, 3), round(-spacing * array.shape[0] / 2, 3)]

    stored = array
    photometric = "MONOCHROME2"
    ds.BitsAllocated = 8 if array.dtype == np.uint8 else 16
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = hints.get("kvp", 120.0)
        ds.SliceThickness = 2.5
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [*corner, 2.5 * ds.InstanceNumber]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        if hints.get("signed", False) or hints.get("padding") is not None:
            stored = (array.astype(np.int32) + 1024).astype(np.int16)
            ds.BitsStored, ds.PixelRepresentation = 16, 1
            if hints.get("padding") is not None:
                ds.PixelPaddingValue = int(hints["padding"]) + 1024
        else:
            stored = np.clip(array.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
            ds.BitsStored = 12
        ds.WindowCenter, ds.WindowWidth = hints.get("window", _CT_WINDOWS[0])
    elif modality == "OPT":
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ConversionType = "WSD"
        ds.ImageLaterality = hints.get("laterality", "R")
        ds.BitsStored = 8
    else:
        ds.BitsStored = _bits_needed(array)
        if modality == "MR":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
            sequence = hints.get("sequence", "T1")
            ds.ScanningSequence = ["SE", "IR"] if sequence == "FLAIR" else "SE"
            ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SK", "", "2D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = (
                hints.get("repetition_time", 500.0),
                hints.get("echo_time", 12.0),
                1,
            )
            ds.MagneticFieldStrength = 1.5
            ds.SeriesDescription = f"AX {sequence}"
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [*corner, 5.0 * ds.InstanceNumber]
            ds.SliceThickness = 5.0
        else:  # CR / DX
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.ViewPosition = hints.get("view", "PA")
            ds.PatientOrientation = ["L", "F"]
            ds.RescaleIntercept, ds.RescaleSlope = 0, 1
            if modality == "DX":
                ds.PresentationIntentType = "FOR PRESENTATION"
                ds.PixelIntensityRelationship = "LOG"
                ds.PixelIntensityRelationshipSign = 1
        photometric = hints.get("photometric", "MONOCHROME2")
        if photometric == "MONOCHROME1":  # smallest value displays white: store the inverted image
            stored = ((2**ds.BitsStored - 1) - array.astype(np.int32)).astype(np.uint16)
        ds.WindowCenter, ds.WindowWidth = _voi_window(stored)
    ds.HighBit = ds.BitsStored - 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = array.shape
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()
    for keyword, value in phi.items():
        setattr(ds, keyword, value)
    for keyword, value in hints.get("tags", {}).items():  # header faults: a wrong value, or None for none
        if value is not None:
            setattr(ds, keyword, value)
        elif keyword in ds:
            delattr(ds, keyword)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if hints.get("rle", False):
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _display_uint8(array: np.ndarray, hints: dict) -> np.ndarray:
    """8-bit rendition as a PNG/JPEG export would hold it: CT through its window, others min-max."""
    data = array.astype(np.float32)
    if array.dtype == np.int16:
        centre, width = hints["window"]
        lo, hi = centre - width / 2, centre + width / 2
    else:
        lo, hi = float(data.min()), float(data.max())
    return np.rint(np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _image_bytes(array: np.ndarray, fmt: str, hints: dict, rng: np.random.Generator) -> bytes:
    """PNG (8-bit, or 16-bit for some 16-bit sources; CT as HU+1024) or JPEG (8-bit) of a rendered image."""
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"unsupported image format {fmt!r}")
    buffer = io.BytesIO()
    if fmt == "png" and array.dtype != np.uint8 and rng.random() < PNG16_FRACTION:
        data = np.clip(array.astype(np.int32) + (1024 if array.dtype == np.int16 else 0), 0, 65535)
        Image.fromarray(data.astype(np.uint16)).save(buffer, format="PNG")
    elif fmt == "png":
        Image.fromarray(_display_uint8(array, hints)).save(buffer, format="PNG")
    else:
        Image.fromarray(_display_uint8(array, hints)).save(
            buffer, format="JPEG", quality=int(rng.integers(75, 96))
        )
    return buffer.getvalue()


# --------------------------------------------------------------------------- studies


def _check_distribution(name: str, dist: dict[str, float], allowed: tuple[str, ...]) -> dict[str, float]:
    unknown = sorted(set(dist) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown keys {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    if any(v < 0 for v in dist.values()) or sum(dist.values()) <= 0:
        raise ValueError(f"{name}: weights must be non-negative with a positive sum")
    total = sum(dist.values())
    return {k: dist.get(k, 0.0) / total for k in allowed}


def _patient_size(rng: np.random.Generator, remaining: int, lo: int, hi: int) -> int:
    """Images for the next patient, leaving a remainder that later patients can still fill within range."""
    if remaining <= hi:
        return remaining
    k = int(rng.integers(lo, hi + 1))
    if remaining - k < lo and remaining - lo >= lo:
        k = remaining - lo  # leave exactly one minimal patient rather than a too-small one
    return k


def _fake_phi(rng: np.random.Generator, label: str, index: int) -> dict[str, str]:
    """Identifying fields that ingest must strip; distinctive so a leak test can search for them."""
    birth = np.datetime64("1935-01-01") + int(rng.integers(0, 70 * 365))
    study = np.datetime64("2018-01-01") + int(rng.integers(0, 7 * 365))
    return {
        "PatientName": f"SYNTH^PATIENT{index}",
        "PatientBirthDate": str(birth).replace("-", ""),
        "PatientSex": str(rng.choice(["F", "M"])),
        "AccessionNumber": f"ACC{int(rng.integers(10**7, 10**8))}",
        "InstitutionName": "SYNTHETIC GENERAL HOSPITAL",
        "ReferringPhysicianName": "SYNTH^REFERRER",
        "StudyDescription": _STUDY_DESCRIPTION[label],
        "StudyDate": str(study).replace("-", ""),
        "StudyTime": f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00",
    }


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    """Deterministic zip: fixed timestamps and permissions."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, body, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def unlabelled_key(key: str) -> str:
    """``<class>/<export>/...`` without its class folder: how an unlabelled drop (``incoming/``) looks."""
    return key.split("/", 1)[1]


def generate(
    n_images: int,
    *,
    size: int = 128,
    seed: int = 0,
    weights: dict[str, float] | None = None,
    images_per_patient: tuple[int, int] = (2, 4),
    formats: dict[str, float] | None = None,
    archive_fraction: float = 0.1,
    difficulty: str = "realistic",
    header_faults: float = 0.0,
) -> Iterator[SynthObject]:
    """Exactly ``n_images`` images as store objects, patient by patient.

    Patients get a class so that image counts track ``weights`` (default :data:`TABLE_I_WEIGHTS`),
    one export format drawn from ``formats`` (default mostly DICOM) and, with probability
    ``archive_fraction``, all their images packed into one zip. Patient sizes stay within
    ``images_per_patient`` except when ``n_images`` cannot be split that way. Patient IDs embed the
    seed ("SYN-<seed>-<n>") so batches from different seeds never share keys or patients.
    Same arguments give byte-identical objects. Arguments are checked before anything is produced.

    ``difficulty`` "realistic" draws every image independently, and modality classification stays
    as easy as it is on real data (a linear model on 16x16 thumbnails does well). "hard" images each
    patient's anatomy once and takes all their images from it through one scanner (position, zoom,
    rotation, crop, blur, shading, gamma, noise level: :class:`_Scanner`) with small per-image
    jitter and fresh noise: coarse layout and intensity stop telling the classes apart, the finer
    structure still does, and a patient's images are correlated, so an image-level split leaks.
    ``header_faults`` is the share of DICOM patients whose Modality/BodyPartExamined are missing (half
    of them) or name another class (the other half), so a header lookup is not the answer.
    """
    class_p = _check_distribution("weights", weights if weights is not None else TABLE_I_WEIGHTS, CLASSES)
    format_p = _check_distribution(
        "formats", formats if formats is not None else DEFAULT_FORMATS, tuple(_EXTENSION)
    )
    lo, hi = images_per_patient
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_patient must satisfy 1 <= low <= high, got {images_per_patient}")
    if n_images < 0 or seed < 0:
        raise ValueError("n_images and seed must be non-negative")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if not 0 <= archive_fraction <= 1:
        raise ValueError(f"archive_fraction must be within [0, 1], got {archive_fraction}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    if not 0 <= header_faults <= 1:
        raise ValueError(f"header_faults must be within [0, 1], got {header_faults}")
    options = _Options(size, format_p, archive_fraction, difficulty == "hard", header_faults)
    return _objects(n_images, seed, class_p, (lo, hi), options)


@dataclass(frozen=True)
class _Options:
    size: int
    format_p: dict[str, float]
    archive_fraction: float
    hard: bool
    header_faults: float


def _objects(
    n_images: int, seed: int, class_p: dict[str, float], bounds: tuple[int, int], options: _Options
) -> Iterator[SynthObject]:
    plan = np.random.default_rng([seed, 0])
    counts = dict.fromkeys(CLASSES, 0)
    done = patient = 0
    while done < n_images:
        k = _patient_size(plan, n_images - done, *bounds)
        # Largest shortfall against the target proportions: even small batches follow the weights.
        label = max(CLASSES, key=lambda c: class_p[c] * (done + k) - counts[c])
        counts[label] += k
        done += k
        yield from _patient_objects(seed, patient, label, k, options)
        patient += 1


def _header_fault(rng: np.random.Generator, label: str) -> dict[str, str | None]:
    """Tags a faulty export writes: none at all, or another class's modality and body part."""
    if rng.random() < 0.5:
        return {"Modality": None, "BodyPartExamined": None}
    other = str(rng.choice([c for c in CLASSES if _MODALITY[c] != _MODALITY[label]]))
    return {"Modality": _MODALITY[other], "BodyPartExamined": _BODY_PART[other]}


def _patient_objects(seed: int, index: int, label: str, n: int, options: _Options) -> Iterator[SynthObject]:
    size, format_p = options.size, options.format_p
    rng = np.random.default_rng([seed, 1, index])
    patient_id = f"SYN-{seed}-{index:05d}"
    # Export folders are opaque ids, as hospital exports should be: keys never carry the PatientID.
    folder = "EXP" + hashlib.sha256(f"mmpipe-synth-{seed}-{index}".encode()).hexdigest()[:10]
    fmt = str(rng.choice(list(format_p), p=list(format_p.values())))
    archived = rng.random() < options.archive_fraction
    phi = _fake_phi(rng, label, index)
    study_uid = generate_uid(entropy_srcs=["mmpipe-synth", str(seed), patient_id, "study"])
    series_uid = generate_uid(entropy_srcs=["mmpipe-synth", str(seed), patient_id, "series"])
    patient_hints: dict = {"series_number": 1}
    if label == "chest_xray":
        patient_hints["modality"] = str(rng.choice(["CR", "DX"]))
        patient_hints["photometric"] = "MONOCHROME1" if rng.random() < MONOCHROME1_FRACTION else "MONOCHROME2"
    elif label == "brain_mri":
        patient_hints["body_part"] = str(rng.choice(["HEAD", "BRAIN"]))
    # Own generators, so the realistic difficulty without faults stays byte-identical to before.
    if options.header_faults and np.random.default_rng([seed, 5, index]).random() < options.header_faults:
        patient_hints["tags"] = _header_fault(np.random.default_rng([seed, 6, index]), label)
    if options.hard:
        anatomy, anatomy_hints = render(label, np.random.default_rng([seed, 3, index]), size)
        scanner = _draw_scanner(np.random.default_rng([seed, 4, index]))

    members: list[tuple[str, bytes]] = []
    for i in range(n):
        image_rng = np.random.default_rng([seed, 2, index, i])
        if options.hard:
            hints = dict(anatomy_hints)
            array = _harden(anatomy, hints, scanner, image_rng)
        else:
            array, hints = render(label, image_rng, size)
        if fmt == "dicom":
            hints |= patient_hints | {
                "instance_number": i + 1,
                "rle": bool(image_rng.random() < RLE_FRACTION),
            }
            sop_uid = generate_uid(entropy_srcs=["mmpipe-synth", str(seed), patient_id, "image", str(i)])
            body = dicom_bytes(
                array,
                label=label,
                patient_id=patient_id,
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=sop_uid,
                hints=hints,
                **phi,
            )
        else:
            body = _image_bytes(array, fmt, hints, image_rng)
        name = f"{i + 1:04d}.{_EXTENSION[fmt]}"
        if archived:
            members.append((f"STUDY0001/SERIES0001/IMG{name}", body))
        else:
            yield SynthObject(f"{label}/{folder}/{name}", body, label, patient_id, fmt)
    if archived:
        yield SynthObject(f"{label}/{folder}.zip", _zip(members), label, patient_id, "zip")
