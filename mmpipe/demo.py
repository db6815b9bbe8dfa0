"""`mmpipe demo`: the whole nightly loop on synthetic studies, through real Airflow DAG runs.

Starts the embedded store (unless ``MMPIPE_S3_ENDPOINT_URL`` points elsewhere), creates the bucket,
salt and schema, imports the packaged pretrained weights, generates labelled studies into
``training/`` and unlabelled ones into ``incoming/`` (the hard difficulty by default: see
:func:`mmpipe.synth.generate`), runs ``mmpipe_ingest``, ``mmpipe_retrain`` and ``mmpipe_score`` with
``airflow dags test``, then prints the leaderboard and tags read back from the store.
Airflow is driven as a subprocess: mmpipe itself never imports airflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mmpipe import embedded
from mmpipe.config import get_settings, record_settings
from mmpipe.errors import MmpipeError
from mmpipe.synth import generate, unlabelled_key

REPO = Path(__file__).resolve().parents[1]
INCOMING_SEED = 7
INCOMING_ARCHIVES = 0.5


@dataclass(frozen=True)
class Profile:
    train_images: int
    incoming_images: int
    canonical_size: int
    retrain_conf: dict
    difficulty: str = "hard"  # on "realistic", 16x16 thumbnails classify nearly as well as a CNN
    header_faults: float = 0.2  # share of DICOM patients with missing or wrong Modality/BodyPart
    pretrained: tuple[str, ...] = ("efficientnet_lite0",)  # weights imported from their package


# The papers' question, "does pretraining help?": the same network, each init with the recipe it needs.
LITE0_TWINS = [
    # The papers' fine-tuning recipe; stage 2 starts after 2 epochs without a lower validation loss
    # and stops after 5, as the demo's small validation split makes single epochs noisy (with 1 and 3,
    # one noisy epoch ended a run at its first epoch's state: 0.822 test macro-F1).
    {"backbone": "efficientnet_lite0", "init": "pretrained", "plateau_patience": 2, "patience": 5},
    # From random weights nothing is frozen, so stage 2 would only drop the rate to 1e-4 at the first
    # noisy plateau: one stage instead, AdamW at 3e-3 with weight decay, annealed (cosine) to the end.
    {
        "backbone": "efficientnet_lite0",
        "init": "random",
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "lr": 3e-3,
        "scheduler": "cosine",
        "plateau_patience": 500,  # the most epochs a candidate may have: never a second stage
    },
]
DEMO_MIN_CLASS_RECALL = 0.7
TARGET_F1 = 0.9  # what every demo candidate should reach (issue 8); the demo says whether it did

PROFILES = {
    # ~7-10 minutes on 2 idle CPU cores: 800 images generated at 128 px and curated at 64 px, where the
    # hard set's fine structure survives (its 16x16 thumbnails lose the class) and Lite0 trains an
    # epoch in seconds; 10 epochs each (the twins' recipes above).
    "demo": Profile(800, 60, 64, {"candidates": LITE0_TWINS, "epochs": 10, "image_size": 64}),
    # The paper's setting, for a GPU machine: more data, full-size inputs, more backbones (from random
    # weights unless their ImageNet weights were imported: `mmpipe weights import BACKBONE FILE`).
    "full": Profile(
        6000,
        600,
        256,
        {
            "candidates": LITE0_TWINS
            + [
                {"backbone": b, "init": "random"}
                for b in ("resnet18", "vgg16", "googlenet", "mobilenetv2", "inceptionv3", "efficientnet_b0")
            ],
            "epochs": 30,
            "image_size": 224,
        },
    ),
}


def airflow_env(home: Path, base: dict[str, str]) -> dict[str, str]:
    """Environment for an embedded Airflow: SQLite metadata under ``home``, our dags and plugins."""
    return base | {
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "plugins"), base.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }


def _run(cmd: list[str], env: dict[str, str], log_file: Path, what: str) -> None:
    started = time.monotonic()
    print(f"==> {what}", flush=True)
    with log_file.open("ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        raise MmpipeError(f"{what} failed (exit {code}); last lines of {log_file}:\n" + "\n".join(tail))
    print(f"    done in {time.monotonic() - started:.0f}s", flush=True)


def _dag_state(dag_id: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "list-runs", dag_id, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    listing = [line for line in out.splitlines() if line.startswith(("[{", "[]"))]
    runs = json.loads(listing[-1]) if listing else []
    return runs[0]["state"] if runs else "missing"


def synth_args(spec: Profile) -> list[str]:
    return ["--difficulty", spec.difficulty, "--header-faults", str(spec.header_faults)]


def run_demo(profile: str = "demo", difficulty: str | None = None) -> None:
    spec = PROFILES[profile]
    if difficulty is not None:
        spec = replace(spec, difficulty=difficulty)
    env = dict(os.environ)
    settings = get_settings()
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    log_file = home / "demo.log"
    env.setdefault("MMPIPE_IMAGE_SIZE", str(spec.canonical_size))
    # The demo's frozen test split holds about ten images of its smaller classes, so one image moves a
    # class's recall by ~0.1: the gate's absolute floor sits one image below the production default.
    env.setdefault("MMPIPE_PROMOTION_MIN_CLASS_RECALL", str(DEMO_MIN_CLASS_RECALL))
    env.setdefault("MMPIPE_HOME", str(home))
    # Later commands in this checkout read the curated size from the home's record (no exports).
    record_settings(home, image_size=int(env["MMPIPE_IMAGE_SIZE"]))
    server = None
    if not settings.s3_endpoint_url or embedded.is_recorded(home, settings.s3_endpoint_url):
        server = embedded.serve(home)
        env |= {"MMPIPE_S3_ENDPOINT_URL": server.endpoint}
        env |= {
            f"MMPIPE_{k.upper()}": v for k, v in embedded.KEYS.items() if f"MMPIPE_{k.upper()}" not in env
        }
        print(f"embedded store (SeaweedFS) at {server.endpoint}, data in {home / 'store'}")
    env = airflow_env(home, env)
    mmpipe = [sys.executable, "-m", "mmpipe"]
    started = time.monotonic()
    _run([*mmpipe, "init"], env, log_file, "init: salt, bucket, catalog schema")
    for backbone in spec.pretrained:
        _run(
            [*mmpipe, "weights", "import", backbone, "--from-package"],
            env,
            log_file,
            f"weights: ImageNet {backbone} from its package, checked strictly",
        )
    _run(
        [
            *mmpipe,
            "synth",
            "--images",
            str(spec.train_images),
            "--size",
            str(max(128, spec.canonical_size)),
            *synth_args(spec),
        ],
        env,
        log_file,
        f"synth: {spec.train_images} labelled images ({spec.difficulty}) into training/",
    )
    _run(
        [
            *mmpipe,
            "synth",
            "--images",
            str(spec.incoming_images),
            "--seed",
            str(INCOMING_SEED),
            "--prefix",
            "incoming/",
            "--archive-fraction",
            str(INCOMING_ARCHIVES),
            *synth_args(spec),
        ],
        env,
        log_file,
        f"synth: {spec.incoming_images} unlabelled images into incoming/",
    )
    _run([sys.executable, "-m", "airflow", "db", "migrate"], env, log_file, "airflow: metadata database")
    airflow_test = [sys.executable, "-m", "airflow", "dags", "test"]
    _run([*airflow_test, "mmpipe_ingest"], env, log_file, "DAG mmpipe_ingest")
    _run(
        [*airflow_test, "mmpipe_retrain", "-c", json.dumps(spec.retrain_conf)],
        env,
        log_file,
        "DAG mmpipe_retrain",
    )
    _run([*airflow_test, "mmpipe_score"], env, log_file, "DAG mmpipe_score")
    states = {d: _dag_state(d, env) for d in ("mmpipe_ingest", "mmpipe_retrain", "mmpipe_score")}
    show_results(env, states, time.monotonic() - started, spec)
    print("\neach run's page: `mmpipe report RUN_ID --open`; the Airflow UI with the runs: `make ui`")
    if server is not None:
        print(f"(embedded store left running at {server.endpoint}; stop it with `mmpipe store serve --stop`)")
    if any(state != "success" for state in states.values()):
        raise MmpipeError(f"a DAG run did not succeed: {states}; see {log_file}")


def pretraining_verdict(board: list[dict]) -> str:
    """Whether the last retrain's candidates reached the target and pretraining beat random weights."""
    latest = [r for r in board if r["airflow_run_id"] == board[0]["airflow_run_id"]] if board else []
    short = [f"{r['candidate']} {r['macro_f1']:.3f}" for r in latest if (r["macro_f1"] or 0) < TARGET_F1]
    lines = [f"candidates below {TARGET_F1} test macro-F1: {', '.join(short) or 'none'}"]
    by_init = {(r["backbone"], r["init"]): r["macro_f1"] or 0 for r in latest}
    for (backbone, init), f1 in sorted(by_init.items()):
        if init == "pretrained" and (backbone, "random") in by_init:
            twin = by_init[backbone, "random"]
            verdict = "helps" if f1 >= twin else "does not help"
            lines.append(f"pretraining {verdict} {backbone}: {f1:.3f} pretrained vs {twin:.3f} random")
    return "\n".join(lines)


