"""The Airflow UI in a real browser, the way a hospital data team uses it.

`mmpipe ui` starts the API server, scheduler and DAG processor on 127.0.0.1 over the embedded stack
(the session's SeaweedFS, a fresh PostgreSQL catalog); headless Chromium (the operating system's,
driven by Playwright) logs in with the password `mmpipe ui` printed, reads an ingest run's report in
its "Run report" tab, opens mmpipe_retrain's trigger form, sets non-default Params and triggers. The
run must reach the scheduler with exactly those Params. Retraining is data-aware here
(MMPIPE_RETRAIN_SCHEDULE=asset), so the ingest run must also start a retrain run.
Screenshots are kept under test-artifacts/ui/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from mmpipe.synth import generate
from mmpipe.ui import ui_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MMPIPE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's notes prescribe for a closed network: no background or component traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip


def non_default_params(params: dict[str, Any]) -> dict[str, Any]:
    """Values for the Params the form must carry, each other than its default (which may change)."""
    backbones = next(b for b in (["tinycnn", "resnet18"], ["tinycnn"]) if b != params["backbones"]["value"])
    epochs = 3 if params["epochs"]["value"] != 3 else 4
    init = next(v for v in params["init"]["schema"]["enum"] if v != params["init"]["value"])
    return {"backbones": backbones, "epochs": epochs, "init": init}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Api:
    """The Airflow REST API with a token for the UI's own user."""

    def __init__(self, url: str, password: str):
        token = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=30)
        token.raise_for_status()
        self.client = httpx.Client(
            base_url=f"{url}/api/v2",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            timeout=30,
        )

    def get(self, path: str) -> Any:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def stack(s3_endpoint, pg_admin, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """`mmpipe ui` on a fresh home: store bucket with a few studies, migrated catalog, retrain on the asset."""
    import sqlalchemy as sa

    home = tmp_path_factory.mktemp("ui") / ".mmpipe"
    db = f"mmpipe_ui_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    # A user's shell: no Airflow variables (the suite's own Airflow home stays out), mmpipe settings only.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MMPIPE_"))} | {
        "MMPIPE_HOME": str(home), "MMPIPE_S3_ENDPOINT_URL": s3_endpoint, "MMPIPE_S3_BUCKET": f"ui-{db[-10:]}",
        "MMPIPE_S3_ACCESS_KEY_ID": "test", "MMPIPE_S3_SECRET_ACCESS_KEY": "test-secret",
        "MMPIPE_DATABASE_URL": pg_admin.url.set(database=db).render_as_string(hide_password=False),
        "MMPIPE_PSEUDONYM_SALT": "ui-test-salt-not-for-production", "MMPIPE_IMAGE_SIZE": "64",
        "MMPIPE_RETRAIN_SCHEDULE": "asset", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    mmpipe = [sys.executable, "-m", "mmpipe"]
    init = subprocess.run([*mmpipe, "init"], env=env, capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    from mmpipe.config import get_settings
    from mmpipe.store import open_store

    store = open_store(
        get_settings(
            **{k.removeprefix("MMPIPE_").lower(): v for k, v in env.items() if k.startswith("MMPIPE_")}
        )
    )
    for obj in generate(15, size=64, seed=5):
        store.put("training/" + obj.key, obj.body)

    port = free_port()
    out = home.parent / "mmpipe-ui.out"
    with out.open("w") as log:
        ui = subprocess.Popen([*mmpipe, "ui", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        printed = wait_for("`mmpipe ui` to print how to log in",
                           lambda: re.search(r"log in as 'admin' with password '([^']+)'", out.read_text()), 420)  # fmt: skip
        url = re.search(r"Airflow UI: (\S+)", out.read_text()).group(1)
        yield {"url": url, "password": printed.group(1), "env": ui_env(home, port, env), "out": out}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # mmpipe ui stops the Airflow processes it started
        ui.wait(120)
        with pg_admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


def test_servers_listen_on_loopback_only(stack):
    port = stack["url"].rsplit(":", 1)[1]
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert listening and all(line.split()[3].startswith("127.0.0.1:") for line in listening.splitlines())
    assert httpx.get(f"{stack['url']}/mmpipe/reports/mmpipe_ingest/x", timeout=30).status_code == 401


@pytest.fixture(scope="module")
def ingest_run(stack) -> str:
    """An ingest run, as the demo makes them, once the DAG processor has the DAGs (so its event is queued)."""
    api = Api(stack["url"], stack["password"])
    wait_for("the DAG processor to parse the DAGs",
             lambda: api.get("/dags?dag_id_pattern=mmpipe")["total_entries"] == len(list((ROOT / "dags").glob("*.py"))), 300)  # fmt: skip
    # New DAGs start paused, and Airflow queues no asset events for a paused DAG.
    api.client.patch("/dags/mmpipe_retrain", json={"is_paused": False}).raise_for_status()
    done = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "mmpipe_ingest"], env=stack["env"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = api.get("/dags/mmpipe_ingest/dagRuns")["dag_runs"]
    assert run["state"] == "success"
    return run["dag_run_id"]


@pytest.fixture
def page(stack) -> Iterator[Page]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)
        page.goto(stack["url"])
        page.locator("input[name=username]").fill("admin")
        page.locator("input[name=password]").fill(stack["password"])
        page.locator("button[type=submit]").click()
        page.wait_for_url(f"{stack['url']}/")
        yield page
        browser.close()


def test_an_ingest_run_shows_its_report_and_queues_retraining(stack, ingest_run, page):
    page.goto(f"{stack['url']}/dags/mmpipe_ingest/runs/{quote(ingest_run, safe='')}")
    page.get_by_role("link", name="Run report").click()
    frame = page.frame_locator("iframe[title='Run report']")
    assert frame.locator("h1").inner_text() == f"mmpipe_ingest run {ingest_run}"
    assert frame.get_by_text(re.compile(r"^(\d+) of \1 new objects accounted for")).is_visible()
    frame.get_by_role("link", name="Data Docs").wait_for()
    page.screenshot(path=ARTIFACTS / "run-report-tab.png")
    # Data-aware scheduling: ingest's curated-images event starts mmpipe_retrain.
    api = Api(stack["url"], stack["password"])

    def asset_triggered() -> list[dict]:
        return [
            r
            for r in api.get("/dags/mmpipe_retrain/dagRuns")["dag_runs"]
            if r["run_type"] == "asset_triggered"
        ]

    (run,) = wait_for("the scheduler to start mmpipe_retrain on the asset event", asset_triggered, 180)
    # It would hold mmpipe_retrain's one active run: out of the way of the next test's backfill.
    api.client.patch(
        f"/dags/mmpipe_retrain/dagRuns/{run['dag_run_id']}", json={"state": "failed"}
    ).raise_for_status()


def test_a_backfill_triggered_in_the_form_reaches_the_scheduler_with_its_params(stack, ingest_run, page):
    api = Api(stack["url"], stack["password"])
    params = api.get("/dags/mmpipe_retrain/details")["params"]
    defaults = {name: p["value"] for name, p in params.items()}
    chosen = non_default_params(params)
    run_id = f"ui_backfill__{uuid.uuid4().hex[:8]}"

    page.goto(f"{stack['url']}/dags/mmpipe_retrain")
    page.get_by_test_id("trigger-dag-button").click()
    form = page.get_by_role("dialog")
    form.locator("#element_backbones").fill("\n".join(chosen["backbones"]))
    epochs = form.locator("[id='number-input:element_epochs:inc']").get_attribute("aria-controls")
    form.locator(f"[id='{epochs}']").fill(str(chosen["epochs"]))
    form.locator("input[name=element_init]").locator("xpath=..").click()
    page.get_by_role("option", name=chosen["init"], exact=True).click()
    form.get_by_role("button", name="Advanced Options").click()
    form.locator("input[name=dagRunId]").fill(run_id)
    form.screenshot(path=ARTIFACTS / "retrain-trigger-form.png")
    form.get_by_test_id("trigger-dag-submit").click()

    def scheduled() -> dict | None:
        run = api.client.get(f"/dags/mmpipe_retrain/dagRuns/{run_id}")
        if run.status_code != 200 or run.json()["state"] == "queued":
            return None
        tis = api.get(f"/dags/mmpipe_retrain/dagRuns/{run_id}/taskInstances")["task_instances"]
        first = next(t for t in tis if t["task_id"] == "prepare_dataset")
        return run.json() if first["state"] else None

    run = wait_for("the scheduler to start the triggered run", scheduled, 300)
    page.goto(f"{stack['url']}/dags/mmpipe_retrain/runs/{quote(run_id, safe='')}")
    page.get_by_text(run_id).first.wait_for()
    page.screenshot(path=ARTIFACTS / "retrain-run.png")
    assert run["run_type"] == "manual" and run["triggered_by"] == "ui"
    changed = {k: v for k, v in run["conf"].items() if defaults.get(k) != v}
    assert changed == chosen  # exactly those Params, every other one at its default
    assert set(run["conf"]) == set(defaults)
