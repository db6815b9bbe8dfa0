"""Fetch and decode: one source object becomes labelled, pseudonymised image rows, in parallel.

One object (pure): :func:`process_object` expands archives safely, decodes every leaf and resolves
its label; identifiers leave it only as salted HMACs. Nothing here writes to the store or catalog:
:mod:`mmpipe.ingest` records what a batch's outcomes hold.

Faults are not verdicts. Only known data faults (:class:`Rejected`) quarantine. An object the store
could not serve (a transient fault that outlasted the retries) or that hit an unexpected exception
in mmpipe's own decoding (a bug) ends with an entry in :attr:`Outcome.errors` instead: ingest leaves
it unrecorded, so the next run takes it again, and reports it (``store_error``, ``decoder_error``
with a traceback that keeps the frames, never the message). Access denied fails the run.

Parallelism. A :class:`Fetcher` fetches and decodes in forked processes (``ingest_processes``;
decoding is CPU-bound Python, which threads would confine to one core), or in ``ingest_workers``
threads where fork is unavailable. A decode process that dies (the OOM killer, a crashing C
decoder) or hangs past ``decode_timeout_seconds`` costs one object, never the run: the objects it
took down are decoded again one process each, and the culprit is quarantined with the cause if it
died or hung while decoding (while fetching, or exiting without an answer, it is an error, not a verdict).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import multiprocessing
import os
import signal
import time
import traceback
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from mmpipe.archives import iter_members
from mmpipe.config import Settings
from mmpipe.errors import StoreError
from mmpipe.imaging import Decoded, Limits, Reason, Rejected, decode_image, sniff
from mmpipe.labels import MEMBER_SEPARATOR, Label, Labeler
from mmpipe.pseudonym import fallback_patient, pseudonym
from mmpipe.store import AccessDenied, Fetched, NotFound, ObjectInfo, Store

log = logging.getLogger(__name__)

MAX_ARCHIVE_DEPTH = 2
ARCHIVE_KINDS = ("zip", "tar")
#: Identifiers shorter than this are too likely to occur in a key by chance to be worth flagging.
MIN_IDENTIFIER_CHARS = 4
PROCESS_CHUNK = 4  # objects per task sent to a decode process
_PR_SET_PDEATHSIG = 1
STORE_ERROR, DECODER_ERROR = "store_error", "decoder_error"
_FETCHED = "fetched"  # an isolated decode process has the object's bytes: its decode timeout starts


# --------------------------------------------------------------------------- one object (pure)


@dataclass
class Outcome:
    """What one source object produced: image rows with pixels, and quarantined members.

    An outcome with ``errors`` (store or decoder errors) is held back whole: none of it is recorded,
    so the object stays unseen and the next run takes it again.
    """

    obj: ObjectInfo
    images: list[tuple[dict[str, Any], np.ndarray]] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    identifier_keys: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    tag_count: int | None = None  # tags the object carried when read (None: not known)


def _rejection(path: str, exc: Rejected) -> dict[str, str]:
    return {"member_path": path, "reason": str(exc.reason), "detail": exc.detail}


def failure(kind: str, detail: str) -> dict[str, str]:
    """An error entry without a traceback: a store error, or a decode process that ended oddly."""
    return {"kind": kind, "member_path": "", "error": detail[:500], "traceback": ""}


def decoder_error(member: str, exc: BaseException) -> dict[str, str]:
    """An unexpected exception in mmpipe's decoding: a bug to fix, not a verdict on the data.

    The traceback keeps the frames (code, not data) and the exception's type, never its message,
    which may quote a header value.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    where = (
        f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}"
        if frames
        else ""
    )
    return {
        "kind": DECODER_ERROR,
        "member_path": member,
        "error": name + where,
        "traceback": "Traceback (most recent call last):\n"
        + "".join(traceback.format_list(frames))
        + f"{name} (message withheld: it may quote header values)",
    }


class Leaf(NamedTuple):
    """A file to decode: its member path ("" for a plain object), bytes, and kind as sniffed (once)."""

    path: str
    body: bytes
    kind: str


