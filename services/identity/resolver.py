"""Identity resolution as transactions: a consumer batch, a manual merge, an unmerge.

Each one locks its working set (see :mod:`services.identity.storage`), lets the pure
:class:`~services.identity.stitching.Graph` decide, writes back in a few statements and commits.
Profile changes go through the identity outbox (inserted in the same transaction, published after
the commit, swept if that fails). Resolved events are returned for the consumer to publish before
it acknowledges; a crash in between means a redelivery, which republishes from the stored result.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from services.core import db, streams
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from services.core.identity_rules import IdentityRules
from services.core.outbox import Outbox
from services.core.telemetry import inject_traceparent, meter
from services.identity.probabilistic import BatchMatcher, Thresholds
from services.identity.reads import SuggestionView, suggestion_view
from services.identity.rules_store import RulesCache
from services.identity.stitching import Graph, Key, LimitBroken, MergeFact, MergeRecord, Outcome
from services.identity.storage import Changes, EventLink, IdentityStore, KeySeen, Processed, RecordedMerge
from tessera.v1 import event_pb2, identity_pb2, stream_pb2

log = logging.getLogger(__name__)

_merges = meter.create_counter(
    "tessera.identity.merges", description="profiles merged, by kind (deterministic, probabilistic, manual, suggestion)"
)
_unmerges = meter.create_counter("tessera.identity.unmerges", description="profiles split by UnmergeProfile")
_resolved = meter.create_counter("tessera.identity.events_resolved", description="events resolved")
_dropped = meter.create_counter("tessera.identity.identifiers_dropped", description="identifiers not used to link")

DETERMINISTIC_RULE = "deterministic: the event carried identifiers of each profile"
Change = stream_pb2.ProfileChange


@dataclass
class IncomingEvent:
    """An event off the stream, its identifiers normalized by the tenant's rules."""

    event_id: str
    # The ``events`` entry as it arrived: the resolved entry is these bytes plus the profile id.
    envelope: bytes
    # The traceparent its resolved entry carries in place of the source's: the consumer span
    # that handles it ("" while tracing is off: the source's stays, of the same trace).
    traceparent: str
    keys: list[Key]
    occurred: dt.datetime
    source: str
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (type, reason)
    traits: dict[str, Any] | None = None  # Identify traits, read only when matching is on
    message_id: str = ""  # the client's idempotency key, recorded beside the event id as evidence


@dataclass
class ResolvedEvent:
    event_id: str
    profile_id: str | None
    # The ``resolved`` entry to publish.
    envelope: bytes


@dataclass
class BatchResult:
    events: list[ResolvedEvent]
    changes: list[Change]
    outcomes: dict[str, Outcome]


def parse_event(
    rules: IdentityRules, ev: event_pb2.Event, envelope: bytes, traceparent: str = "", *, with_traits: bool = False
) -> IncomingEvent:
    """Normalize an event's identifiers (dropped ones are kept with a reason)."""
    traits = json_format.MessageToDict(ev.identify.traits) if with_traits and ev.HasField("identify") else None
    keys: list[Key] = []
    dropped: list[tuple[str, str]] = []
    for ident in ev.identifiers:
        result = rules.normalize(ident.type, ident.value)
        if result.value is None:
            dropped.append((ident.type, str(result.dropped)))
        else:
            keys.append((ident.type, result.value))
    occurred = ev.timestamp.ToDatetime(dt.UTC) if ev.HasField("timestamp") else dt.datetime.now(dt.UTC)
    return IncomingEvent(
        ev.event_id, envelope, traceparent, keys, occurred, ev.source, dropped, traits, message_id=ev.message_id
    )


def merge_changes(recorded: Sequence[RecordedMerge], at: dt.datetime) -> list[Change]:
    return [
        streams.change(
            streams.MERGED,
            r.fact.survivor,
            absorbed_profile_id=r.fact.absorbed,
            merge_id=r.merge_id,
            event_id=r.fact.event_id,
            at=at,
        )
        for r in recorded
    ]


def checked_merge(graph: Graph, survivor: str, absorbed: str) -> MergeFact:
    """A requested merge, or FAILED_PRECONDITION naming the identifier type whose limit it breaks."""
    try:
        return graph.merge(survivor, absorbed)
    except LimitBroken as exc:
        raise FailedPrecondition(
            f"merge refused by merge protection: {exc}",
            type_="IDENTIFIER_LIMIT",
            subject=f"identityRules/types/{exc.type_name}",
            description=str(exc),
        ) from None


