"""Dataverse simulator: framing a ``$batch`` answer's parts (``_multipart``).

The parts are framed in one join of the pieces; seeded random part lists (none, one, many,
empty parts, parts holding CRLFs and dashes), with and without a head and the last line
break, must come out as the plain definition writes them.
"""

from __future__ import annotations

import random

import pytest

from services.simulators.dynamics.batch import _count_text, _multipart


def _plainly(parts: list[bytes], boundary: str, *, last_break: bool, head: str) -> bytes:
    """The framing as the multipart grammar reads: each part after a delimiter line, then the
    closing delimiter."""
    out = head.encode()
    for n, part in enumerate(parts):
        out += (b"\r\n" if n else b"") + f"--{boundary}\r\n".encode() + part
    out += (b"\r\n" if parts else b"") + f"--{boundary}--".encode()
    return out + (b"\r\n" if last_break else b"")


@pytest.mark.parametrize("seed", range(3))
def test_parts_are_framed_as_the_plain_definition_frames_them(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [b"", b"\r\n", b"--", b"HTTP/1.1 200 OK\r\n", b"{}", b"\xff", b"x" * 50]
    for _ in range(500):
        parts = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(4)))
                 for _ in range(rng.choice([0, 1, 1, 2, 5]))]
        boundary = rng.choice(["batchresponse_1", "changesetresponse_ab"])
        head = rng.choice(["", "Content-Type: multipart/mixed; boundary=b\r\n\r\n"])
        last_break = rng.random() < 0.5
        assert (_multipart(parts, boundary, last_break=last_break, head=head)
                == _plainly(parts, boundary, last_break=last_break, head=head))


@pytest.mark.parametrize("count", [0, 1, 15, 16, 255, 999, 1000, 1001, 4096, 2**48 - 1, 2**48])
def test_a_change_set_answers_count_is_laid_out_as_twelve_hex_digits(count: int) -> None:
    # (looked up for as many as a batch of lone writes gives, formatted beyond them)
    assert _count_text(count) == f"{count:012x}"