def expand(key: str, data: bytes, limits: Limits) -> tuple[list[Leaf], list[dict[str, str]]]:
    """The object's leaf files and its rejected archives.

    A plain object is its own single leaf (path ""). Archives nest up to MAX_ARCHIVE_DEPTH, and all
    levels together share one member/bytes budget, so an archive of archives cannot multiply the
    limits. An archive that fails anywhere (even mid-way) is rejected whole: none of its files is used.
    """
    leaves: list[Leaf] = []
    rejected: list[dict[str, str]] = []
    members_left, bytes_left = limits.max_archive_members, limits.max_archive_bytes
    pending = deque([("", data, 0)])
    while pending:
        path, body, depth = pending.popleft()
        kind = sniff(body, path or key)
        if kind not in ARCHIVE_KINDS:
            leaves.append(Leaf(path, body, kind))
            continue
        try:
            if depth >= MAX_ARCHIVE_DEPTH:
                raise Rejected(
                    Reason.UNSAFE_ARCHIVE, f"archives nested deeper than {MAX_ARCHIVE_DEPTH} levels"
                )
            room = replace(limits, max_archive_members=members_left, max_archive_bytes=bytes_left)
            members = list(iter_members(body, path or key, room, kind))
            if not members:
                raise Rejected(Reason.EMPTY, "archive holds no files")
        except Rejected as exc:
            rejected.append(_rejection(path, exc))
            continue
        members_left -= len(members)
        bytes_left -= sum(len(b) for _, b in members)
        pending.extend(
            (f"{path}{MEMBER_SEPARATOR}{name}" if path else name, b, depth + 1) for name, b in members
        )
    return leaves, rejected


def _names_identifier(key: str, member: str, decoded: Decoded) -> bool:
    where = f"{key}{MEMBER_SEPARATOR}{member}"
    return any(
        value and len(value) >= MIN_IDENTIFIER_CHARS and value in where
        for value in (decoded.patient_id, decoded.accession)
    )


def image_row(obj: ObjectInfo, member: str, decoded: Decoded, label: Label, salt: bytes) -> dict[str, Any]:
    """The catalog row of one decoded image; identifiers enter it only as salted hashes."""
    pixels = decoded.pixels
    patient = decoded.patient_id or fallback_patient(obj.key, member)
    study = decoded.study_uid or f"{patient}/{obj.key}"
    return {
        "image_id": hashlib.sha256(pixels.tobytes()).hexdigest()[:32],
        "source_key": obj.key,
        "source_etag": obj.etag,
        "member_path": member,
        "frame": decoded.frame,
        "label": label.name,
        "label_source": label.source,
        "modality": decoded.modality,
        "body_part": decoded.body_part,
        "n_frames": decoded.n_frames,
        "photometric": decoded.photometric,
        "transfer_syntax": decoded.transfer_syntax,
        "patient_key": pseudonym(salt, "patient", patient),
        "study_key": pseudonym(salt, "study", study),
        "orig_rows": decoded.orig_rows,
        "orig_cols": decoded.orig_cols,
        "bits_stored": decoded.bits_stored,
        "bits_allocated": decoded.bits_allocated,
        "float_pixels": decoded.float_pixels,
        "pixel_mean": float(pixels.mean()),
        "pixel_std": float(pixels.std()),
        "colourfulness": round(decoded.colourfulness, 3),
    }


def process_object(
    obj: ObjectInfo, data: bytes, *, labeler: Labeler, salt: bytes, size: int, limits: Limits
) -> Outcome:
    """Decode one object (expanding archives) into labelled, pseudonymised image rows. Pure: no I/O.

    A member that raises anything but :class:`Rejected` records a decoder error (see the module doc).
    """
    outcome = Outcome(obj)
    try:
        leaves, outcome.quarantined = expand(obj.key, data, limits)
    except Exception as exc:
        return Outcome(obj, errors=[decoder_error("", exc)])
    for member, body, kind in leaves:
        try:
            decoded = decode_image(body, member or obj.key, size, limits, kind)
            label = labeler.resolve(
                obj.key, member, decoded.modality, decoded.body_part, decoded.study_description
            )
            outcome.images.append((image_row(obj, member, decoded, label, salt), decoded.pixels))
            outcome.identifier_keys += _names_identifier(obj.key, member, decoded)
        except Rejected as exc:
            outcome.quarantined.append(_rejection(member, exc))
        except Exception as exc:
            outcome.errors.append(decoder_error(member, exc))
    return outcome


# --------------------------------------------------------------------------- in parallel


@dataclass(frozen=True)
class DecodeContext:
    labeler: Labeler
    salt: bytes
    size: int
    limits: Limits


def fetch_listed(store: Store, obj: ObjectInfo, limits: Limits) -> Fetched:
    """The bytes of a listed object, or Rejected when the object itself is unusable (too large, empty,
    deleted since listing: 404 only). Any other store error propagates, classified (see Store)."""
    if obj.size > limits.max_object_bytes:
        raise Rejected(Reason.TOO_LARGE, f"object is {obj.size} bytes; limit {limits.max_object_bytes}")
    if obj.size == 0:
        raise Rejected(Reason.EMPTY, "zero-byte object")
    try:
        return store.fetch(obj.key)
    except NotFound:
        raise Rejected(Reason.EMPTY, "object was deleted after it was listed") from None


