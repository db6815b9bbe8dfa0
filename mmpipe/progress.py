"""Progress bars for long CLI work (ingest, training epochs, scoring, benches).

Shown only on a terminal: in Airflow task logs and pipes they are silent (``disable=None``),
where the stages' own log lines already say how far a run got.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one: ``bar.update(n)``), hidden when stderr is not a TTY."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, dynamic_ncols=True, **kwargs)
