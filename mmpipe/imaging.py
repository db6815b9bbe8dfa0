"""Decode one DICOM, PNG or JPEG object (bytes) into the canonical image, or reject it with a reason.

Pure functions on bytes, safe to call from worker threads. Every input ends as either a
:class:`Decoded` or a :class:`Rejected` carrying a fixed machine-readable :class:`Reason`: ingest
quarantines on that reason. Where a library parses the input (pydicom reading or converting a
header value, a pixel codec, Pillow, libjpeg), any exception is damage in the data and becomes
:class:`Rejected` (:func:`data_fault`). Any other exception is a bug in mmpipe's own code: it
escapes :func:`decode_image`, and ingest records it as a decoder error, never as a verdict on the data.

DICOM rules, in order (the native-unit image handed to :func:`mmpipe.pixels.normalise`):

* Header limits (rows*columns, frames) are checked before any pixel data is decoded.
* Multi-frame: the representative frame is index ``n_frames // 2`` (the middle one), and only that
  frame is decoded.
* Monochrome: Modality LUT, else Rescale Slope/Intercept (top level, else the enhanced per-frame
  then shared functional groups). Then a VOI LUT Sequence, if present, is applied and intensities
  are scaled by percentiles; otherwise the first Window Centre/Width pair, if valid, is resolved to
  its (lo, hi) bounds and passed to ``normalise`` (SIGMOID is approximated by the LINEAR bounds;
  unparseable values and widths the standard forbids are ignored). MONOCHROME1, or a Presentation
  LUT Shape of INVERSE, is inverted by negation (the window negated with it), so what displays
  bright stays bright; once only: for MONOCHROME1, INVERSE restates that polarity.
* Colour (RGB, YBR_*, PALETTE COLOR): converted to RGB, then ITU-R BT.601 luma.
* A JPEG, JPEG-LS or JPEG 2000 frame without its end marker is truncated and refused: the codecs
  would fill the missing part with noise.
* Pixel data goes through pydicom's plugins in pydicom's order (pylibjpeg first). A sequential JPEG
  frame that they all refuse because its scan header misstates the spectral selection (some
  encoders write Se=0) is decoded once more with the full spectrum stated, as IJG's codec (DCMTK,
  GDCM) reads it.
* The common case takes a fast path that gives exactly what pydicom gives (:class:`NativeHeader`):
  a Part-10 file in explicit or implicit VR little endian, one sample of 8 or 16 bits, MONOCHROME,
  no LUT sequence or functional groups, ASCII text values. Anything else, or anything it finds odd,
  goes to pydicom, which judges it; dcmread and the decoder runner cost 3-4 times the whole fast path.

PNG/JPEG: grayscale at its native depth (8 or 16 bit), RGB(A)/palette/CMYK to BT.601 luma, alpha
dropped; intensities scaled by percentiles. A JPEG Pillow cannot open (12-bit extended, lossless up
to 16 bit) is decoded by libjpeg, its sample precision recorded as bits stored. An EXIF Orientation
(JPEG or PNG) is applied as ``PIL.ImageOps.exif_transpose`` would, so the stored image is upright and
``orig_rows``/``orig_cols`` describe it upright.

A 2-D image with no variation (constant before or after intensity scaling) is BLANK.
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO
from pathlib import PurePosixPath
from typing import Any

import libjpeg
import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.filereader import _read_command_set_elements, _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_rescale, apply_voi, get_decoder, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from mmpipe.pixels import normalise

# pydicom's reading validation echoes offending element values (names, dates, IDs) into warnings
# and its logger; ingest reads PHI, so values are never validated while reading.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# python-gdcm is deliberately not a dependency. Installed, pydicom tries it first for every JPEG,
# JPEG-LS and JPEG 2000 syntax (changing lossy JPEG pixels); 3.2.6 aborts the process (SIGABRT,
# SIGSEGV) on corrupt frames that pylibjpeg rejects with an exception; its pydicom plugin refuses
# 12-bit JPEG Extended. Its JPEG 2000 decode is faster only by using a second thread (2048x2048
# 12-bit lossless: 438 ms wall / 657 ms CPU, pylibjpeg 620 / 588 ms; 16 J2K objects in one process:
# 2.6 s vs 3.8 s). Ingest's decode processes (CPU count + 1) already fill both cores: there the same
# 16 objects took 2.27 s with gdcm, 2.04 s with pylibjpeg.

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_ZIP = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
GZIP_MAGIC, BZ2_MAGIC, XZ_MAGIC = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"
_TAR_BLOCK = 512
_INFLATE_CHUNK = 1 << 20
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFLATED = DeflatedExplicitVRLittleEndian.encode()
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SEQUENTIAL_JPEG = (JPEGBaseline8Bit, JPEGExtended12Bit)
_END_MARKED = frozenset(JPEGTransferSyntaxes + JPEGLSTransferSyntaxes + JPEG2000TransferSyntaxes)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)
_SOF_SEQUENTIAL, _SOF_LOSSLESS = frozenset({0xC0, 0xC1}), frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_SOS, _APP0, _APP1, _APP14 = 0xDA, 0xE0, 0xE1, 0xEE
_ORIENTATION = 0x0112
#: EXIF Orientation -> the view that shows the stored image upright (PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].T,
    8: lambda a: np.rot90(a),
}


class Reason(StrEnum):
    """Why an object was quarantined (stored in the catalog; values are a fixed contract)."""

    NOT_IMAGE = "not_image"
    CORRUPT = "corrupt"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    UNLABELLED = "unlabelled"
    TOO_LARGE = "too_large"
    UNSAFE_ARCHIVE = "unsafe_archive"
    BLANK = "blank"
    EMPTY = "empty"
    NO_PIXEL_DATA = "no_pixel_data"


class Rejected(Exception):
    """An input that cannot become a training/scoring image. ``detail`` never contains PHI."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(reason, detail)
        self.reason = Reason(reason)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


