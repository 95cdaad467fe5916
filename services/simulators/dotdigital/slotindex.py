"""An integer per contact slot, with block maxima so ordered walks skip what cannot match.

Contacts of an account live in slots ``0..n-1`` in contact-id order. For each preference the
simulator keeps two of these: the opt-in state (-1 never set, 0 out, 1 in) and ``dateModifed`` in
milliseconds (-1 never set). "Contacts with id >= M whose value >= T, in id order" then walks
slots from M and skips every 64-slot block (and 4096-slot super-block) whose maximum is below T,
so a page costs about its own size even among a million states.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

_BLOCK_SHIFT = 6  # 64 slots per block
_SUPER_SHIFT = 12  # 4096 slots (64 blocks) per super-block
_BLOCKS_PER_SUPER = 1 << (_SUPER_SHIFT - _BLOCK_SHIFT)
NONE = -1


def _maxima(values: array[int], shift: int) -> array[int]:
    width = 1 << shift
    return array("q", (max(values[i:i + width]) for i in range(0, len(values), width)))


class SlotIndex:
    """Values by slot plus per-block maxima."""

    __slots__ = ("_blocks", "_supers", "_values")

    def __init__(self, values: Iterable[int] = ()) -> None:
        self._values = array("q", values)
        self._blocks = _maxima(self._values, _BLOCK_SHIFT)
        self._supers = _maxima(self._blocks, _SUPER_SHIFT - _BLOCK_SHIFT)

    @classmethod
    def filled(cls, size: int, value: int = NONE) -> SlotIndex:
        index = cls()
        index._values = array("q", [value]) * size
        index._blocks = array("q", [value]) * ((size + 63) >> _BLOCK_SHIFT)
        index._supers = array("q", [value]) * ((len(index._blocks) + _BLOCKS_PER_SUPER - 1)
                                               // _BLOCKS_PER_SUPER)
        return index

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, slot: int) -> int:
        return self._values[slot]

    def values(self) -> array[int]:
        return self._values

    def append(self, value: int) -> None:
        slot = len(self._values)
        self._values.append(NONE)
        if slot & ((1 << _BLOCK_SHIFT) - 1) == 0:
            self._blocks.append(NONE)
            if (slot >> _BLOCK_SHIFT) % _BLOCKS_PER_SUPER == 0:
                self._supers.append(NONE)
        self.set(slot, value)

    def set(self, slot: int, value: int) -> None:
        values, blocks, supers = self._values, self._blocks, self._supers
        old = values[slot]
        values[slot] = value
        block = slot >> _BLOCK_SHIFT
        sup = slot >> _SUPER_SHIFT
        if value >= old:  # the usual write (a later stamp): the maxima can only rise
            if value > blocks[block]:
                blocks[block] = value
            if value > supers[sup]:
                supers[sup] = value
            return
        if blocks[block] != old:
            return
        # The block may have lost its maximum: recompute it and its super-block.
        start = block << _BLOCK_SHIFT
        blocks[block] = max(values[start:start + (1 << _BLOCK_SHIFT)])
        first = sup * _BLOCKS_PER_SUPER
        supers[sup] = max(blocks[first:first + _BLOCKS_PER_SUPER])

    def slots_at_least(self, start: int, threshold: int, limit: int) -> list[int]:
        """The first ``limit`` slots ``>= start`` whose value is ``>= threshold``, ascending."""
        values, blocks, supers = self._values, self._blocks, self._supers
        size = len(values)
        slot = max(start, 0)
        out: list[int] = []
        while slot < size and len(out) < limit:
            sup = slot >> _SUPER_SHIFT
            if supers[sup] < threshold:
                slot = (sup + 1) << _SUPER_SHIFT
                continue
            block = slot >> _BLOCK_SHIFT
            if blocks[block] < threshold:
                slot = (block + 1) << _BLOCK_SHIFT
                continue
            end = min((block + 1) << _BLOCK_SHIFT, size)
            # a block at a time: a page is mostly whole blocks that match
            out += [i for i in range(slot, end) if values[i] >= threshold]
            slot = end
        del out[limit:]
        return out
