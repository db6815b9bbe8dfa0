"""Tags on the hospital's objects: mmpipe's own, within S3's budget, never at the cost of foreign tags.

S3 (and MinIO, SeaweedFS) allow :data:`MAX_TAGS` tags per object. Foreign tags (any key without
:data:`TAG_PREFIX`) are the hospital's and always stay; mmpipe's previous tags (an earlier champion's)
are replaced. mmpipe's tags come in priority order (modality or status first, then review), so when
space is short the essential ones are written and the rest only reach the object's sidecar. When
not even one fits, nothing is written: the caller records that as the object's fate.
Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

MAX_TAGS = 10
TAG_PREFIX = "mmpipe-"
MAX_VALUE_CHARS = 256
#: Characters S3 accepts in a tag value (letters, digits, spaces and + - = . _ : / @).
_UNSAFE = re.compile(r"[^\w +\-=._:/@]")


def is_mine(key: str) -> bool:
    return key.startswith(TAG_PREFIX)


def clean_value(value: object) -> str:
    """A value S3 accepts: disallowed characters become '_', at most MAX_VALUE_CHARS."""
    return _UNSAFE.sub("_", str(value))[:MAX_VALUE_CHARS]


@dataclass(frozen=True)
class TagPlan:
    """The tag set to write and mmpipe's tags that did not fit (they live in the sidecar only)."""

    tags: dict[str, str]  # the object's whole new tag set: foreign tags + mmpipe's that fit
    written: dict[str, str]  # mmpipe's tags in ``tags``
    left_out: dict[str, str]  # mmpipe's tags that did not fit

    @property
    def fits(self) -> bool:
        """At least the first (essential) tag was written."""
        return bool(self.written)


def plan_tags(current: Mapping[str, str], ours: Mapping[str, str], limit: int = MAX_TAGS) -> TagPlan:
    """Keep every foreign tag of ``current``, drop mmpipe's old ones, add ``ours`` (in priority order)
    while the total stays within ``limit``."""
    foreign = {k: v for k, v in current.items() if not is_mine(k)}
    room = max(limit - len(foreign), 0)
    items = [(k, clean_value(v)) for k, v in ours.items()]
    written, left_out = dict(items[:room]), dict(items[room:])
    return TagPlan(foreign | written, written, left_out)
