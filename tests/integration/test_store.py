"""The embedded SeaweedFS endpoint through mmpipe.store: persistence, tags, ETags, listing."""

from __future__ import annotations

import pytest

from mmpipe import embedded
from mmpipe.config import get_settings
from mmpipe.errors import StoreError
from mmpipe.store import (
    MAX_PARALLEL_FOLDERS,
    AccessDenied,
    NotFound,
    Store,
    StoreUnavailable,
    open_store,
    split_uri,
)
from tests.faults.proxy import Faults, fault_proxy

pytestmark = pytest.mark.integration


def test_data_survives_a_restart(tmp_path) -> None:
    server = embedded.start(tmp_path / "store")
    settings = get_settings(
        s3_endpoint_url=server.endpoint, s3_bucket="persist", s3_access_key_id="a", s3_secret_access_key="b"
    )
    store = open_store(settings)
    store.ensure_bucket()
    store.put("training/x.dcm", b"DICM-bytes")
    etag = store.head("training/x.dcm").etag
    embedded.stop(server)
    assert embedded.running(tmp_path / "store") is None

    again = embedded.start(tmp_path / "store", server.s3_port)
    try:
        assert store.get("training/x.dcm") == b"DICM-bytes"
        assert store.head("training/x.dcm").etag == etag
    finally:
        embedded.stop(again)


