"""mmpipe's SigV4 signer gives exactly botocore's S3 signature for the requests mmpipe sends."""

from __future__ import annotations

from datetime import UTC, datetime

import botocore.auth
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from mmpipe.sigv4 import Signer, canonical_query, host_of

NOW = datetime(2026, 11, 27, 23, 59, 58, tzinfo=UTC)
STATIC = ReadOnlyCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None)
SESSION = ReadOnlyCredentials("ASIAEXAMPLE", "secret/with+signs", "FwoGZXIvYXdzEJr//token==")

REQUESTS = [
    ("GET", "http://127.0.0.1:8333/bucket/incoming/a%20b/%C3%A9t%C3%A9.dcm", b"", {}),
    ("GET", "http://127.0.0.1:8333/bucket?delimiter=%2F&encoding-type=url&list-type=2&prefix=in%2F", b"", {}),
    ("GET", "http://s3.eu-west-1.amazonaws.com/bucket/k.dcm?tagging=", b"", {}),
    ("PUT", "http://minio:9000/bucket/results/v1/k.json", b'{"a": 1}', {"Content-Type": "application/json"}),
    ("PUT", "http://[::1]:9000/bucket/k?tagging=", b"<Tagging/>", {"Content-MD5": "  abc==  "}),
    ("PUT", "http://localhost:80/bucket/k", b"\x00\x01", {"Content-Type": "a/b"}),
]


@pytest.mark.parametrize("credentials", [STATIC, SESSION], ids=["static", "session-token"])
@pytest.mark.parametrize("method,url,body,headers", REQUESTS)
def test_signature_equals_botocores(monkeypatch, credentials, method, url, body, headers) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    reference = AWSRequest(method, url, data=body, headers=dict(headers))  # http: botocore signs the body
    S3SigV4Auth(credentials, "s3", "eu-west-1").add_auth(reference)

    ours = Signer("eu-west-1").headers(credentials, method, url, body, headers, NOW)

    assert ours == dict(reference.headers.items())


def test_a_different_secret_day_or_body_changes_the_signature() -> None:
    signer = Signer("us-east-1")
    url = "http://127.0.0.1:1/b/k"
    base = signer.headers(STATIC, "PUT", url, b"x", now=NOW)["Authorization"]
    other = ReadOnlyCredentials(STATIC.access_key, STATIC.secret_key + "x", None)
    assert signer.headers(other, "PUT", url, b"x", now=NOW)["Authorization"] != base
    assert signer.headers(STATIC, "PUT", url, b"y", now=NOW)["Authorization"] != base
    tomorrow = NOW.replace(day=28)
    assert signer.headers(STATIC, "PUT", url, b"x", now=tomorrow)["Authorization"] != base
    # and back: the cached key follows the day and the secret, not the first call
    assert signer.headers(STATIC, "PUT", url, b"x", now=NOW)["Authorization"] == base


def test_host_and_query_canonical_forms() -> None:
    assert host_of("http://LocalHost:80/b") == "localhost"
    assert host_of("https://s3.amazonaws.com:443/b") == "s3.amazonaws.com"
    assert host_of("http://127.0.0.1:8333/b") == "127.0.0.1:8333"
    assert host_of("http://[::1]:9000/b") == "[::1]:9000"
    assert canonical_query("prefix=a&list-type=2&tagging=") == "list-type=2&prefix=a&tagging="
    assert canonical_query("") == ""
