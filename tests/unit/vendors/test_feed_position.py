"""The ec-poller's checkpoint of a preference's opt-ins feed, as it is stored and as the writer
reads it (common.vendors.dotdigital.feed.FeedPosition)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.store.checkpoints import opt_ins_source
from common.vendors.dotdigital.feed import EPOCH, FeedPosition

T = datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_the_stored_forms_are_unchanged() -> None:
    # Checkpoints written before this codec existed must read the same, and the other way round.
    under_way = '{"since":"2024-05-01T12:00:00+00:00","min_contact_id":42,"markers_owed":true}'
    finished = '{"since":"2024-05-01T12:00:00+00:00","previous":"2024-05-01T11:55:00+00:00"}'
    assert FeedPosition(since=T, min_contact_id=42, markers_owed=True).encode() == under_way
    assert FeedPosition(since=T, previous=T - timedelta(minutes=5)).encode() == finished
    for saved in (under_way, finished):
        assert FeedPosition.decode(saved).encode() == saved
    assert opt_ins_source(7) == "dotdigital:opt-ins:7"


def test_never_read() -> None:
    position = FeedPosition.decode(None)
    assert position == FeedPosition()
    assert position.watermark is None and position.first_read


def test_a_first_read_under_way_has_no_watermark() -> None:
    position = FeedPosition.decode(FeedPosition(since=EPOCH, min_contact_id=3,
                                                markers_owed=True).encode())
    assert position.watermark is None and position.first_read


def test_a_later_read_under_way_saved_without_the_last_watermark_is_waited_for() -> None:
    position = FeedPosition.decode('{"since":"2024-05-01T12:00:00+00:00","min_contact_id":3}')
    assert position.watermark is None and not position.first_read


def test_a_later_read_under_way_keeps_the_last_complete_reads_watermark() -> None:
    # The writer goes on from there meanwhile, rather than waiting for the read to finish.
    earlier = T - timedelta(minutes=5)
    finished = FeedPosition(since=T, previous=earlier)
    under_way = FeedPosition.decode(FeedPosition(
        since=T, min_contact_id=3, last_watermark=finished.watermark).encode())
    assert under_way.last_watermark == earlier
    assert under_way.watermark == earlier and not under_way.first_read
    # once that read finishes, its own start is the watermark
    assert FeedPosition(since=T + timedelta(seconds=5), previous=T - timedelta(seconds=30)
                        ).watermark == T - timedelta(seconds=30)


def test_the_watermark_is_where_the_last_complete_read_started() -> None:
    earlier = T - timedelta(minutes=5)
    assert FeedPosition(since=T, previous=earlier).watermark == earlier
    # after a first read (it read from EPOCH) there is nothing earlier than its start
    after_first = FeedPosition(since=T, previous=EPOCH)
    assert after_first.watermark == T and not after_first.first_read
