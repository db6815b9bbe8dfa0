"""Faults injected while scoring runs, on the real embedded SeaweedFS and PostgreSQL, then the rerun.

The corpus of the ingest faults arrives under incoming/, some objects carrying the hospital's own
tags (two, eight, ten), and a tinycnn champion scores it. Each test injects one fault (the store
stopped and restarted, 503s, slow answers, resets, bodies cut short, the catalog connection killed,
the score process SIGKILLed, the local disk full under the embedded catalog, two runs at once), lets
the faulted run end as it will, reruns, and checks what :func:`tests.faults.workload.score_recovery`
measures: listed = tagged + unreadable + unknown + skipped + failed, one fate row per object and no
duplicate prediction row, every object's fate and tags those of a clean run (mmpipe's from one
model, the hospital's kept), and no transient fault turned into ``mmpipe-status=unreadable``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from mmpipe import embedded, ingest, score
from mmpipe.store import open_store
from tests.faults.conftest import MODEL
from tests.faults.proxy import Faults, fault_proxy
from tests.faults.workload import (
    SCORE_PREFIX,
    assert_score_recovered,
    first_run,
    in_background,
    score_recovery,
    serves,
    start_run,
    tags_consistent,
    terminate_backends,
    wait_for,
)
from tests.integration.test_score import register

pytestmark = pytest.mark.integration

FLUSH = 8  # catalog rows written every 8 objects: a fault can fall between two flushes
SCORE = """from mmpipe import score
score.FLUSH_OBJECTS = extra["flush"]
print(json.dumps(score.run(settings, store, catalog, run_id, model_version=extra["model"])))
"""


def start_child(settings, run_id: str, *sync: Path, model: str = "") -> subprocess.Popen:
    """A scoring run in a process of its own, as the CLI runs it (of the champion unless ``model``)."""
    return start_run(settings, run_id, SCORE, {"flush": FLUSH, "model": model}, *sync)


def night(settings, store, catalog, run_id: str = "night") -> Callable[[], dict]:
    return lambda: score.run(settings, store, catalog, run_id)


def settled(catalog) -> int:
    return catalog.scalar("SELECT count(*) FROM scored_objects WHERE settled = TRUE")


def sidecars(store) -> list:
    return store.list(f"{score.RESULTS_PREFIX}{MODEL}/")


def rows(catalog) -> int:
    return catalog.scalar("SELECT count(*) FROM scored_objects")


def reconciled(summary: dict) -> bool:
    fates = sum(summary[f] for f in (*score.FATES, "not_reached"))
    return summary["listed"] == fates and summary["not_reached"] == 0


def rescore_and_check(fault: str, figures: dict, setup: tuple, reference: dict, record_score) -> dict:
    """The next run, fault over: it must score exactly what the faulted one left, as a clean run does."""
    settings, store, catalog, foreign = setup
    figures["left_for_rerun"] = len(store.list(SCORE_PREFIX)) - settled(catalog)
    rerun = score.run(settings, store, catalog, "rerun")
    figures |= {"rerun_scored": rerun["listed"] - rerun["skipped"], "rerun_reconciled": reconciled(rerun)}
    figures |= score_recovery(store, catalog, MODEL, reference, foreign)
    record_score(fault, figures)
    assert rerun["status"] == "finished", rerun
    assert_score_recovered(figures)
    assert figures["rerun_scored"] == figures["left_for_rerun"]
    return figures


# --------------------------------------------------------------------------- the store


def test_store_stopped_and_restarted_mid_scoring(scoring, own_store, score_reference, record_score) -> None:
    server = own_store["handle"]
    setup = scoring(s3_endpoint_url=server.endpoint, s3_max_attempts=3)
    settings, store, catalog, _ = setup
    faults = Faults({"slow": 1.0}, slow_seconds=0.03)  # slow enough to be caught mid-way
    with fault_proxy(server.endpoint, faults) as proxy:
        flaky = settings.model_copy(update={"s3_endpoint_url": proxy.url})
        thread, out = in_background(night(flaky, open_store(flaky), catalog))
        wait_for(lambda: len(sidecars(store)) >= 8)
        embedded.stop(server)
        time.sleep(3)
        own_store["handle"] = embedded.start(server.data_dir, server.s3_port)
        thread.join(300)
    wait_for(
        lambda: serves(store, SCORE_PREFIX)
    )  # its volumes come up after its S3 port: the next run starts then
    assert out["first_run"] in ("finished", "incomplete", "failed: StoreUnavailable"), out
    figures = out | {"injected": "3 s down"}
    rescore_and_check("store stopped and restarted", figures, setup, score_reference, record_score)


@pytest.mark.parametrize(
    ("fault", "rate"),
    [("503", 0.2), ("slow", 0.3), ("reset", 0.15), ("cut", 0.15)],
    ids=["503-slowdown", "slow-answers", "connection-resets", "bodies-cut-short"],
)
def test_store_answers_badly_during_scoring(scoring, s3_endpoint, score_reference, record_score, fault, rate):
    setup = scoring()
    settings, _, catalog, _ = setup
    faults = Faults({fault: rate}, slow_seconds=0.3, seed=11)
    with fault_proxy(s3_endpoint, faults) as proxy:
        flaky = settings.model_copy(update={"s3_endpoint_url": proxy.url})
        figures = first_run(night(flaky, open_store(flaky), catalog))
    figures["injected"] = f"{faults.injected[fault]} of {proxy.requests}"
    name = {"503": "503 SlowDown", "slow": "slow answers (0.3 s)", "reset": "connection resets"}
    label = f"{name.get(fault, 'bodies cut short')} ({rate:.0%} of requests)"
    rescore_and_check(label, figures, setup, score_reference, record_score)


def test_a_store_stalling_past_the_decode_timeout(
    scoring, s3_endpoint, score_reference, record_score
) -> None:
    """Reads of objects that stall longer than a decode process may take: the decode processes are
    replaced and the objects retried on their own, and a fetch that still stalls is an error, never
    a verdict on the object (``unreadable``)."""
    setup = scoring(decode_timeout_seconds=2.0)
    settings, _, catalog, _ = setup

    def object_reads(method: str, path: str) -> bool:
        return method == "GET" and f"/{SCORE_PREFIX}" in path and "tagging" not in path

    faults = Faults({"slow": 0.1}, match=object_reads, slow_seconds=9, seed=5)  # > 4 objects x 2 s
    with fault_proxy(s3_endpoint, faults) as proxy:
        flaky = settings.model_copy(update={"s3_endpoint_url": proxy.url})
        figures = first_run(night(flaky, open_store(flaky), catalog))
    figures["injected"] = f"{faults.injected['slow']} of {proxy.requests} stalled 9 s"
    rescore_and_check(
        "reads stalled past the decode timeout (2 s)", figures, setup, score_reference, record_score
    )


# --------------------------------------------------------------------------- the catalog and the machine


def test_catalog_connection_terminated_mid_scoring(
    scoring, pg_admin, monkeypatch, score_reference, record_score
) -> None:
    setup = scoring()
    settings, _, catalog, _ = setup
    monkeypatch.setattr(score, "FLUSH_OBJECTS", FLUSH)
    database = sa.engine.make_url(settings.database_url).database
    faults = Faults({"slow": 1.0}, slow_seconds=0.02)  # a run long enough for three kills
    with fault_proxy(settings.s3_endpoint_url, faults) as proxy:
        flaky = settings.model_copy(update={"s3_endpoint_url": proxy.url})
        thread, out = in_background(night(flaky, open_store(flaky), catalog))
        terminated = terminate_backends(pg_admin, database, thread, lambda: rows(catalog), busy_only=False)
        thread.join(300)
    assert out["first_run"] == "finished", out  # dropped transactions are run again
    figures = out | {"injected": f"{terminated} backends"}
    rescore_and_check("catalog connection terminated", figures, setup, score_reference, record_score)


@pytest.mark.parametrize("seed", [1, 2])
def test_score_sigkilled_at_a_seeded_point(scoring, incoming, score_reference, record_score, seed) -> None:
    """The CLI's process killed after a seeded number of objects written (sidecar and tags; their
    catalog rows follow in bursts); seed 2's run is then found abandoned by the sweep, seed 1's by
    the next run."""
    setup = scoring()
    settings, store, catalog, _ = setup
    rng = random.Random(seed)
    at, delay = rng.randrange(4, len(incoming) - 4), rng.uniform(0, 0.2)
    faults = Faults({"slow": 1.0}, slow_seconds=0.03)  # a run slow enough to be killed mid-way
    with fault_proxy(settings.s3_endpoint_url, faults) as proxy:
        child = start_child(settings.model_copy(update={"s3_endpoint_url": proxy.url}), "night")
        wait_for(lambda: child.poll() is not None or len(sidecars(store)) >= at)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
    was = catalog.scalar("SELECT status FROM score_runs WHERE run_id = 'night'")
    done = f"{len(sidecars(store))} written, {rows(catalog)} recorded"
    figures = {"first_run": f"SIGKILL ({was})", "injected": done}
    if seed == 2 and was == "running":
        ingest.sweep_orphans(settings, store, catalog)
        assert catalog.scalar("SELECT status FROM score_runs WHERE run_id = 'night'") == "abandoned"
    rescore_and_check(f"score SIGKILLed (seed {seed})", figures, setup, score_reference, record_score)
    if was == "running":
        assert catalog.scalar("SELECT status FROM score_runs WHERE run_id = 'night'") == "abandoned"


def test_local_disk_full_under_the_embedded_catalog(scoring, tmp_path, score_reference, record_score) -> None:
    """Scoring writes one thing locally: the embedded default's SQLite catalog (sidecars and tags go
    to the store). The faulted run is the CLI's process, which exits on the error."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        setup = scoring(catalog="sqlite", home=disk)
        settings, _, catalog, _ = setup
        ballast = disk / "ballast"
        with ballast.open("wb") as fill, pytest.raises(OSError):  # fill the disk up
            while True:
                fill.write(bytes(1 << 16))
                fill.flush()
        os.truncate(ballast, ballast.stat().st_size - (1 << 14))  # 16 kB left
        child = start_child(settings, "night")
        _, errors = child.communicate(timeout=300)
        assert child.returncode != 0 and "out of disk space" in errors, errors[-2000:]
        ballast.unlink()
        figures = {"first_run": 'failed: "out of disk space"', "injected": "disk full"}
        rescore_and_check("local disk full (SQLite catalog)", figures, setup, score_reference, record_score)
        catalog.dispose()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


