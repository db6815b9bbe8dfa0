"""`mmpipe bench score` end to end on a few objects: it scores them all and says where the CPU went."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_score_reports_rates_and_cpu_per_object(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mmpipe", "bench", "score", "--objects", "24"],
        capture_output=True, text=True, timeout=600, check=True, cwd=tmp_path,
    )  # fmt: skip
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "score" and figures["objects"] == 24
    for rate in ("images_per_s", "bare_forward_per_s", "naive_per_s"):
        assert figures[rate] > 0
    assert figures["vs_forward"] == pytest.approx(
        figures["images_per_s"] / figures["bare_forward_per_s"], abs=1e-3
    )
    assert figures["vs_naive"] == pytest.approx(figures["images_per_s"] / figures["naive_per_s"], abs=0.01)
    cpu = figures["cpu_ms_per_object"]
    assert cpu["scoring"] > 0 and cpu["helpers"] > 0 and cpu["store"] > 0  # the model, decode+writes, weed
    # the CPU counted is all the run spent: the cores could not have given more (10 ms ticks: some slack)
    assert figures["images_per_s"] <= 1.1 * figures["cpu_ceiling_per_s"]
    assert figures["listing_100k_watermark_s"] < figures["listing_100k_no_watermark_s"]
