"""Data Docs a data team can read: the data asset named on every page, and pages that render offline.

GX 1.24 leaves a dataframe batch's data asset out of the validation page header ("Data asset:
None"): :class:`NamedAssetDataDocsAction` copies it from the active batch definition before
building the site, as the Checkpoint's own UpdateDataDocsAction. GX's pages load bootstrap, jQuery
and bootstrap-table from CDNs, which a hospital network often cannot reach: :func:`offline_site`
points them at copies shipped in ``mmpipe/datadocs_static`` (see its README).
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING, Literal

from great_expectations.checkpoint import UpdateDataDocsAction

if TYPE_CHECKING:
    from great_expectations.checkpoint.checkpoint import ActionContext, CheckpointResult


class NamedAssetDataDocsAction(UpdateDataDocsAction):
    """UpdateDataDocsAction that first names the data asset where the page header looks for it."""

    type: Literal["mmpipe_update_data_docs"] = "mmpipe_update_data_docs"

    def run(self, checkpoint_result: CheckpointResult, action_context: ActionContext | None = None) -> dict:
        store = self._resolve_context().context.validation_results_store  # what the site is built from
        for identifier, result in checkpoint_result.run_results.items():
            definition = result.meta.get("active_batch_definition") or {}
            spec = result.meta.setdefault("batch_spec", {})
            spec["data_asset_name"] = spec.get("data_asset_name") or definition.get("data_asset_name")
            store.set(identifier, result)
        return super().run(checkpoint_result, action_context)


#: GX's CDN front-end files -> the copies shipped in ``mmpipe/datadocs_static`` (by file name). Files left out
#: are dropped: vega draws charts no mmpipe expectation renders, popper is inside bootstrap.bundle, the
#: dark theme is optional, and ``icons.css`` stands in for Font Awesome.
_VENDORED = {
    "bootstrap.min.css": "bootstrap.min.css",
    "bootstrap-table.min.css": "bootstrap-table.min.css",
    "bootstrap-table-filter-control.css": "bootstrap-table-filter-control.min.css",
    "bootstrap-table-filter-control.min.css": "bootstrap-table-filter-control.min.css",
    "bootstrap-datepicker.min.css": "bootstrap-datepicker.min.css",
    "all.min.css": "icons.css",
    "jquery-3.7.1.min.js": "jquery.min.js",
    "bootstrap.min.js": "bootstrap.bundle.min.js",
    "bootstrap-table.min.js": "bootstrap-table.min.js",
    "bootstrap-table-filter-control.min.js": "bootstrap-table-filter-control.min.js",
    "bootstrap-datepicker.min.js": "bootstrap-datepicker.min.js",
}
_VENDOR_DIR = "static/vendor/"
_REMOTE_TAG = re.compile(
    r'<link\b[^>]*\bhref="(https?://[^"]+)"[^>]*>|<script\b[^>]*\bsrc="(https?://[^"]+)"[^>]*>\s*</script>'
)
_REMOTE_LOGO = re.compile(r'src="https?://[^"]*/(logo-long\.png)[^"]*"')


def offline_site(site: dict[str, bytes]) -> dict[str, bytes]:
    """The Data Docs site with every CDN stylesheet and script replaced by a shipped copy (or dropped)
    and the remote logo by the site's own: the pages render inside an air-gapped hospital network."""
    shipped = resources.files("mmpipe") / "datadocs_static"
    out = dict(site)
    for name in sorted(set(_VENDORED.values())):
        out[_VENDOR_DIR + name] = (shipped / name).read_bytes()
    for path, body in site.items():
        if path.endswith(".html"):
            out[path] = _offline_page(body.decode(), "../" * path.count("/")).encode()
    return out


def _offline_page(html: str, root: str) -> str:
    def local(match: re.Match[str]) -> str:
        url = match.group(1) or match.group(2)
        name = _VENDORED.get(url.rsplit("/", 1)[-1].split("?")[0])
        if name is None:
            return ""
        href = root + _VENDOR_DIR + name
        return (
            f'<link rel="stylesheet" href="{href}">'
            if name.endswith(".css")
            else f'<script src="{href}"></script>'
        )

    html = _REMOTE_TAG.sub(local, html)
    return _REMOTE_LOGO.sub(lambda m: f'src="{root}static/images/{m.group(1)}"', html)
