"""How `syncd explain` words a story: what differs from what syncd wrote, and how many
of the recent syncs it lists."""

from __future__ import annotations

from typing import Any

import pytest

from syncd.cli.explain import _print


def _story(records: list[dict[str, Any]], syncs: int) -> dict[str, Any]:
    return {
        "pipeline": "p",
        "id": "i:1",
        "collection": "docs",
        "mongodb": {"_id": 1, "body": "b"},
        "matches_filter": True,
        "mapping_error": None,
        "chroma": records,
        "missing_in_chroma": [],
        "consistent": False,
        "records_match": False,
        "recent_syncs": [
            {"time": f"2026-01-01T00:00:{n:02d}Z", "operation": "update", "outcome": "applied"}
            for n in range(syncs)
        ],
        "dead_letter": None,
        "halt": None,
    }


def _record(**fields: Any) -> dict[str, Any]:
    base = {"id": "i:1", "matches": False, "orphaned": False, "hash_matches": True}
    return {**base, "text_matches": True, "differing_keys": [], **fields}


def test_a_metadata_difference_names_the_keys_and_blames_no_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _print(_story([_record(differing_keys=["tags"])], 0))
    out = capsys.readouterr().out
    assert (
        "i:1  STALE (metadata (tags) in Chroma differs from what syncd wrote "
        "(edited in Chroma, or left behind by Chroma))" in out
    )


def test_a_text_difference_says_text(capsys: pytest.CaptureFixture[str]) -> None:
    _print(_story([_record(text_matches=False)], 0))
    assert "i:1  STALE (text in Chroma differs from what syncd wrote" in capsys.readouterr().out
    _print(_story([_record(text_matches=False, differing_keys=["a", "b"])], 0))
    out = capsys.readouterr().out
    assert "STALE (text and metadata (a, b) in Chroma differ from what syncd wrote" in out


@pytest.mark.parametrize(("syncs", "heading"), [(3, "(3)"), (10, "(10)"), (11, "(10 of 11)")])
def test_the_sync_count_says_how_many_are_listed(
    capsys: pytest.CaptureFixture[str], syncs: int, heading: str
) -> None:
    _print(_story([], syncs))
    out = capsys.readouterr().out
    assert f"recent syncs {heading}:" in out
    listed = [line for line in out.splitlines() if "update   applied" in line]
    assert len(listed) == min(syncs, 10)
    if syncs > 10:
        assert "00:00:00Z" not in out and f"00:00:{syncs - 1:02d}Z" in out  # the newest
