"""Safe archive expansion: every archive is built in memory by the test itself."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

import pytest

from mmpipe.archives import iter_members, safe_member_path
from mmpipe.imaging import Limits, Reason, Rejected, sniff

MB = 2**20
LIMITS = Limits(
    max_object_bytes=8 * MB,
    max_archive_members=10,
    max_archive_bytes=16 * MB,
    max_image_pixels=4096 * 4096,
    max_frames=16,
)


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in entries:
            archive.writestr(name, payload)
    return buffer.getvalue()


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, **kwargs) as archive:
        for info, payload in entries:
            info.size = len(payload) if info.isreg() else 0
            archive.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return buffer.getvalue()


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def members(data: bytes, limits: Limits = LIMITS) -> list[tuple[str, bytes]]:
    return list(iter_members(data, "upload.bin", limits))


def rejection(data: bytes, limits: Limits = LIMITS) -> Rejected:
    with pytest.raises(Rejected) as caught:
        members(data, limits)
    return caught.value


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_tar_nested_folders_yield_normalised_paths_and_exact_bytes(mode: str) -> None:
    payloads = {"study1/series1/a.dcm": b"A" * 3000, "study1/b.png": bytes(range(256)) * 10}
    data = make_tar(
        [
            (tar_entry("./study1", tarfile.DIRTYPE), b""),
            (tar_entry("./study1/series1", tarfile.DIRTYPE), b""),
            (tar_entry("./study1/series1/a.dcm"), payloads["study1/series1/a.dcm"]),
            (tar_entry("study1//b.png"), payloads["study1/b.png"]),
        ],
        mode=mode,
    )
    assert sniff(data, "x.bin") == "tar"
    assert dict(members(data)) == payloads


def test_zip_happy_path_skips_directories() -> None:
    data = make_zip([("dir/", b""), ("dir/sub/x.dcm", b"x" * 10), (r"win\style.png", b"png")])
    assert members(data) == [("dir/sub/x.dcm", b"x" * 10), ("win/style.png", b"png")]


def test_zip_inside_zip_is_yielded_as_a_member_and_can_be_expanded() -> None:
    inner = make_zip([("deep/image.dcm", b"dicom bytes")])
    outer = make_zip([("outer/inner.zip", inner), ("outer/readme.txt", b"hi")])
    found = dict(members(outer))
    assert found["outer/inner.zip"] == inner
    assert sniff(found["outer/inner.zip"], "inner.zip") == "zip"
    assert members(found["outer/inner.zip"]) == [("deep/image.dcm", b"dicom bytes")]


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "ok/../evil", "..\\evil", "/etc/x", "C:/x"])
def test_zip_slip_and_absolute_paths_are_unsafe(name: str) -> None:
    assert rejection(make_zip([("fine.dcm", b"1"), (name, b"2")])).reason is Reason.UNSAFE_ARCHIVE


@pytest.mark.parametrize("name", ["../evil", "/etc/x"])
def test_tar_slip_and_absolute_paths_are_unsafe(name: str) -> None:
    assert rejection(make_tar([(tar_entry(name), b"2")])).reason is Reason.UNSAFE_ARCHIVE


@pytest.mark.parametrize(
    "entry",
    [
        tar_entry("link", tarfile.SYMTYPE, "/etc/passwd"),
        tar_entry("hard", tarfile.LNKTYPE, "a.dcm"),
        tar_entry("dev", tarfile.CHRTYPE),
        tar_entry("fifo", tarfile.FIFOTYPE),
    ],
    ids=["symlink", "hardlink", "device", "fifo"],
)
def test_tar_links_and_special_files_are_unsafe(entry: tarfile.TarInfo) -> None:
    data = make_tar([(tar_entry("a.dcm"), b"payload"), (entry, b"")], mode="w:gz")
    assert rejection(data).reason is Reason.UNSAFE_ARCHIVE


def test_zip_symlink_member_is_unsafe() -> None:
    link = zipfile.ZipInfo("link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    assert rejection(make_zip([(link, b"/etc/passwd")])).reason is Reason.UNSAFE_ARCHIVE


def test_checks_run_before_anything_is_yielded() -> None:
    """A bad last member rejects the archive before the first good member reaches the caller."""
    stream = iter_members(make_zip([("good.dcm", b"1"), ("../evil", b"2")]), "a.zip", LIMITS)
    with pytest.raises(Rejected):
        next(stream)


def test_zip_bomb_beyond_max_archive_bytes_is_too_large() -> None:
    data = make_zip([(f"zeros{i}.bin", bytes(6 * MB)) for i in range(3)])
    assert len(data) < LIMITS.max_archive_bytes // 100  # really a high-ratio bomb
    assert rejection(data).reason is Reason.TOO_LARGE


def test_member_beyond_max_object_bytes_is_too_large() -> None:
    assert rejection(make_zip([("big.bin", bytes(9 * MB))])).reason is Reason.TOO_LARGE


def test_tar_gz_bomb_is_rejected_from_declared_sizes() -> None:
    data = make_tar([(tar_entry(f"z{i}.bin"), bytes(7 * MB)) for i in range(3)], mode="w:gz")
    assert rejection(data).reason is Reason.TOO_LARGE


def test_lying_zip_size_header_cannot_inflate_past_it() -> None:
    """Central directory and local header claim 1 kB for 6 MB of zeros: never yielded as 6 MB."""
    data = bytearray(make_zip([("zeros.bin", bytes(6 * MB))]))
    real = (6 * MB).to_bytes(4, "little")
    assert data.count(real) == 2  # uncompressed size in the local header and the central directory
    data[:] = data.replace(real, (1024).to_bytes(4, "little"))
    assert rejection(bytes(data)).reason is Reason.CORRUPT


def test_oversized_pax_header_is_refused_before_tarfile_reads_it() -> None:
    data = make_tar(
        [(tar_entry("a.dcm"), b"x")],
        mode="w:gz",
        format=tarfile.PAX_FORMAT,
        pax_headers={"comment": "x" * (6 * MB)},
    )
    assert rejection(data).reason is Reason.TOO_LARGE


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_members(kind: str) -> None:
    entries = [(f"f{i}.dcm", b"x") for i in range(LIMITS.max_archive_members + 1)]
    data = make_zip(entries) if kind == "zip" else make_tar([(tar_entry(n), p) for n, p in entries])
    assert rejection(data).reason is Reason.TOO_LARGE
    assert len(members(data, Limits(**{**LIMITS.__dict__, "max_archive_members": 11}))) == 11


def test_zip_member_count_is_checked_from_the_end_record_before_parsing() -> None:
    data = make_zip([(f"f{i}.dcm", b"x") for i in range(11)])
    assert "declares 11 members" in rejection(data).detail


@pytest.mark.parametrize(
    "data",
    [b"hello, this is text", b""],
    ids=["text", "empty"],
)
def test_non_archives_are_not_images(data: bytes) -> None:
    assert rejection(data).reason is Reason.NOT_IMAGE


def test_truncated_archives_are_corrupt() -> None:
    payload = bytes(range(256)) * 4000
    for data in (make_zip([("a.bin", payload)]), make_tar([(tar_entry("a.bin"), payload)], mode="w:gz")):
        assert rejection(data[: len(data) // 2]).reason is Reason.CORRUPT


def test_object_beyond_max_object_bytes_is_too_large() -> None:
    tight = Limits(**{**LIMITS.__dict__, "max_object_bytes": 100})
    assert rejection(make_zip([("a.bin", bytes(range(256)))]), tight).reason is Reason.TOO_LARGE


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("a/b.dcm", "a/b.dcm"), ("./a//./b.dcm", "a/b.dcm"), ("a\\b.dcm", "a/b.dcm"), ("./", "")],
)
def test_safe_member_path_normalises(raw: str, expected: str) -> None:
    assert safe_member_path(raw) == expected