# --------------------------------------------------------------------------- two runs at once


def together(settings, tmp_path: Path, runs: dict[str, str], catalog) -> list[dict]:
    """Scoring runs (run id -> model, "" the champion) started together in processes of their own;
    their score_runs rows, each finished and reconciled."""
    children = {run_id: start_child(settings, run_id, tmp_path, model=m) for run_id, m in runs.items()}
    wait_for(lambda: all((tmp_path / r).exists() or c.poll() is not None for r, c in children.items()))
    (tmp_path / "go").touch()
    outputs = [child.communicate(timeout=300) for child in children.values()]
    assert [c.returncode for c in children.values()] == [0, 0], [err[-2000:] for _, err in outputs]
    rows = catalog.query(
        "SELECT run_id, model_version, status, listed, skipped, claimed_elsewhere, tagged, unreadable, "
        "unknown, failed, not_reached FROM score_runs ORDER BY run_id"
    )
    assert {r["status"] for r in rows} == {"finished"} and all(reconciled(r) for r in rows), rows
    return rows


def test_two_scoring_runs_on_one_prefix_at_once(scoring, tmp_path, score_reference, record_score) -> None:
    """The nightly run and a backfill from the UI, started together: each object scored and
    accounted once, its tags consistent."""
    setup = scoring()
    settings, _, catalog, _ = setup
    runs = together(settings, tmp_path, {"nightly": "", "backfill": ""}, catalog)
    scored = [r["listed"] - r["skipped"] for r in runs]
    assert sum(scored) == runs[0]["listed"]  # each object scored by one of them
    figures = {"first_run": "both finished", "injected": "+".join(map(str, scored)) + " scored"}
    figures = rescore_and_check(
        "two runs at once (PostgreSQL)", figures, setup, score_reference, record_score
    )
    assert figures["rerun_scored"] == 0


