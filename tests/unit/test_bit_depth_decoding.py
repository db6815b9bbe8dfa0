"""Decoding records the header's bit depth as it is (BitsStored and BitsAllocated), for validation to judge."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from mmpipe.imaging import Limits, Reason, Rejected, decode_image
from mmpipe.validate import bit_depth_problem
from tests.dicom_factory import dicom_bytes

LIMITS = Limits(2**26, 100, 2**27, 4096 * 4096, 64)


def with_bits_stored(body: bytes, bits: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(body))
    ds.BitsStored, ds.HighBit = bits, bits - 1
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_15_bit_dicom_is_recorded_as_15_of_16_and_is_consistent():
    decoded = decode_image(with_bits_stored(dicom_bytes(1, high=2**15), 15), "a.dcm", 32, LIMITS)
    assert (decoded.bits_stored, decoded.bits_allocated, decoded.float_pixels) == (15, 16, False)
    assert (
        bit_depth_problem(decoded.bits_stored, decoded.bits_allocated, decoded.photometric, False)
        == "consistent"
    )


def test_stored_beyond_allocated_cannot_decode_and_is_quarantined_before_validation():
    with pytest.raises(Rejected) as rejected:
        decode_image(with_bits_stored(dicom_bytes(2, high=255), 17), "b.dcm", 32, LIMITS)
    assert rejected.value.reason == Reason.CORRUPT and "Bits Stored" in rejected.value.detail


def test_32_bit_grayscale_integers_decode_and_fail_the_bit_depth_rule():
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(3)))
    pixels = np.random.default_rng(3).integers(0, 2**20, (32, 32)).astype("<u4")
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    decoded = decode_image(buffer.getvalue(), "c.dcm", 32, LIMITS)
    assert (decoded.bits_stored, decoded.bits_allocated, decoded.float_pixels) == (32, 32, False)
    problem = bit_depth_problem(decoded.bits_stored, decoded.bits_allocated, decoded.photometric, False)
    assert problem == "BitsAllocated 32 > 16 (grayscale integer)"


def test_png_samples_are_their_own_container():
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), "c.png", 32, LIMITS)
    assert (decoded.bits_stored, decoded.bits_allocated) == (16, 16)
