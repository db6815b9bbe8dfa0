"""Decoding real DICOM (pydicom's bundled test files) and crafted DICOM/PNG/JPEG inputs."""

from __future__ import annotations

import io
import struct
import tarfile
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import libjpeg
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.data import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import apply_rescale
from pydicom.sequence import Sequence
from pydicom.uid import MPEG2MPML, JPEGLosslessSV1, SecondaryCaptureImageStorage

from mmpipe.config import Settings
from mmpipe.imaging import Decoded, Limits, Reason, Rejected, decode_image, dicom_native, sniff
from mmpipe.pixels import normalise

SIZE = 64
LIMITS = Limits(
    max_object_bytes=64 * 2**20,
    max_archive_members=100,
    max_archive_bytes=256 * 2**20,
    max_image_pixels=4096 * 4096,
    max_frames=64,
)
#: Only the files shipped inside the pydicom wheel: get_testdata_files() would try to download more.
TEST_FILES = Path(DATA_ROOT) / "test_files"
SECRET = "SECRET-PATIENT-42"


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def local(name: str) -> bytes:
    path = TEST_FILES / name
    assert path.is_file(), f"{name} is not bundled with this pydicom"
    return path.read_bytes()


def decode(data: bytes, name: str = "object", limits: Limits = LIMITS) -> Decoded:
    return decode_image(data, name, SIZE, limits)


def rejection(data: bytes, name: str = "object", limits: Limits = LIMITS) -> Rejected:
    with pytest.raises(Rejected) as caught:
        decode(data, name, limits)
    return caught.value


