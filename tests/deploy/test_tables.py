"""Human-facing tables: aligned, numbers right-aligned, nested results as their own tables, --json intact."""

from __future__ import annotations

import json

from mmpipe import tables


def test_table_aligns_columns_and_right_aligns_numbers():
    rows = [
        {"candidate": "resnet18", "macro_f1": 0.912345, "images": 120},
        {"candidate": "tinycnn", "macro_f1": 0.5},
    ]
    lines = tables.table(rows, title="leaderboard").splitlines()
    assert lines[0] == "leaderboard:"
    assert lines[1].split() == ["candidate", "macro_f1", "images"]
    assert lines[3] == "resnet18      0.912     120"
    assert lines[4] == "tinycnn       0.500"  # a missing cell is blank, not "None"
    assert len({len(line) for line in lines[1:4]}) == 1


def test_fields_put_nested_results_in_their_own_tables():
    text = tables.render({"status": "succeeded", "ok": True, "reasons": {"truncated": 2},
                          "batches": [{"n": 1, "uri": "s3://b/1"}], "empty": []})  # fmt: skip
    assert "  status  succeeded" in text and "  ok      yes" in text and "  empty   none" in text
    assert "reasons:\n  truncated  2" in text
    assert "batches:\nn  uri" in text


def test_long_cells_are_shortened_for_the_terminal_only(capsys):
    row = {"detail": "x" * 300}
    assert len(tables.table([row]).splitlines()[2]) == tables.MAX_CELL
    tables.show(row, as_json=True)
    assert json.loads(capsys.readouterr().out) == row
