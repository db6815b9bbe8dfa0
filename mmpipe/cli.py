"""`mmpipe` command line: the same entry points Airflow tasks, training pods and people use.

Every user-fixable problem (unreachable store or DB, unknown backbone, missing salt, empty
bucket) ends as one line on stderr naming what to fix, exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpipe import tables
from mmpipe.errors import MmpipeError

log = logging.getLogger("mmpipe")
CLI_RUN_ID = f"cli__{time.strftime('%Y%m%dT%H%M%S')}"  # runs started by hand, named like Airflow's


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def cmd_init(args: argparse.Namespace) -> None:
    """Create the salt secret (if missing), the bucket and the catalog schema; refuse a changed salt."""
    from mmpipe import catalog
    from mmpipe.config import get_settings
    from mmpipe.errors import ConfigError
    from mmpipe.pseudonym import salt_problem
    from mmpipe.store import open_store

    settings = get_settings()
    salt_file = settings.salt_file
    created = settings.pseudonym_salt is None and not salt_file.exists()
    if created:
        salt_file.parent.mkdir(parents=True, exist_ok=True)
        salt_file.write_text(secrets.token_hex(32))
        salt_file.chmod(0o600)
    salt = settings.salt()
    if problem := salt_problem(salt):
        raise ConfigError(
            f"the pseudonymisation salt {problem}: set a random secret (`openssl rand -hex 32`)"
        )
    open_store(settings).ensure_bucket()
    db = catalog.open_catalog(settings)
    applied = catalog.upgrade(db)
    summary = {
        "bucket": settings.s3_bucket,
        "store": settings.s3_endpoint_url or "AWS S3",
        "migrations applied": ", ".join(applied) or "none (up to date)",
        "catalog version": catalog.current_version(db),
        "salt": _record_salt(db, salt, args.rotate_salt),
    }
    if created:
        summary["salt file"] = f"{salt_file} (created: keep it secret, back it up)"
    tables.show(summary, args.json, lambda s: tables.fields(s, "mmpipe init"))


def _record_salt(db: Any, salt: bytes, rotate_reason: str | None) -> str:
    """Record the salt's fingerprint on first use; refuse a different salt unless rotated on purpose."""
    from mmpipe.errors import ConfigError
    from mmpipe.pseudonym import salt_change, salt_fingerprint

    change = salt_change(db.scalar("SELECT fingerprint FROM pseudonym_salts WHERE status = 'active'"), salt)
    if change == "changed" and not rotate_reason:
        raise ConfigError(
            "the pseudonymisation salt differs from the one this catalog's pseudonyms were made with: "
            "restore it from your backup, or rotate on purpose with `mmpipe init --rotate-salt REASON` "
            "(docs/operations.md)"
        )
    if change != "same":
        row = {
            "fingerprint": salt_fingerprint(salt),
            "status": "active",
            "reason": rotate_reason or "first init",
        }
        with db.begin() as conn:
            conn.exec_driver_sql("UPDATE pseudonym_salts SET status = 'retired' WHERE status = 'active'")
            db.upsert("pseudonym_salts", [row], ["fingerprint"], conn=conn)
    return {"new": "recorded (first use)", "same": "matches the catalog", "changed": "rotated"}[change]


def cmd_store_serve(args: argparse.Namespace) -> None:
    from mmpipe import embedded
    from mmpipe.config import get_settings

    home = get_settings().home
    if args.stop:
        running = embedded.running(home / "store")
        if running:
            embedded.stop(running)
            print(f"stopped embedded store (pid {running.pid})")
        return
    server = embedded.serve(home, args.port)
    tables.show(
        {"endpoint": server.endpoint, "pid": server.pid, "data": str(server.data_dir)},
        args.json,
        lambda s: s["endpoint"],
    )
    if args.detach:
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while embedded.running(server.data_dir):
            time.sleep(1)
    finally:
        embedded.stop(server)


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    from mmpipe import catalog
    from mmpipe.config import get_settings

    db = catalog.open_catalog(get_settings())
    applied = catalog.upgrade(db)
    summary = {"catalog version": catalog.current_version(db), "applied now": ", ".join(applied) or "nothing"}
    tables.show(summary, args.json)