def make_dicom(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16, **attrs: object
) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality, ds.PatientID, ds.AccessionNumber, ds.StudyInstanceUID = "OT", SECRET, "ACC-9", "1.2.3.4"
    ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_raster(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def disk(value_in: int, value_out: int, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    return np.where(inside, value_in, value_out).astype(np.uint16)


def jpeg_frame(name: str) -> bytes:
    """The encoded frame of a single-frame bundled JPEG DICOM: a real JPEG stream."""
    return get_frame(pydicom.dcmread(io.BytesIO(local(name))).PixelData, 0, number_of_frames=1)


def lossless_jpeg(image: np.ndarray, component_ids: bytes = b"\x01\x02\x03", app: bytes = b"") -> bytes:
    """A 16-bit lossless JPEG (process 14, first-order prediction) of ``image`` (rows x cols [x 3]).

    No installed package encodes one and this pydicom bundles none, so the test writes it: one
    Huffman table giving every difference category a 5-bit code. ``app`` is inserted after SOI.
    """
    samples = image.reshape(*image.shape[:2], -1).astype(np.int64)
    rows, cols, n = samples.shape
    predicted = np.empty_like(samples)  # left neighbour; first column: above; first sample: 2**15
    predicted[:, 1:], predicted[1:, 0], predicted[0, 0] = samples[:, :-1], samples[:-1, 0], 1 << 15
    bits = []
    for diff in ((samples - predicted + 32767) % 65536 - 32767).ravel().tolist():  # -32767..32768
        category = abs(diff).bit_length()
        bits.append(f"{category:05b}")
        if 0 < category < 16:
            bits.append(f"{diff if diff > 0 else diff + (1 << category) - 1:0{category}b}")
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    ids = component_ids[:n]
    frame = struct.pack(">BHHB", 16, rows, cols, n) + b"".join(bytes([c, 0x11, 0]) for c in ids)
    table = bytes([0, 0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))  # Tc/Th, 16 counts, 17 symbols
    selectors = bytes([n]) + b"".join(bytes([c, 0]) for c in ids) + bytes([1, 0, 0])  # Ss=predictor 1
    return (
        b"\xff\xd8"
        + app
        + segment(0xC3, frame)
        + segment(0xC4, table)
        + segment(0xDA, selectors)
        + scan
        + b"\xff\xd9"
    )


def exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def asymmetric() -> np.ndarray:
    """A 48x80 grayscale image that every flip and turn changes."""
    gray = np.zeros((48, 80), dtype=np.uint8)
    gray[4:20, 6:30], gray[30:44, 50:76] = 250, 120
    return gray


# --------------------------------------------------------------------------- pydicom's own files

NOT_DICOM_SUFFIXES = {".json", ".txt", ".dump", ".icc", ".gz"}


def test_every_bundled_pydicom_file_decodes_or_is_rejected_with_a_reason() -> None:
    outcomes: dict[str, str] = {}
    for path in sorted(p for p in TEST_FILES.iterdir() if p.is_file()):
        data = path.read_bytes()
        try:
            decoded = decode(data, path.name)
        except Rejected as exc:
            assert exc.reason in set(Reason)
            outcomes[path.name] = exc.reason.value
        else:
            assert decoded.pixels.shape == (SIZE, SIZE) and decoded.pixels.dtype == np.uint8
            outcomes[path.name] = "decoded"
        if path.suffix in NOT_DICOM_SUFFIXES:
            assert sniff(data, path.name) == "unknown", path.name
            assert outcomes[path.name] == Reason.NOT_IMAGE.value, path.name
    assert len(outcomes) > 50  # the bundled set really was iterated


@pytest.mark.parametrize(
    ("name", "tsyntax", "n_frames"),
    [
        ("CT_small.dcm", "1.2.840.10008.1.2.1", 1),
        ("MR_small.dcm", "1.2.840.10008.1.2.1", 1),
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", 1),
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2", 1),
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", 1),
        ("SC_rgb_rle.dcm", "1.2.840.10008.1.2.5", 1),
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", 1),
        ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", 1),
        ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", 1),  # baseline, YBR_FULL
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", 1),
        ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", 1),  # scan header states Se=0
        ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70", 1),  # lossless SV1
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", 1),
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", 1),
        ("examples_palette.dcm", "1.2.840.10008.1.2.1", 1),
        ("SC_ybr_full_422_uncompressed.dcm", "1.2.840.10008.1.2.1", 1),
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", 1),  # deflated dataset
        ("rtdose.dcm", "1.2.840.10008.1.2", 15),
        ("examples_ybr_color.dcm", "1.2.840.10008.1.2.4.50", 30),  # multi-frame JPEG
        ("SC_rgb_rle_2frame.dcm", "1.2.840.10008.1.2.5", 2),
    ],
)
def test_known_files_decode(name: str, tsyntax: str, n_frames: int) -> None:
    decoded = decode(local(name), name)
    assert decoded.transfer_syntax == tsyntax
    assert decoded.n_frames == n_frames
    assert decoded.frame == (n_frames // 2 if n_frames > 1 else None)
    assert decoded.pixels.shape == (SIZE, SIZE) and decoded.pixels.dtype == np.uint8
    assert decoded.pixels.std() > 5  # a real picture, not a flat field


def test_mr_small_is_identical_across_transfer_syntaxes() -> None:
    """Byte order and lossless compression must not change the canonical image."""
    reference = decode(local("MR_small.dcm")).pixels
    for variant in ("MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                    "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"):  # fmt: skip
        assert np.array_equal(decode(local(variant)).pixels, reference), variant


def test_misstated_sequential_scan_decodes_as_its_conforming_twin() -> None:
    """JPEG-lossy.dcm differs from JPGExtended.dcm in one byte: its scan header says Se=0."""
    lossy, extended = jpeg_frame("JPEG-lossy.dcm"), jpeg_frame("JPGExtended.dcm")
    assert [i for i, (a, b) in enumerate(zip(lossy, extended, strict=True)) if a != b] == [165]
    decoded = decode(local("JPEG-lossy.dcm"))
    assert np.array_equal(decoded.pixels, decode(local("JPGExtended.dcm")).pixels)
    assert (decoded.bits_stored, decoded.orig_rows, decoded.orig_cols) == (12, 1024, 256)


def test_ct_small_is_rescaled_to_hounsfield_units() -> None:
    ds = pydicom.dcmread(io.BytesIO(local("CT_small.dcm")))
    native, _, _ = dicom_native(ds, 0)
    assert np.allclose(native, apply_rescale(ds.pixel_array, ds))
    assert float(ds.RescaleIntercept) == -1024 and native.min() < ds.pixel_array.min()  # intercept applied
    assert native.min() >= -1024 and native.max() < 3072  # within the physical HU range
    assert -500 < native.mean() < 200  # soft tissue and air, not raw stored values (~900)


def test_header_identifiers_and_metadata_are_returned_raw() -> None:
    decoded = decode(local("CT_small.dcm"))
    ds = pydicom.dcmread(io.BytesIO(local("CT_small.dcm")))
    assert (decoded.patient_id, decoded.study_uid) == (ds.PatientID, ds.StudyInstanceUID)
    assert decoded.modality == "CT" and decoded.photometric == "MONOCHROME2"
    assert (decoded.orig_rows, decoded.orig_cols, decoded.bits_stored) == (128, 128, 16)


# --------------------------------------------------------------------------- DICOM pixel rules


def test_monochrome1_is_inverted_so_bright_stays_bright() -> None:
    """MONOCHROME1: low stored values display white. A low-valued disk must come out bright."""
    pixels = disk(value_in=200, value_out=3000)
    centre, corner = (SIZE // 2, SIZE // 2), (2, 2)
    mono1 = decode(make_dicom(pixels, "MONOCHROME1", bits=12)).pixels
    mono2 = decode(make_dicom(pixels, "MONOCHROME2", bits=12)).pixels
    assert mono1[centre] > 200 and mono1[corner] < 50
    assert mono2[centre] < 50 and mono2[corner] > 200


def test_window_centre_width_bounds_the_intensity_scaling() -> None:
    ramp = np.tile(np.arange(64, dtype=np.uint16) * 100, (64, 1))  # column c holds 100*c
    windowed = decode(make_dicom(ramp, WindowCenter=3200, WindowWidth=1001)).pixels
    assert (windowed[:, :27] == 0).all() and (windowed[:, 38:] == 255).all()  # outside 2700..3700
    assert (np.diff(windowed[32].astype(int)) >= 0).all()
    assert 0 < windowed[32, 32] < 255
    unwindowed = decode(make_dicom(ramp)).pixels
    assert unwindowed[32, 10] > 0  # percentile scaling keeps the low columns
    for centre, width in ((3200, 0), (3200, "ab;c")):  # forbidden width, garbled value: ignored
        data = make_dicom(ramp, WindowCenter=3200, WindowWidth=1001).replace(b"3200", f"{centre}".encode())
        data = data.replace(b"1001", f"{width}".encode().ljust(4))
        assert np.array_equal(decode(data).pixels, unwindowed)


def test_monochrome1_window_is_inverted_with_the_image() -> None:
    ramp = np.tile(np.arange(64, dtype=np.uint16) * 100, (64, 1))
    windowed = decode(make_dicom(ramp, "MONOCHROME1", WindowCenter=3200, WindowWidth=1001)).pixels
    assert (windowed[:, :27] == 255).all() and (windowed[:, 38:] == 0).all()


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME2", None, False),
        ("MONOCHROME2", "IDENTITY", False),
        ("MONOCHROME2", "INVERSE", True),
        ("MONOCHROME1", None, True),
        ("MONOCHROME1", "IDENTITY", True),
        ("MONOCHROME1", "INVERSE", True),  # restates MONOCHROME1: inverted once, not twice
    ],
)
def test_presentation_lut_shape_inverse_inverts_once(
    photometric: str, shape: str | None, inverted: bool
) -> None:
    pixels = disk(value_in=200, value_out=3000)
    attrs = {"PresentationLUTShape": shape} if shape else {}
    decoded = decode(make_dicom(pixels, photometric, bits=12, **attrs)).pixels
    expected = decode(make_dicom(pixels, "MONOCHROME1" if inverted else "MONOCHROME2", bits=12)).pixels
    assert np.array_equal(decoded, expected)
    assert (decoded[SIZE // 2, SIZE // 2] > 200) == inverted  # the low-valued disk displays bright


def test_inverse_presentation_lut_inverts_the_window_with_the_image() -> None:
    ramp = np.tile(np.arange(64, dtype=np.uint16) * 100, (64, 1))
    windowed = decode(
        make_dicom(ramp, WindowCenter=3200, WindowWidth=1001, PresentationLUTShape="INVERSE")
    ).pixels
    assert (windowed[:, :27] == 255).all() and (windowed[:, 38:] == 0).all()


def test_voi_lut_sequence_is_applied() -> None:
    """An inverting VOI LUT must invert the displayed image (and override percentile-only display)."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", list(range(4095, -1, -1)))
    pixels = disk(value_in=3000, value_out=200)
    plain = decode(make_dicom(pixels, bits=12)).pixels
    with_lut = decode(make_dicom(pixels, bits=12, VOILUTSequence=Sequence([item]))).pixels
    centre = (SIZE // 2, SIZE // 2)
    assert plain[centre] > 200 and with_lut[centre] < 50


def test_enhanced_rescale_in_functional_groups_is_used() -> None:
    """Slope -1 stored only in the shared functional groups flips the image: proof it was read."""
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = -1, 0, "US"
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    pixels = disk(value_in=3000, value_out=200)
    flipped = decode(make_dicom(pixels, bits=12, SharedFunctionalGroupsSequence=Sequence([shared]))).pixels
    assert flipped[SIZE // 2, SIZE // 2] < 50


def test_multi_frame_decodes_the_middle_frame() -> None:
    frames = np.zeros((5, 40, 40), dtype=np.uint16)
    for k in range(5):
        frames[k, 4 + 6 * k : 10 + 6 * k, 4:36] = 1000 + k  # a bright band lower in each frame
    decoded = decode(make_dicom(frames, NumberOfFrames=5))
    assert (decoded.frame, decoded.n_frames) == (2, 5)
    assert np.array_equal(decoded.pixels, normalise(frames[2].astype(np.float32), SIZE))
    assert not np.array_equal(decoded.pixels, normalise(frames[0].astype(np.float32), SIZE))


def test_real_multi_frame_picks_index_n_frames_half() -> None:
    ds = pydicom.dcmread(io.BytesIO(local("rtdose.dcm")))
    decoded = decode(local("rtdose.dcm"))
    middle = ds.pixel_array[ds.NumberOfFrames // 2].astype(np.float32)
    assert np.array_equal(decoded.pixels, normalise(middle, SIZE))


def test_signed_pixels_decode_safely() -> None:
    signed = disk(0, 0).astype(np.int16)
    signed[:24] = -2000
    signed[24:] = 1500
    decoded = decode(make_dicom(signed, bits=16))
    assert decoded.pixels[5, SIZE // 2] < decoded.pixels[-12, SIZE // 2]  # -2000 below +1500


def test_raw_dataset_without_file_meta_and_prefix_without_preamble_decode() -> None:
    data = local("MR_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    raw = io.BytesIO()
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)  # no preamble, DICM or meta
    reference = decode(data).pixels
    assert sniff(raw.getvalue(), "x") == "dicom"
    assert np.array_equal(decode(raw.getvalue()).pixels, reference)
    assert np.array_equal(decode(data[128:]).pixels, reference)  # "DICM" prefix, preamble cut


# --------------------------------------------------------------------------- rejections


def test_rejection_reasons() -> None:
    mr = local("MR_small.dcm")
    assert rejection(b"").reason is Reason.EMPTY
    assert rejection(mr[: len(mr) - 3000]).reason is Reason.CORRUPT
    ds = pydicom.dcmread(io.BytesIO(local("JPEG-lossy.dcm")))
    ds.PixelData = encapsulate([jpeg_frame("JPEG-lossy.dcm")[:100]])  # cut inside its Huffman table
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert rejection(buffer.getvalue()).reason is Reason.CORRUPT  # restating the scan repairs no damage
    assert rejection(b"patient notes\n" * 20, "x.dcm").reason is Reason.NOT_IMAGE
    assert rejection(b"not a png at all", "x.png").reason is Reason.NOT_IMAGE
    assert rejection(local("rtplan.dcm")).reason is Reason.NO_PIXEL_DATA
    blank = make_dicom(np.full((32, 32), 7, dtype=np.uint16))
    assert rejection(blank).reason is Reason.BLANK
    assert rejection(make_raster(np.full((16, 16), 9, np.uint8), "PNG")).reason is Reason.BLANK


def test_archives_are_not_images() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.dcm", local("MR_small.dcm"))
    assert rejection(buffer.getvalue(), "a.zip").reason is Reason.NOT_IMAGE
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as archive:
        info = tarfile.TarInfo("a.txt")
        archive.addfile(info, io.BytesIO(b""))
    assert sniff(tar.getvalue(), "a.tgz") == "tar"
    assert rejection(tar.getvalue()).reason is Reason.NOT_IMAGE


def test_huge_dicom_header_is_too_large_without_allocating() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((8, 8), dtype=np.uint16))))
    ds.Rows = ds.Columns = 65535  # US maximum, ~4.3e9 pixels; the pixel data stays 128 bytes
    buffer = io.BytesIO()
    ds.save_as(buffer)
    tracemalloc.start()
    try:
        reason = rejection(buffer.getvalue()).reason
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reason is Reason.TOO_LARGE
    assert peak < 16 * 2**20


def test_frame_and_object_limits() -> None:
    frames = make_dicom(
        np.zeros((70, 8, 8), dtype=np.uint16) + np.arange(8, dtype=np.uint16), NumberOfFrames=70
    )
    assert rejection(frames).reason is Reason.TOO_LARGE
    mr = local("MR_small.dcm")
    tight = Limits(**{**LIMITS.__dict__, "max_object_bytes": len(mr) - 1})
    assert rejection(mr, limits=tight).reason is Reason.TOO_LARGE
    few_pixels = Limits(**{**LIMITS.__dict__, "max_image_pixels": 64 * 64 - 1})
    assert rejection(mr, limits=few_pixels).reason is Reason.TOO_LARGE


@pytest.mark.parametrize("strip", [0, 132], ids=["part10", "no-preamble"])
def test_deflate_bomb_is_measured_before_pydicom_inflates_it(strip: int) -> None:
    """Without preamble and DICM prefix pydicom still reads the file meta and inflates: so does the guard."""
    data = local("image_dfl.dcm")[strip:]  # ~4.6 kB deflated, inflates to ~260 kB
    assert decode(data).n_frames == 1
    assert rejection(data, limits=Limits(**{**LIMITS.__dict__, "max_object_bytes": 100_000})).reason is (
        Reason.TOO_LARGE
    )


def test_a_rust_codec_panic_is_a_data_fault_not_a_crash() -> None:
    """pylibjpeg-rle panics (a BaseException, not an Exception) on this damaged RLE segment."""
    data = bytearray(local("MR_small_RLE.dcm"))
    data[2436] = 145
    exc = rejection(bytes(data))
    assert exc.reason is Reason.CORRUPT and "PanicException" in exc.detail


def test_unsupported_transfer_syntax() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((8, 8), dtype=np.uint16))))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([bytes(100)])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert rejection(buffer.getvalue()).reason is Reason.UNSUPPORTED_TRANSFER_SYNTAX


def test_rejection_details_never_carry_phi() -> None:
    """Invalid values are written over same-length placeholders, as real broken files would hold them."""
    pixels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    cases = [
        make_dicom(pixels)[:-100],  # truncated pixel data
        make_dicom(pixels, NumberOfFrames="123456789012").replace(b"123456789012", b"SECRET-PT-42"),
        make_dicom(pixels, RescaleSlope="1234567890", RescaleIntercept=0).replace(
            b"1234567890", b"SECRET-PT1"
        ),
        make_raster(np.zeros((8, 8), np.uint8), "PNG"),  # blank
    ]
    for data in cases:
        exc = rejection(data, f"{SECRET}/scan.dcm")
        assert "SECRET" not in str(exc) and "SECRET" not in repr(exc.args), exc


def test_no_exception_but_rejected_escapes_for_mutated_inputs() -> None:
    rng = np.random.default_rng(7)
    seeds = [local(n) for n in ("MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm")]
    seeds += [make_raster(np.arange(1024, dtype=np.uint8).reshape(32, 32), "PNG"),
              make_raster(np.arange(3072, dtype=np.uint8).reshape(32, 32, 3), "JPEG"),
              jpeg_frame("JPEG-lossy.dcm"), lossless_jpeg(disk(60000, 900, 24))]  # fmt: skip
    outcomes = set()
    for seed in seeds:
        for _ in range(40):
            data = bytearray(seed)
            for position in rng.integers(0, len(data), size=rng.integers(1, 20)):
                data[position] = rng.integers(0, 256)
            cut = len(data) if rng.random() < 0.7 else int(rng.integers(1, len(data)))
            try:
                decode(bytes(data[:cut]))
                outcomes.add("decoded")
            except Rejected as exc:
                outcomes.add(exc.reason.value)
    assert "decoded" in outcomes and Reason.CORRUPT.value in outcomes


# --------------------------------------------------------------------------- PNG / JPEG


def test_png_16_bit_keeps_its_depth() -> None:
    gradient = np.tile(np.arange(64, dtype=np.uint16) * 1000, (64, 1))  # 0..63000: needs 16 bits
    decoded = decode(make_raster(gradient, "PNG"), "scan.png")
    assert decoded.bits_stored == 16 and decoded.photometric == "MONOCHROME2"
    assert np.array_equal(decoded.pixels, normalise(gradient.astype(np.float32), SIZE))


@pytest.mark.parametrize(
    ("fmt", "mode", "photometric"),
    [
        ("JPEG", None, "RGB"),
        ("JPEG", "L", "MONOCHROME2"),
        ("JPEG", "CMYK", "RGB"),
        ("PNG", None, "RGB"),
        ("PNG", "RGBA", "RGB"),
        ("PNG", "P", "PALETTE COLOR"),
        ("PNG", "LA", "MONOCHROME2"),
        ("PNG", "L", "MONOCHROME2"),
    ],
)
def test_raster_colour_modes_become_grayscale(fmt: str, mode: str | None, photometric: str) -> None:
    rgb = np.zeros((48, 80, 3), dtype=np.uint8)
    rgb[:, :40] = (30, 30, 30)
    rgb[:, 40:] = (220, 200, 180)
    decoded = decode(make_raster(rgb, fmt, mode), "photo.dcm")  # the extension is ignored
    assert decoded.photometric == photometric
    assert (decoded.orig_rows, decoded.orig_cols) == (48, 80)
    assert decoded.pixels[SIZE // 2, 10] < decoded.pixels[SIZE // 2, SIZE - 10]  # right half brighter


@pytest.mark.parametrize("side", [5000, 100_000], ids=["over-our-limit", "over-pillow-limit"])
def test_png_header_claiming_huge_size_is_too_large(side: int) -> None:
    data = bytearray(make_raster(np.arange(256, dtype=np.uint8).reshape(16, 16), "PNG"))
    struct.pack_into(">II", data, 16, side, side)  # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    assert rejection(bytes(data)).reason is Reason.TOO_LARGE


def test_truncated_png_is_corrupt() -> None:
    data = make_raster(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), "PNG")
    assert rejection(data[: len(data) // 2]).reason is Reason.CORRUPT


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_12_bit_jpeg_object_decodes_like_its_dicom(name: str) -> None:
    """Pillow cannot open 12-bit JPEG: libjpeg decodes it to what pydicom decodes from the DICOM."""
    decoded = decode(jpeg_frame(name), "scan.jpg")
    reference = pydicom.dcmread(io.BytesIO(local("JPGExtended.dcm"))).pixel_array  # the conforming twin
    assert (decoded.bits_stored, decoded.photometric, decoded.orig_rows, decoded.orig_cols) == (
        12, "MONOCHROME2", 1024, 256,
    )  # fmt: skip
    assert np.array_equal(decoded.pixels, normalise(reference.astype(np.float32), SIZE))


def test_16_bit_lossless_jpeg_object_decodes_like_its_dicom() -> None:
    image = (disk(52000, 3000) + np.arange(48, dtype=np.uint16) * 200).astype(np.uint16)  # needs 16 bits
    stream = lossless_jpeg(image)
    assert np.array_equal(libjpeg.decode(stream), image)  # the test's encoder is right
    decoded = decode(stream, "scan.jpg")
    assert (decoded.bits_stored, decoded.photometric) == (16, "MONOCHROME2")
    assert np.array_equal(decoded.pixels, normalise(image.astype(np.float32), SIZE))
    ds = pydicom.dcmread(io.BytesIO(make_dicom(image)))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([stream])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert np.array_equal(decode(buffer.getvalue()).pixels, decoded.pixels)


@pytest.mark.parametrize(
    ("ids", "app", "luma"),
    [
        (b"RGB", b"", True),
        (b"\x01\x02\x03", b"", True),  # lossless without colour markers: RGB
        (b"\x01\x02\x03", b"\xff\xe0\x00\x10JFIF\x00\x01\x02\x00\x00\x01\x00\x01\x00\x00", False),  # YCbCr
    ],
)
def test_16_bit_lossless_colour_jpeg_becomes_luma(ids: bytes, app: bytes, luma: bool) -> None:
    rgb = np.stack([disk(50000, 1000), disk(9000, 30000), disk(20000, 20000)], axis=-1)
    decoded = decode(lossless_jpeg(rgb, ids, app), "photo.jpg")
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if luma else rgb[..., 0]
    assert (decoded.bits_stored, decoded.photometric) == (16, "RGB")
    assert np.array_equal(decoded.pixels, normalise(gray.astype(np.float32), SIZE))


def test_truncated_or_oversized_high_bit_jpeg_is_rejected_before_decoding() -> None:
    for data in (jpeg_frame("JPGExtended.dcm"), lossless_jpeg(disk(60000, 900))):
        for cut in (12, 200, len(data) // 2, len(data) - 2):
            assert rejection(data[:cut], "scan.jpg").reason is Reason.CORRUPT, cut
        huge = bytearray(data)
        struct.pack_into(">HH", huge, 7, 65535, 65535)  # SOF rows, columns: ~4.3e9 pixels
        tracemalloc.start()
        try:
            reason = rejection(bytes(huge), "scan.jpg").reason
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert reason is Reason.TOO_LARGE and peak < 16 * 2**20


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(asymmetric()).save(buffer, format=fmt, exif=exif_orientation(orientation))
    stored = Image.open(io.BytesIO(buffer.getvalue()))
    upright = np.asarray(ImageOps.exif_transpose(stored), dtype=np.float32)
    assert (orientation == 1) == np.array_equal(upright, np.asarray(stored, dtype=np.float32))
    decoded = decode(buffer.getvalue(), "photo.jpg")
    assert (decoded.orig_rows, decoded.orig_cols) == upright.shape
    assert np.array_equal(decoded.pixels, normalise(upright, SIZE))


def test_exif_orientation_of_high_bit_jpeg_and_unreadable_exif() -> None:
    frame = jpeg_frame("JPGExtended.dcm")
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif_orientation(6)) + 2) + exif_orientation(6)
    reference = pydicom.dcmread(io.BytesIO(local("JPGExtended.dcm"))).pixel_array.astype(np.float32)
    decoded = decode(frame[:2] + app1 + frame[2:], "scan.jpg")
    assert (decoded.orig_rows, decoded.orig_cols) == (256, 1024)
    assert np.array_equal(decoded.pixels, normalise(np.rot90(reference, -1), SIZE))
    buffer = io.BytesIO()
    Image.fromarray(asymmetric()).save(buffer, format="PNG", exif=b"Exif\x00\x00not a TIFF header")
    assert np.array_equal(decode(buffer.getvalue()).pixels, decode(make_raster(asymmetric(), "PNG")).pixels)


# --------------------------------------------------------------------------- sniff, limits


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (make_raster(np.zeros((4, 4), np.uint8), "PNG"), "png"),
        (make_raster(np.zeros((4, 4), np.uint8), "JPEG"), "jpeg"),
        (b"PK\x05\x06" + bytes(18), "zip"),
        (b'{"not": "dicom"}', "unknown"),
        (b"\x08\x00\x05\x00", "unknown"),  # a plausible first tag is not enough
    ],
)
def test_sniff_by_content_not_name(data: bytes, kind: str) -> None:
    assert sniff(data, "misleading.dcm") == kind


def test_sniff_dicom_and_ignores_extension() -> None:
    assert sniff(local("CT_small.dcm"), "ct.png") == "dicom"
    assert sniff(local("ExplVR_BigEndNoMeta.dcm"), "x") == "dicom"  # raw big-endian dataset


def test_limits_from_settings() -> None:
    settings = Settings(max_frames=7, max_image_pixels=1000, max_archive_members=3)
    limits = Limits.from_settings(settings)
    assert (limits.max_frames, limits.max_image_pixels, limits.max_archive_members) == (7, 1000, 3)
    assert limits.max_object_bytes == settings.max_object_bytes


def test_rejected_is_reason_and_detail() -> None:
    exc = Rejected(Reason.BLANK, "constant pixel values")
    assert (exc.reason, exc.detail, str(exc)) == (
        Reason.BLANK,
        "constant pixel values",
        "blank: constant pixel values",
    )
    assert {reason.value for reason in Reason} == {
        "not_image", "corrupt", "unsupported_transfer_syntax", "unlabelled", "too_large",
        "unsafe_archive", "blank", "empty", "no_pixel_data",
    }  # fmt: skip


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_truncated_compressed_frames_are_refused_and_padding_is_not(name) -> None:
    ds = pydicom.dcmread(io.BytesIO(local(name)))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)

    def with_frame(encoded: bytes) -> bytes:
        ds.PixelData = encapsulate([encoded])
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    cut = frame[: len(frame) * 2 // 3 // 2 * 2]  # what an interrupted transfer leaves
    caught = rejection(with_frame(cut))
    assert (caught.reason, caught.detail) == (
        Reason.CORRUPT,
        "compressed frame is truncated (no end-of-image marker)",
    )
    padded = decode(with_frame(frame + b"\0\0"))
    assert np.array_equal(padded.pixels, decode(local(name)).pixels)


# --------------------------------------------------------------------------- the native fast path

NATIVE_FILES = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm", "liver_1frame.dcm",
    "rtdose_1frame.dcm", "examples_overlay.dcm", "no_meta_group_length.dcm", "nested_priv_SQ.dcm",
)  # fmt: skip


def outcome(data: bytes) -> tuple:
    """Everything decoding gives: the Decoded's fields and pixels, or the rejection."""
    try:
        decoded = decode(data)
    except Rejected as exc:
        return ("rejected", exc.reason, exc.detail)
    fields = {k: v for k, v in decoded.__dict__.items() if k != "pixels"}
    return ("decoded", tuple(sorted(fields.items())), decoded.pixels.tobytes())


def native_corpus() -> list[bytes]:
    """Synthetic studies of every class (CT signed with rescale and window, MONOCHROME1, 8-bit OCT,
    multi-frame), pydicom's native-syntax files, and the same re-encoded with bits stored < allocated."""
    from mmpipe.synth import generate

    bodies = [o.body for o in generate(60, size=40, seed=2, formats={"dicom": 1.0}, archive_fraction=0)]
    bodies += [local(name) for name in NATIVE_FILES if (TEST_FILES / name).is_file()]
    for signed in (0, 1):
        ds = pydicom.dcmread(io.BytesIO(local("CT_small.dcm")))
        ds.BitsStored, ds.PixelRepresentation = 12, signed  # high bits hold garbage pydicom clears
        ds.NumberOfFrames, ds.WindowCenter, ds.WindowWidth = 1, [40, 400], [350, 1500]
        buffer = io.BytesIO()
        ds.save_as(buffer)
        bodies.append(buffer.getvalue())
    return bodies


def test_the_fast_path_decodes_exactly_as_pydicom(monkeypatch) -> None:
    from mmpipe.imaging import NativeHeader

    corpus = native_corpus()
    taken = sum(NativeHeader.parse(body) is not None for body in corpus)
    assert taken >= 0.85 * len(corpus)  # the common case really takes it
    fast = [outcome(body) for body in corpus]
    monkeypatch.setattr(NativeHeader, "parse", classmethod(lambda cls, data: None))
    assert fast == [outcome(body) for body in corpus]


def test_damaged_native_files_end_as_pydicom_ends_them(monkeypatch) -> None:
    """Header bytes changed at random: the fast path decodes only what pydicom decodes, the same way;
    everything else it leaves to pydicom."""
    from mmpipe.imaging import NativeHeader

    rng = np.random.default_rng(3)
    seeds = native_corpus()[::6]
    mutants = []
    for seed in seeds:
        header = seed.index(b"\xe0\x7f\x10\x00")  # before the pixel data
        for _ in range(60):
            data = bytearray(seed)
            for position in rng.integers(132, header, size=rng.integers(1, 4)):
                data[position] = rng.integers(0, 256)
            mutants.append(bytes(data))
    fast = [outcome(body) for body in mutants]
    monkeypatch.setattr(NativeHeader, "parse", classmethod(lambda cls, data: None))
    slow = [outcome(body) for body in mutants]
    differ = [(f, s) for f, s in zip(fast, slow, strict=True) if f != s]
    assert not differ, differ[:3]
    assert {o[0] for o in fast} == {"decoded", "rejected"}


def test_colourfulness_tells_a_photograph_from_grey_in_a_colour_container() -> None:
    """Scoring's colour check: grey stored as RGB (PNG, JPEG, RGB DICOM) measures ~0, a colourful
    photograph far above the 15 that marks 'not colourful'; a greyscale file measures 0."""
    rng = np.random.default_rng(0)
    grey = (rng.random((96, 96)) * 255).astype(np.uint8)
    photo = (rng.random((4, 4, 3)).repeat(24, 0).repeat(24, 1) * 255).astype(np.uint8)
    for rgb, low, high in ((np.stack([grey] * 3, -1), 0, 2), (photo, 30, 500)):
        for data in (make_raster(rgb, "PNG"), make_raster(rgb, "JPEG"), make_dicom(rgb, "RGB", 8)):
            decoded = decode(data)
            assert decoded.photometric == "RGB"
            assert low <= decoded.colourfulness <= high, decoded.colourfulness
    assert decode(make_raster(grey, "PNG")).colourfulness == 0.0
