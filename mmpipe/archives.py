"""Safe, in-memory expansion of zip and tar (optionally gzip/bzip2/xz) archives.

Nothing is written to disk, but member paths still become catalog keys and may be extracted by
someone else later, so the rules are strict: any member path that is absolute or contains ``..``,
any link, device or FIFO rejects the whole archive as UNSAFE_ARCHIVE. Sizes are checked twice:
the declared listing first (member count, each member <= ``max_object_bytes``, total <=
``max_archive_bytes``), then the bytes actually inflated, so a lying header cannot exhaust memory.

The whole listing is validated before the first member is yielded; only damage found while
inflating (CRC errors, truncation, more bytes than declared) can surface mid-iteration, so a caller
that must account for every object should treat a mid-iteration :class:`Rejected` as rejecting
the whole archive. Nested archives are yielded as ordinary members.

Whatever zipfile, tarfile or a codec raises while reading the archive is damage in the data
(:func:`mmpipe.imaging.data_fault`); an exception from this module's own code is a bug, and escapes.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import BinaryIO

from mmpipe.imaging import BZ2_MAGIC, GZIP_MAGIC, XZ_MAGIC, Limits, Reason, Rejected, data_fault, sniff

_CHUNK = 1 << 20
#: Largest single read tarfile may make: it reads pax and GNU long-name headers whole.
_MAX_TAR_READ = 4 * _CHUNK
_ZIP_EOCD = b"PK\x05\x06"
_ZIP_EOCD_SIZE = 22
_ZIP_ENCRYPTED = 0x1


def iter_members(
    data: bytes, name: str, limits: Limits, kind: str | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(normalised posix path, bytes)`` for each regular file of a zip or (compressed) tar
    (``kind``: what :func:`sniff` said of ``data``, if the caller sniffed it already).

    Raises :class:`Rejected`: UNSAFE_ARCHIVE, TOO_LARGE, CORRUPT (unreadable archive) or NOT_IMAGE
    (not an archive at all).
    """
    if len(data) > limits.max_object_bytes:
        raise Rejected(Reason.TOO_LARGE, f"{len(data)} bytes > max_object_bytes {limits.max_object_bytes}")
    kind = kind or sniff(data, name)
    if kind not in ("zip", "tar"):
        raise Rejected(Reason.NOT_IMAGE, f"not a zip or tar archive (sniffed {kind})")
    try:
        yield from (_iter_zip if kind == "zip" else _iter_tar)(data, limits)
    except MemoryError:
        raise Rejected(Reason.TOO_LARGE, f"out of memory expanding {kind} archive") from None


