"""Faults injected while ingest runs, on the real embedded SeaweedFS and PostgreSQL, then the rerun.

Each test injects one fault a hospital meets (the store stopped and restarted, 503s, slow answers,
resets, bodies cut short, credentials revoked, the catalog connection killed, the ingest process
SIGKILLed, the local disk full, a decoder regression, two runs at once), lets the faulted run end as
it will, reruns, and checks what :func:`tests.faults.workload.recovery` measures: exact accounting,
no pixel kept twice, no orphan after the sweep, no quarantine caused by the fault, and the catalog a
clean run gives. Every test adds its figures to the suite's summary table.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from mmpipe import decoding, embedded, ingest
from mmpipe.store import open_store
from tests.faults.proxy import Faults, fault_proxy
from tests.faults.workload import (
    PREFIX,
    assert_recovered,
    first_run,
    in_background,
    recovery,
    serves,
    start_run,
    terminate_backends,
    wait_for,
)

pytestmark = pytest.mark.integration

BATCH = 8
INGEST = (
    "from mmpipe import ingest\ningest.run(settings, store, catalog, run_id, batch_size=extra['batch'])\n"
)


def night(settings, store, catalog, run_id: str = "night") -> Callable[[], dict]:
    return lambda: ingest.run(settings, store, catalog, run_id, batch_size=BATCH)


def rerun_and_check(fault: str, figures: dict, settings, store, catalog, reference, record) -> dict:
    """The next run, fault over: it must take up exactly what the faulted one left."""
    rerun = ingest.run(settings, store, catalog, "rerun", batch_size=BATCH)
    figures |= {"rerun_new_objects": rerun["new_objects"]} | recovery(settings, store, catalog, reference)
    record(fault, figures)
    assert rerun["status"] == "succeeded"
    assert_recovered(figures)
    return figures


def committed(catalog) -> int:
    return catalog.scalar("SELECT count(*) FROM source_objects")


def start_child(settings, run_id: str, *sync: Path) -> subprocess.Popen:
    return start_run(settings, run_id, INGEST, {"batch": BATCH}, *sync)


# --------------------------------------------------------------------------- the store


def test_store_stopped_and_restarted_mid_run(loaded, own_store, reference, record) -> None:
    server = own_store["handle"]
    settings, store, catalog = loaded(s3_endpoint_url=server.endpoint, s3_max_attempts=3)
    thread, out = in_background(night(settings, store, catalog))
    wait_for(lambda: committed(catalog) >= BATCH)
    embedded.stop(server)
    time.sleep(3)
    own_store["handle"] = embedded.start(server.data_dir, server.s3_port)
    thread.join(300)
    wait_for(lambda: serves(store, PREFIX))  # its volumes come up after its S3 port: the next run starts then
    assert out["first_run"] in ("succeeded", "failed: StoreUnavailable"), out  # never a verdict on data
    figures = out | {"injected": "3 s down"}
    rerun_and_check(
        "store stopped and restarted mid-run", figures, settings, store, catalog, reference, record
    )


@pytest.mark.parametrize(
    ("fault", "rate"),
    [("503", 0.2), ("slow", 0.3), ("reset", 0.15), ("cut", 0.15)],
    ids=["503-slowdown", "slow-answers", "connection-resets", "bodies-cut-short"],
)
def test_store_answers_badly(loaded, s3_endpoint, reference, record, fault, rate) -> None:
    settings, store, catalog = loaded()
    faults = Faults({fault: rate}, slow_seconds=0.3, seed=11)
    with fault_proxy(s3_endpoint, faults) as proxy:
        flaky = settings.model_copy(update={"s3_endpoint_url": proxy.url})
        figures = first_run(night(flaky, open_store(flaky), catalog))
    figures["injected"] = f"{faults.injected[fault]} of {proxy.requests}"
    name = {"503": "503 SlowDown", "slow": "slow answers (0.3 s)", "reset": "connection resets"}
    label = f"{name.get(fault, 'bodies cut short')} ({rate:.0%} of requests)"
    rerun_and_check(label, figures, settings, store, catalog, reference, record)


def test_credentials_revoked_mid_run_fail_it_loudly(loaded, s3_endpoint, reference, record) -> None:
    settings, store, catalog = loaded()
    faults = Faults({"slow": 1.0}, slow_seconds=0.03)  # a run slow enough to be caught mid-way
    with fault_proxy(s3_endpoint, faults) as proxy:
        flaky = settings.model_copy(update={"s3_endpoint_url": proxy.url})
        thread, out = in_background(night(flaky, open_store(flaky), catalog))
        wait_for(lambda: committed(catalog) >= BATCH)
        faults.rates = {"403": 1.0}  # the keys were rotated under the running job
        thread.join(300)
    assert out["first_run"] == "failed: AccessDenied", out
    assert "MMPIPE_S3_ACCESS_KEY_ID" in out["first_error"] and "\n" not in out["first_error"]
    assert catalog.scalar("SELECT status FROM ingest_runs WHERE run_id = 'night'") == "failed"
    figures = out | {"injected": f"{faults.injected['403']} x 403"}
    rerun_and_check("403 AccessDenied mid-run", figures, settings, store, catalog, reference, record)


# --------------------------------------------------------------------------- the catalog and the machine


def test_catalog_connection_terminated_mid_batch(loaded, pg_admin, reference, record) -> None:
    settings, store, catalog = loaded()
    database = sa.engine.make_url(settings.database_url).database
    thread, out = in_background(night(settings, store, catalog))
    terminated = terminate_backends(pg_admin, database, thread, lambda: committed(catalog), busy_only=True)
    thread.join(300)
    assert out["first_run"] == "succeeded", out  # dropped transactions are run again
    figures = out | {"injected": f"{terminated} backends"}
    rerun_and_check("catalog connection terminated", figures, settings, store, catalog, reference, record)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ingest_sigkilled_at_a_random_point(loaded, objects, reference, record, seed) -> None:
    settings, store, catalog = loaded()
    rng = random.Random(seed)
    at, delay = rng.randrange(len(objects) - BATCH), rng.uniform(0, 0.5)
    child = start_child(settings, "night")
    wait_for(lambda: child.poll() is not None or committed(catalog) >= at)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    was = catalog.scalar("SELECT status FROM ingest_runs WHERE run_id = 'night'")
    figures = {"first_run": f"SIGKILL ({was})", "injected": f"after {committed(catalog)} objects"}
    figures = rerun_and_check(
        f"ingest SIGKILLed (seed {seed})", figures, settings, store, catalog, reference, record
    )
    if was == "running":  # killed mid-run: the rerun found its process gone
        assert catalog.scalar("SELECT status FROM ingest_runs WHERE run_id = 'night'") == "abandoned"


def test_local_disk_full_under_the_embedded_catalog(loaded, tmp_path, reference, record) -> None:
    """The embedded default writes one thing locally during ingest: its SQLite catalog."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        settings, store, catalog = loaded(catalog="sqlite", home=disk)
        ballast = disk / "ballast"
        with ballast.open("wb") as fill, pytest.raises(OSError):  # fill the disk up
            while True:
                fill.write(bytes(1 << 16))
                fill.flush()
        os.truncate(ballast, ballast.stat().st_size - (1 << 14))  # 16 kB left
        figures = first_run(night(settings, store, catalog))
        assert "out of disk space" in figures.get("first_error", ""), figures
        ballast.unlink()
        figures["injected"] = "disk full"
        rerun_and_check(
            "local disk full (SQLite catalog)", figures, settings, store, catalog, reference, record
        )
        catalog.dispose()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