def _fetch(store: Store, obj: ObjectInfo, limits: Limits) -> Fetched | Outcome:
    """The object's bytes, or the outcome that settles it unread: rejected, or a store error (after
    the store's retries) that leaves it for the next run. Access denied fails the run."""
    try:
        return fetch_listed(store, obj, limits)
    except Rejected as exc:
        return Outcome(obj, quarantined=[_rejection("", exc)])
    except AccessDenied:
        raise
    except StoreError as exc:
        return Outcome(obj, errors=[failure(STORE_ERROR, str(exc))])


def _process(context: DecodeContext, obj: ObjectInfo, data: Fetched) -> Outcome:
    outcome = process_object(
        obj, data.body, labeler=context.labeler, salt=context.salt, size=context.size, limits=context.limits
    )
    outcome.tag_count = data.tag_count
    return outcome


def _fetch_and_process(store: Store, context: DecodeContext, obj: ObjectInfo) -> Outcome:
    data = _fetch(store, obj, context.limits)
    return data if isinstance(data, Outcome) else _process(context, obj, data)


#: The forked decode process's own store client and context (see :func:`_worker_start`).
_worker: tuple[Store, DecodeContext] | None = None


def _die_with_parent(parent: int) -> None:
    """Linux: a decode process must not outlive a killed task (it would wait on its queue forever).

    The signal follows the forking thread; a :class:`Fetcher` is always closed by that thread.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def quiet_child(parent: int, nice: int = 0) -> None:
    """Set up a forked helper process: it dies with ``parent`` and logs or warns nothing (the parent's
    logging handlers and locks are not the child's to use; its answers carry what the parent records).

    ``nice``: how much lower its CPU priority is than the parent's (the threads it starts inherit it),
    so that it yields a shared core to the parent's own work (scoring's inference) instead of
    preempting it. A nice level, not the idle class: it still gets a share of a busy core."""
    _die_with_parent(parent)
    if nice:
        os.nice(nice)
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")


def _worker_start(store: Store, context: DecodeContext, parent: int, nice: int = 0) -> None:
    """Set up one forked decode process (:func:`quiet_child`).

    ``store`` is the parent's: a decode process only fetches, through :class:`DirectHttp`, which
    opens a connection per process and thread on first use, so none is shared (and no process
    builds a client of its own: ~0.2 s of CPU each).
    """
    global _worker
    quiet_child(parent, nice)
    _worker = (store, context)


def _worker_fetch(objects: list[ObjectInfo]) -> list[Outcome]:
    if _worker is None:
        raise RuntimeError("decode process used before _worker_start")
    return [_fetch_and_process(*_worker, obj) for obj in objects]


def _isolated_worker(
    store: Store, context: DecodeContext, parent: int, nice: int, obj: ObjectInfo, send: Any
) -> None:
    """One object in a process of its own (see :meth:`Fetcher.isolated`): say when its bytes are in,
    then send its outcome, or the exception that must fail the run (access denied), and exit."""
    _worker_start(store, context, parent, nice)
    try:
        data = _fetch(store, obj, context.limits)
        if not isinstance(data, Outcome):
            send.send(_FETCHED)
            data = _process(context, obj, data)
        send.send(data)
    except Exception as exc:
        send.send(exc)
    send.close()


def _crash_rejection(signum: int) -> Rejected:
    """Why a process that was decoding one object died by signal ``signum``."""
    name = signal.Signals(signum).name
    if signum == signal.SIGKILL:  # what the kernel's OOM killer sends
        return Rejected(Reason.TOO_LARGE, f"decode process killed ({name}; out of memory?)")
    return Rejected(Reason.CORRUPT, f"decode process crashed ({name})")


def decode_processes(settings: Settings) -> int:
    """How many processes fetch and decode in parallel (1: the task's own threads do)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return settings.ingest_processes or (os.cpu_count() or 1) + 1


@dataclass
class Chunk:
    objects: list[ObjectInfo]
    future: Future[list[Outcome]]
    pool: Executor


class Fetcher:
    """Fetches and decodes objects in parallel: forked processes (decoding is CPU-bound Python, so
    threads would share one core), or ``ingest_workers`` threads where processes are off.

    One fetcher serves a whole run, so batches queue behind each other without new processes and
    the next batch decodes while the previous one is recorded. Dead or stuck decode processes: see
    the module doc.
    """

    def __init__(self, settings: Settings, store: Store, context: DecodeContext, objects: int, nice: int = 0):
        """``store``: anything with ``fetch(key)`` (local files too), shared with the decode processes:
        its direct requests open a connection per process (:func:`_worker_start`). ``nice``: the
        decode processes' priority below this process's (:func:`quiet_child`)."""
        processes = decode_processes(settings)
        self.processes = min(processes, max(objects, 1))
        self.store, self.context, self.nice = store, context, nice
        self.timeout = settings.decode_timeout_seconds  # enforced in decode processes only
        if processes > 1:
            self.pool = self._process_pool()
        else:
            self.pool = ThreadPoolExecutor(settings.ingest_workers)

    def _process_pool(self) -> Executor:
        return ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_worker_start,
            initargs=(self.store, self.context, os.getpid(), self.nice),
        )

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    def _local(self, objects: list[ObjectInfo]) -> list[Outcome]:
        return [_fetch_and_process(self.store, self.context, o) for o in objects]

    def submit(self, objects: Sequence[ObjectInfo]) -> list[Chunk]:
        if isinstance(self.pool, ThreadPoolExecutor):
            return [Chunk([o], self.pool.submit(self._local, [o]), self.pool) for o in objects]
        chunks = [list(objects[i : i + PROCESS_CHUNK]) for i in range(0, len(objects), PROCESS_CHUNK)]
        return [self._submit_chunk(chunk) for chunk in chunks]

    def _submit_chunk(self, objects: list[ObjectInfo]) -> Chunk:
        try:
            future = self.pool.submit(_worker_fetch, objects)
        except BrokenProcessPool:  # broken by an earlier chunk: this one goes to a fresh pool
            self._replace_pool(self.pool)
            future = self.pool.submit(_worker_fetch, objects)
        return Chunk(objects, future, self.pool)

    def _replace_pool(self, broken: Executor) -> None:
        if broken is self.pool:
            broken.shutdown(wait=False, cancel_futures=True)
            self.pool = self._process_pool()

    def results(self, chunk: Chunk) -> list[Outcome]:
        """The chunk's outcomes; if its decode process died or hangs, each object decoded again on its own.

        A chunk not done ``decode_timeout_seconds`` per object after its turn came is stuck (a
        decoder looping on malformed data): the pool's processes are killed, which breaks the pool.
        """
        threads = isinstance(chunk.pool, ThreadPoolExecutor)  # a thread cannot be killed: no timeout
        try:
            return chunk.future.result(timeout=None if threads else self.timeout * len(chunk.objects))
        except TimeoutError:
            for process in list(getattr(chunk.pool, "_processes", {}).values()):  # no public kill
                process.kill()
        except BrokenProcessPool:
            pass
        self._replace_pool(chunk.pool)
        return self.isolated(chunk.objects)

    def isolated(self, objects: list[ObjectInfo]) -> list[Outcome]:
        """Each object in a fresh process of its own, ``processes`` at a time. One whose process dies,
        or does not answer within ``decode_timeout_seconds``, while decoding is quarantined with the
        cause; while fetching, or exiting without an answer, it is an error (not recorded, taken again)."""
        context = multiprocessing.get_context("fork")
        outcomes = []
        for start in range(0, len(objects), self.processes):
            running = []
            for obj in objects[start : start + self.processes]:
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_isolated_worker,
                    args=(self.store, self.context, os.getpid(), self.nice, obj, send),
                )
                process.start()
                send.close()
                running.append((obj, process, receive, time.monotonic() + self.timeout))
            for obj, process, receive, deadline in running:
                outcomes.append(self._answer(obj, process, receive, deadline))
        return outcomes

    def _answer(self, obj: ObjectInfo, process: Any, receive: Any, deadline: float) -> Outcome:
        """The isolated process's outcome: ``deadline`` for its fetch, then a decode timeout of its own."""
        stage, timed_out = "fetch", False
        try:
            while True:
                if not receive.poll(max(deadline - time.monotonic(), 0)):
                    process.kill()
                    timed_out = True
                    break
                message = receive.recv()
                if isinstance(message, Exception):
                    raise message
                if message != _FETCHED:
                    return message
                stage, deadline = "decode", time.monotonic() + self.timeout
        except EOFError:  # died before answering
            pass
        finally:
            process.join()  # at once: it answered, died or was killed
            receive.close()
        if stage == "fetch":
            what = "did not finish" if timed_out else f"ended ({_exit(process.exitcode)})"
            detail = f"decode process fetching the object {what} within {self.timeout:g} s"
            return self._failed(Outcome(obj, errors=[failure(STORE_ERROR, detail)]), detail)
        if timed_out:
            rejection = Rejected(Reason.CORRUPT, f"decoding did not finish within {self.timeout:g} s")
        elif process.exitcode is not None and process.exitcode < 0:
            rejection = _crash_rejection(-process.exitcode)
        else:  # not a verdict on the data: Python exits like this only through a bug or the machine
            detail = f"decode process {_exit(process.exitcode)} without a result"
            return self._failed(Outcome(obj, errors=[failure(DECODER_ERROR, detail)]), detail)
        return self._failed(Outcome(obj, quarantined=[_rejection("", rejection)]), rejection.detail)

    @staticmethod
    def _failed(outcome: Outcome, detail: str) -> Outcome:
        fate = "quarantined" if outcome.quarantined else "left for the next run"
        log.warning("decode process for one object failed (%s); %s", detail, fate)
        return outcome


def _exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"
