"""The image store: one boto3 code path for AWS S3, MinIO and the embedded SeaweedFS endpoint.

Prefix layout inside the bucket (see docs/architecture.md):

- ``training/<class>/...``   labelled studies dropped by the hospital (read-only for mmpipe)
- ``incoming/...``           unlabelled studies/archives to score (read-only; only tags are written)
- ``curated/<ingest run>/``  decoded, pseudonymised, fixed-size image shards (``.npz``)
- ``quarantine/<run>/``      JSON records of what could not be used, with a reason (originals untouched)
- ``plans/``                 versioned training plans (JSON)
- ``models/<run>/<cand>/``   checkpoints (safetensors) + model card JSON
- ``weights/<backbone>/``    the pretrained-weights registry (imported from local files)
- ``reports/``               run reports, GX Data Docs, evaluation plots
- ``results/``               scoring results per run
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit
from xml.etree import ElementTree

import boto3
import botocore.exceptions
import botocore.session
from botocore.config import Config
from botocore.httpsession import get_cert_path
from botocore.utils import get_environ_proxies, percent_encode

from mmpipe.config import Settings
from mmpipe.errors import ConfigError, StoreError
from mmpipe.sigv4 import Signer, host_of

FETCH_ATTEMPTS = 5
#: Answers that mean "try again later": 5xx and throttling, as botocore's standard retry mode treats them.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout", "InternalError",
     "ServiceUnavailable"}
)  # fmt: skip
DENIED_STATUSES = frozenset({401, 403})
MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
BACKOFF_CAP = 20.0
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 120.0
LIST_THREADS = 8
MAX_PARALLEL_FOLDERS = 4 * LIST_THREADS


class Fetched(NamedTuple):
    """An object's bytes, and how many tags it carried when read."""

    body: bytes
    tag_count: int


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    etag: str
    size: int
    modified: str = ""  # LastModified exactly as the store reports it (compared, never parsed)


class StoreUnavailable(StoreError):
    """A transient fault (5xx, throttling, a timeout, a reset or refused connection) that outlasted
    the retries: the work is left for the next attempt, never judged."""


class AccessDenied(StoreError):
    """The store refuses the configured credentials (403): no retry helps, so the run fails."""


class NotFound(StoreError):
    """404 / NoSuchKey: the one answer that means the object is absent."""


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): full jitter, capped, like botocore's standard mode."""
    return random.random() * min(BACKOFF_CAP, 2.0 ** (attempt - 1))


def uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def split_uri(value: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not value.startswith("s3://") or "/" not in value[5:]:
        raise StoreError(f"not an s3:// object URI: {value!r}")
    bucket, key = value[5:].split("/", 1)
    return bucket, key


@dataclass
class _Route:
    """How this thread reaches one endpoint: its connection (``http.client`` opens it: TLS, proxy
    tunnel), the buffered reader of its answers, and what a plain-HTTP proxy needs."""

    conn: http.client.HTTPConnection
    absolute: bool = False  # the request line names the whole URL (a plain-HTTP proxy)
    headers: dict[str, str] = field(default_factory=dict)
    reader: Any = None  # of the open socket; None: not connected

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.conn.close()


class DirectHttp:
    """Signed requests over one kept-alive connection per thread and host (opened by ``http.client``,
    requests written and answers read by :func:`request_head` and :func:`read_response`).

    Connections are opened lazily by the thread (and process) that uses them: a client copied into a
    forked decode process, or shared by worker threads, never shares a socket. Transient failures
    (connection refused or reset, timeouts, a body cut short, 5xx, throttling) are retried up to
    ``attempts`` times in all, with jittered exponential backoff, on a fresh connection; other
    answers (403, 404, ...) fail at once.
    Like boto3, it verifies TLS against ``ca_bundle`` (``AWS_CA_BUNDLE``: a hospital's own CA for
    MinIO) and goes through the ``HTTP(S)_PROXY`` that applies to the endpoint, unless ``NO_PROXY``
    exempts it: CONNECT tunnels for HTTPS, absolute request targets for plain HTTP.
    """

    def __init__(self, ca_bundle: str | None = None, attempts: int = FETCH_ATTEMPTS) -> None:
        self._cafile = get_cert_path(ca_bundle or True)
        self._local = threading.local()
        self.attempts = attempts

    def _route(self, scheme: str, netloc: str) -> _Route:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.routes = os.getpid(), {}
        route = local.routes.get((scheme, netloc))
        if route is None:
            route = local.routes[(scheme, netloc)] = self._open(scheme, netloc)
        return route

    def _open(self, scheme: str, netloc: str) -> _Route:
        context = ssl.create_default_context(cafile=self._cafile) if scheme == "https" else None
        proxy = get_environ_proxies(f"{scheme}://{netloc}").get(scheme)
        if not proxy:
            if context:
                return _Route(http.client.HTTPSConnection(netloc, timeout=CONNECT_TIMEOUT, context=context))
            return _Route(http.client.HTTPConnection(netloc, timeout=CONNECT_TIMEOUT))
        via = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if via.scheme != "http":
            raise ConfigError(
                f"unsupported proxy scheme {via.scheme!r}: set HTTP(S)_PROXY to an http:// proxy"
            )
        address, headers = f"{via.hostname}:{via.port or 80}", {}
        if via.username:
            user = f"{unquote(via.username)}:{unquote(via.password or '')}"
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        if context:
            conn = http.client.HTTPSConnection(address, timeout=CONNECT_TIMEOUT, context=context)
            conn.set_tunnel(netloc, headers=headers)
            return _Route(conn)
        return _Route(http.client.HTTPConnection(address, timeout=CONNECT_TIMEOUT), True, headers)

    def get(self, url: str) -> bytes:
        """The body of a 200 answer to GET ``url``; :class:`HttpFailed` otherwise."""
        return self.send("GET", url)[0]

    def send(
        self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """(body, headers with lowercase names) of a 200 answer to ``method url``; :class:`HttpFailed`
        otherwise. Only idempotent requests come here (GETs, PUTs of a whole object or tag set): a
        retry repeats them. ``http.client`` opens the connection (TLS, proxy tunnel); the request is
        written and its answer read here (HTTP/1.1: Content-Length, chunked, or until close): a
        signed object read costs 0.2 instead of 0.5 ms of client CPU through ``http.client``'s own
        request and answer (measured here), and that CPU bounds ingest and scoring on a small machine."""
        parts = urlsplit(url)
        route = self._route(parts.scheme, parts.netloc)
        target = url if route.absolute else urlunsplit(("", "", parts.path, parts.query, ""))
        head = request_head(method, target, host_of(url), {**route.headers, **(headers or {})}, body)
        # one write for a small request; a large body (a checkpoint) is sent as it is, not copied
        writes = (head + body,) if body and len(body) <= COPY_LIMIT else (head, body or b"")
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(backoff(attempt))
            try:
                if route.reader is None:
                    route.conn.connect()
                    route.conn.sock.settimeout(READ_TIMEOUT)
                    route.reader = route.conn.sock.makefile("rb")
                for part in writes:
                    route.conn.sock.sendall(part)
                status, answer_headers, answer, keep = read_response(route.reader, method)
            except (OSError, http.client.HTTPException) as exc:
                route.close()  # also a half-made connection: the next attempt starts afresh
                failure = HttpFailed(
                    f"{type(exc).__name__}: {exc}"[:240], refused=isinstance(exc, ConnectionRefusedError)
                )
                continue
            if not keep:
                route.close()
            if status == 200:
                return answer, answer_headers
            failure = HttpFailed(f"HTTP {status}", code=_error_code(answer), status=status)
            if not failure.transient:
                break
        raise failure


MAX_LINE = 65536  # longest status or header line accepted (as http.client)
COPY_LIMIT = 1 << 20  # bodies up to this size go out in one write with their request head


def request_head(method: str, target: str, host: str, headers: dict[str, str], body: bytes | None) -> bytes:
    """An HTTP/1.1 request up to its body: line, Host, headers, and Content-Length for a body or an
    upload."""
    if any("\r" in text or "\n" in text for text in (target, host, *headers, *headers.values())):
        raise ValueError("a request target or header carries a line break")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None or method in ("PUT", "POST", "PATCH"):  # S3 wants a length on every upload
        lines.append(f"Content-Length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(reader: Any, method: str) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, whether the connection stays open) of the next answer on ``reader``;
    1xx answers are skipped. A closed connection or a body cut short raises ``http.client``'s errors."""
    while True:
        line = reader.readline(MAX_LINE + 1)
        if not line:
            raise http.client.RemoteDisconnected("the connection closed without an answer")
        version, _, rest = line.decode("latin-1").partition(" ")
        if not version.startswith("HTTP/") or not rest[:3].isdigit():
            raise http.client.BadStatusLine(line[:80].decode("latin-1"))
        status, headers = int(rest[:3]), {}
        while (field_line := reader.readline(MAX_LINE + 1)) not in (b"\r\n", b"\n"):
            if not field_line:
                raise http.client.IncompleteRead(b"")
            if len(field_line) > MAX_LINE:
                raise http.client.LineTooLong("header line")
            name, _, value = field_line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if status >= 200:
            break
    keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if method == "HEAD" or status in (204, 304):
        return status, headers, b"", keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return status, headers, _read_chunked(reader), keep
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise http.client.HTTPException(
                f"bad Content-Length {headers['content-length'][:40]!r}"
            ) from None
        body = reader.read(length)
        if len(body) < length:
            raise http.client.IncompleteRead(body, length - len(body))
        return status, headers, body, keep
    return status, headers, reader.read(), False  # the body ends where the connection does


def _read_chunked(reader: Any) -> bytes:
    chunks = []
    while True:
        size_line = reader.readline(MAX_LINE + 1)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise http.client.IncompleteRead(b"".join(chunks)) from None
        if size == 0:
            while reader.readline(MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields
            return b"".join(chunks)
        chunk = reader.read(size)
        if len(chunk) < size or reader.readline(MAX_LINE + 1) not in (b"\r\n", b"\n"):
            raise http.client.IncompleteRead(b"".join(chunks) + chunk)
        chunks.append(chunk)


class HttpFailed(Exception):
    """A direct request that failed for good: what happened, the HTTP status and S3 error code if an
    answer came, and whether the endpoint refused the connection (it is down, not misbehaving)."""

    def __init__(self, what: str, code: str | None = None, refused: bool = False, status: int | None = None):
        super().__init__(f"{what} {code}" if code else what)
        self.code, self.refused, self.status = code, refused, status

    @property
    def transient(self) -> bool:
        """No answer at all (refused, reset, timed out), or one that asks to try again."""
        return self.status is None or self.status in RETRY_STATUSES or self.code in RETRY_CODES


def _error_code(body: bytes) -> str | None:
    """The ``<Code>`` of an S3 error document, if the body is one."""
    try:
        return ElementTree.fromstring(body).findtext("Code")
    except ElementTree.ParseError:
        return None


class Store:
    """Thin wrapper over an S3 client bound to one bucket; every error becomes a one-line StoreError.

    Errors are classified, never guessed: transient faults are retried (botocore's retry modes for
    boto3 calls, the same bounded backoff for mmpipe's direct requests) and, if they outlast
    ``s3_max_attempts``, raise :class:`StoreUnavailable`; only 404/NoSuchKey raises
    :class:`NotFound`; 403 raises :class:`AccessDenied`, naming the fix.
    """

    def __init__(self, settings: Settings):
        self.bucket = settings.s3_bucket
        self.endpoint = settings.s3_endpoint_url or "AWS S3"
        secret = settings.s3_secret_access_key
        key_id = settings.s3_access_key_id
        session = botocore.session.Session()
        if key_id and secret:
            session.set_credentials(key_id.get_secret_value(), secret.get_secret_value())
        # mmpipe never reads object timestamps from boto3 responses; botocore parses each with
        # dateutil, a sizeable part of the CPU of a small get_object or head_object.
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        # bulk reads and writes; open their connections lazily, verified like boto3's (see DirectHttp)
        self._http = DirectHttp(session.get_config_variable("ca_bundle"), settings.s3_max_attempts)
        self.attempts = settings.s3_max_attempts
        self._signer = Signer(settings.s3_region)
        self._client = boto3.Session(botocore_session=session).client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=Config(
                retries={"total_max_attempts": settings.s3_max_attempts, "mode": settings.s3_retry_mode},
                connect_timeout=5,
                read_timeout=120,
                max_pool_connections=32,
                s3={"addressing_style": "path"},
            ),
        )
        # the client's own credential chain (keys given, else environment, profile, role)
        self._credentials = session.get_credentials()

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        """``fn(**kwargs)`` (botocore retries transient faults itself), its errors classified."""
        try:
            return fn(**kwargs)
        except botocore.exceptions.NoCredentialsError:
            raise self._no_credentials() from None
        except botocore.exceptions.EndpointConnectionError:
            raise self._unreachable() from None
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
            raise StoreUnavailable(
                f"{what} failed on {self.endpoint} after {self.attempts} attempts ({type(exc).__name__})"
            ) from None
        except botocore.exceptions.ClientError as exc:
            error, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
            code = str(error.get("Code", "?"))
            raise self._classified(what, meta.get("HTTPStatusCode"), code, "Key" not in kwargs) from None

    def _classified(
        self, what: str, status: int | None, code: str, bucket_level: bool, detail: str | None = None
    ) -> StoreError:
        """The error an S3 error answer means (after any retries)."""
        if code == "NoSuchBucket" or (bucket_level and status == 404):
            return self._no_bucket()
        if status == 404 or code in MISSING_CODES:
            return NotFound(f"{what} failed on {self.endpoint}: HTTP 404 {code}")
        if status in DENIED_STATUSES:
            return self._denied(what, code)
        if status in RETRY_STATUSES or code in RETRY_CODES:
            return StoreUnavailable(
                f"{what} failed on {self.endpoint} after {self.attempts} attempts: {code}"
            )
        return StoreError(f"{what} failed on {self.endpoint}: {detail or code}")

    def _denied(self, what: str, code: str | None) -> AccessDenied:
        if code == "RequestTimeTooSkewed":
            fix = "this machine's clock is off: synchronise it (NTP)"
        else:
            fix = (
                f"check that MMPIPE_S3_ACCESS_KEY_ID / MMPIPE_S3_SECRET_ACCESS_KEY are current (rotated?) "
                f"and may read and write bucket {self.bucket!r}"
            )
        return AccessDenied(f"access denied by the image store at {self.endpoint} ({code}) on {what}: {fix}")

    def _unreachable(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"image store unreachable at {self.endpoint}: start it (`mmpipe store serve`) "
            "or set MMPIPE_S3_ENDPOINT_URL"
        )

    def _no_bucket(self) -> StoreError:
        return StoreError(
            f"bucket {self.bucket!r} does not exist at {self.endpoint}: run `mmpipe init` or set MMPIPE_S3_BUCKET"
        )

    def _no_credentials(self) -> StoreError:
        return StoreError(
            f"no credentials for the image store at {self.endpoint}: set MMPIPE_S3_ACCESS_KEY_ID and "
            "MMPIPE_S3_SECRET_ACCESS_KEY (or an AWS profile/role)"
        )

    def _signed(
        self, what: str, method: str, key: str = "", query: dict[str, str] | None = None,
        body: bytes = b"", headers: dict[str, str] | None = None,
    ) -> tuple[bytes, dict[str, str]]:  # fmt: skip
        """A request on the bucket (or ``key`` in it), signed (SigV4, in its headers, see
        :mod:`mmpipe.sigv4`) with the client's credentials, endpoint and path addressing, sent by
        :class:`DirectHttp`: the bulk paths (listing, reads, scoring's sidecars and tags) at a ninth
        of the client CPU of a boto3 call (measured here)."""
        credentials = self._credentials.get_frozen_credentials() if self._credentials else None
        if credentials is None or credentials.access_key is None:
            raise self._no_credentials()
        url = f"{self._client.meta.endpoint_url}/{self.bucket}" + (f"/{quote(key, safe='/~')}" if key else "")
        if query:
            url += "?" + "&".join(
                f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(query.items())
            )
        signed = self._signer.headers(credentials, method, url, body, headers)
        return self._direct(what, method, url, body or None, signed, bucket_level=not key)

    def _direct(
        self, what: str, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        bucket_level: bool = False,
    ) -> tuple[bytes, dict[str, str]]:  # fmt: skip
        """:meth:`DirectHttp.send`, its failures classified like boto3's."""
        try:
            return self._http.send(method, url, body, headers)
        except HttpFailed as exc:
            if exc.refused:
                raise self._unreachable() from None
            if exc.status is None:  # reset, timed out, cut short: on every attempt
                raise StoreUnavailable(
                    f"{what} failed on {self.endpoint} after {self.attempts} attempts: {exc}"
                ) from None
            raise self._classified(what, exc.status, exc.code or "?", bucket_level, str(exc)) from None

    def uri(self, key: str) -> str:
        return uri(self.bucket, key)

    def key_of(self, value: str) -> str:
        bucket, key = split_uri(value)
        if bucket != self.bucket:
            raise StoreError(f"{value} is outside the configured bucket {self.bucket!r}")
        return key

    def ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError:
            self._call("create bucket", self._client.create_bucket, Bucket=self.bucket)
        except botocore.exceptions.EndpointConnectionError:
            self._call("head bucket", self._client.head_bucket, Bucket=self.bucket)

    def check(self) -> None:
        """Fail with one clear line when the store or bucket is not usable."""
        self._call("head bucket", self._client.head_bucket, Bucket=self.bucket)

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix``, sorted by key.

        The folders one level below ``prefix`` (``training/<class>/``) are listed concurrently: the
        server does the work of a listing, so a nightly run with nothing new waits on it, and
        folders in parallel roughly halve that wait here. Many folders (one per study) are listed
        flat instead: one request per folder would cost more than it saves. Pages are signed
        ListObjectsV2 GETs parsed with ElementTree (8 vs 45 ms of CPU per 1,000 keys through
        botocore's parser).
        """
        direct, folders = self._list_pages(prefix, delimiter="/")
        if len(folders) > MAX_PARALLEL_FOLDERS:  # one folder per study: a flat listing is fewer requests
            return self._list_pages(prefix)[0]
        with ThreadPoolExecutor(LIST_THREADS) as pool:
            nested = list(pool.map(lambda folder: self._list_pages(folder)[0], folders))
        return sorted(chain(direct, *nested), key=lambda o: o.key)

    def _list_pages(self, prefix: str, delimiter: str = "") -> tuple[list[ObjectInfo], list[str]]:
        """Objects under ``prefix`` and, with a delimiter, the common prefixes rolled up by it."""
        params = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
        if delimiter:
            params["delimiter"] = delimiter
        objects, folders = [], []
        while True:
            page = ElementTree.fromstring(self._signed("list " + prefix, "GET", query=params)[0])
            objects += [
                ObjectInfo(
                    unquote_plus(item.findtext("{*}Key", "")),
                    item.findtext("{*}ETag", "").strip('"'),
                    int(item.findtext("{*}Size", "0")),
                    item.findtext("{*}LastModified", ""),
                )
                for item in page.iterfind("{*}Contents")
            ]
            folders += [unquote_plus(p.findtext("{*}Prefix", "")) for p in page.iterfind("{*}CommonPrefixes")]
            token = page.findtext("{*}NextContinuationToken")
            if page.findtext("{*}IsTruncated") != "true" or not token:
                return objects, folders
            params["continuation-token"] = token

    def get(self, key: str) -> bytes:
        """An object's bytes. Every read takes :meth:`fetch`'s path, so a body cut short is retried
        too (botocore retries a ``get_object`` request, not the reading of its body)."""
        return self.fetch(key).body

    def fetch(self, key: str) -> Fetched:
        """The bulk-read path (ingest, scoring): 0.2 vs 2 ms of client CPU per 8 KB object through
        ``get_object`` (measured here), which is what bounds ingest on a small machine. With the
        bytes comes the object's tag count (S3's ``x-amz-tagging-count``): scoring reads the tags
        of an object only when it has some."""
        body, headers = self._signed("get " + key, "GET", key)
        return Fetched(body, int(headers.get("x-amz-tagging-count") or 0))

    def head(self, key: str) -> ObjectInfo | None:
        """The object's listing facts, or None when it is absent (404 only; other errors raise)."""
        try:
            meta = self._call("head " + key, self._client.head_object, Bucket=self.bucket, Key=key)
        except NotFound:
            return None
        return ObjectInfo(key, meta["ETag"].strip('"'), meta["ContentLength"])

    def put(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        """Write an object and return its s3:// URI."""
        self._signed("put " + key, "PUT", key, body=body, headers={"Content-Type": content_type})
        return self.uri(key)

    def delete(self, keys: list[str]) -> None:
        """Delete objects (mmpipe's own outputs only: callers never pass a hospital's originals)."""
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects request takes
            batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
            response = self._call("delete", self._client.delete_objects, Bucket=self.bucket, Delete=batch)
            if response.get("Errors"):
                error = response["Errors"][0]
                raise StoreError(f"delete {error.get('Key')} failed on {self.endpoint}: {error.get('Code')}")

    def put_json(self, key: str, payload: Any) -> str:
        body = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        return self.put(key, body, "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def get_tags(self, key: str) -> dict[str, str]:
        """The object's tags (scoring reads those of every object that has some before writing its own)."""
        body = self._signed("get tags " + key, "GET", key, {"tagging": ""})[0]
        return {
            tag.findtext("{*}Key", ""): tag.findtext("{*}Value", "")
            for tag in ElementTree.fromstring(body).iterfind("{*}TagSet/{*}Tag")
        }

    def put_tags(self, key: str, tags: dict[str, str]) -> None:
        """Merge ``tags`` into the object's tag set; the object's bytes are never rewritten."""
        self.set_tags(key, {**self.get_tags(key), **tags})

    def set_tags(self, key: str, tags: dict[str, str]) -> None:
        """Replace the object's whole tag set with ``tags``; the object's bytes are never rewritten."""
        body = tagging_document(tags)
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        self._signed("put tags " + key, "PUT", key, {"tagging": ""}, body, {"Content-MD5": md5})


def tagging_document(tags: dict[str, str]) -> bytes:
    """The PutObjectTagging body: S3's ``Tagging`` XML, values cut to S3's 256 characters."""
    root = ElementTree.Element("Tagging", xmlns="http://s3.amazonaws.com/doc/2006-03-01/")
    tag_set = ElementTree.SubElement(root, "TagSet")
    for k, v in sorted(tags.items()):
        tag = ElementTree.SubElement(tag_set, "Tag")
        ElementTree.SubElement(tag, "Key").text = k
        ElementTree.SubElement(tag, "Value").text = str(v)[:256]
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def open_store(settings: Settings) -> Store:
    return Store(settings)