def test_a_new_champion_scores_while_the_last_one_runs(scoring, tmp_path, record_score) -> None:
    """A backfill of the old champion still running when the new one's nightly run starts: each
    object ends with one model's tags, whole (never a mix), and the hospital's tags kept."""
    settings, store, catalog, foreign = scoring()
    register(store, catalog, "tiny-2")  # the new champion
    runs = together(settings, tmp_path, {"backfill": MODEL, "nightly": "tiny-2"}, catalog)
    assert [r["listed"] - r["skipped"] for r in runs] == [r["listed"] for r in runs]  # one model each
    keys = [o.key for o in store.list(SCORE_PREFIX)]
    tagged = [k for k in keys if any(t.startswith(score.TAG_PREFIX) for t in store.get_tags(k))]
    figures = {
        "first_run": "both finished",
        "injected": "2 models x 32",
        "listed": len(keys),
        "accounted": min(r["listed"] for r in runs),
        "duplicate_rows": rows(catalog) - 2 * len(keys),
        "tags_inconsistent": sum(not tags_consistent(store, k, [MODEL, "tiny-2"], foreign) for k in keys),
        "fault_verdicts": 0,
        "by_model": dict(Counter(store.get_tags(k).get("mmpipe-model", "-") for k in keys)),
    }
    record_score("a new champion while the last one runs", figures)
    assert figures["duplicate_rows"] == figures["tags_inconsistent"] == 0, figures
    assert len(tagged) == len(keys) - 1  # all but the object whose 10 foreign tags leave no room