def cmd_synth(args: argparse.Namespace) -> None:
    """Generate a labelled corpus under training/ (or unlabelled archives under incoming/)."""
    from concurrent.futures import ThreadPoolExecutor

    from mmpipe.config import get_settings
    from mmpipe.store import open_store
    from mmpipe.synth import generate, unlabelled_key

    store = open_store(get_settings())
    store.check()
    prefix = args.prefix.rstrip("/") + "/"
    labelled = prefix.startswith("training/")
    objects = generate(
        args.images,
        size=args.size,
        seed=args.seed,
        archive_fraction=args.archive_fraction,
        difficulty=args.difficulty,
        header_faults=args.header_faults,
    )

    def put(obj: Any) -> str:
        # incoming/ mimics a hospital drop: no class folder, the label is what scoring must find.
        key = prefix + (obj.key if labelled else unlabelled_key(obj.key))
        return store.put(key, obj.body)

    with ThreadPoolExecutor(8) as pool:
        written = sum(1 for _ in pool.map(put, objects))
    summary = {"objects written": written, "images": args.images, "under": store.uri(prefix)}
    tables.show(summary, args.json, lambda s: tables.fields(s, "mmpipe synth"))


def cmd_ingest(args: argparse.Namespace) -> None:
    from mmpipe import pipeline

    report = pipeline.ingest_all(args.run_id, args.prefix, args.batch_size)
    report |= {"validation": pipeline.validate_ingest(args.run_id), "sweep": pipeline.ingest_sweep()}
    tables.show(report, args.json, lambda r: tables.fields(r, f"ingest run {args.run_id}"))


def cmd_quarantine_release(args: argparse.Namespace) -> None:
    """Re-queue quarantined objects after a fix: the next ingest over their prefix takes them again."""
    from mmpipe import ingest, pipeline

    _, _, catalog = pipeline.connect()
    tables.show(ingest.release_quarantine(catalog, args.reason, args.run), args.json, text=format_release)


def format_release(release: dict[str, Any]) -> str:
    header = f"{'quarantine reason':<30} {'objects':>8} {'members':>8}"
    lines = [header, "-" * len(header)]
    lines += [
        f"{reason:<30} {n['objects']:>8} {n['members']:>8}" for reason, n in release["by_reason"].items()
    ]
    lines.append(f"{'total':<30} {release['objects']:>8} {release['members']:>8}")
    if release["objects"]:
        lines.append(
            f"released as {release['release_id']}: the next ingest over their prefix processes them again"
        )
    else:
        lines.append(
            "nothing to release" + (f" from run {release['run_filter']}" if release["run_filter"] else "")
        )
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> None:
    """Validate an ingest run and show each rule's verdict; a failed batch still prints, then exits 2."""
    from mmpipe import dataset, pipeline

    try:
        summary, failure = dataset.validate_ingest(*pipeline.connect(), args.run_id), None
    except dataset.ValidationFailed as exc:
        summary, failure = exc.summary, exc
    if args.json:
        _print(summary)
    else:
        print(format_validation(summary))
    if failure:
        raise failure


def format_validation(summary: dict[str, Any]) -> str:
    """The rule table of a validation summary: what failed, how much, against which threshold."""
    if not summary.get("images"):
        return f"run {summary['run_id']}: no images to validate ({len(summary.get('readmitted', []))} re-admitted)"
    header = f"{'rule':<24} {'failing':>7} {'share':>7} {'threshold':>9}  {'verdict':<16} examples"
    lines = [header, "-" * len(header)]
    for r in summary["rules"]:
        share = f"{r['share']:.1%}" if r["share"] is not None else "-"
        threshold = f"{r['threshold']:.1%}" if r["threshold"] is not None else "-"
        row = f"{r['rule']:<24} {r['failing']:>7} {share:>7} {threshold:>9}  {r['verdict']:<16} "
        lines.append((row + ", ".join(r["examples"])).rstrip())
    verdict = "passed" if summary["success"] else "FAILED"
    lines.append(
        f"run {summary['run_id']} {verdict}: {summary['images']} images, {summary['images_active']} may train, "
        f"{summary['images_excluded']} excluded, {len(summary['readmitted'])} earlier exclusions re-admitted"
    )
    lines.append(f"Data Docs: {summary['docs_uri']}")
    return "\n".join(lines)