#: Not faults of the data. Everything else a library raises on untrusted bytes is, including the
#: ``PanicException`` of Rust codecs (pylibjpeg-rle), a BaseException that ``except Exception`` misses.
_NOT_DATA_FAULTS = (Rejected, MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit)


@contextmanager
def data_fault(what: str, reason: Reason = Reason.CORRUPT) -> Iterator[None]:
    """A library parsing untrusted bytes: whatever it raises is damage in the data, kept as ``what``
    and the exception's type only (library messages may quote header values or member names)."""
    try:
        yield
    except _NOT_DATA_FAULTS:
        raise
    except BaseException as exc:
        raise Rejected(reason, f"{what} ({type(exc).__name__})") from None


@dataclass(frozen=True)
class Limits:
    """Resource ceilings for one object, checked before the expensive work they guard."""

    max_object_bytes: int
    max_archive_members: int
    max_archive_bytes: int
    max_image_pixels: int
    max_frames: int

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            max_object_bytes=settings.max_object_bytes,
            max_archive_members=settings.max_archive_members,
            max_archive_bytes=settings.max_archive_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_frames=settings.max_frames,
        )


@dataclass(frozen=True)
class Decoded:
    """A canonical image plus the header facts ingest records.

    ``patient_id``, ``study_uid`` and ``accession`` are raw identifiers (PHI): the caller
    pseudonymises them at once and never logs them.
    """

    pixels: np.ndarray
    frame: int | None
    n_frames: int
    orig_rows: int
    orig_cols: int
    bits_stored: int
    photometric: str | None
    transfer_syntax: str | None
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    accession: str | None = None
    bits_allocated: int = 0  # the container per sample (DICOM BitsAllocated); 0 when the header lacks it
    float_pixels: bool = False  # Float/Double Float Pixel Data
    colourfulness: float = 0.0  # of colour input (:func:`colourfulness`); 0 for greyscale


# --------------------------------------------------------------------------- sniffing


def sniff(data: bytes, name: str) -> str:
    """The object's kind from its content: "dicom", "png", "jpeg", "zip", "tar" or "unknown".

    ``name`` is accepted for symmetry with the other entry points but never decides: extensions lie.
    "tar" includes gzip/bzip2/xz-compressed tars; "dicom" includes Part-10 files with or without
    the preamble and raw datasets without file meta that parse as a plausible dataset.
    """
    if data[128:132] == b"DICM" or data[:4] == b"DICM":
        return "dicom"
    if data.startswith(_PNG):
        return "png"
    if data.startswith(_JPEG):
        return "jpeg"
    if data.startswith(_ZIP):
        return "zip"
    if _is_tar_header(_decompressed_head(data)):
        return "tar"
    if _looks_like_raw_dataset(data):
        return "dicom"
    return "unknown"


def _decompressed_head(data: bytes) -> bytes:
    """The first tar block of ``data``, decompressing gzip/bzip2/xz just far enough to see it."""
    try:
        if data.startswith(GZIP_MAGIC):
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:65536], _TAR_BLOCK)
        if data.startswith(BZ2_MAGIC):  # bzip2 emits nothing before a whole (<= 900 kB) block
            return bz2.BZ2Decompressor().decompress(data[: 1 << 20], _TAR_BLOCK)
        if data.startswith(XZ_MAGIC):
            return lzma.LZMADecompressor().decompress(data[:65536], _TAR_BLOCK)
    except Exception:  # damaged compression: not a tar, whatever the codec raised
        return b""
    return data[:_TAR_BLOCK]


def _is_tar_header(block: bytes) -> bool:
    """A valid tar header checksum (what tarfile itself trusts; covers ustar, GNU and v7 tars)."""
    if len(block) < _TAR_BLOCK:
        return False
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"x", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:_TAR_BLOCK])
    signed = sum(struct.unpack("148b", block[:148])) + 8 * 32 + sum(struct.unpack("356b", block[156:512]))
    return stored in (unsigned, signed)


