"""The decisions log keeps one record per line whatever a reviewer types (U+2028, U+0085,
carriage returns …), and reads back logs an older version wrote with those raw."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.integration.decisions import DECISIONS_NAME, append_decision, read_decisions

LINE_BREAKERS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@settings(max_examples=60, deadline=None)
@given(comments=st.lists(
    st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(LINE_BREAKERS),
            max_size=40),
    min_size=1, max_size=5,
))
def test_every_decision_comes_back_whatever_its_comment(tmp_path_factory, comments) -> None:
    run = tmp_path_factory.mktemp("run")
    for k, comment in enumerate(comments):
        append_decision(run, {"id": f"t{k}", "status": "accepted", "comment": comment})
    raw = (run / DECISIONS_NAME).read_bytes()
    assert raw.count(b"\n") == len(comments) and raw.isascii()
    back = read_decisions(run)
    assert [r["comment"] for r in back] == comments
    assert [r["id"] for r in back] == [f"t{k}" for k in range(len(comments))]


def test_an_older_log_with_raw_separators_is_read_whole(tmp_path: Path) -> None:
    log = tmp_path / DECISIONS_NAME
    log.parent.mkdir(parents=True)
    records = [{"id": "a", "status": "rejected", "comment": "wall\u2028torn\x85here"},
               {"id": "b", "status": "accepted", "comment": ""}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    log.write_text(text + '{"id": "c", "sta', encoding="utf-8")  # and a torn last line
    assert read_decisions(tmp_path) == records


def test_an_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path: Path) -> None:
    append_decision(tmp_path, {"id": "a", "status": "accepted"})
    with open(tmp_path / DECISIONS_NAME, "a", encoding="ascii") as handle:
        handle.write('{"id": "b", "sta')  # a kill in the middle of a write
    append_decision(tmp_path, {"id": "c", "status": "rejected"})
    assert [r["id"] for r in read_decisions(tmp_path)] == ["a", "c"]


def _run(tmp_path: Path, ids=("t0", "t1", "t2")) -> Path:
    import numpy as np

    from histosynth.integration.dataset import RunWriter, TileRecord

    run = tmp_path / "run"
    with RunWriter(run, config={"mode": "test"}) as writer:
        for tile_id in ids:
            writer.add_tile(
                TileRecord(id=tile_id, synthesis_type="extracted", class_name="Vessel",
                           tile_size=8, mpp=0.5),
                np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8), np.uint8), [],
            )
    return run


def _statuses(run: Path) -> dict[str, str]:
    from histosynth.integration.dataset import read_index

    return {row["id"]: row["review_status"] for row in read_index(run)}


def test_replay_writes_what_the_index_lacks_once(tmp_path: Path) -> None:
    """A server killed between its log append and its index write: the next start (or
    review sync) writes the logged decision; a second replay changes nothing."""
    from histosynth.integration.dataset import read_index, update_index
    from histosynth.integration.decisions import (
        APPLIED_NAME,
        mark_applied,
        replay_decisions,
        rows_with_logged_decisions,
    )

    run = _run(tmp_path)
    size = append_decision(run, {"id": "t0", "status": "accepted", "time": "2026-01-01T00:00:00Z"})
    update_index(run, {"t0": {"review_status": "accepted"}})
    mark_applied(run, size)
    append_decision(run, {"id": "t1", "status": "rejected", "time": "2026-01-01T00:00:01Z"})
    append_decision(run, {"id": "t1", "status": "accepted", "time": "2026-01-01T00:00:02Z"})
    append_decision(run, {"id": "gone", "status": "accepted", "time": "2026-01-01T00:00:03Z"})
    # killed here: the log is ahead of the index (and the times are older than the file)
    assert _statuses(run)["t1"] == "pending"
    assert rows_with_logged_decisions(run, read_index(run))[1]["review_status"] == "accepted"
    assert replay_decisions(run) == {"t1": "accepted"}
    assert _statuses(run) == {"t0": "accepted", "t1": "accepted", "t2": "pending"}
    assert json.loads((run / APPLIED_NAME).read_text())["log_bytes"] == (
        run / DECISIONS_NAME).stat().st_size
    # a later decision made elsewhere (review sync from QuPath) is not undone by a replay
    update_index(run, {"t1": {"review_status": "rejected"}})
    assert replay_decisions(run) == {} and _statuses(run)["t1"] == "rejected"


def test_without_a_record_of_what_was_applied_only_newer_decisions_replay(tmp_path):
    """A run reviewed by an older histosynth has a log but no applied marker: only the
    decisions newer than index.csv are replayed, so an older decision that QuPath later
    changed (and review sync wrote) is not brought back."""
    import os

    from histosynth.integration.decisions import replay_decisions

    run = _run(tmp_path)
    append_decision(run, {"id": "t0", "status": "accepted", "time": "2020-01-01T00:00:00Z"})
    append_decision(run, {"id": "t2", "status": "rejected", "time": "2999-01-01T00:00:00Z"})
    os.utime(run / "index.csv", (1_700_000_000, 1_700_000_000))  # written in 2023
    assert replay_decisions(run) == {"t2": "rejected"}
    assert _statuses(run) == {"t0": "pending", "t1": "pending", "t2": "rejected"}


def test_a_log_that_is_a_link_is_refused(tmp_path: Path) -> None:
    import pytest

    from histosynth.integration.errors import InputError

    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("")
    (tmp_path / "review").mkdir()
    (tmp_path / DECISIONS_NAME).symlink_to(outside)
    with pytest.raises(InputError, match="link"):
        append_decision(tmp_path, {"id": "a", "status": "accepted"})
    assert outside.read_text() == ""