def cmd_dataset(args: argparse.Namespace) -> None:
    from mmpipe import dataset, pipeline

    if args.action == "freeze-test":
        tables.show(dataset.freeze_test(*pipeline.connect(), args.name, reason=args.reason), args.json)
    else:
        tables.show(pipeline.prepare_dataset(args.run_id, seed=args.seed, target=args.target), args.json)


def cmd_train(args: argparse.Namespace) -> None:
    from mmpipe import pipeline

    result = pipeline.train(args.plan, json.loads(args.candidate), args.run_id)
    if args.xcom_file:
        Path(args.xcom_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.xcom_file).write_text(json.dumps(result))
    print(json.dumps(result))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from mmpipe import pipeline

    _print(pipeline.evaluate_model(args.model_version, args.snapshot))


def cmd_promote(args: argparse.Namespace) -> None:
    """The gate over candidates, or a person's rollback / forced promotion (recorded with a reason)."""
    from mmpipe import pipeline
    from mmpipe.errors import ConfigError

    if args.rollback or args.force:
        if args.model_versions or (args.rollback and args.force):
            raise ConfigError("--rollback and --force take no candidates and exclude each other")
        if args.rollback:
            _print(pipeline.change_champion("rollback", args.run_id, args.to, reason=args.reason))
        else:
            _print(
                pipeline.change_champion("promote", args.run_id, args.force, force=True, reason=args.reason)
            )
        return
    if args.to:
        raise ConfigError("--to goes with --rollback")
    if not (args.model_versions and args.snapshot):
        raise ConfigError("name the candidate model versions and --snapshot (or use --rollback / --force)")
    _print(pipeline.promote_best(args.model_versions, args.snapshot, args.run_id))


def cmd_score(args: argparse.Namespace) -> None:
    from mmpipe import pipeline

    target = args.target or args.prefix
    if not target.startswith("s3://") and Path(target).exists():
        out = Path(args.out or "mmpipe-scores.csv")
        summary = pipeline.score_local(Path(target), out, args.model_version)
        title = f"scored {target} (nothing written to the store)"
    else:
        window = {"modified_from": args.modified_from, "modified_to": args.modified_to}
        summary = pipeline.score_all(args.run_id, target, args.model_version, force=args.force, **window)
        title = f"scoring run {args.run_id}"
    tables.show(summary, args.json, lambda s: format_fates(s, title))


def format_fates(summary: dict[str, Any], title: str) -> str:
    """The run's fates as a table (listed = the sum of the others), then its other fields."""
    fates = ("tagged", "unreadable", "unknown", "skipped", "failed", "not_reached")
    rows = [{"fate": f, "objects": summary[f]} for f in fates if f in summary]
    rows.append({"fate": "listed", "objects": summary["listed"]})
    rest = {k: v for k, v in summary.items() if k not in fates and k != "listed"}
    return tables.fields(rest, title) + "\n\n" + tables.table(rows, title="fates")


def cmd_weights(args: argparse.Namespace) -> None:
    from mmpipe import models, pipeline, weights
    from mmpipe.errors import ConfigError

    if args.action == "export-reference":
        models.export_reference_weights(args.backbone, Path(args.file))
        print(f"wrote seeded random-init reference weights for {args.backbone} to {args.file}")
        return
    if args.from_package and args.layout:
        raise ConfigError("--layout applies to a FILE; --from-package knows its package's layout")
    _, store, _ = pipeline.connect()
    if args.from_package:
        _print(weights.import_packaged(store, args.backbone))
    else:
        _print(weights.import_weights(store, args.backbone, Path(args.file), layout=args.layout))


def cmd_leaderboard(args: argparse.Namespace) -> None:
    from mmpipe import pipeline

    print(format_leaderboard(pipeline.leaderboard(args.limit)))