def _looks_like_raw_dataset(data: bytes) -> bool:
    """A file-meta-less dataset: first tag in a low even group and at least two dictionary tags parse."""
    if len(data) < 8:
        return False
    groups = struct.unpack_from("<H", data)[0], struct.unpack_from(">H", data)[0]
    if not any(2 <= group <= 0x28 and group % 2 == 0 for group in groups):
        return False
    try:
        if _DEFLATED in data:  # dcmread would inflate the dataset unmeasured: its file meta must do
            tags = _read_file_meta_info(BytesIO(data)).keys()
        else:  # tags only: iterating the dataset would convert every value
            tags = pydicom.dcmread(BytesIO(data), force=True, stop_before_pixels=True).keys()
        return sum(dictionary_has_tag(tag) for tag in tags) >= 2
    except Exception:
        return False


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, name: str, size: int, limits: Limits, kind: str | None = None) -> Decoded:
    """Decode ``data`` to a canonical ``size``x``size`` uint8 image; raise :class:`Rejected` when the
    data is at fault. Any other exception is a bug in mmpipe, not a verdict on the data (module doc).

    ``name`` only contributes its extension to rejection details (never the name: it may hold PHI).
    ``kind`` is what :func:`sniff` said of ``data``, if the caller sniffed it already.
    """
    try:
        return _decode(data, name, size, limits, kind or sniff(data, name))
    except MemoryError:
        raise Rejected(Reason.TOO_LARGE, "out of memory while decoding") from None


def _decode(data: bytes, name: str, size: int, limits: Limits, kind: str) -> Decoded:
    if not data:
        raise Rejected(Reason.EMPTY, "zero-byte object")
    if len(data) > limits.max_object_bytes:
        raise Rejected(Reason.TOO_LARGE, f"{len(data)} bytes > max_object_bytes {limits.max_object_bytes}")
    if kind == "dicom":
        return _decode_dicom(data, size, limits)
    if kind in ("png", "jpeg"):
        return _decode_raster(data, kind, size, limits)
    suffix = PurePosixPath(name).suffix.lower()
    suffix = suffix if len(suffix) <= 6 and suffix[1:].isalnum() else "unrecognised"  # names may hold PHI
    if kind in ("zip", "tar"):
        raise Rejected(Reason.NOT_IMAGE, f"{kind} archive (extension {suffix}): expand it first")
    raise Rejected(Reason.NOT_IMAGE, f"content is not DICOM, PNG, JPEG or an archive (extension {suffix})")


def _check_pixels(rows: int, cols: int, limits: Limits) -> None:
    if rows < 1 or cols < 1:
        raise Rejected(Reason.CORRUPT, f"invalid image size {rows}x{cols}")
    if rows * cols > limits.max_image_pixels:
        raise Rejected(Reason.TOO_LARGE, f"{rows}x{cols} pixels > max_image_pixels {limits.max_image_pixels}")


def _finish(native: np.ndarray, size: int, window: tuple[float, float] | None) -> np.ndarray:
    """Native-unit 2-D image -> canonical pixels, rejecting images that carry no information."""
    finite = np.isfinite(native)
    if not finite.all():  # float pixel data may use NaN/inf as padding: treat it as background
        if not finite.any():
            raise Rejected(Reason.BLANK, "no finite pixel values")
        native = np.where(finite, native, native[finite].min())
    if native.min() == native.max():
        raise Rejected(Reason.BLANK, "constant pixel values")
    pixels = normalise(native, size, window)
    if pixels.min() == pixels.max():
        raise Rejected(Reason.BLANK, "constant after intensity scaling")
    return pixels


