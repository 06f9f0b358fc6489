"""The right to erasure, ingest's part, as pure code: the suppression list and event purges.

No I/O here (tested without a database): where the list is kept is
:class:`services.ingest.storage.SuppressionStore`; this module decides what goes on it, how an
incoming event is matched against it, and how long a replica may trust its copy.

**What is kept.** For each identifier of an erased person, a 16-byte keyed hash
(:func:`identifier_hash`: SHA-256 over tenant, type and canonical value), never the value: the
point is to forget the person. Beside it, for each identifier type, the normalizer the tenant's
identity rules named when the person was erased, and the region national phone numbers are read
in, so ingest makes an incoming identifier canonical exactly as identity would before hashing it
("  Ada@Example.COM " and "ada@example.com" are one email; "(415) 555-0100" read in US and
"+14155500100" are one phone). A type with no stored normalizer is trimmed.

**When it applies.** Every replica keeps the list in memory (:class:`SuppressionCache`) and asks
PostgreSQL whether any tenant's list changed at most every ``suppression_cache_seconds``
(``TESSERA_INGEST_SUPPRESSION_CACHE_SECONDS``, default 2 s; 0 asks on every batch). So a
suppression takes effect on every replica within that time after ``SuppressIdentifiers``
returned: every batch that *starts* later is checked against it. (A batch already past its check
then commits within its statement limit, 60 s at most, usually milliseconds.) The profile
service's erasure waits that long before it relies on the suppression. A tenant without
suppressions costs one dict look-up per batch and no query; one with suppressions costs a
normalization and a hash per identifier of a suppressed type.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Protocol

import phonenumbers

from services.core.errors import InvalidArgument, Violation
from services.core.identity_rules import MAX_TYPES, TYPE_NAME_RE, TYPE_NAME_RULE
from services.core.normalize import NORMALIZERS, Normalizer, trim
from services.ingest.prepare import Prepared, received_at_range
from tessera.v1 import event_pb2, ingest_pb2

SUPPRESSED = ingest_pb2.EVENT_STATUS_SUPPRESSED

MAX_SUPPRESS_IDENTIFIERS: Final = 1000
MAX_PURGE_EVENT_IDS: Final = 1000
#: A canonical value can be longer than the raw one ("ß" case-folds to "ss"), never this long.
MAX_SUPPRESSED_VALUE: Final = 1024
MAX_ERASURE_REQUEST: Final = 256
#: What a type without a stored normalizer is made canonical with (identity's custom-type default).
DEFAULT_NORMALIZER: Final = "trim"
HASH_BYTES: Final = 16
#: Identifiers matched per tenant's list and remembered (raw value -> suppressed or not).
MEMO_SIZE: Final = 100_000

_EVENT_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_SEP = "\x1f"


def identifier_hash(tenant_id: str, id_type: str, value: str) -> bytes:
    """16 bytes of SHA-256 over ``tenant_id, type, canonical value`` (unit separators between).

    Keyed by the tenant, so one person's email hashes differently in two tenants, and the hash
    of a type and value is stored in place of them.
    """
    return hashlib.sha256(f"{tenant_id}{_SEP}{id_type}{_SEP}{value}".encode()).digest()[:HASH_BYTES]


@dataclass(frozen=True, slots=True)
class TypeNormalizer:
    """How one identifier type's values are made canonical: a name of
    :data:`services.core.normalize.NORMALIZERS` and the region national phones are read in."""

    normalizer: str
    default_region: str = ""


_DEFAULT = TypeNormalizer(DEFAULT_NORMALIZER)


def canonical(normalizer: TypeNormalizer, raw: str) -> str | None:
    """The value identity would link with, or None when the normalizer refuses it (as identity
    does: trimmed first, control characters refused)."""
    fn: Normalizer = NORMALIZERS.get(normalizer.normalizer) or NORMALIZERS[DEFAULT_NORMALIZER]
    trimmed = trim(raw)
    if not trimmed or any(ord(ch) < 32 for ch in trimmed):
        return None
    return fn(trimmed, normalizer.default_region)


# ---- SuppressIdentifiers


@dataclass(frozen=True)
class Suppression:
    """A validated SuppressIdentifiers call: the hashes to add (one per distinct identifier), the
    normalizers to upsert, and the erasure request it serves."""

    entries: tuple[tuple[str, bytes], ...]  # (id_type, id_hash)
    normalizers: Mapping[str, TypeNormalizer]
    erasure_request: str


def _erasure_request(name: str, out: list[Violation], path: str = "erasure_request") -> None:
    if len(name) > MAX_ERASURE_REQUEST:
        out.append(Violation(path, f"at most {MAX_ERASURE_REQUEST} characters, got {len(name)}", "TOO_LONG"))


def parse_suppression(tenant_id: str, request: ingest_pb2.SuppressIdentifiersRequest) -> Suppression:
    """Validate a SuppressIdentifiers request, or raise INVALID_ARGUMENT with field violations.

    Values are taken as given (identity has already made them canonical); only their hashes leave
    this function.
    """
    out: list[Violation] = []
    n = len(request.identifiers)
    if n > MAX_SUPPRESS_IDENTIFIERS:
        out.append(Violation("identifiers", f"at most {MAX_SUPPRESS_IDENTIFIERS} per request, got {n}", "TOO_MANY"))
    entries: dict[bytes, str] = {}
    for i, ident in enumerate(request.identifiers[:MAX_SUPPRESS_IDENTIFIERS]):
        if not TYPE_NAME_RE.fullmatch(ident.type):
            out.append(Violation(f"identifiers[{i}].type", TYPE_NAME_RULE, "INVALID_FORMAT"))
        if not ident.value or ident.value.isspace():
            out.append(Violation(f"identifiers[{i}].value", "required", "REQUIRED"))
        elif len(ident.value) > MAX_SUPPRESSED_VALUE:
            out.append(
                Violation(
                    f"identifiers[{i}].value",
                    f"at most {MAX_SUPPRESSED_VALUE} characters, got {len(ident.value)}",
                    "TOO_LONG",
                )
            )
        if not out:
            entries.setdefault(identifier_hash(tenant_id, ident.type, ident.value), ident.type)
    if len(request.normalizers) > MAX_TYPES:
        out.append(
            Violation("normalizers", f"at most {MAX_TYPES} per request, got {len(request.normalizers)}", "TOO_MANY")
        )
    region = request.default_region
    if region and not (len(region) == 2 and region in phonenumbers.SUPPORTED_REGIONS):
        out.append(
            Violation(
                "default_region",
                "empty, or an upper-case ISO 3166 region phonenumbers supports, such as 'US'",
                "UNKNOWN_VALUE",
            )
        )
    normalizers: dict[str, TypeNormalizer] = {}
    for i, spec in enumerate(request.normalizers[:MAX_TYPES]):
        if not TYPE_NAME_RE.fullmatch(spec.type):
            out.append(Violation(f"normalizers[{i}].type", TYPE_NAME_RULE, "INVALID_FORMAT"))
        elif spec.type in normalizers:
            out.append(Violation(f"normalizers[{i}].type", f"type {spec.type!r} is named twice", "DUPLICATE"))
        if spec.normalizer not in NORMALIZERS:
            known = ", ".join(NORMALIZERS)
            out.append(
                Violation(f"normalizers[{i}].normalizer", f"unknown normalizer; use one of: {known}", "UNKNOWN_VALUE")
            )
        normalizers.setdefault(spec.type, TypeNormalizer(spec.normalizer, region))
    _erasure_request(request.erasure_request, out)
    if out:
        raise InvalidArgument("invalid suppression request", out)
    return Suppression(
        entries=tuple((t, h) for h, t in entries.items()),
        normalizers=MappingProxyType(normalizers),
        erasure_request=request.erasure_request,
    )


# ---- PurgeEvents


@dataclass(frozen=True)
class Purge:
    """A validated PurgeEvents call: distinct event ids, each with the receive-time range its
    partition of the event log is found by (see :func:`services.ingest.prepare.received_at_range`)."""

    event_ids: tuple[str, ...]
    ranges: tuple[tuple[dt.datetime, dt.datetime], ...]
    erasure_request: str


def parse_purge(request: ingest_pb2.PurgeEventsRequest) -> Purge:
    """Validate a PurgeEvents request, or raise INVALID_ARGUMENT with field violations: each id must
    be an event id this service issues (a UUIDv7, in its canonical text form; any case)."""
    out: list[Violation] = []
    n = len(request.event_ids)
    if n > MAX_PURGE_EVENT_IDS:
        out.append(Violation("event_ids", f"at most {MAX_PURGE_EVENT_IDS} per request, got {n}", "TOO_MANY"))
    ids: dict[str, tuple[dt.datetime, dt.datetime] | None] = {}
    for i, raw in enumerate(request.event_ids[:MAX_PURGE_EVENT_IDS]):
        event_id = raw.lower()
        if not _EVENT_ID_RE.fullmatch(event_id):
            out.append(
                Violation(
                    f"event_ids[{i}]",
                    "not an event id of this service (a UUIDv7 such as '0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b')",
                    "INVALID_FORMAT",
                )
            )
            continue
        if event_id not in ids:
            ids[event_id] = received_at_range(event_id)
    _erasure_request(request.erasure_request, out)
    if out:
        raise InvalidArgument("invalid purge request", out)
    # An id whose time no event can have (past year 9999) names nothing: there is nothing to purge.
    kept = [(eid, rng) for eid, rng in ids.items() if rng is not None]
    return Purge(
        event_ids=tuple(eid for eid, _ in kept),
        ranges=tuple(rng for _, rng in kept),
        erasure_request=request.erasure_request,
    )


# ---- matching events


@dataclass(frozen=True)
class TenantSuppressions:
    """One tenant's suppression list as a replica holds it: what to match an event against."""

    tenant_id: str
    version: int
    hashes: frozenset[bytes]
    # The types with at least one suppressed value: identifiers of other types are not even normalized.
    types: frozenset[str]
    normalizers: Mapping[str, TypeNormalizer]
    _memo: dict[tuple[str, str], bool] = field(default_factory=dict, compare=False, repr=False)

    def suppresses(self, id_type: str, raw: str) -> bool:
        """Whether this identifier, made canonical as identity would, is on the list."""
        if id_type not in self.types:
            return False
        key = (id_type, raw)
        hit = self._memo.get(key)
        if hit is None:
            value = canonical(self.normalizers.get(id_type, _DEFAULT), raw)
            hit = value is not None and identifier_hash(self.tenant_id, id_type, value) in self.hashes
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def carries_suppressed(self, identifiers: Iterable[event_pb2.Identifier]) -> bool:
        return any(self.suppresses(i.type, i.value) for i in identifiers)

    def with_changes(self, changes: SuppressionChanges) -> TenantSuppressions:
        """This list with the entries added since its version (entries are never removed)."""
        return TenantSuppressions(
            tenant_id=self.tenant_id,
            version=changes.version,
            hashes=self.hashes.union(h for _t, h in changes.entries),
            types=self.types.union(t for t, _h in changes.entries),
            normalizers=MappingProxyType(dict(changes.normalizers)),
        )