def format_leaderboard(rows: Sequence[dict[str, Any]]) -> str:
    """Candidates with the validation metric that chose among them, their test scores, and the two
    baselines (majority class, 16x16-thumbnail linear) on the same snapshot."""

    def num(value: Any, width: int) -> str:
        return f"{value:>{width}.3f}" if value is not None else f"{'n/a':>{width}}"

    header = (
        f"{'candidate':<18} {'backbone':<16} {'init':<10} {'snapshot':<10} {'val-F1':>6} {'accuracy':>8} "
        f"{'macro-F1':>8} {'AUC':>6} {'ECE':>6} {'majority':>8} {'thumb16':>7}  promoted"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        mark = "yes (champion)" if r["is_champion"] else "yes" if r["promoted"] else "no"
        lines.append(
            f"{r['candidate']:<18} {r['backbone']:<16} {r['init'] or 'n/a':<10} {r['test_snapshot']:<10} "
            f"{num(r['val_macro_f1'], 6)} {num(r['accuracy'], 8)} {num(r['macro_f1'], 8)} "
            f"{num(r['macro_auc'], 6)} {num(r['ece'], 6)} {num(r['majority_f1'], 8)} "
            f"{num(r['thumbnail_f1'], 7)}  {mark}"
        )
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> None:
    from mmpipe import bench

    options = {k: v for k, v in vars(args).items() if k in ("objects", "images", "epochs", "amp")}
    if args.what == "train":
        options["backbones"] = tuple(args.backbone or ())
    bench.run(args.what, **options)


def cmd_demo(args: argparse.Namespace) -> None:
    from mmpipe.demo import run_demo

    run_demo(profile=args.profile, difficulty=args.difficulty)


def cmd_dataset_lineage(args: argparse.Namespace) -> None:
    """Plan -> validations -> ingest runs -> source objects of one dataset version."""
    from mmpipe import dataset, pipeline

    _, store, catalog = pipeline.connect()
    tables.show(dataset.lineage(store, catalog, args.version), args.json)


def cmd_report(args: argparse.Namespace) -> None:
    """Write the run's HTML page to the store and a local copy (with the files it links) under home."""
    import webbrowser

    from mmpipe import pipeline, report

    settings, store, catalog = pipeline.connect()
    written = report.write_run_report(store, catalog, args.run_id, args.dag_id)
    local = report.mirror(store, written, settings.home)
    tables.show(
        {"store": written.uri, "file": str(local)}, args.json, lambda s: tables.fields(s, "run report")
    )
    if args.open:
        webbrowser.open(local.resolve().as_uri())


def cmd_ui(args: argparse.Namespace) -> None:
    from mmpipe import ui

    ui.run(port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--json", action="store_true", help="print results as JSON (any position)")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create salt, bucket and catalog schema; check the salt")
    init.add_argument(
        "--rotate-salt", metavar="REASON", help="accept a new pseudonymisation salt, recording why"
    )
    init.set_defaults(fn=cmd_init)
    store = sub.add_parser("store", help="the embedded S3 endpoint").add_subparsers(
        dest="action", required=True
    )
    serve = store.add_parser("serve", help="run SeaweedFS on 127.0.0.1 with data under MMPIPE_HOME/store")
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--detach", action="store_true", help="start in the background and return")
    serve.add_argument("--stop", action="store_true", help="stop a detached server")
    serve.set_defaults(fn=cmd_store_serve)
    db = sub.add_parser("db", help="catalog database").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply pending catalog migrations").set_defaults(fn=cmd_db_upgrade)

    synth = sub.add_parser("synth", help="generate synthetic labelled studies into the store")
    synth.add_argument("--images", type=int, default=300)
    synth.add_argument("--size", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--prefix", default="training/")
    synth.add_argument("--archive-fraction", type=float, default=0.1)
    synth.add_argument(
        "--difficulty", choices=("realistic", "hard"), default="realistic", help="see mmpipe.synth.generate"
    )
    synth.add_argument(
        "--header-faults",
        type=float,
        default=0.0,
        help="share of DICOM patients whose Modality/BodyPartExamined are missing or wrong",
    )
    synth.set_defaults(fn=cmd_synth)

    ing = sub.add_parser("ingest", help="ingest new objects under a prefix")
    ing.add_argument("--prefix", default="training/")
    ing.add_argument("--run-id", default=CLI_RUN_ID)
    ing.add_argument("--batch-size", type=int, default=200)
    ing.set_defaults(fn=cmd_ingest)

    quarantine = sub.add_parser("quarantine", help="quarantined objects").add_subparsers(
        dest="action", required=True
    )
    release = quarantine.add_parser("release", help="re-queue quarantined objects after a fix")
    release.add_argument("--reason", required=True, help="what was fixed (recorded with the release)")
    release.add_argument("--run", help="only what this ingest run quarantined")
    release.set_defaults(fn=cmd_quarantine_release)

    val = sub.add_parser("validate", help="run the GX batch suite over an ingest run")
    val.add_argument("--run-id", required=True)
    # SUPPRESS: a global --json (if the parser has one) is not reset by this subcommand's default
    val.set_defaults(fn=cmd_validate)

    ds = sub.add_parser("dataset", help="splits, frozen test snapshots and training plans")
    ds_sub = ds.add_subparsers(dest="action", required=True)
    freeze = ds_sub.add_parser("freeze-test", help="freeze today's test split as a named snapshot")
    freeze.add_argument("name")
    freeze.add_argument("--reason", default="frozen by hand")
    freeze.set_defaults(fn=cmd_dataset)
    plan = ds_sub.add_parser("plan", help="record splits, validate and write a training plan")
    plan.add_argument("--run-id", default=CLI_RUN_ID)
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--target", default="median")
    plan.set_defaults(fn=cmd_dataset)

    tr = sub.add_parser("train", help="train one candidate from a plan (what the pod runs)")
    tr.add_argument("--plan", required=True, help="s3:// URI of the training plan")
    tr.add_argument("--candidate", required=True, help="candidate JSON")
    tr.add_argument("--run-id", required=True)
    tr.add_argument("--xcom-file", help="also write the result JSON here")
    tr.set_defaults(fn=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a model on a frozen test snapshot")
    ev.add_argument("--model-version", required=True)
    ev.add_argument("--snapshot", required=True)
    ev.set_defaults(fn=cmd_evaluate)

    pr = sub.add_parser(
        "promote",
        help="gate the best candidate (chosen on validation) against the champion; or roll back / force",
    )
    pr.add_argument("model_versions", nargs="*", help="candidate model versions (the gate path)")
    pr.add_argument("--snapshot", help="frozen test snapshot the gate judges on")
    pr.add_argument("--run-id", default=CLI_RUN_ID)
    pr.add_argument("--rollback", action="store_true", help="give the champion back to the one it replaced")
    pr.add_argument("--to", metavar="VERSION", help="with --rollback: the former champion to go back to")
    pr.add_argument("--force", metavar="MODEL_VERSION", help="make this model champion without the gate")
    pr.add_argument("--reason", help="why (required with --force; recorded in the alias history)")
    pr.set_defaults(fn=cmd_promote)

    sc = sub.add_parser("score", help="score incoming objects with the champion and tag them")
    sc.add_argument(
        "target",
        nargs="?",
        help="a store prefix (default incoming/), an s3:// URI, or a local file or folder (writes --out, "
        "changes nothing in the store)",
    )
    sc.add_argument("--prefix", default="incoming/", help="store prefix when no TARGET is given")
    sc.add_argument("--model-version", default="", help="model to score with (default: the champion)")
    sc.add_argument("--modified-from", default="", help="only objects modified at or after (ISO time)")
    sc.add_argument("--modified-to", default="", help="only objects modified before (ISO time)")
    sc.add_argument("--force", action="store_true", help="rescore objects this model already scored")
    sc.add_argument("--out", help="local TARGET: results file, .csv (default mmpipe-scores.csv) or .json")
    sc.add_argument("--run-id", default=CLI_RUN_ID)
    sc.set_defaults(fn=cmd_score)

    wt = sub.add_parser("weights", help="the pretrained-weights registry").add_subparsers(
        dest="action", required=True
    )
    imp = wt.add_parser("import", help="verify (strictly) and register a local or packaged weights file")
    imp.add_argument("backbone")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help=".safetensors or .pth/.pt/.bin state dict")
    source.add_argument("--from-package", action="store_true", help="the file an installed package ships")
    imp.add_argument(
        "--layout", help="key layout of FILE: native, torchvision or efficientnet_pytorch (default: detected)"
    )
    imp.set_defaults(fn=cmd_weights)
    ref = wt.add_parser(
        "export-reference", help="write seeded random-init weights (to exercise the import path)"
    )
    ref.add_argument("backbone")
    ref.add_argument("file")
    ref.set_defaults(fn=cmd_weights, from_package=False, layout=None)

    lb = sub.add_parser("leaderboard", help="evaluations, newest first")
    lb.add_argument("--limit", type=int, default=20)
    lb.set_defaults(fn=cmd_leaderboard)

    lineage = ds_sub.add_parser("lineage", help="validations, ingest runs and source objects behind a plan")
    lineage.add_argument("version", help="dataset version (the plan's hash)")
    lineage.set_defaults(fn=cmd_dataset_lineage)

    bench = sub.add_parser("bench", help="benchmarks that print their figures (not timed tests)")
    kinds = bench.add_subparsers(dest="what", required=True)
    kinds.add_parser("ingest", help="ingest vs a naive loop").add_argument(
        "--objects", type=int, default=2000
    )
    kinds.add_parser("score", help="scoring vs the bare forward pass and a naive loop").add_argument(
        "--objects", type=int, default=2000, help="enough that a run's ~0.5 s start-up is a small part"
    )
    bench_train = kinds.add_parser(
        "train", help="mmpipe train's data path vs a bare loop, per demo candidate"
    )
    bench_train.add_argument("--images", type=int, default=200, help="synthetic images planned")
    bench_train.add_argument(
        "--epochs", type=int, default=8, help="epochs timed per side (their pairs' median ratio is reported)"
    )
    bench_train.add_argument("--amp", action="store_true", help="also measure under bf16 autocast")
    bench_train.add_argument(
        "--backbone", action="append", help="only the demo's candidates of this backbone"
    )
    kinds.add_parser("synth", help="thumbnail baselines per synthetic difficulty").add_argument(
        "--images", type=int, default=600, help="images per difficulty"
    )
    bench.set_defaults(fn=cmd_bench)

    rep = sub.add_parser("report", help="one readable HTML page for a DAG run (ingest, retrain, score)")
    rep.add_argument("run_id")
    rep.add_argument("--dag-id", help="the DAG the run belongs to (shown in the title)")
    rep.add_argument("--open", action="store_true", help="open the local copy in a browser")
    rep.set_defaults(fn=cmd_report)

    ui_cmd = sub.add_parser("ui", help="the Airflow UI on the demo's Airflow home (127.0.0.1)")
    ui_cmd.add_argument("--port", type=int, default=8080)
    ui_cmd.set_defaults(fn=cmd_ui)

    demo = sub.add_parser("demo", help="the whole nightly loop on synthetic studies")
    demo.add_argument("--profile", choices=("demo", "full"), default="demo")
    demo.add_argument(
        "--difficulty", choices=("realistic", "hard"), default=None, help="synthetic studies (default: hard)"
    )
    demo.set_defaults(fn=cmd_demo)
    return parser


def _argv(argv: Sequence[str] | None) -> list[str]:
    """``--json`` is global but may be typed after the command too: move it before the command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" in args:
        args.remove("--json")
        args.insert(0, "--json")
    return args


def _start_recorded_store(args: argparse.Namespace) -> None:
    """After `make demo`, the checkout's commands use the embedded store it recorded: start it if down."""
    from mmpipe import embedded
    from mmpipe.config import get_settings

    settings = get_settings()
    if args.command not in ("store", "demo") and embedded.is_recorded(
        settings.home, settings.s3_endpoint_url
    ):
        embedded.serve(settings.home)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_argv(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        _start_recorded_store(args)
        args.fn(args)
    except MmpipeError as exc:
        print(f"mmpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
