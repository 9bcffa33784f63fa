"""The feedback mailbox: mail to the bounce domain or an FBL address is read, not delivered.

Each such message is parsed (:mod:`epoxi.bounce.inbound`), turned into records for the
message it is about, and kept in a small quarantine for inspection:

- a bounce: one ``OOB`` record per failed recipient;
- a complaint (ARF): one ``Feedback`` record;
- an auto-reply, or anything else: no record.

The message it is about is named by the VERP token of the address the report came to, or,
for a report sent to a fixed FBL address, the token in the returned message's envelope
sender (ARF ``Original-Mail-From``, or its ``Return-Path``). A token that does not verify
names nothing: the report is quarantined and logged, and no record claims a message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from epoxi.bounce.classify import Classifier
from epoxi.bounce.inbound import Kind, Report, ReportedRecipient, parse
from epoxi.bounce.verp import Decoded, ForgedToken, Verp
from epoxi.events.records import Record, RecordType, Response
from epoxi.events.sink import EventSink
from epoxi.message import MessageMeta

log = logging.getLogger(__name__)

UNCONFIRMED = "recipient not confirmed: the VERP token names another"

# What Quarantine.keep names a file; any other name (a path, "..") names no report
_KEPT_NAME = re.compile(r"([0-9]{1,20})-([a-z]{1,16})-([0-9A-Za-z]{1,64})\.eml")


@dataclass(frozen=True, slots=True)
class Kept:
    """A report in the quarantine."""

    name: str
    kind: str
    queue_id: str
    size: int
    kept_at: float


class Quarantine:
    """The last ``size`` reports, one file each (``<ns>-<kind>-<id>.eml``), oldest dropped.

    The calls block (call them in a thread). Only names ``keep`` makes are read or removed,
    so a name from a request cannot reach a file outside the directory."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size

    def keep(self, data: bytes, kind: str, queue_id: str) -> Path | None:
        """Write one report durably (blocking: call it in a thread). None when size is 0."""
        if self.size == 0:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{time.time_ns()}-{kind}-{queue_id}.eml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._trim()
        return path

    def _trim(self) -> None:
        kept = sorted(p for p in self.directory.iterdir() if p.suffix == ".eml")
        for path in kept[: max(0, len(kept) - self.size)]:
            path.unlink(missing_ok=True)

    def newest(self, limit: int) -> tuple[list[Kept], int]:
        """The ``limit`` newest reports, newest first, and how many are kept."""
        try:
            names = sorted(
                (n for n in os.listdir(self.directory) if _KEPT_NAME.fullmatch(n)), reverse=True
            )
        except FileNotFoundError:  # nothing kept yet
            return [], 0
        found = [kept for kept in map(self.find, names[:limit]) if kept is not None]
        return found, len(names)

    def find(self, name: str) -> Kept | None:
        """The report of that name; None when there is none (or the name is not one)."""
        match = _KEPT_NAME.fullmatch(name)
        if match is None:
            return None
        try:
            size = (self.directory / name).stat().st_size
        except FileNotFoundError:
            return None
        ns, kind, queue_id = match.groups()
        return Kept(name, kind, queue_id, size, int(ns) / 1e9)

    def read(self, name: str) -> bytes | None:
        """The report's bytes as received; None when there is no such report."""
        if self.find(name) is None:
            return None
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:  # trimmed meanwhile
            return None

    def remove(self, name: str) -> Kept | None:
        """Delete the report; returns what it was, None when there was none."""
        kept = self.find(name)
        if kept is None:
            return None
        try:
            (self.directory / name).unlink()
        except FileNotFoundError:
            return None
        return kept