def empty(tenant_id: str) -> TenantSuppressions:
    return TenantSuppressions(tenant_id, 0, frozenset(), frozenset(), MappingProxyType({}))


def drop_suppressed(
    prep: Prepared, events: Sequence[event_pb2.Event], suppressions: TenantSuppressions
) -> tuple[Prepared, int]:
    """Take the events carrying a suppressed identifier out of a prepared batch, before dedupe and
    storage: their results say SUPPRESSED (no event id, no violations). An in-batch duplicate of a
    suppressed event is suppressed with it. Returns the batch still to store and how many were
    dropped. Rejected events stay rejected: validation comes first."""
    dropped: set[int] = set()
    to_store = []
    positions = []
    for new, pos in zip(prep.to_store, prep.positions, strict=True):
        if suppressions.carries_suppressed(events[pos].identifiers):
            prep.results[pos].status = SUPPRESSED
            dropped.add(pos)
        else:
            to_store.append(new)
            positions.append(pos)
    dups: dict[int, int] = {}
    extra = 0
    for i, first in prep.in_batch_duplicates.items():
        if first in dropped or suppressions.carries_suppressed(events[i].identifiers):
            prep.results[i].status = SUPPRESSED
            extra += 1
        else:
            dups[i] = first
    if not dropped and not extra:
        return prep, 0
    return Prepared(prep.results, to_store, positions, dups), len(dropped) + extra


