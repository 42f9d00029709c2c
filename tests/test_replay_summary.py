"""A second backfill skips what the store holds; the summaries' coverage is a number.

The store here is test_loader_replay's in-memory ``FakeClient`` (upserts keyed by id); the
oracles are the prediction and feedback frames built straight from the month's trips, and the
client's own dicts, never the summary compared with itself.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from loader import pipeline, replay
from tests.test_loader_replay import MODEL, FakeClient, _backfill, _live, _month

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def trained():
    return pipeline.train(_month(1), "2020-01-01", "2020-02-01")


def _month_ids(trained, m: int, until: str) -> set[str]:
    """Ids of month m's predictions before ``until``, from the trips (the oracle)."""
    start = pd.Timestamp(2020, m, 1)
    scored = pipeline.score_trips(trained, _month(m), start, start + pd.offsets.MonthBegin(1))
    frame = replay.prediction_frame(scored)
    return set(frame.loc[frame["ts"] < replay.parse_time(until), "id"])


def test_a_second_backfill_writes_no_prediction_again(trained):
    client = FakeClient()
    first = _backfill(client, trained)
    predictions, feedback = dict(client.predictions), dict(client.feedback)
    second = _backfill(client, trained, resume=client.latest_prediction_ts(MODEL))
    assert first.predictions_written == len(predictions) > 0
    assert second.skipped == ["2020-01"]  # February holds the latest prediction
    assert second.predictions_written == 0
    assert client.predictions == predictions and client.feedback == feedback
    assert "skipped 2020-01, already in the store" in second.format()


class _Interrupted(Exception):
    pass


class _DiesAfter(FakeClient):
    """Stops (as a Ctrl-C would) after ``n`` prediction batches."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def write_predictions(self, name, records):
        if self.left == 0:
            raise _Interrupted
        self.left -= 1
        return super().write_predictions(name, records)


def test_an_interrupted_backfill_resumes_where_it_stopped(trained):
    once = FakeClient()
    _backfill(once, trained, batch_size=500)
    pieces = _DiesAfter(5)  # in January's predictions
    with pytest.raises(_Interrupted):
        _backfill(pieces, trained, batch_size=500)
    pieces.left = -1  # never again
    resumed = _backfill(pieces, trained, batch_size=500,
                        resume=pieces.latest_prediction_ts(MODEL))
    assert pieces.predictions == once.predictions and pieces.feedback == once.feedback
    assert resumed.skipped == []
    assert resumed.predictions_written == len(once.predictions) - 5 * 500 + 1  # from the latest


def test_live_summary_coverage_is_the_labeled_share_of_each_month(trained):
    client = FakeClient()
    until = "2020-02-15"
    summary = _live(client, trained, until)
    stored = {i for _, i in client.feedback}
    by_month = {m.month: m for m in summary.months}
    assert set(by_month) == {"2020-01", "2020-02"}
    for m in (1, 2):
        ids = _month_ids(trained, m, until)
        stats = by_month[f"2020-{m:02d}"]
        assert stats.predictions == len(ids)
        assert stats.coverage == pytest.approx(len(ids & stored) / len(ids), abs=1e-12)
        assert 0.5 < stats.coverage < 1
    table = summary.format()
    assert "nan" not in table.lower(), table


def test_backfill_summary_coverage(trained):
    client = FakeClient()
    summary = _backfill(client, trained, until="2020-02-15")
    stored = {i for _, i in client.feedback}
    for stats in summary.months:
        m = int(stats.month[-2:])
        ids = _month_ids(trained, m, "2020-02-15")
        assert stats.coverage == pytest.approx(len(ids & stored) / len(ids), abs=1e-12)
    assert not any(math.isnan(s.coverage) for s in summary.months)
