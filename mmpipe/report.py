"""One readable HTML page per DAG run: what the run did, what it decided and why.

Everything comes from what the catalog and the store already hold for the run id: ingest
accounting, quarantine reasons and validations (with their Data Docs); training runs, epochs,
evaluations, plots and the promotion decision; scoring counts by fate and review reasons. The page
is self-contained (inline CSS, plots as data URIs) and stored at ``reports/runs/<run>.html``.

Rendering is generic on purpose, because other stages keep adding to what they record: every column
of a row is shown, JSON columns and JSON reports become nested tables, PNGs named anywhere in a
report are embedded, any other catalog table with a run column gets its own section, and a section
whose data is absent is skipped. Links to other store objects (Data Docs) are relative to the page's
key, so they work wherever the store's ``reports/`` tree is served or mirrored.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mmpipe import tables
from mmpipe.catalog import Catalog
from mmpipe.errors import MmpipeError
from mmpipe.ingest import run_slug
from mmpipe.store import Store, split_uri

PAGE_PREFIX = "reports/runs/"
RUN_COLUMNS = ("run_id", "airflow_run_id", "ingest_run_id")
ROW_LIMIT = 50
#: Tables the named sections show; every other table with a run column lands in "Other records".
SHOWN = {
    "ingest_runs", "source_objects", "quarantine", "images", "duplicates", "validations",
    "training_runs", "promotions", "predictions", "score_failures", "evaluations", "dataset_versions",
    "score_runs", "scored_objects",
}  # fmt: skip
SCORE_FATES = ("tagged", "unreadable", "unknown", "skipped", "failed", "not_reached")
#: Columns whose values say what became of a scored object, grouped into counts when present.
FATE_COLUMNS = ("fate", "predicted", "needs_review", "review_reason", "review_reasons")


def page_key(run_id: str) -> str:
    return f"{PAGE_PREFIX}{run_slug(run_id)}.html"


@dataclass
class RunData:
    """What the catalog and the store hold for one run: rows per table, JSON reports, PNGs by URI."""

    run_id: str
    bucket: str
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    documents: dict[str, Any] = field(default_factory=dict)  # store URI -> parsed JSON report
    images: dict[str, bytes] = field(default_factory=dict)  # store URI -> PNG bytes
    curves: bytes | None = None  # training curves PNG
    tasks: dict[str, Any] = field(default_factory=dict)  # Airflow task id -> state, when known


@dataclass(frozen=True)
class Written:
    uri: str
    key: str
    links: tuple[str, ...]  # store keys the page links to


# --- gathering: thin I/O over the catalog and the store ----------------------------------------


def run_tables(catalog: Catalog) -> dict[str, list[str]]:
    """Every catalog table with its columns, read from the database itself (new tables included)."""
    inspector = sa.inspect(catalog.engine)
    return {t: [c["name"] for c in inspector.get_columns(t)] for t in inspector.get_table_names()}


def gather(store: Store, catalog: Catalog, run_id: str) -> RunData:
    data = RunData(run_id, store.bucket)
    schema = run_tables(catalog)

    def rows(table: str, where: str, limit: int | None = ROW_LIMIT, **params: Any) -> list[dict[str, Any]]:
        if table not in schema:
            return []
        cut = f" LIMIT {limit}" if limit else ""
        return catalog.query(f"SELECT * FROM {table} WHERE {where}{cut}", **params)

    def count_by(table: str, cols: Sequence[str], where: str, **params: Any) -> list[dict[str, Any]]:
        present = [c for c in cols if c in schema.get(table, ())]
        if not present:
            return []
        group = ", ".join(present)
        return catalog.query(
            f"SELECT {group}, count(*) AS n FROM {table} WHERE {where} GROUP BY {group} ORDER BY n DESC",
            **params,
        )

    r = {"r": run_id}
    data.rows["ingest_runs"] = rows("ingest_runs", "run_id = :r", **r)
    # Validation subjects name what was validated: "ingest:<run>", "dataset:<run>".
    tail = "substr(subject, length(subject) - :n + 1) = :r ORDER BY created_at"
    found = rows("validations", tail, None, n=len(run_id), **r)
    data.rows["validations"] = [v for v in found if v["subject"].split(":", 1)[-1] == run_id]
    if data.rows["ingest_runs"]:
        data.rows["quarantine"] = rows("quarantine", "run_id = :r ORDER BY reason, source_key", **r)
        data.counts["quarantine"] = count_by("quarantine", ["reason"], "run_id = :r", **r)
        data.counts["source_objects"] = count_by("source_objects", ["status"], "run_id = :r", **r)
        data.counts["images"] = count_by(
            "images", ["status", "status_reason", "label"], "ingest_run_id = :r", **r
        )
    data.rows["training_runs"] = rows("training_runs", "airflow_run_id = :r ORDER BY candidate", None, **r)
    data.rows["promotions"] = rows("promotions", "airflow_run_id = :r", **r)
    if data.rows["training_runs"]:
        versions = [t["model_version"] for t in data.rows["training_runs"] if t.get("model_version")]
        data.rows["evaluations"] = catalog.query_in(
            "SELECT t.candidate, t.backbone, e.* FROM evaluations e "
            "JOIN models m ON m.model_version = e.model_version "
            "JOIN training_runs t ON t.training_run_id = m.training_run_id "
            "WHERE e.model_version IN ({in}) ORDER BY e.macro_f1 DESC",
            versions,
        )
        dataset_versions = sorted({t["dataset_version"] for t in data.rows["training_runs"]})
        data.rows["dataset_versions"] = catalog.query_in(
            "SELECT * FROM dataset_versions WHERE dataset_version IN ({in})", dataset_versions
        )
        data.curves = training_curves(
            catalog.query_in(
                "SELECT t.candidate, e.* FROM epoch_metrics e JOIN training_runs t "
                "ON t.training_run_id = e.training_run_id WHERE e.training_run_id IN ({in}) "
                "ORDER BY t.candidate, e.epoch",
                [t["training_run_id"] for t in data.rows["training_runs"]],
            )
        )
    data.rows["score_runs"] = rows("score_runs", "run_id = :r", **r)
    if data.rows["score_runs"]:
        data.counts["scored_objects"] = count_by("scored_objects", ["fate", "reason"], "run_id = :r", **r)
    data.counts["predictions"] = count_by("predictions", FATE_COLUMNS, "run_id = :r", **r)
    data.counts["score_failures"] = count_by("score_failures", ["reason"], "run_id = :r", **r)
    if data.counts["predictions"] or data.counts["score_failures"]:
        review = "run_id = :r AND needs_review = :yes ORDER BY confidence"
        data.rows["predictions"] = rows("predictions", review, yes=True, **r)
        data.rows["score_failures"] = rows("score_failures", "run_id = :r ORDER BY reason, source_key", **r)
    for table, cols in schema.items():
        if table in SHOWN or table in data.rows:
            continue
        for col in RUN_COLUMNS:
            if col in cols and (found := rows(table, f"{col} = :r", **r)):
                data.rows[table] = found
                break
    _fetch_documents(store, data)
    return data


def _fetch_documents(store: Store, data: RunData) -> None:
    """The JSON reports the run's rows name in a ``report_uri`` column, and every PNG those name."""
    named = [row.get("report_uri") for rows in data.rows.values() for row in rows]
    for uri in _uris(named, ".json"):
        try:
            data.documents[uri] = store.get_json(store.key_of(uri))
        except MmpipeError:
            data.documents[uri] = {"unavailable": f"{uri} could not be read"}
    for uri in [u for doc in data.documents.values() for u in _uris(_walk(doc), ".png")]:
        try:
            data.images[uri] = store.get(store.key_of(uri))
        except MmpipeError:
            continue


