"""Dataverse simulator: the GUIDs of new rows and batch boundaries (``protocol.new_guid``).

They are drawn a block at a time: each must still be a version-4 GUID laid out as
``str(uuid.uuid4())`` lays it out, none repeated, and seeding the generator must give the
same GUIDs again from the seed on (tests seed it to have two simulators make the same).
"""

from __future__ import annotations

import random
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


def test_guids_are_the_blocks_drawn_laid_out_one_at_a_time() -> None:
    """The block laid out a digit's place at a time gives each GUID as laying out its own
    128 bits (the block's most significant first, blocks in the order drawn) gives it."""
    protocol._GUIDS.seed(13)
    drawn = [new_guid() for _ in range(3 * protocol._BLOCK * protocol._BLOCKS + 5)]
    reference = random.Random(13)
    want: list[str] = []
    while len(want) < len(drawn):
        block = (reference.getrandbits(128 * protocol._BLOCK) & protocol._BLOCK_CLEAR
                 | protocol._BLOCK_SET)
        want += [str(uuid.UUID(int=block >> (128 * n) & ((1 << 128) - 1)))
                 for n in reversed(range(protocol._BLOCK))]
    assert drawn == want[:len(drawn)]