class Resolver:
    def __init__(
        self,
        store: IdentityStore,
        rules: RulesCache,
        outbox: Outbox,
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.store = store
        self.rules = rules
        self.outbox = outbox
        self.clock = clock
        self.new_id = new_id

    @contextmanager
    def _changing(self, tenant_id: str, span: str, rows: int = 0) -> Iterator[tuple[Any, list[Change]]]:
        """A transaction whose profile changes (appended to the list) go into the outbox within it
        and are published once it has committed."""
        changes: list[Change] = []
        with db.raw_transaction(self.store.engine, span, rows) as (cur, _):
            yield cur, changes
            traceparent = inject_traceparent()
            envelopes = [streams.change_envelope(tenant_id, traceparent, c) for c in changes]
            pending = self.outbox.enqueue(cur, tenant_id, streams.CHANGES.name, envelopes)
        self.outbox.submit(pending)

    # ------------------------------------------------------------------------------------------
    # The consumer's batch.

    def resolve_batch(self, tenant_id: str, events: Sequence[IncomingEvent]) -> BatchResult:
        """Apply a batch of one tenant's events in one transaction; idempotent per event id."""
        tenant_rules = self.rules.get_full(tenant_id)
        rules = tenant_rules.rules
        matcher = None
        if tenant_rules.probabilistic.get("enabled"):
            thresholds = Thresholds.of(tenant_rules.probabilistic)
            matcher = BatchMatcher.for_events(
                thresholds, ((e.event_id, e.traits) for e in events), weights=tenant_rules.weights
            )
        all_keys = {k for e in events for k in e.keys}
        now_s = self.clock()
        now = dt.datetime.fromtimestamp(now_s, dt.UTC)
        outcomes: dict[str, Outcome] = {}
        with self._changing(tenant_id, "identity resolve batch", len(events)) as (cur, publications):
            blocks = matcher.block_keys() if matcher else []
            record_keys = {k for e in events if matcher and e.event_id in matcher.records for k in e.keys}
            graph, candidates = self.store.lock_working_set(
                cur,
                tenant_id,
                rules,
                all_keys,
                block_keys=blocks,
                record_keys=record_keys,
                with_candidates=matcher is not None,
            )
            if matcher is not None:
                matcher.load(candidates)
                matcher.load_counts(self.store.value_counts(cur, tenant_id, matcher.count_keys()))
            # Checked under the locks: a concurrent redelivery of the same event waits for them.
            done = self.store.processed(cur, tenant_id, [e.event_id for e in events])
            changes = Changes(graph)
            links: list[EventLink] = []
            for e in events:
                if e.event_id in done or e.event_id in outcomes:
                    continue
                if not e.keys:
                    done[e.event_id] = Processed(None)
                    links.append((e.event_id, None, (), e.occurred))
                    continue
                out = graph.resolve(e.event_id, e.keys, self.new_id, now_s)
                outcomes[e.event_id] = out
                seen = KeySeen(e.occurred, e.source, e.event_id, e.message_id)
                if e.message_id:
                    changes.message_ids[e.event_id] = e.message_id
                for k in out.attached:
                    changes.new_keys[k] = (out.profile_id, seen)
                for k in out.linked:
                    if k not in changes.new_keys:
                        prev = changes.seen.get(k)
                        changes.seen[k] = e.occurred if prev is None else max(prev, e.occurred)
                changes.merges.extend(
                    MergeRecord(m, identity_pb2.MERGE_KIND_DETERMINISTIC, DETERMINISTIC_RULE) for m in out.merges
                )
                if matcher is not None:
                    changes.merges.extend(matcher.match(graph, e.event_id, out.profile_id))
                links.append((e.event_id, out.profile_id, out.linked, e.occurred))
            recorded = self.store.write(cur, tenant_id, changes, now, links)
            if matcher is not None:
                self.store.add_match_records(cur, tenant_id, matcher.new_records(graph, outcomes))
                self.store.add_value_counts(cur, tenant_id, matcher.count_deltas())
                self.store.add_suggestions(cur, tenant_id, matcher.suggestion_rows(graph))
            publications.extend(streams.change(streams.CREATED, p.profile_id, at=now) for p in graph.new_profiles())
            publications.extend(merge_changes(recorded, now))
        resolved: list[ResolvedEvent] = []
        emitted: set[str] = set()
        for e in events:
            if e.event_id in emitted:
                continue
            emitted.add(e.event_id)
            if e.event_id in outcomes:
                out = outcomes[e.event_id]
                pid: str | None = graph.final(out.profile_id)
                keys: tuple[Key, ...] = out.linked
            else:
                prior = done.get(e.event_id, Processed(None))
                pid, keys = prior.profile_id, prior.identifiers
            envelope = streams.resolved_envelope(e.envelope, pid, keys, e.traceparent)
            resolved.append(ResolvedEvent(e.event_id, pid, envelope))
        self._count(tenant_id, events, outcomes, recorded)
        return BatchResult(resolved, publications, outcomes)

    def _count(
        self,
        tenant_id: str,
        events: Sequence[IncomingEvent],
        outcomes: dict[str, Outcome],
        recorded: Sequence[RecordedMerge],
    ) -> None:
        _resolved.add(len(outcomes))
        names = {v.number: v.name for v in identity_pb2.MergeKind.DESCRIPTOR.values}
        kinds = Counter(names[r.kind].removeprefix("MERGE_KIND_").lower() for r in recorded)
        for kind, n in kinds.items():
            _merges.add(n, {"kind": kind})
        drops = Counter(reason for e in events for _type, reason in e.dropped)
        drops["MERGE_PROTECTION"] += sum(len(out.dropped) for out in outcomes.values())
        for reason, n in drops.items():
            if n:
                _dropped.add(n, {"reason": reason})
        for out in outcomes.values():
            if out.dropped:
                log.info(
                    "merge protection dropped identifiers",
                    extra={"tenant": tenant_id, "event_id": out.event_id, "dropped": [d.key[0] for d in out.dropped]},
                )

    # ------------------------------------------------------------------------------------------
    # Manual changes.

    def merge(
        self, tenant_id: str, survivor: str, absorbed: str, reason: str, *, kind: int = identity_pb2.MERGE_KIND_MANUAL
    ) -> tuple[RecordedMerge, list[Change]]:
        rules = self.rules.get(tenant_id)
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        with self._changing(tenant_id, "identity manual merge") as (cur, pubs):
            graph, _ = self.store.lock_working_set(cur, tenant_id, rules, (), (survivor, absorbed))
            s = self._active(cur, tenant_id, graph, survivor)
            a = self._active(cur, tenant_id, graph, absorbed)
            if s == a:
                raise FailedPrecondition(
                    "the two profiles are already one customer",
                    type_="ALREADY_MERGED",
                    subject=f"profiles/{s}",
                    description=f"profiles/{survivor} and profiles/{absorbed} both resolve to profiles/{s}",
                )
            fact = checked_merge(graph, s, a)
            changes = Changes(graph, merges=[MergeRecord(fact, kind, "manual", reason)])
            recorded = self.store.write(cur, tenant_id, changes, now)
            pubs.extend(merge_changes(recorded, now))
        _merges.add(1, {"kind": "manual"})
        return recorded[0], pubs

    def unmerge(
        self, tenant_id: str, profile: str, keys: Sequence[Key], reason: str
    ) -> tuple[RecordedMerge, list[str], list[Change]]:
        """Split ``keys`` off ``profile`` into a new profile; events linked only by them follow."""
        rules = self.rules.get(tenant_id)
        now_s = self.clock()
        now = dt.datetime.fromtimestamp(now_s, dt.UTC)
        with self._changing(tenant_id, "identity unmerge") as (cur, pubs):
            graph, _ = self.store.lock_working_set(cur, tenant_id, rules, keys, (profile,))
            source = self._active(cur, tenant_id, graph, profile)
            violations = [
                Violation(f"identifiers[{i}]", f"does not belong to profiles/{source}", "NOT_ON_PROFILE")
                for i, k in enumerate(keys)
                if graph.owner.get(k) != source
            ]
            if violations:
                raise InvalidArgument("every identifier to split off must belong to the profile", violations)
            if set(keys) == graph.profiles[source].keys:
                raise FailedPrecondition(
                    "a split must leave at least one identifier on the profile",
                    type_="SPLIT_EVERYTHING",
                    subject=f"profiles/{source}",
                    description="name a subset of the profile's identifiers",
                )
            target = graph.split(source, keys, self.new_id(), now_s)
            changes = Changes(graph, new_origin={k: target.profile_id for k in keys})
            fact = MergeFact(source, target.profile_id, tuple(sorted(set(keys))))
            changes.merges.append(MergeRecord(fact, identity_pb2.MERGE_KIND_UNMERGE, "manual", reason))
            recorded = self.store.write(cur, tenant_id, changes, now)
            moved = self.store.reattribute(cur, tenant_id, source, sorted(set(keys)), target.profile_id)
            rec = recorded[0]
            pubs.extend(
                (
                    streams.change(streams.CREATED, target.profile_id, at=now),
                    streams.change(
                        streams.SPLIT,
                        source,
                        new_profile_id=target.profile_id,
                        merge_id=rec.merge_id,
                        moved_event_ids=moved,
                        moved_identifiers=sorted(set(keys)),
                        at=now,
                    ),
                )
            )
        _unmerges.add(1)
        return rec, moved, pubs

    def review(
        self, tenant_id: str, suggestion_id: int, accept: bool, reason: str
    ) -> tuple[SuggestionView, RecordedMerge | None, list[Change]]:
        """Accept (merge the pair, older profile surviving) or reject an open suggestion."""
        rules = self.rules.get(tenant_id)
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        name = f"matchSuggestions/{suggestion_id}"
        recorded: RecordedMerge | None = None
        with self._changing(tenant_id, "identity review suggestion") as (cur, pubs):
            row = self.store.suggestion_for_update(cur, tenant_id, suggestion_id)
            if row is None:
                raise NotFound(f"{name} not found")
            suggestion = suggestion_view(row)
            a, b = suggestion.profile_a, suggestion.profile_b
            if suggestion.state != identity_pb2.MATCH_SUGGESTION_STATE_OPEN:
                raise FailedPrecondition(
                    f"{name} was already reviewed", type_="ALREADY_REVIEWED", subject=name, description="not open"
                )
            if accept:
                graph, _ = self.store.lock_working_set(cur, tenant_id, rules, (), (a, b))
                fa = self._active(cur, tenant_id, graph, a)
                fb = self._active(cur, tenant_id, graph, b)
                if fa != fb:
                    survivor, absorbed = sorted((fa, fb), key=lambda p: (graph.profiles[p].created, p))
                    fact = checked_merge(graph, survivor, absorbed)
                    kind = identity_pb2.MERGE_KIND_SUGGESTION
                    merge = MergeRecord(
                        fact,
                        kind,
                        f"accepted {name}",
                        reason,
                        suggestion.score,
                        suggestion.scored.raw if suggestion.scored is not None else dict(suggestion.evidence),
                    )
                    (recorded,) = self.store.write(cur, tenant_id, Changes(graph, merges=[merge]), now)
            new_state = (
                identity_pb2.MATCH_SUGGESTION_STATE_ACCEPTED if accept else identity_pb2.MATCH_SUGGESTION_STATE_REJECTED
            )
            updated = self.store.review_suggestion(
                cur, tenant_id, suggestion_id, new_state, reason, recorded.merge_id if recorded else None
            )
            pubs.extend(merge_changes([recorded] if recorded else [], now))
        if recorded is not None:
            _merges.add(1, {"kind": "suggestion"})
        return suggestion_view(updated), recorded, pubs

    def erase(self, tenant_id: str, profile: str) -> tuple[str, int, list[str]]:
        """Forget a person (see IdentityService.EraseProfile); emits an "erased" change."""
        rules = self.rules.get(tenant_id)
        with self._changing(tenant_id, "identity erase") as (cur, pubs):
            graph, _ = self.store.lock_working_set(cur, tenant_id, rules, (), (profile,))
            target = self._active(cur, tenant_id, graph, profile)
            deleted, ids = self.store.erase(cur, tenant_id, target)
            pubs.append(streams.change(streams.ERASED, target, erased_profile_ids=ids))
        log.info("profile erased", extra={"tenant": tenant_id, "identifiers": deleted, "profiles": len(ids)})
        return target, deleted, ids

    def _active(self, cur: Any, tenant_id: str, graph: Graph, asked: str) -> str:
        """The locked active profile an id (maybe merged away) resolves to, or NOT_FOUND."""
        final = self.store.survivor(tenant_id, asked, cur)
        if final is None or final not in graph.profiles:
            raise NotFound(f"profiles/{asked} not found")
        return final