def _walk(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [x for v in value.values() for x in _walk(v)]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _walk(v)]
    return [value]


def _uris(values: Any, suffix: str) -> list[str]:
    return [v for v in values if isinstance(v, str) and v.startswith("s3://") and v.endswith(suffix)]


def training_curves(epochs: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Validation macro-F1 and losses per epoch, one line per candidate."""
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name in dict.fromkeys(e["candidate"] for e in epochs):
        mine = [e for e in epochs if e["candidate"] == name]
        x = [e["epoch"] for e in mine]
        ax1.plot(x, [e["val_macro_f1"] for e in mine], "o-", label=name)
        ax2.plot(x, [e["train_loss"] for e in mine], "-", label=f"{name} train")
        ax2.plot(x, [e["val_loss"] for e in mine], "--", label=f"{name} val")
    ax1.set(title="validation macro-F1", xlabel="epoch", ylim=(0, 1.02))
    ax2.set(title="loss", xlabel="epoch")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


# --- rendering: pure functions from RunData to HTML ---------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #d8dce3}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#5b6475}
table{border-collapse:collapse;background:#fff;margin:4px 0 12px;font-size:13px}
th,td{border:1px solid #d8dce3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.summary li{margin:2px 0}.ok{color:#17702f;font-weight:600}.bad{color:#b3261e;font-weight:600}
img{max-width:100%;background:#fff;border:1px solid #d8dce3}summary{cursor:pointer;color:#1a56c4}.more{color:#5b6475;font-style:italic}
"""


@dataclass
class Page:
    """Rendering context: where the page lives (for relative links) and what it has linked."""

    key: str
    bucket: str
    links: list[str] = field(default_factory=list)

    def href(self, uri: str) -> str | None:
        bucket, key = split_uri(uri)
        if bucket != self.bucket:
            return None
        self.links.append(key)
        return posixpath.relpath(key, posixpath.dirname(self.key))


def esc(value: Any) -> str:
    return html.escape(tables.cell(value))


def _parsed(value: Any) -> Any:
    """JSON text (``*_json`` columns) as the structure it holds; anything else unchanged."""
    if isinstance(value, str) and value[:1] in "[{":
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def _grid(value: Any) -> bool:
    """A list of equal-length lists of numbers (a confusion matrix)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(r, list) and len(r) == len(value[0]) for r in value)
        and all(isinstance(x, int | float) for r in value for x in r)
    )


def value_html(value: Any, page: Page) -> str:
    """Any value: nested structures as tables (a mapping of mappings as one table), store URIs as links."""
    value = _parsed(value)
    if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
        return table_html([{"": k, **v} for k, v in value.items()], page)
    if isinstance(value, Mapping):
        return fields_html(value, page) if value else ""
    if tables.is_table(value):
        return table_html(value, page)
    if _grid(value):
        return (
            "<table>"
            + "".join("<tr>" + "".join(_cell(x, page) for x in r) + "</tr>" for r in value)
            + "</table>"
        )
    if isinstance(value, list | tuple):
        return ", ".join(value_html(v, page) for v in value)
    if isinstance(value, str) and value.startswith("s3://") and (target := page.href(value)):
        return f'<a href="{html.escape(target)}">{html.escape(value)}</a>'
    return esc(value)


def _cell(value: Any, page: Page, fold: bool = False) -> str:
    """One cell; with ``fold``, a nested structure stays folded until clicked, so row tables stay short."""
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric:
        return f'<td class="num">{esc(value)}</td>'
    inner, nested = value_html(value, page), isinstance(_parsed(value), Mapping | list | tuple)
    return (
        f"<td><details><summary>show</summary>{inner}</details></td>"
        if fold and nested and inner
        else f"<td>{inner}</td>"
    )


def table_html(rows: Sequence[Mapping[str, Any]], page: Page, cols: Sequence[str] | None = None) -> str:
    cols = list(cols or tables.columns(rows))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(_cell(row.get(c), page, fold=True) for c in cols) + "</tr>" for row in rows
    )
    more = f'<p class="more">first {ROW_LIMIT} rows shown</p>' if len(rows) == ROW_LIMIT else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def fields_html(mapping: Mapping[str, Any], page: Page) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th>{_cell(v, page)}</tr>" for k, v in mapping.items())
    return f"<table>{body}</table>"


def image_html(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


Block = tuple[str, str]  # (heading, HTML)


def ingest_section(data: RunData, page: Page) -> list[Block]:
    if not data.rows.get("ingest_runs"):
        return []
    run = data.rows["ingest_runs"][0]
    blocks: list[Block] = [("Accounting", fields_html(run, page))]
    report = data.documents.get(run.get("report_uri") or "")
    if isinstance(report, Mapping):
        new, accounted = report.get("new_objects"), report.get("accounted")
        if new is not None and accounted is not None:
            ok = new == accounted
            verdict = (
                f'<p class="{"ok" if ok else "bad"}">{accounted} of {new} new objects accounted for '
                f"(ingested, duplicate or quarantined){'' if ok else ': some are missing'}</p>"
            )
            blocks.append(("Every object accounted for?", verdict))
        blocks.append(("Run report", fields_html(report, page)))
    blocks += _counted(data, page, "source_objects", "Source objects by status")
    blocks += _counted(data, page, "quarantine", "Quarantine by reason")
    if data.rows.get("quarantine"):
        cols = [c for c in ("source_key", "member_path", "reason", "detail", "record_uri")]
        blocks.append(("Quarantined objects", table_html(data.rows["quarantine"], page, cols)))
    blocks += _counted(data, page, "images", "Images by status and label")
    return blocks


def validation_html(row: Mapping[str, Any], page: Page) -> str:
    ok = bool(row.get("success"))
    verdict = f'<p class="{"ok" if ok else "bad"}">{"passed" if ok else "failed"}'
    if row.get("docs_uri") and (target := page.href(row["docs_uri"])):
        verdict += f' — <a href="{html.escape(target)}">Data Docs</a>'
    return verdict + "</p>" + fields_html(row, page)


def retrain_section(data: RunData, page: Page) -> list[Block]:
    blocks: list[Block] = []
    for p in data.rows.get("promotions", []):
        ok = p.get("decision") == "promoted"
        verdict = f'<p class="{"ok" if ok else "bad"}">{esc(p.get("decision"))}: {esc(p.get("reason"))}</p>'
        blocks.append(("Promotion decision", verdict + fields_html(p, page)))
    if data.rows.get("evaluations"):
        blocks.append(("Leaderboard (frozen test snapshot)", table_html(data.rows["evaluations"], page)))
    if data.curves:
        blocks.append(("Training curves", image_html(data.curves, "training curves")))
    if data.rows.get("training_runs"):
        blocks.append(("Training runs", table_html(data.rows["training_runs"], page)))
    for e in data.rows.get("evaluations", []):
        report = data.documents.get(e.get("report_uri") or "")
        if isinstance(report, Mapping):
            pngs = "".join(
                image_html(data.images[u], u) for u in _uris(_walk(report), ".png") if u in data.images
            )
            blocks.append(
                (f"Evaluation of {e['candidate']} ({e['model_version']})", pngs + fields_html(report, page))
            )
    if data.rows.get("dataset_versions"):
        blocks.append(("Dataset", table_html(data.rows["dataset_versions"], page)))
    return blocks


def validation_section(data: RunData, page: Page) -> list[Block]:
    return [
        (f"{v['suite']} suite ({v['subject']})", validation_html(v, page)) for v in data.rows["validations"]
    ]


def score_section(data: RunData, page: Page) -> list[Block]:
    blocks = []
    for run in data.rows.get("score_runs", []):  # every listed object's fate: they add up to listed
        fates = [{"fate": f, "objects": run.get(f, 0)} for f in SCORE_FATES] + [
            {"fate": "listed", "objects": run.get("listed")}
        ]
        blocks.append(
            (f"Fates ({run.get('status')}, model {run.get('model_version')})", table_html(fates, page))
        )
    blocks += _counted(data, page, "scored_objects", "Objects by fate and reason")
    blocks += _counted(data, page, "predictions", "Scored images by outcome")
    blocks += _counted(data, page, "score_failures", "Not scored, by reason")
    if data.rows.get("predictions"):
        blocks.append(("Flagged for review", table_html(data.rows["predictions"], page)))
    if data.rows.get("score_failures"):
        blocks.append(("Failures", table_html(data.rows["score_failures"], page)))
    return blocks


def _counted(data: RunData, page: Page, table: str, heading: str) -> list[Block]:
    return [(heading, table_html(data.counts[table], page))] if data.counts.get(table) else []


def summary_lines(data: RunData) -> list[str]:
    """One line per kind of work the run did: the page's first answer to "what happened?"."""
    lines = []
    if data.rows.get("ingest_runs"):
        run = data.rows["ingest_runs"][0]
        lines.append(
            f"Ingest {run.get('status')}: {run.get('listed')} listed, {run.get('ingested')} ingested, "
            f"{run.get('duplicates')} duplicates, {run.get('quarantined')} quarantined."
        )
    for v in data.rows.get("validations", []):
        lines.append(f"Validation ({v['suite']} suite): {'passed' if v.get('success') else 'failed'}.")
    if data.rows.get("training_runs"):
        runs = data.rows["training_runs"]
        ok = sum(1 for t in runs if t.get("status") == "succeeded")
        lines.append(f"Training: {ok} of {len(runs)} candidates succeeded.")
    for p in data.rows.get("promotions", []):
        lines.append(f"Promotion: {p.get('decision')} {p.get('challenger')}: {p.get('reason')}.")
    for run in data.rows.get("score_runs", []):
        parts = " + ".join(
            f"{run.get(f, 0)} {f.replace('_', ' ')}" for f in SCORE_FATES if f != "not_reached"
        )
        late = f" + {run['not_reached']} not reached" if run.get("not_reached") else ""
        lines.append(f"Scoring ({run.get('status')}): {run.get('listed')} listed = {parts}{late}.")
    if data.counts.get("predictions") or data.counts.get("score_failures"):
        scored = sum(r["n"] for r in data.counts.get("predictions", []))
        failed = sum(r["n"] for r in data.counts.get("score_failures", []))
        review = sum(r["n"] for r in data.counts.get("predictions", []) if r.get("needs_review") in (True, 1))
        lines.append(f"Scoring: {scored} images scored ({review} flagged for review), {failed} not scored.")
    failed_tasks = sorted(t for t, s in data.tasks.items() if s in ("failed", "upstream_failed"))
    if failed_tasks:
        lines.append(f"Airflow tasks not done: {', '.join(failed_tasks)}.")
    return lines


def render(data: RunData, dag_id: str | None = None, now: datetime | None = None) -> tuple[str, list[str]]:
    """The page's HTML and the store keys it links to."""
    page = Page(page_key(data.run_id), data.bucket)
    sections: list[tuple[str, list[Block]]] = []
    if data.tasks:
        rows = [{"task": t, "state": s} for t, s in sorted(data.tasks.items())]
        sections.append(("Airflow tasks", [("", table_html(rows, page))]))
    builders: list[tuple[str, Callable[[RunData, Page], list[Block]]]] = [
        ("Ingest", ingest_section),
        ("Retrain", retrain_section),
        ("Validation", validation_section),
        ("Scoring", score_section),
    ]
    sections += [(title, blocks) for title, build in builders if (blocks := build(data, page))]
    others = [(t, table_html(rows, page)) for t, rows in sorted(data.rows.items()) if t not in SHOWN and rows]
    if others:
        sections.append(("Other records of this run", others))
    title = f"{dag_id or 'mmpipe'} run {data.run_id}"
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(data))
    body = "".join(
        f"<h2>{html.escape(name)}</h2>"
        + "".join(f"<h3>{html.escape(h)}</h3>{b}" if h else b for h, b in blocks)
        for name, blocks in sections
    )
    doc = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><main><h1>{html.escape(title)}</h1>"
        f'<p class="meta">written {stamp} from the catalog and the image store</p>'
        f'<ul class="summary">{summary}</ul>{body}</main></body></html>'
    )
    return doc, list(dict.fromkeys(page.links))


# --- entry points -------------------------------------------------------------------------------


def write_run_report(
    store: Store,
    catalog: Catalog,
    run_id: str,
    dag_id: str | None = None,
    tasks: Mapping[str, Any] | None = None,
) -> Written:
    """Render the run's page and put it at ``reports/runs/<run>.html``; a run nothing recorded is an error."""
    data = gather(store, catalog, run_id)
    data.tasks = dict(tasks or {})
    if not data.tasks and not any(data.rows.values()) and not any(data.counts.values()):
        raise MmpipeError(f"nothing recorded for run {run_id!r}: check the run id (see `mmpipe leaderboard`)")
    doc, links = render(data, dag_id)
    key = page_key(run_id)
    return Written(store.put(key, doc.encode(), "text/html; charset=utf-8"), key, tuple(links))


def mirror(store: Store, written: Written, home: Path) -> Path:
    """A local copy of the page under ``home`` with what it links (a Data Docs page with its folder)."""
    keys = [written.key]
    for key in written.links:
        folder = posixpath.dirname(key) + "/"
        keys += [o.key for o in store.list(folder)] if key.endswith(".html") else [key]
    for key in dict.fromkeys(keys):
        path = home / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get(key))
    return home / written.key
