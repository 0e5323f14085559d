"""How `syncd status` names a pipeline's position: as `syncd tokens show` does."""

from __future__ import annotations

import pytest
from bson.timestamp import Timestamp

from syncd.checkpoint import Checkpoint
from syncd.cli.status import _print
from syncd.status import _position
from syncd.tokens import covered_through, encode_high_water_mark

T = 1_796_131_584


def test_a_high_water_mark_reads_as_its_own_time_as_tokens_show_prints_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = {"_data": encode_high_water_mark(Timestamp(T, 0))}
    cp = Checkpoint(pipeline="p", fingerprint="f", token=token, cluster_time=covered_through(token))
    assert cp.cluster_time == Timestamp(T - 1, 2**32 - 1)  # every change before T
    where = _position(cp)
    assert where["position"] == f"{T}.0" and where["position_type"] == "highWaterMark"
    assert where["applied_through"] == f"{T - 1}.4294967295"
    _print({"pipeline": "p", "state": "streaming", "namespace": "app.docs",
            "chroma_collection": "docs", "dead_letters": 0, **where})  # fmt: skip
    out = capsys.readouterr().out
    assert f"position       resume after highWaterMark at {T}.0 (" in out
    assert "4294967295" not in out


def test_a_start_time_reads_as_start_at() -> None:
    cp = Checkpoint(
        pipeline="p", fingerprint="f", start_at=Timestamp(T, 3), cluster_time=Timestamp(T, 2)
    )
    where = _position(cp)
    assert where["position"] == f"{T}.3" and where["position_type"] == "start_at"
    assert where["position_text"].startswith(f"start at {T}.3 (")