# ---- the per-replica cache


@dataclass(frozen=True)
class SuppressionChanges:
    """What a tenant's list gained after some version, and its normalizers now."""

    version: int
    entries: Sequence[tuple[str, bytes]]  # (id_type, id_hash) added after the version asked about
    normalizers: Mapping[str, TypeNormalizer]


class SuppressionSource(Protocol):
    """Where the lists are kept (:class:`services.ingest.storage.SuppressionStore`)."""

    def suppression_versions(self) -> Mapping[str, int]:
        """tenant_id -> version of its list, for every tenant that has one."""

    def suppression_changes(self, tenant_id: str, after_version: int) -> SuppressionChanges:
        """The tenant's entries added after ``after_version``, with its current version."""


class SuppressionCache:
    """Every tenant's suppression list, in memory, refreshed at most every ``ttl`` seconds.

    The refresh is one query for all tenants (their lists' versions: one row per tenant with a
    list), then, only for a tenant whose version moved and that sends events here, a query for
    what its list gained since. Lists only grow, so a replica never reloads a whole list.

    Guarantee: the versions a batch is checked against were read at most ``ttl`` seconds before
    the check, so a suppression committed earlier than that is seen. ``ttl = 0`` reads them for
    every batch.
    """

    def __init__(self, source: SuppressionSource, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.ttl = ttl
        self.clock = clock
        self._versions: Mapping[str, int] = {}
        self._checked = -float("inf")
        self._tenants: dict[str, TenantSuppressions] = {}
        self._versions_lock = threading.Lock()
        self._load_lock = threading.Lock()

    def get(self, tenant_id: str) -> TenantSuppressions | None:
        """The tenant's list, or None when it has none (the common case: one dict look-up)."""
        versions = self._versions
        if self.clock() - self._checked >= self.ttl:
            versions = self._refresh_versions()
        want = versions.get(tenant_id)
        if want is None:
            return None
        have = self._tenants.get(tenant_id)
        if have is not None and have.version >= want:
            return have
        return self._load(tenant_id, want)

    def invalidate(self) -> None:
        """Read the versions again on the next batch (this replica just changed a list)."""
        self._checked = -float("inf")

    def _refresh_versions(self) -> Mapping[str, int]:
        if self.ttl <= 0:
            versions = dict(self.source.suppression_versions())
            self._versions = versions
            return versions
        with self._versions_lock:
            if self.clock() - self._checked < self.ttl:
                return self._versions  # another thread refreshed while this one waited
            started = self.clock()
            versions = dict(self.source.suppression_versions())
            self._versions = versions
            self._checked = started
            for gone in [t for t in self._tenants if t not in versions]:
                self._tenants.pop(gone, None)
            return versions

    def _load(self, tenant_id: str, want: int) -> TenantSuppressions:
        with self._load_lock:
            have = self._tenants.get(tenant_id)
            if have is not None and have.version >= want:
                return have
            base = have or empty(tenant_id)
            loaded = base.with_changes(self.source.suppression_changes(tenant_id, base.version))
            self._tenants[tenant_id] = loaded
            return loaded
