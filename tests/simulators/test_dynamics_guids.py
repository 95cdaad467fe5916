"""Dataverse simulator: the GUIDs of new rows and batch boundaries (``protocol.new_guid``).

They are drawn a block at a time: each must still be a version-4 GUID laid out as
``str(uuid.uuid4())`` lays it out, none repeated, and seeding the generator must give the
same GUIDs again from the seed on (tests seed it to have two simulators make the same).
"""

from __future__ import annotations

import uuid

from services.simulators.dynamics import protocol
from services.simulators.dynamics.protocol import new_guid


def test_guids_are_version_4_laid_out_as_uuid4_lays_them_out() -> None:
    guids = [new_guid() for _ in range(1000)]  # (blocks, and GUIDs left of the last)
    assert len(set(guids)) == len(guids)
    for guid in guids:
        parsed = uuid.UUID(guid)
        assert str(parsed) == guid
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_seeding_gives_the_same_guids_again_whatever_was_drawn_before() -> None:
    protocol._GUIDS.seed(11)
    first = [new_guid() for _ in range(150)]
    for drawn in (0, 1, 63, 64, 65, 300):
        [new_guid() for _ in range(drawn)]
        protocol._GUIDS.seed(11)
        assert [new_guid() for _ in range(150)] == first
    protocol._GUIDS.seed(12)
    assert new_guid() not in first