def test_a_port_taken_before_weed_binds_it_is_tried_again_elsewhere(tmp_path, monkeypatch) -> None:
    """free_ports can race another process: the first set of ports handed out holds one that is
    already taken (a plain listener, as another server's); start still succeeds, on other ports."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real, calls = embedded.free_ports, []

    def racy(count: int, start: int = 20000) -> list[int]:
        calls.append(count)
        ports = real(count, start)
        return [taken.getsockname()[1], *ports[1:]] if len(calls) == 2 else ports  # the master's port

    monkeypatch.setattr(embedded, "free_ports", racy)
    try:
        server = embedded.start(tmp_path / "store")
        try:
            assert len(calls) == 4  # (s3), (master, filer, volume) twice
            assert embedded.running(tmp_path / "store") is not None
        finally:
            embedded.stop(server)
    finally:
        taken.close()


@pytest.fixture
def store(make_settings) -> Store:
    """A store with a fresh bucket (no catalog: these tests need none)."""
    store = open_store(make_settings())
    store.ensure_bucket()
    return store


def test_tags_merge_and_never_touch_bytes(store) -> None:
    store.put("incoming/a.zip", b"original")
    before = store.head("incoming/a.zip")
    store.put_tags("incoming/a.zip", {"hospital-tag": "keep"})
    store.put_tags("incoming/a.zip", {"mmpipe-modality": "lung_ct"})
    assert store.get_tags("incoming/a.zip") == {"hospital-tag": "keep", "mmpipe-modality": "lung_ct"}
    assert store.get("incoming/a.zip") == b"original"
    assert store.head("incoming/a.zip").etag == before.etag


def test_listing_pages_and_prefixes(store) -> None:
    for i in range(1005):  # more than one 1,000-key page
        store.put(f"training/brain_mri/{i:05d}.dcm", b"x")
    store.put("incoming/other.dcm", b"y")
    nested = ["training/top.dcm", "training/zz/deeper/still/c.dcm", "training/brain_mri~/x.dcm"]
    for key in nested:
        store.put(key, b"z")
    keys = [o.key for o in store.list("training/")]
    assert len(keys) == 1008 and keys == sorted(keys) and set(nested) <= set(keys)
    assert [o.key for o in store.list("training/brain")] == keys[:1006]  # a prefix that is no folder
    assert [o.key for o in store.list("incoming/")] == ["incoming/other.dcm"]


def test_listing_many_folders_flat_gives_the_same_objects(store) -> None:
    keys = [f"incoming/S{n:03d}/im.dcm" for n in range(MAX_PARALLEL_FOLDERS + 3)] + ["incoming/top.dcm"]
    for key in keys:
        store.put(key, b"x")
    assert [o.key for o in store.list("incoming/")] == sorted(keys)
    assert [o.key for o in store.list("incoming/S00")] == sorted(keys)[:10]  # few folders: in parallel


def test_listing_reports_what_head_reports_for_awkward_keys(store) -> None:
    keys = [
        "training/x/a b+c.dcm",
        "training/x/\u00fc%20&<>'.dcm",
        "training/x/tab\there.dcm",
        "training/x/p.dcm",
    ]
    for n, key in enumerate(keys):
        store.put(key, bytes(n + 1))
    listed = {o.key: o for o in store.list("training/x/")}
    assert sorted(listed) == sorted(keys)
    for key in keys:
        head = store.head(key)
        assert (listed[key].etag, listed[key].size) == (head.etag, head.size)
        assert listed[key].modified


def test_listing_a_missing_bucket_names_the_fix(make_settings) -> None:
    missing = open_store(make_settings())  # its bucket was never created
    with pytest.raises(StoreError, match=r"does not exist.*mmpipe init"):
        list(missing.list("training/"))


def test_uri_helpers(store) -> None:
    assert split_uri(store.uri("models/a/card.json")) == (store.bucket, "models/a/card.json")
    with pytest.raises(StoreError):
        store.key_of("s3://another-bucket/key")
    with pytest.raises(StoreError):
        split_uri("/local/path")


def test_fetch_reads_what_get_reads_and_fails_clearly(store) -> None:
    body = bytes(range(256)) * 40
    store.put("training/x/a b+c.dcm", body)  # a key that needs URL quoting
    assert store.fetch("training/x/a b+c.dcm") == (body, 0)
    assert store.get("training/x/a b+c.dcm") == body
    store.set_tags("training/x/a b+c.dcm", {"a": "1", "b": "2", "c": "3"})
    assert store.fetch("training/x/a b+c.dcm").tag_count == 3  # scoring reads tags only when there are some
    with pytest.raises(NotFound, match="HTTP 404"):
        store.fetch("training/x/missing.dcm")


# --------------------------------------------------------------------------- errors are classified


def through(store: Store, proxy, make_settings) -> Store:
    """The same bucket, reached through ``proxy``."""
    return open_store(make_settings(s3_bucket=store.bucket, s3_endpoint_url=proxy.url, s3_max_attempts=3))


def test_only_a_404_means_absent(store, make_settings, s3_endpoint) -> None:
    store.put("training/x/a.dcm", b"x")
    assert store.head("training/x/missing.dcm") is None
    every_read = Faults({"403": 1.0}, match=lambda method, path: method in ("GET", "HEAD"))
    with fault_proxy(s3_endpoint, every_read) as proxy:
        denied = through(store, proxy, make_settings)
        for read in (denied.head, denied.fetch, denied.get):
            with pytest.raises(AccessDenied, match=r"access denied .* MMPIPE_S3_ACCESS_KEY_ID") as exc:
                read("training/x/a.dcm")  # a 403 is not "absent": head() used to answer None
            assert "\n" not in str(exc.value)
    assert every_read.injected["403"] == 3  # refused at once: no retry helps


@pytest.mark.parametrize("fault", ["503", "reset", "cut"])
def test_transient_faults_are_retried_and_then_unavailable(store, make_settings, s3_endpoint, fault) -> None:
    store.put("training/x/a.dcm", b"payload" * 100)
    once = Faults({fault: 1.0}, match=lambda method, path: "a.dcm" in path and not once.injected)
    with fault_proxy(s3_endpoint, once) as proxy:
        assert through(store, proxy, make_settings).fetch("training/x/a.dcm").body == b"payload" * 100
    assert once.injected[fault] == 1

    always = Faults({fault: 1.0}, match=lambda method, path: "a.dcm" in path)
    with fault_proxy(s3_endpoint, always) as proxy:
        flaky = through(store, proxy, make_settings)
        reads = [flaky.fetch] if fault == "cut" else [flaky.fetch, flaky.head]  # a HEAD has no body to cut
        for read in reads:
            with pytest.raises(StoreUnavailable, match="after 3 attempts"):
                read("training/x/a.dcm")
    assert always.injected[fault] == 3 * len(reads)  # s3_max_attempts each, boto3 calls and presigned reads


def test_signed_writes_keep_keys_types_and_tag_values(store) -> None:
    """Sidecars and tags go through mmpipe's own SigV4-signed PUTs: any key, type and tag value S3 takes."""
    key = "results/v1/incoming/Ström ü 100%+1 (copy)#2.dcm.json"
    store.put(key, b'{"ok": true}', "application/json")
    assert store.get(key) == b'{"ok": true}'
    assert store._client.head_object(Bucket=store.bucket, Key=key)["ContentType"] == "application/json"
    tags = {
        "mmpipe-review-reason": "low_confidence+header_disagrees",
        "site": "Ward 3/B: x@y = z.",
        "long": "v" * 300,
    }
    store.set_tags(key, tags)
    assert store.get_tags(key) == tags | {"long": "v" * 256}  # S3's limit on a tag value
    store.set_tags(key, {})
    assert store.get_tags(key) == {}


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_signed_write_faults_are_retried_then_unavailable(store, make_settings, s3_endpoint, fault) -> None:
    store.put("incoming/a.dcm", b"original")
    once = Faults({fault: 1.0}, match=lambda method, path: method == "PUT" and not once.injected)
    with fault_proxy(s3_endpoint, once) as proxy:
        through(store, proxy, make_settings).set_tags("incoming/a.dcm", {"k": "v"})
    assert once.injected[fault] == 1 and store.get_tags("incoming/a.dcm") == {"k": "v"}

    always = Faults({fault: 1.0}, match=lambda method, path: method == "PUT")
    with fault_proxy(s3_endpoint, always) as proxy:
        flaky = through(store, proxy, make_settings)
        with pytest.raises(StoreUnavailable, match="after 3 attempts"):
            flaky.set_tags("incoming/a.dcm", {"k": "w"})
        with pytest.raises(StoreUnavailable, match="after 3 attempts"):
            flaky.put("results/a.json", b"{}")
    assert always.injected[fault] == 6
    assert store.get_tags("incoming/a.dcm") == {"k": "v"} and store.get("incoming/a.dcm") == b"original"