@dataclass(frozen=True, slots=True)
class FeedbackMailbox:
    """Where mail for the bounce domain and the FBL addresses goes instead of the queues."""

    verp: Verp
    classifier: Classifier
    records: EventSink
    quarantine: Quarantine
    fbl_addresses: frozenset[str] = frozenset()
    # The (tenant, campaign) of a message by id (the status store), put on its records
    owner: Callable[[str], Awaitable[tuple[str, str] | None]] | None = None
    # Reports read, by kind, and tokens refused, since start (for the metrics)
    counts: dict[str, int] = field(default_factory=dict)

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Figures for the metrics: name -> (description, value)."""
        figures: dict[str, tuple[str, float]] = {
            f"inbound_reports_{kind.value}": (
                f"Reports read by the feedback mailbox since start: {kind.value}",
                self.counts.get(kind.value, 0),
            )
            for kind in Kind
        }
        figures["inbound_forged_tokens"] = (
            "Reports whose VERP token did not verify (no record made), since start",
            self.counts.get("forged", 0),
        )
        return figures

    def is_ours(self, recipient: str) -> bool:
        return self.verp.is_ours(recipient) or recipient.lower() in self.fbl_addresses

    async def take(self, meta: MessageMeta, body: bytes) -> list[str]:
        """Read the message if any recipient is ours; return the recipients left to deliver."""
        ours = [r for r in meta.recipients if self.is_ours(r)]
        if not ours:
            return meta.recipients
        report = parse(body, self.classifier)
        self.counts[report.kind.value] = self.counts.get(report.kind.value, 0) + 1
        records = await self._owned(self.records_for(report, ours, peer=meta.peer))
        kept = await asyncio.to_thread(self.quarantine.keep, body, report.kind.value, meta.id)
        log.info(
            "[%s] %s report from %s to %s: %d record(s); kept as %s",
            meta.id,
            report.kind.value,
            meta.peer or "?",
            ",".join(ours),
            len(records),
            kept.name if kept else "nothing",
        )
        for record in records:
            self.records.emit(record)
        return [r for r in meta.recipients if not self.is_ours(r)]

    async def _owned(self, records: list[Record]) -> list[Record]:
        """``records`` with the tenant and campaign of their message, where known."""
        if not records or self.owner is None:
            return records
        try:
            owner = await self.owner(records[0].message_id)
        except Exception as exc:  # the store is down: the records still go out, without
            log.warning("[%s] tenant lookup failed: %s", records[0].message_id, exc)
            return records
        if owner is None:
            return records
        tenant, campaign = owner
        return [msgspec.structs.replace(r, tenant=tenant, campaign=campaign) for r in records]

    def records_for(self, report: Report, ours: list[str], *, peer: str = "") -> list[Record]:
        """The OOB or Feedback records of ``report``, which came to the addresses ``ours``."""
        if report.kind not in (Kind.DSN, Kind.ARF):
            return []
        found = self._token(report, ours)
        if found is None:
            return []
        address, token = found
        if report.kind is Kind.ARF:
            return [self._feedback(report, address, token, peer)]
        return [self._oob(r, address, token, report) for r in _confirmed(report, token)]

    def _token(self, report: Report, ours: list[str]) -> tuple[str, Decoded] | None:
        """The first of the addresses that may carry a token whose token verifies."""
        for address in [*ours, *report.return_paths()]:
            if not self.verp.is_ours(address):
                continue
            try:
                return address, self.verp.decode(address)
            except ForgedToken as exc:
                log.warning("%s report: %s; no record", report.kind.value, exc)
                self.counts["forged"] = self.counts.get("forged", 0) + 1
                return None
        log.info("%s report names no VERP address of ours; no record", report.kind.value)
        return None

    def _oob(
        self, recipient: ReportedRecipient, address: str, token: Decoded, report: Report
    ) -> Record:
        code = 550 if recipient.permanent else 450
        return Record(
            type=RecordType.OOB,
            message_id=token.message_id,
            sender=address,
            recipient=_our_address(token, recipient),
            response=Response(code, recipient.status, recipient.diagnostic),
            peer_address=recipient.remote_mta,
            classification=recipient.category.value,
            reporter=report.reporting_mta,
            reason="" if token.per_message or _names(token, recipient) else UNCONFIRMED,
        )

    def _feedback(self, report: Report, address: str, token: Decoded, peer: str) -> Record:
        assert report.feedback is not None
        feedback = report.feedback
        return Record(
            type=RecordType.FEEDBACK,
            message_id=token.message_id,
            sender=address,
            recipient=feedback.original_rcpt_to or report.original.recipient,
            feedback_type=feedback.feedback_type,
            reporter=feedback.user_agent,
            peer_address=peer,
        )


def _names(token: Decoded, recipient: ReportedRecipient) -> bool:
    return token.names(recipient.address) or (
        bool(recipient.original_recipient) and token.names(recipient.original_recipient)
    )


def _our_address(token: Decoded, recipient: ReportedRecipient) -> str:
    """The address Epoxi sent to: the Original-Recipient when only it is the token's."""
    original = recipient.original_recipient
    if original and not token.names(recipient.address) and token.names(original):
        return original
    return recipient.address


def _confirmed(report: Report, token: Decoded) -> tuple[ReportedRecipient, ...]:
    """The failed recipients; those the token names, when it names one and one is reported."""
    failed = report.failed
    if token.per_message:
        return failed
    named = tuple(r for r in failed if _names(token, r))
    return named or failed