def _luma(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """BT.601 luma of an RGB image, and its colourfulness (:func:`colourfulness`)."""
    rgb = np.asarray(rgb[..., :3], dtype=np.float32)
    return rgb @ _BT601, colourfulness(rgb)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness of an RGB image on a 0-255 scale: 0 for grey (whatever its
    container), under ~15 "not colourful", 33+ a photograph's. The five modalities are greyscale, so
    scoring reads a colourful image as out of distribution. Computed on a subsample of <= 256x256."""
    step = max(1, max(rgb.shape[:2]) // 256)
    sample = np.asarray(rgb[::step, ::step, :3], dtype=np.float32)
    if sample.max() > 255:  # 16-bit samples
        sample = sample * (255.0 / 65535.0)
    rg = sample[..., 0] - sample[..., 1]
    yb = 0.5 * (sample[..., 0] + sample[..., 1]) - sample[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _technical(exc: Exception) -> str:
    """A codec's message on one line: lengths, syntaxes and error codes, never header values."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


# --------------------------------------------------------------------------- DICOM


def _read_dataset(data: bytes, limits: Limits) -> Dataset:
    if data[:4] == b"DICM":  # prefix without the preamble: restore it so pydicom finds the meta
        data = bytes(128) + data
    _guard_deflate(data, limits)
    try:
        return pydicom.dcmread(BytesIO(data), force=True)
    except Exception as exc:
        raise Rejected(Reason.CORRUPT, f"unreadable DICOM ({type(exc).__name__})") from None


def _guard_deflate(data: bytes, limits: Limits) -> None:
    """pydicom inflates a Deflated-syntax dataset in one unbounded call: measure it first.

    The guard fails closed: it reads the file meta as ``dcmread`` does (with or without a preamble),
    and a file naming the deflated syntax whose file meta it cannot read is refused, not passed on.
    """
    if _DEFLATED not in data:  # the file meta stores the UID as text: without it, no parse needed
        return
    fp = BytesIO(data)
    with data_fault("unreadable file meta of a dataset naming the deflated syntax"):
        read_preamble(fp, True)  # without a preamble pydicom rewinds and still reads a file meta
        tsyntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
        _read_command_set_elements(fp)  # pydicom inflates what follows these
    if tsyntax != DeflatedExplicitVRLittleEndian:
        return
    inflater, pending, total = zlib.decompressobj(-zlib.MAX_WBITS), data[fp.tell() :], 0
    while not inflater.eof:
        try:
            out = inflater.decompress(pending, _INFLATE_CHUNK)
        except zlib.error:
            raise Rejected(Reason.CORRUPT, "corrupt deflated dataset") from None
        total += len(out)
        if total > limits.max_object_bytes:
            raise Rejected(
                Reason.TOO_LARGE, f"deflated dataset inflates beyond {limits.max_object_bytes} bytes"
            )
        pending = inflater.unconsumed_tail
        if not out and not pending:
            break


def _value(ds: Dataset, keyword: str) -> Any:
    """``keyword``'s value in ``ds``, or None. pydicom converts a value when it is first read, so
    damaged bytes surface here, as a data fault."""
    with data_fault(f"unreadable {keyword}"):
        return ds.get(keyword)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _value(ds, keyword)
    if value is None:
        return None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = _value(ds, keyword)
    if value in (None, ""):
        if default is None:
            raise Rejected(Reason.CORRUPT, f"missing {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Rejected(Reason.CORRUPT, f"invalid {keyword}") from None


def _first_float(value: Any) -> float:
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _frame_value(ds: Dataset, frame: int, group: str, keyword: str) -> Any:
    """``keyword`` at top level, else in the frame's then the shared functional group ``group``."""
    if keyword in ds:
        return _value(ds, keyword)
    for sequence, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = _value(ds, sequence)
        if items and index < len(items):
            macro = _value(items[index], group)
            if macro and keyword in macro[0]:
                return _value(macro[0], keyword)
    return None


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax; for raw datasets the encoding pydicom parsed them with."""
    tsyntax = _value(ds.file_meta, "TransferSyntaxUID")
    if tsyntax:
        return UID(tsyntax)
    with data_fault("unreadable PixelData"):
        undefined = "PixelData" in ds and ds["PixelData"].is_undefined_length
    if undefined:
        raise Rejected(
            Reason.UNSUPPORTED_TRANSFER_SYNTAX, "encapsulated pixel data without a transfer syntax"
        )
    implicit, little = ds.original_encoding
    syntaxes = {
        (True, True): ImplicitVRLittleEndian,
        (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian,
    }
    if (implicit, little) not in syntaxes:
        raise Rejected(Reason.CORRUPT, "undeterminable dataset encoding")
    ds.file_meta.TransferSyntaxUID = syntaxes[(implicit, little)]
    return ds.file_meta.TransferSyntaxUID


def _decode_dicom(data: bytes, size: int, limits: Limits) -> Decoded:
    ds = NativeHeader.parse(data) or _read_dataset(data, limits)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise Rejected(Reason.NO_PIXEL_DATA, "dataset has no pixel data")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    _check_pixels(rows, cols, limits)
    n_frames = _int(ds, "NumberOfFrames", default=1)
    if n_frames < 1:
        raise Rejected(Reason.CORRUPT, f"invalid NumberOfFrames {n_frames}")
    if n_frames > limits.max_frames:
        raise Rejected(Reason.TOO_LARGE, f"{n_frames} frames > max_frames {limits.max_frames}")
    tsyntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise Rejected(
            Reason.UNSUPPORTED_TRANSFER_SYNTAX, f"no decoder for {tsyntax} ({tsyntax.name})"
        ) from None
    if not decoder.is_available:
        raise Rejected(
            Reason.UNSUPPORTED_TRANSFER_SYNTAX, f"no installed plugin decodes {tsyntax} ({tsyntax.name})"
        )
    frame = n_frames // 2
    native, window, colour = dicom_native(ds, frame)
    return Decoded(
        pixels=_finish(native, size, window),
        frame=frame if n_frames > 1 else None,
        n_frames=n_frames,
        orig_rows=rows,
        orig_cols=cols,
        bits_stored=_int(ds, "BitsStored", default=_int(ds, "BitsAllocated", default=0)),
        photometric=_text(ds, "PhotometricInterpretation"),
        transfer_syntax=str(tsyntax),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        study_description=_text(ds, "StudyDescription"),
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        accession=_text(ds, "AccessionNumber"),
        bits_allocated=_int(ds, "BitsAllocated", default=0),
        float_pixels="PixelData" not in ds,
        colourfulness=colour,
    )


def dicom_native(
    ds: Dataset | NativeHeader, frame: int
) -> tuple[np.ndarray, tuple[float, float] | None, float]:
    """Decode one frame to a 2-D float image in native units, its window and its colourfulness."""
    stored = _stored_frame(ds, frame)
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric == "PALETTE COLOR":
        with data_fault("unusable palette"):
            rgb = apply_color_lut(stored, ds)
        luma, colour = _luma(rgb)
        return luma, None, colour
    if stored.ndim == 3:  # RGB; pydicom already converted YBR_* to RGB
        luma, colour = _luma(stored)
        return luma, None, colour
    if stored.ndim != 2:
        raise Rejected(Reason.CORRUPT, f"unexpected decoded shape {stored.shape}")
    if photometric not in _MONOCHROME:
        raise Rejected(Reason.CORRUPT, f"single-sample image with photometric {photometric}")
    native = _rescale(stored, ds, frame)
    window = None
    if _value(ds, "VOILUTSequence"):
        with data_fault("unusable VOI LUT"):
            native = apply_voi(np.rint(native).astype(np.int64), ds)
    else:
        window = _window(ds, frame)
    native = np.asarray(native, dtype=np.float32)
    if photometric == "MONOCHROME1" or _text(ds, "PresentationLUTShape") == "INVERSE":
        native = -native
        window = None if window is None else (-window[1], -window[0])
    return native, window, 0.0


def _stored_frame(ds: Dataset, frame: int) -> np.ndarray:
    """The frame's stored values; a sequential JPEG frame is retried with its scans' spectrum restated.

    JPEG, JPEG-LS and JPEG 2000 frames end with a marker (EOI/EOC, then only 00 or FF padding); the
    codecs decode a frame cut short without complaint, into an image whose lower part is noise, so
    a frame without it is refused before decoding.
    """
    if isinstance(ds, NativeHeader):
        return ds.frame(frame)
    tsyntax = _value(ds.file_meta, "TransferSyntaxUID")
    encoded = _encoded_frame(ds, frame) if tsyntax in _END_MARKED else None
    if encoded is not None and not encoded.rstrip(b"\0\xff").endswith(b"\xff\xd9"):
        raise Rejected(Reason.CORRUPT, "compressed frame is truncated (no end-of-image marker)")
    try:
        return pixel_array(ds, index=frame)
    except _NOT_DATA_FAULTS:
        raise
    except BaseException as exc:  # pixel-level messages are technical (lengths, syntaxes), never PHI
        failure = exc
    if encoded is not None and tsyntax in _SEQUENTIAL_JPEG:
        with contextlib.suppress(Rejected), data_fault("undecodable"):  # the retry only adds a decode
            restated = _sequential_scans(encoded)
            if restated is not None:
                return pixel_array(_single_frame(ds, restated))
    raise Rejected(Reason.CORRUPT, f"pixel data undecodable ({_technical(failure)})")


def _encoded_frame(ds: Dataset, frame: int) -> bytes | None:
    """The frame's encapsulated bytes, or None where pydicom's own reading must judge the encapsulation."""
    try:
        return get_frame(ds.PixelData, frame, number_of_frames=_int(ds, "NumberOfFrames", default=1))
    except Exception:
        return None


def _single_frame(ds: Dataset, encoded: bytes) -> Dataset:
    """A one-frame dataset: ``ds``'s image pixel description and transfer syntax, holding ``encoded``."""
    single = ds.group_dataset(0x0028)
    single.file_meta = ds.file_meta
    single.NumberOfFrames = 1
    single.PixelData = encapsulate([encoded])
    return single


def _rescale(stored: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    if _value(ds, "ModalityLUTSequence"):
        with data_fault("unusable Modality LUT"):
            return apply_rescale(stored, ds)
    group = "PixelValueTransformationSequence"
    slope = _frame_value(ds, frame, group, "RescaleSlope")
    intercept = _frame_value(ds, frame, group, "RescaleIntercept")
    native = stored.astype(np.float32)  # also makes big-endian and signed dtypes native float
    if slope not in (None, ""):
        native *= np.float32(_rescale_value(slope, "RescaleSlope"))
    if intercept not in (None, ""):
        native += np.float32(_rescale_value(intercept, "RescaleIntercept"))
    return native


def _rescale_value(value: Any, keyword: str) -> float:
    try:
        return _first_float(value)
    except (TypeError, ValueError):  # kept as text by pydicom's lenient reading: the value is garbled
        raise Rejected(Reason.CORRUPT, f"invalid {keyword}") from None


def _window(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """The first Window Centre/Width pair as (lo, hi) bounds (PS3.3 C.11.2.1.2), or None."""
    group = "FrameVOILUTSequence"
    centre, width = (
        _frame_value(ds, frame, group, "WindowCenter"),
        _frame_value(ds, frame, group, "WindowWidth"),
    )
    if centre in (None, "") or width in (None, ""):
        return None
    try:
        c, w = _first_float(centre), _first_float(width)
    except (TypeError, ValueError):
        return None  # a garbled display hint is ignored, like a width the standard forbids
    function = str(_frame_value(ds, frame, group, "VOILUTFunction") or "LINEAR").strip().upper()
    if function == "LINEAR_EXACT":
        return (c - w / 2, c + w / 2) if w > 0 else None
    if w < 1:  # LINEAR requires width >= 1; SIGMOID shares its bounds
        return None
    return c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2


# --------------------------------------------------------------------------- DICOM: the fast path

_TAGS = {  # keyword -> (tag, VR) of what decoding reads
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"), "PixelRepresentation": (0x00280103, "US"),
    "SamplesPerPixel": (0x00280002, "US"), "NumberOfFrames": (0x00280008, "IS"),
    "PhotometricInterpretation": (0x00280004, "CS"), "PresentationLUTShape": (0x20500020, "CS"),
    "RescaleSlope": (0x00281053, "DS"), "RescaleIntercept": (0x00281052, "DS"),
    "WindowCenter": (0x00281050, "DS"), "WindowWidth": (0x00281051, "DS"), "VOILUTFunction": (0x00281056, "CS"),
    "Modality": (0x00080060, "CS"), "BodyPartExamined": (0x00180015, "CS"), "StudyDescription": (0x00081030, "LO"),
    "PatientID": (0x00100020, "LO"), "StudyInstanceUID": (0x0020000D, "UI"), "AccessionNumber": (0x00080050, "SH"),
}  # fmt: skip
_PIXEL_DATA = 0x7FE00010
#: Present, these need what only pydicom does: float pixels, LUTs, functional groups.
_PYDICOM_ONLY = frozenset({0x7FE00008, 0x7FE00009, 0x00283000, 0x00283010, 0x52009229, 0x52009230})
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_NESTING = 8
_NATIVE_SYNTAXES = {ExplicitVRLittleEndian: False, ImplicitVRLittleEndian: True}  # syntax -> implicit VR
_TEXT = frozenset(range(0x20, 0x7F))


class _NotNative(Exception):
    """The fast path steps aside: pydicom reads this file."""


def _element(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(data):
        raise _NotNative
    group, number = struct.unpack_from("<HH", data, pos)
    tag = group << 16 | number
    if implicit or group == 0xFFFE:  # items and delimiters carry no VR in either encoding
        return tag, None, struct.unpack_from("<I", data, pos + 4)[0], pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _NotNative
        return tag, vr, struct.unpack_from("<I", data, pos + 8)[0], pos + 12
    if not vr.isalpha() or not vr.isupper():
        raise _NotNative
    return tag, vr, struct.unpack_from("<H", data, pos + 6)[0], pos + 8


def _skip_sequence(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """The offset after an undefined-length sequence whose first item starts at ``pos``."""
    if depth > _MAX_NESTING:
        raise _NotNative
    while True:
        tag, _, length, pos = _element(data, pos, True)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _NotNative
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements, up to the item delimiter
            tag, vr, length, pos = _element(data, pos, implicit)
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED:
                if vr not in (None, b"SQ", b"UN"):
                    raise _NotNative
                pos = _skip_sequence(data, pos, implicit or vr == b"UN", depth + 1)
            else:
                pos += length


class NativeHeader:
    """What decoding reads from a DICOM file in a native little-endian syntax, parsed with ``struct``.

    It answers :func:`_value` as a pydicom Dataset does (values converted as pydicom converts
    them), and :meth:`frame` gives what ``pixel_array`` gives; :meth:`parse` returns None for any
    file outside the fast path (see the module doc), so pydicom judges every odd case.
    """

    def __init__(self, values: dict[str, Any], pixels: bytes, tsyntax: UID):
        self.values, self.pixels = values, pixels
        self.file_meta = {"TransferSyntaxUID": tsyntax}

    def get(self, keyword: str, default: Any = None) -> Any:
        return self.values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.values

    @classmethod
    def parse(cls, data: bytes) -> NativeHeader | None:
        try:
            return cls._parse(data)
        except (_NotNative, struct.error, ValueError):
            return None

    @classmethod
    def _parse(cls, data: bytes) -> NativeHeader:
        if data[128:132] != b"DICM":
            raise _NotNative
        meta, pos = {}, 132
        while data[pos : pos + 2] == b"\x02\x00":  # the file meta, always explicit VR little endian
            tag, _, length, pos = _element(data, pos, False)
            if length == _UNDEFINED:
                raise _NotNative
            meta[tag], pos = data[pos : pos + length], pos + length
        tsyntax = UID(meta.get(0x00020010, b"").rstrip(b"\0 ").decode("ascii"))
        if tsyntax not in _NATIVE_SYNTAXES:
            raise _NotNative
        implicit = _NATIVE_SYNTAXES[tsyntax]
        if implicit and data[pos + 4 : pos + 6].isalpha():
            raise _NotNative  # explicit VR under an implicit syntax: pydicom's guess decides
        raw: dict[int, tuple[bytes | None, bytes]] = {}
        while pos < len(data):
            tag, vr, length, pos = _element(data, pos, implicit)
            if tag in _PYDICOM_ONLY or tag >> 16 == 0xFFFE:
                raise _NotNative
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA or vr not in (None, b"SQ", b"UN"):
                    raise _NotNative  # encapsulated pixel data in a native syntax: pydicom judges
                pos = _skip_sequence(data, pos, implicit or vr == b"UN", 0)  # UN: implicit VR inside
                continue
            if pos + length > len(data):
                raise _NotNative
            raw[tag], pos = (vr, data[pos : pos + length]), pos + length
        if raw.get(_PIXEL_DATA, (b"UN",))[0] not in (None, b"OB", b"OW"):
            raise _NotNative
        values: dict[str, Any] = {"PixelData": True}
        for keyword, (tag, vr) in _TAGS.items():
            if tag in raw:
                found, value = raw[tag]
                if found is not None and found.decode() != vr:
                    raise _NotNative
                values[keyword] = _native_value(value, vr)
        header = cls(values, raw[_PIXEL_DATA][1], tsyntax)
        header._check()
        return header

    def _check(self) -> None:
        """Only what the fast path decodes exactly as pydicom does; the rest goes to pydicom."""
        get = self.values.get
        if get("SamplesPerPixel") != 1 or get("PhotometricInterpretation") not in _MONOCHROME:
            raise _NotNative
        allocated, stored = get("BitsAllocated"), get("BitsStored")
        if allocated not in (8, 16) or get("PixelRepresentation") not in (0, 1):
            raise _NotNative
        if stored is None or not 1 <= stored <= allocated:
            raise _NotNative
        rows, cols, frames = get("Rows"), get("Columns"), get("NumberOfFrames", 1) or 1
        if not rows or not cols:
            raise _NotNative
        expected = rows * cols * frames * allocated // 8
        if len(self.pixels) not in (expected, expected + 1):
            raise _NotNative

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as ``pixel_array`` gives it: unused high bits cleared, or sign-extended."""
        get = self.values.get
        rows, cols, allocated = get("Rows"), get("Columns"), get("BitsAllocated")
        dtype = np.dtype(("<i" if get("PixelRepresentation") else "<u") + str(allocated // 8))
        count = rows * cols
        pixels = np.frombuffer(self.pixels, dtype, count=count, offset=index * count * dtype.itemsize)
        shift = allocated - get("BitsStored")
        if shift:
            pixels = np.right_shift(np.left_shift(pixels, shift), shift)
        return pixels.reshape(rows, cols)


def _native_value(value: bytes, vr: str) -> Any:
    """``value`` as pydicom converts it (empty: None), or _NotNative where that is not plain."""
    if vr == "US":
        if len(value) != 2:
            raise _NotNative
        return struct.unpack("<H", value)[0]
    text = value.rstrip(b"\0") if vr == "UI" else value
    if not set(text) <= _TEXT:
        raise _NotNative  # another character set, control characters, NUL: pydicom's conversion decides
    text = text.decode("ascii").strip()
    if not text:
        return None
    if "\\" in text:  # several values: pydicom's MultiValue, for the DS values decoding reads
        if vr != "DS":
            raise _NotNative
        values = [v.strip() for v in text.split("\\")]
        for v in values:
            float(v)
        return values
    if vr == "IS":
        if not text.isdigit():
            raise _NotNative
        return int(text)
    if vr == "DS":
        float(text)  # what pydicom would keep as text goes to pydicom
    return text


# --------------------------------------------------------------------------- PNG / JPEG


@dataclass(frozen=True)
class _JpegFrame:
    """What a JPEG's header segments declare, read before anything is decoded."""

    precision: int
    rows: int
    cols: int
    components: int
    ycbcr: bool  # three components are Y, Cb, Cr (libjpeg-turbo's rules), not R, G, B
    exif: bytes
    scan: int  # offset of the first SOS marker


def _decode_raster(data: bytes, kind: str, size: int, limits: Limits) -> Decoded:
    try:
        image = Image.open(BytesIO(data), formats=[kind.upper()])  # lazy: reads the header only
    except Image.DecompressionBombError:  # beyond twice Pillow's own limit, checked on open
        raise Rejected(Reason.TOO_LARGE, "image dimensions refused by Pillow") from None
    except Exception as exc:  # whatever Pillow raises on a header it cannot parse
        if kind != "jpeg":
            raise Rejected(Reason.CORRUPT, f"unreadable {kind} header ({type(exc).__name__})") from None
        native, photometric, bits, colour = _libjpeg_raster(data, limits)  # Pillow opens 8-bit JPEG only
    else:
        with image:
            native, photometric, bits, colour = _pillow_raster(image, kind, limits)
    return Decoded(
        pixels=_finish(native, size, None),
        frame=None,
        n_frames=1,
        orig_rows=native.shape[0],
        orig_cols=native.shape[1],
        bits_stored=bits,
        photometric=photometric,
        transfer_syntax=None,
        bits_allocated=_raster_container(bits),
        colourfulness=colour,
    )


def _raster_container(bits: int) -> int:
    """The sample container of a PNG/JPEG sample of ``bits`` (a 12-bit JPEG sample decodes to 16 bits)."""
    return bits if bits in (1, 8, 16, 32) else 8 * -(-bits // 8)


def _pillow_raster(image: Image.Image, kind: str, limits: Limits) -> tuple[np.ndarray, str, int, float]:
    cols, rows = image.size
    _check_pixels(rows, cols, limits)  # before load(), so Pillow's global bomb limit never decides
    try:
        image.load()
    except Image.DecompressionBombError:
        raise Rejected(Reason.TOO_LARGE, f"{rows}x{cols} pixels refused by Pillow") from None
    except Exception as exc:
        raise Rejected(Reason.CORRUPT, f"truncated or corrupt {kind} ({type(exc).__name__})") from None
    with data_fault(f"unconvertible {kind}"):
        native, photometric, bits, colour = _raster_native(image)
    return _upright(native, image.getexif), photometric, bits, colour


def _raster_native(image: Image.Image) -> tuple[np.ndarray, str, int, float]:
    """A loaded Pillow image -> (2-D float image, DICOM-style photometric, bits per sample, colourfulness)."""
    mode = image.mode
    if mode in ("1", "L", "LA"):
        gray = image if mode != "LA" else image.getchannel("L")
        return np.asarray(gray, dtype=np.float32), "MONOCHROME2", 1 if mode == "1" else 8, 0.0
    if mode.startswith("I") or mode == "F":
        bits = 16 if mode.startswith("I;16") else 32
        return np.asarray(image, dtype=np.float32), "MONOCHROME2", bits, 0.0
    photometric = "PALETTE COLOR" if mode in ("P", "PA") else "RGB"
    luma, colour = _luma(np.asarray(image.convert("RGB")))
    return luma, photometric, 8, colour


def _libjpeg_raster(data: bytes, limits: Limits) -> tuple[np.ndarray, str, int, float]:
    """A JPEG Pillow cannot open (12-bit extended, lossless up to 16 bit) -> as :func:`_raster_native`."""
    frame = _jpeg_frame(data)
    _check_pixels(frame.rows, frame.cols, limits)  # libjpeg allocates whatever the header declares
    if frame.components not in (1, 3):
        raise Rejected(Reason.CORRUPT, f"jpeg with {frame.components} components")
    if data.find(b"\xff\xd9", frame.scan) < 0:  # libjpeg fills a truncated scan in silently
        raise Rejected(Reason.CORRUPT, "truncated jpeg (no end-of-image marker after the scan)")
    restated = _sequential_scans(data) or data
    try:
        stored = libjpeg.decode(restated)
    except Exception as exc:
        raise Rejected(Reason.CORRUPT, f"truncated or corrupt jpeg ({_technical(exc)})") from None
    colour = 0.0
    if stored.ndim == 2:
        native, photometric = stored.astype(np.float32), "MONOCHROME2"
    elif frame.ycbcr:  # Y is BT.601 luma already
        native, photometric = stored[..., 0].astype(np.float32), "RGB"
        colour = colourfulness(_ycbcr_to_rgb(stored, frame.precision))
    else:
        (native, colour), photometric = _luma(stored), "RGB"
    return _upright(native, lambda: _exif(frame.exif)), photometric, frame.precision, colour


def _ycbcr_to_rgb(ycbcr: np.ndarray, precision: int) -> np.ndarray:
    """JFIF's full-range YCbCr -> RGB, at the samples' own precision (for colourfulness only)."""
    y, cb, cr = (ycbcr[..., c].astype(np.float32) for c in range(3))
    half = float(2 ** (precision - 1))
    cb, cr = cb - half, cr - half
    return np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)


def _upright(native: np.ndarray, read_exif: Callable[[], Image.Exif]) -> np.ndarray:
    """``native`` turned as its EXIF Orientation says; an unreadable EXIF block is ignored, like a bad window."""
    try:
        orientation = read_exif().get(_ORIENTATION)
    except Exception:  # Pillow parsing a damaged TIFF structure
        return native
    turn = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return native if turn is None else turn(native)


def _exif(payload: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif.load(payload)
    return exif


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(marker, offset, payload) of each header segment from SOI through the first SOS."""
    if not data.startswith(b"\xff\xd8"):
        raise Rejected(Reason.CORRUPT, "jpeg without a start-of-image marker")
    pos = 2
    while True:
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise Rejected(Reason.CORRUPT, "unreadable jpeg header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        yield marker, pos, data[pos + 4 : end]
        if marker == _SOS:
            return
        pos = end


def _jpeg_frame(data: bytes) -> _JpegFrame:
    segments = list(_jpeg_segments(data))  # the last one is the first SOS
    frame, jfif, adobe, exif = None, False, None, b""
    for marker, _, payload in segments:
        if marker in _SOF and frame is None:
            frame = marker, payload
        elif marker == _APP0:
            jfif = jfif or payload.startswith(b"JFIF\0")
        elif marker == _APP1 and payload.startswith(b"Exif\0\0") and not exif:
            exif = payload
        elif marker == _APP14 and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe = payload[11]  # the colour transform flag
    if frame is None or len(frame[1]) < 6:
        raise Rejected(Reason.CORRUPT, "jpeg without a frame header")
    marker, sof = frame
    precision, rows, cols, components = struct.unpack_from(">BHHB", sof)
    if adobe is not None:
        ycbcr = adobe != 0
    else:  # JFIF means YCbCr; otherwise lossless frames and components named R, G, B are RGB
        ycbcr = jfif or not (marker in _SOF_LOSSLESS or sof[6 : 6 + 3 * components : 3] == b"RGB")
    return _JpegFrame(precision, rows, cols, components, ycbcr, exif, scan=segments[-1][1])


def _sequential_scans(data: bytes) -> bytes | None:
    """A sequential DCT JPEG with every scan stating the full spectrum, or None if nothing changes.

    Ss, Se, Ah and Al mean nothing to a sequential scan, yet some encoders write Se=0 there. IJG's
    codec warns and decodes the full scan; libjpeg refuses it. The bytes are restated as IJG reads them.
    """
    segments = list(_jpeg_segments(data))
    if not any(marker in _SOF_SEQUENTIAL for marker, _, _ in segments):
        return None
    restated, pos = bytearray(data), segments[-1][1]  # the first SOS; 0xFFDA cannot occur in scan data
    while pos >= 0 and pos + 4 < len(restated):
        spectral = pos + 5 + 2 * restated[pos + 4]  # after Ls and the Ns component selectors
        if spectral + 3 <= len(restated):
            restated[spectral : spectral + 3] = b"\x00\x3f\x00"
        pos = restated.find(b"\xff\xda", pos + 2)
    return bytes(restated) if restated != data else None