def test_a_refused_write_is_access_denied(store, make_settings, s3_endpoint) -> None:
    every_write = Faults({"403": 1.0}, match=lambda method, path: method == "PUT")
    with fault_proxy(s3_endpoint, every_write) as proxy, pytest.raises(AccessDenied, match="access denied"):
        through(store, proxy, make_settings).set_tags("incoming/a.dcm", {"k": "v"})
    assert every_write.injected["403"] == 1


def test_signatures_pass_a_store_that_checks_them(tmp_path, make_settings) -> None:
    """Every request path (boto3 calls, presigned reads, signed writes) against a store that checks
    signatures, as AWS S3 and MinIO do; a wrong secret is refused on each."""
    keys = {"s3_access_key_id": "hospital", "s3_secret_access_key": "right-secret"}
    server = embedded.start(tmp_path / "checked", identity=keys)
    try:
        good = open_store(make_settings(s3_endpoint_url=server.endpoint, **keys))
        good.ensure_bucket()
        good.put("incoming/a b.dcm", b"original")
        good.set_tags("incoming/a b.dcm", {"k": "v"})
        assert good.fetch("incoming/a b.dcm") == (b"original", 1)
        assert good.get_tags("incoming/a b.dcm") == {"k": "v"}
        assert [o.key for o in good.list("incoming/")] == ["incoming/a b.dcm"]
        assert good.head("incoming/a b.dcm") is not None
        wrong = open_store(make_settings(s3_endpoint_url=server.endpoint, s3_bucket=good.bucket,
                                         **(keys | {"s3_secret_access_key": "not-the-secret"})))  # fmt: skip
        for attempt in (
            lambda: wrong.put("results/a.json", b"{}"),
            lambda: wrong.set_tags("incoming/a b.dcm", {"k": "w"}),
            lambda: wrong.fetch("incoming/a b.dcm"),
            lambda: wrong.head("incoming/a b.dcm"),
        ):
            with pytest.raises(AccessDenied):
                attempt()
        assert good.get_tags("incoming/a b.dcm") == {"k": "v"} and good.head("results/a.json") is None
    finally:
        embedded.stop(server)