# --------------------------------------------------------------------------- mmpipe itself


def test_a_decoder_regression_quarantines_nothing(loaded, objects, monkeypatch, reference, record) -> None:
    settings, store, catalog = loaded()
    victims = {body for key, body in objects.items() if key.endswith(".jpg")}
    real = decoding.decode_image

    def regression(data: bytes, *args):
        if data in victims:
            raise IndexError("a bug in mmpipe")
        return real(data, *args)

    monkeypatch.setattr(decoding, "decode_image", regression)  # the forked decode processes inherit it
    figures = first_run(night(settings, store, catalog))
    assert figures["first_run"] == "failed: MmpipeError" and "a bug, not bad data" in figures["first_error"]
    report = store.get_json(store.key_of(catalog.scalar("SELECT report_uri FROM ingest_runs")))
    assert {e["kind"] for e in report["errors"]} == {"decoder_error"} and report["quarantined"] == 2
    figures |= {"injected": f"{len(victims)} JPEGs", "left_for_rerun": report["decoder_errors"]}
    monkeypatch.undo()  # the fix
    rerun_and_check("decoder regression (bug)", figures, settings, store, catalog, reference, record)


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_two_runs_on_one_prefix_at_once(loaded, tmp_path, reference, record, kind) -> None:
    """The nightly run and a backfill from the UI, started together."""
    settings, store, catalog = loaded(catalog=kind)
    children = [start_child(settings, run_id, tmp_path) for run_id in ("nightly", "backfill")]
    wait_for(
        lambda: all(
            (tmp_path / r).exists() or c.poll() is not None
            for r, c in zip(("nightly", "backfill"), children, strict=True)
        )
    )
    (tmp_path / "go").touch()
    errors = [child.communicate()[1] for child in children]
    assert [child.returncode for child in children] == [0, 0], errors
    runs = catalog.query("SELECT run_id, status, listed, claimed_elsewhere FROM ingest_runs ORDER BY run_id")
    assert {r["status"] for r in runs} == {"succeeded"}
    figures = {
        "first_run": "both succeeded",
        "injected": "+".join(str(r["listed"] - r["claimed_elsewhere"]) for r in runs) + " done",
    }
    figures = rerun_and_check(
        f"two runs at once ({kind})", figures, settings, store, catalog, reference, record
    )
    assert figures["rerun_new_objects"] == 0
