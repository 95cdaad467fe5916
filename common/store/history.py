"""The history of decisions and writes: how its rows are found by email without an index that
every save writes to at random.

Each save appends a history row per decision and per write, for keys spread over the whole
ledger. An index ordered by email puts each new row on a random page of a large index: in SQLite
that page is written to the WAL again per row (about 10-20 µs a row, measured in the backfill,
more than the row itself). History is read by email only to show or erase one person's rows, so
the index trades a little of that read for much cheaper appends:

1. Each row carries its email's **bucket**, :func:`history_bucket` (one of :data:`BUCKETS`, a
   CRC-32 of the normalised email, the same in every process and release).
2. The index is ordered by account, bucket, then id (rows are appended in id order): each save
   writes to the tail of at most :data:`BUCKETS` runs of the index, pages a batch shares.
3. One email's rows are found by scanning its bucket's index entries, which carry the email:
   about 1/:data:`BUCKETS` of the account's history (kept bounded by retention), without
   reading the rows of other emails.
4. A ledger made before buckets (schema 1 or 2) gets them once, when it is opened by this
   code (:func:`fill_buckets`), and its index by email is dropped.
"""

from __future__ import annotations

import zlib

from common.store.connection import Connection

BUCKETS = 64

# After the column exists (a ledger made before gets it as an added column).
INDEXES = (
    "CREATE INDEX IF NOT EXISTS history_by_bucket ON history (account, bucket, id, email)",
    "DROP INDEX IF EXISTS history_by_email",
)

# One email's rows (parameters: account, bucket, email).
BY_EMAIL = "account = ? AND bucket = ? AND email = ?"

# Rows given their buckets per statement when an older ledger is brought up to date.
_FILL_PAGE = 5_000


def history_bucket(email: str) -> int:
    """The bucket of a normalised email's history rows."""
    return zlib.crc32(email.encode()) % BUCKETS


async def fill_buckets(db: Connection) -> int:
    """Inside the schema transaction of a ledger made before buckets: every history row gets its
    email's bucket, a page at a time in id order. Returns how many rows were filled."""
    filled = 0
    after = -1
    while True:
        async with db.execute("SELECT id, email FROM history WHERE id > ? ORDER BY id LIMIT ?",
                              (after, _FILL_PAGE)) as cursor:
            rows = list(await cursor.fetchall())
        if not rows:
            return filled
        await db.executemany("UPDATE history SET bucket = ? WHERE id = ?",
                             [(history_bucket(str(email)), int(row_id)) for row_id, email in rows])
        filled += len(rows)
        after = int(rows[-1][0])