def show_results(env: dict[str, str], states: dict[str, str], seconds: float, spec: Profile) -> None:
    from mmpipe import pipeline
    from mmpipe.cli import format_leaderboard

    os.environ.update({k: v for k, v in env.items() if k.startswith("MMPIPE_")})
    settings, store, catalog = pipeline.connect()
    print(f"\nDAG runs: {', '.join(f'{d}={s}' for d, s in states.items())}  ({seconds:.0f}s in all)\n")
    board = pipeline.leaderboard(10)
    print(format_leaderboard(board))
    print("\n" + pretraining_verdict(board))
    decision = catalog.query(
        "SELECT decision, challenger, reason FROM promotions ORDER BY created_at DESC LIMIT 1"
    )
    if decision:
        print(f"\npromotion: {decision[0]['decision']} {decision[0]['challenger']} ({decision[0]['reason']})")
    # The demo knows what it generated, so it can say how the tags compare with the truth.
    truth = {
        "incoming/" + unlabelled_key(o.key): o.label
        for o in generate(
            spec.incoming_images,
            size=128,
            seed=INCOMING_SEED,
            archive_fraction=INCOMING_ARCHIVES,
            difficulty=spec.difficulty,
            header_faults=spec.header_faults,
        )
    }
    tagged = {o.key: store.get_tags(o.key) for o in store.list("incoming/")}
    right = sum(tags.get("mmpipe-modality") == truth.get(key) for key, tags in tagged.items())
    print(
        f"\ntags written back to incoming/: {right}/{len(tagged)} objects tagged with their true modality; sample:"
    )
    for key, tags in list(tagged.items())[:8]:
        shown = " ".join(
            f"{k.removeprefix('mmpipe-')}={v}" for k, v in sorted(tags.items()) if k != "mmpipe-model"
        )
        print(f"  {key:<40} {shown}  (truth: {truth.get(key, '?')})")
    counts = catalog.query(
        "SELECT (SELECT count(*) FROM images WHERE status = 'active') AS images, "
        "(SELECT count(*) FROM quarantine) AS quarantined, (SELECT count(*) FROM predictions) AS predictions"
    )[0]
    print(
        f"\ncatalog: {counts['images']} curated images, {counts['quarantined']} quarantined, "
        f"{counts['predictions']} predictions; database {settings.db_url.split('@')[-1]}"
    )
