"""``mmpipe bench ingest|score|train|synth``: mmpipe's paths against naive baselines, measured in one
process (one module per bench: :mod:`.ingest`, :mod:`.score`, :mod:`.train`, :mod:`.synth`). Each
prints its figures and ends with one JSON line."""

from __future__ import annotations

import json
import logging
import tempfile
from importlib import import_module
from pathlib import Path
from typing import Any

from mmpipe.errors import ConfigError

BENCHES = ("ingest", "score", "train", "synth")


def run(what: str, **options: Any) -> dict[str, Any]:
    """Run benchmark ``what`` with its options (see the CLI), print its figures and a final JSON line."""
    if what not in BENCHES:
        raise ConfigError(f"unknown benchmark {what!r}; available: {', '.join(BENCHES)}")
    bench = import_module(f"mmpipe.bench.{what}").bench
    for noisy in ("mmpipe.ingest", "mmpipe.score", "mmpipe.decoding", "mmpipe.dataset", "mmpipe.validate",
                  "great_expectations"):  # fmt: skip
        logging.getLogger(noisy).setLevel(logging.WARNING)  # per-batch progress would drown the figures
    with tempfile.TemporaryDirectory(prefix="mmpipe-bench-") as tmp:
        figures = bench(workdir=Path(tmp), **options)
    print(json.dumps(figures))
    return figures
