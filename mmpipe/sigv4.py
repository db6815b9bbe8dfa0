"""AWS Signature Version 4 for mmpipe's direct S3 requests (see :class:`mmpipe.store.DirectHttp`).

The same signature botocore's ``S3SigV4Auth`` computes (a test compares the two), without building
a botocore request per call and with the day's signing key derived once: 0.03 instead of 0.15-0.2 ms
of CPU per signature here (a whole signed object read: 0.5 instead of 0.8 ms), paid three times per
object by a scoring run (read, sidecar, tags).
The payload is always hashed into the signature, as botocore does over plain HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_of(url: str) -> str:
    """The Host a request to ``url`` carries: lowercase, the port only when not the scheme's default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port is not None and parts.port != DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def canonical_query(query: str) -> str:
    """The query's ``key=value`` pairs (already percent-encoded) sorted, as SigV4 canonicalises them."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join(f"{k}={v}" for k, v in pairs)


class Signer:
    """Signs requests for one region and service with the credentials given per call (refreshable
    ones change), caching each day's signing key per secret."""

    def __init__(self, region: str, service: str = "s3"):
        self.region, self.service = region, service
        self._keys: dict[tuple[str, str], bytes] = {}

    def _key(self, secret: str, day: str) -> bytes:
        key = self._keys.get((secret, day))
        if key is None:
            key = ("AWS4" + secret).encode()
            for part in (day, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret, day): key}  # one entry: yesterday's key is never needed again
        return key

    def headers(
        self, credentials: Any, method: str, url: str, body: bytes = b"",
        headers: dict[str, str] | None = None, now: datetime | None = None,
    ) -> dict[str, str]:  # fmt: skip
        """``headers`` plus the date, payload hash, session token (if any) and Authorization headers
        that sign ``method url`` with ``body`` (``credentials``: access_key, secret_key, token)."""
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        signed = dict(headers or {})
        signed["X-Amz-Date"] = stamp
        signed["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        if credentials.token:
            signed["X-Amz-Security-Token"] = credentials.token
        canonical = {k.lower(): " ".join(str(v).split()) for k, v in signed.items()}
        canonical.setdefault("host", host_of(url))
        names = sorted(canonical)
        parts = urlsplit(url)
        request = "\n".join(
            [
                method.upper(),
                parts.path or "/",
                canonical_query(parts.query),
                "".join(f"{n}:{canonical[n]}\n" for n in names),
                ";".join(names),
                signed["X-Amz-Content-SHA256"],
            ]
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"{ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        signature = hmac.new(
            self._key(credentials.secret_key, day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        signed["Authorization"] = (
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return signed
