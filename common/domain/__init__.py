"""Pure sync rules: last-writer-wins per (account, email, preference), echo recognition through a
write ledger, and contact suppression. No I/O here; the services call these functions and store
the results."""

from common.domain.clock import lww_rank, order, span, whole_second
from common.domain.commands import WriteCommand
from common.domain.fold import Fold, fold_batch
from common.domain.history import HistoryEntry
from common.domain.identity import PreferenceKey, normalize_email
from common.domain.observation import Observation
from common.domain.reconcile import Decision, Outcome, outstanding, reconcile, reopen, settle
from common.domain.records import differing_records, speaks_for_email
from common.domain.sides import SIDES, PerSide, Side, other
from common.domain.state import (
    KeyState,
    Known,
    LedgerHorizon,
    PendingWrite,
    Register,
    WriteRecord,
)
from common.domain.suppression import (
    ContactDecision,
    ContactState,
    apply_contact_status,
    is_suppressed,
)
from common.domain.time_base import (
    DEFAULT_FUTURE_TOLERANCE,
    ClockEstimate,
    ClockState,
    Epoch,
    OffsetSample,
    Verdict,
    in_time_base,
)
from common.domain.writes import (
    abandon_write,
    begin_write,
    find_echo,
    in_write_window,
    is_echo,
    is_superseded,
    record_write,
    start_after_read,
    write_window,
    write_window_end,
    writer_should_apply,
)

__all__ = [
    "DEFAULT_FUTURE_TOLERANCE",
    "SIDES",
    "ClockEstimate",
    "ClockState",
    "ContactDecision",
    "ContactState",
    "Decision",
    "Epoch",
    "Fold",
    "HistoryEntry",
    "KeyState",
    "Known",
    "LedgerHorizon",
    "Observation",
    "OffsetSample",
    "Outcome",
    "PendingWrite",
    "PerSide",
    "PreferenceKey",
    "Register",
    "Side",
    "Verdict",
    "WriteCommand",
    "WriteRecord",
    "abandon_write",
    "apply_contact_status",
    "begin_write",
    "differing_records",
    "find_echo",
    "fold_batch",
    "in_time_base",
    "in_write_window",
    "is_echo",
    "is_superseded",
    "is_suppressed",
    "lww_rank",
    "normalize_email",
    "order",
    "other",
    "outstanding",
    "reconcile",
    "record_write",
    "reopen",
    "settle",
    "span",
    "speaks_for_email",
    "start_after_read",
    "whole_second",
    "write_window",
    "write_window_end",
    "writer_should_apply",
]
