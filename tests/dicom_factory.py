"""Small hand-built DICOM objects for tests: only the attributes a test names are set."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid


def dicom_bytes(
    seed: int, *, side: int = 32, high: int = 3000, sop_class: str = CTImageStorage, **attrs: str
) -> bytes:
    """A 16-bit MONOCHROME2 image of seeded noise; empty attribute values are left out."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID = attrs.pop("StudyInstanceUID", None) or generate_uid()
    for keyword, value in attrs.items():
        if value:
            setattr(ds, keyword, value)
    pixels = np.random.default_rng(seed).integers(0, high, (side, side)).astype(np.uint16)
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
