"""Procedural studies of modalities mmpipe does not classify, for the open-set tests: ultrasound-like
speckle fans (DICOM, Modality US), RGB photographs and textures, scanned text documents (PNG/JPEG)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydicom.dataset import Dataset
from pydicom.uid import UltrasoundImageStorage, generate_uid

KINDS = ("ultrasound", "photo", "document")


def speckle_fan(rng: np.random.Generator, side: int) -> np.ndarray:
    """A B-mode sector: Rayleigh speckle over a smooth tissue map, attenuated with depth, in a fan."""
    y, x = np.mgrid[0:side, 0:side] / side
    depth = np.hypot(x - 0.5, y + 0.05)
    angle = np.arctan2(x - 0.5, y + 0.05)
    half = rng.uniform(0.45, 0.75)
    fan = (np.abs(angle) < half) & (depth > 0.1) & (depth < rng.uniform(0.85, 1.0))
    tissue = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    speckle = rng.rayleigh(1.0, (side, side)) * (0.4 + np.asarray(tissue) / 255)
    image = speckle * np.exp(-1.5 * depth) * fan
    return (np.clip(image / image.max(), 0, 1) * 4000).astype(np.uint16)


def photo(rng: np.random.Generator, side: int) -> bytes:
    """An RGB 'photograph': a coloured gradient sky, textured ground and a few coloured shapes."""
    base = rng.random((4, 4, 3)) * 255
    image = Image.fromarray(base.astype(np.uint8)).resize((side, side), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = rng.integers(0, side, 2)
        w, h = rng.integers(side // 8, side // 2, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=colour)
    noise = rng.normal(0, 12, (side, side, 3))
    out = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return _encode(Image.fromarray(out, "RGB"), "PNG")


def document(rng: np.random.Generator, side: int) -> bytes:
    """A scanned letter: dark lines of 'words' on an off-white page, slightly blurred and skewed."""
    page = Image.new("L", (side * 2, side * 2), int(rng.integers(225, 250)))
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(8, 20))
    while y < side * 2 - 10:
        x = int(rng.integers(8, 16))
        while x < side * 2 - 20:
            w = int(rng.integers(6, 30))
            draw.rectangle([x, y, x + w, y + 4], fill=int(rng.integers(10, 70)))
            x += w + int(rng.integers(4, 8))
        y += int(rng.integers(9, 14))
    page = page.rotate(float(rng.uniform(-3, 3)), fillcolor=235).filter(ImageFilter.GaussianBlur(0.6))
    return _encode(page.resize((side, side), Image.BILINEAR), "JPEG")


def ultrasound_dicom(pixels: np.ndarray) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.Modality, ds.BodyPartExamined = generate_uid(), "US", "ABDOMEN"
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def out_of_class(kind: str, seed: int, side: int = 64) -> tuple[str, bytes]:
    """(file name, bytes) of one out-of-class study of ``kind``."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    if kind == "ultrasound":
        return f"us{seed:04d}.dcm", ultrasound_dicom(speckle_fan(rng, side))
    if kind == "photo":
        return f"photo{seed:04d}.png", photo(rng, side)
    return f"doc{seed:04d}.jpg", document(rng, side)
