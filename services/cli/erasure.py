"""``prefsync forget ACCOUNT EMAIL [--yes]``: erase what prefsync holds for one person.

Rules:

1. Everything the ledger holds for the email in that account goes, in one transaction (the
   tables are listed in ``common.store.personal.ERASED``); other accounts keep theirs.
2. Without ``--yes`` it shows what it would remove and asks; it never asks where no one can
   answer (stdin not a terminal): it refuses and says to pass ``--yes``.
3. It prints what it removed, and logs one audit line with the account and the counts only:
   the log never names the email.
4. The vendors' data (Dynamics records, dotdigital contacts) is theirs to erase (README,
   Personal data). While they still hold the person, a later change read from them brings
   the email back into the ledger, as for anyone new.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import TextIO

from common.config import Config
from common.domain import normalize_email
from common.store import open_store
from common.store.personal import ERASED

log = logging.getLogger("prefsync.erasure")


def format_counts(counts: Mapping[str, int]) -> str:
    lines = [f"  {counts.get(table, 0):>7}  {label}" for table, label in ERASED.items()]
    return "\n".join(lines)


def _ask_terminal(prompt: str) -> str | None:
    """The answer typed at the terminal; None where there is no one to ask."""
    if not sys.stdin.isatty():
        return None
    try:
        return input(prompt)
    except EOFError:
        return None


async def forget_command(*, config: Config, account: str, email: str, yes: bool,
                         out: TextIO = sys.stdout,
                         ask: Callable[[str], str | None] = _ask_terminal) -> int:
    """0: erased (or nothing was held); 1: not confirmed; 2: bad arguments."""
    config.account(account)
    try:
        email = normalize_email(email)
    except ValueError as exc:
        print(f"prefsync: {email!r}: {exc}", file=sys.stderr)
        return 2
    async with open_store(config.store.url) as store:
        held = await store.personal_data(account, email)
        if not any(held.values()):
            print(f"prefsync holds nothing for {email} in {account}", file=out)
            return 0
        if not yes:
            print(f"prefsync holds for {email} in {account}:\n{format_counts(held)}", file=out,
                  flush=True)
            answer = ask("Erase all of it? [y/N] ")
            if answer is None:
                print("prefsync: not a terminal: pass --yes to erase without asking",
                      file=sys.stderr)
                return 2
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing erased", file=out)
                return 1
        removed = await store.forget_email(account, email)
    # the audit line: the account and the counts, never the email
    log.info("personal data erased", extra={
        "account": account, "rows": sum(removed.values()),
        "removed": {table: n for table, n in removed.items() if n}})
    print(f"erased {email} from {account}:\n{format_counts(removed)}\n"
          "The vendors' own data is not touched: erase the person there too "
          "(README, Personal data).", file=out)
    return 0