def safe_member_path(raw: str) -> str:
    """Normalise a member path to relative posix form, rejecting absolute and ``..`` paths.

    Backslashes count as separators (Windows-made archives); ``.`` and empty parts are dropped.
    """
    if "\0" in raw:
        raise Rejected(Reason.UNSAFE_ARCHIVE, "member path contains NUL")
    path = raw.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise Rejected(Reason.UNSAFE_ARCHIVE, "absolute member path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise Rejected(Reason.UNSAFE_ARCHIVE, "member path escapes the archive (..)")
    return str(PurePosixPath(*parts)) if parts else ""


class _Budget:
    """Declared-then-actual accounting of member count and bytes against :class:`Limits`."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.members = 0
        self.declared = 0
        self.actual = 0

    def count(self) -> None:
        self.members += 1
        if self.members > self.limits.max_archive_members:
            raise Rejected(Reason.TOO_LARGE, f"more than {self.limits.max_archive_members} members")

    def declare(self, size: int) -> None:
        if size > self.limits.max_object_bytes:
            raise Rejected(Reason.TOO_LARGE, f"member declares {size} bytes > max_object_bytes")
        self.declared += size
        if self.declared > self.limits.max_archive_bytes:
            raise Rejected(
                Reason.TOO_LARGE, f"members declare > max_archive_bytes {self.limits.max_archive_bytes}"
            )

    def read(self, stream: BinaryIO) -> bytes:
        """The member's bytes, stopping as soon as they pass a limit whatever the header said."""
        cap = min(self.limits.max_object_bytes, self.limits.max_archive_bytes - self.actual)
        out = bytearray()
        while chunk := stream.read(_CHUNK):
            out += chunk
            if len(out) > cap:
                raise Rejected(Reason.TOO_LARGE, "member inflates past its size limit")
        self.actual += len(out)
        return bytes(out)


def _zip_declared_members(data: bytes) -> int | None:
    """Entry count from the end-of-central-directory record, read before zipfile builds its index.

    0xFFFF (the zip64 sentinel) is taken literally: it already means "at least 65535".
    """
    eocd = data.rfind(_ZIP_EOCD, max(0, len(data) - _ZIP_EOCD_SIZE - 0xFFFF))
    if eocd < 0 or eocd + _ZIP_EOCD_SIZE > len(data):
        return None
    return struct.unpack_from("<H", data, eocd + 10)[0]


def _iter_zip(data: bytes, limits: Limits) -> Iterator[tuple[str, bytes]]:
    declared = _zip_declared_members(data)
    if declared is not None and declared > limits.max_archive_members:
        raise Rejected(Reason.TOO_LARGE, f"zip declares {declared} members > {limits.max_archive_members}")
    budget = _Budget(limits)
    with data_fault("unreadable zip archive"):
        archive = zipfile.ZipFile(io.BytesIO(data))
    with archive:
        regular = []
        for info in archive.infolist():
            budget.count()
            path = safe_member_path(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # unix mode bits; 0 when made elsewhere
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise Rejected(Reason.UNSAFE_ARCHIVE, "zip member is a link or special file")
            if info.is_dir() or kind == stat.S_IFDIR:
                continue
            if info.flag_bits & _ZIP_ENCRYPTED:
                raise Rejected(Reason.UNSAFE_ARCHIVE, "encrypted zip member cannot be inspected")
            if not path:
                raise Rejected(Reason.UNSAFE_ARCHIVE, "zip member without a name")
            budget.declare(info.file_size)
            regular.append((path, info))
        for path, info in regular:
            with data_fault("unreadable zip archive"), archive.open(info) as stream:
                body = budget.read(stream)
            yield path, body


class _BoundedReads:
    """Read-only file view refusing single reads above a cap; tarfile needs read/seek/tell only."""

    def __init__(self, raw: BinaryIO, cap: int):
        self._raw, self._cap = raw, cap

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._cap:
            raise Rejected(Reason.TOO_LARGE, "tar header block larger than a sane pax/long-name header")
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True


def _tar_stream(data: bytes) -> BinaryIO:
    """Plain tar bytes as a streaming, seekable file (decompressing gzip/bzip2/xz on the fly)."""
    raw = io.BytesIO(data)
    if data.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if data.startswith(BZ2_MAGIC):
        return bz2.BZ2File(raw)
    if data.startswith(XZ_MAGIC):
        return lzma.LZMAFile(raw)
    return raw


def _open_tar(stream: BinaryIO) -> tarfile.TarFile:
    with data_fault("unreadable tar archive"):
        return tarfile.TarFile.open(fileobj=_BoundedReads(stream, _MAX_TAR_READ), mode="r:")


def _iter_tar(data: bytes, limits: Limits) -> Iterator[tuple[str, bytes]]:
    budget = _Budget(limits)
    stream = _tar_stream(data)
    with stream, _open_tar(stream) as archive:
        regular = []
        # Iterating reads headers one by one; raising before the next header is read means a
        # member declaring too much is never skipped over (i.e. never decompressed).
        headers = iter(archive)
        while True:
            with data_fault("unreadable tar archive"):
                member = next(headers, None)
            if member is None:
                break
            budget.count()
            path = safe_member_path(member.name)
            if member.issym() or member.islnk():
                raise Rejected(Reason.UNSAFE_ARCHIVE, "tar member is a symbolic or hard link")
            if member.isdir():
                continue
            if not member.isreg():
                raise Rejected(Reason.UNSAFE_ARCHIVE, "tar member is a device, FIFO or unknown type")
            if not path:
                raise Rejected(Reason.UNSAFE_ARCHIVE, "tar member without a name")
            budget.declare(member.size)
            regular.append((path, member))
        for path, member in regular:  # in archive order: one rewind, then forward-only
            with data_fault("unreadable tar archive"):
                extracted = archive.extractfile(member)
                if extracted is None:
                    raise Rejected(Reason.CORRUPT, "tar member has no data")
                with extracted:
                    body = budget.read(extracted)
            yield path, body
