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
