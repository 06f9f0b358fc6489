"""The pure part of ingest's erasure: hashing, request validation, matching events against a
tenant's suppression list, and how long a replica trusts its copy (no database)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from types import MappingProxyType

import pytest

from services.core.errors import InvalidArgument
from services.core.settings import SettingsError
from services.ingest import prepare, suppression, validation
from services.ingest.settings import IngestSettings
from services.ingest.suppression import SuppressionChanges, TypeNormalizer, identifier_hash
from tessera.v1 import event_pb2, ingest_pb2
from tests.support.events import interaction, track

SUPPRESSED = ingest_pb2.EVENT_STATUS_SUPPRESSED
UNSPECIFIED = ingest_pb2.EVENT_STATUS_UNSPECIFIED
REJECTED = ingest_pb2.EVENT_STATUS_REJECTED
NORMALIZERS = {"email": TypeNormalizer("email", "US"), "phone": TypeNormalizer("phone", "US")}


def listed(
    tenant: str, *entries: tuple[str, str], normalizers: Mapping[str, TypeNormalizer] = NORMALIZERS
) -> suppression.TenantSuppressions:
    """A tenant's list holding these canonical (type, value) identifiers."""
    return suppression.empty(tenant).with_changes(
        SuppressionChanges(1, [(t, identifier_hash(tenant, t, v)) for t, v in entries], MappingProxyType(normalizers))
    )


def request(*identifiers: tuple[str, str], normalizers=(("email", "email"), ("phone", "phone")), region="US"):  # type: ignore[no-untyped-def]
    return ingest_pb2.SuppressIdentifiersRequest(
        identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in identifiers],
        normalizers=[ingest_pb2.SuppressionNormalizer(type=t, normalizer=n) for t, n in normalizers],
        default_region=region,
        erasure_request="erasureRequests/1",
    )


def violations(err: pytest.ExceptionInfo[InvalidArgument]) -> list[tuple[str, str]]:
    return [(v.field, v.reason) for v in err.value.violations]


def test_the_hash_is_16_bytes_keyed_by_tenant_and_type() -> None:
    h = identifier_hash("acme", "email", "ada@example.com")
    assert len(h) == 16
    assert h == identifier_hash("acme", "email", "ada@example.com")
    assert h != identifier_hash("other", "email", "ada@example.com")
    assert h != identifier_hash("acme", "user_id", "ada@example.com")
    # The separator keeps the parts apart (neither tenant ids nor types may contain it).
    assert identifier_hash("acme", "email", "x") != identifier_hash("acm", "eemail", "x")


def test_a_request_becomes_hashes_and_normalizers_only() -> None:
    parsed = suppression.parse_suppression(
        "acme", request(("email", "ada@example.com"), ("phone", "+14155550100"), ("email", "ada@example.com"))
    )
    assert parsed.entries == (
        ("email", identifier_hash("acme", "email", "ada@example.com")),
        ("phone", identifier_hash("acme", "phone", "+14155550100")),
    )
    assert dict(parsed.normalizers) == NORMALIZERS
    assert parsed.erasure_request == "erasureRequests/1"
    assert "ada@example.com" not in repr(parsed)


def test_suppression_request_violations_name_their_fields() -> None:
    bad = request(
        ("Email", "ada@example.com"),
        ("email", "  "),
        normalizers=(("email", "email"), ("email", "phone"), ("crm_id", "upper")),
        region="XX",
    )
    with pytest.raises(InvalidArgument) as err:
        suppression.parse_suppression("acme", bad)
    assert violations(err) == [
        ("identifiers[0].type", "INVALID_FORMAT"),
        ("identifiers[1].value", "REQUIRED"),
        ("default_region", "UNKNOWN_VALUE"),
        ("normalizers[1].type", "DUPLICATE"),
        ("normalizers[2].normalizer", "UNKNOWN_VALUE"),
    ]


def test_too_many_identifiers_and_lower_case_regions_are_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        suppression.parse_suppression("acme", request(*[("email", f"p{i}@example.com") for i in range(1001)]))
    assert violations(err) == [("identifiers", "TOO_MANY")]
    with pytest.raises(InvalidArgument) as err:
        suppression.parse_suppression("acme", request(("email", "a@example.com"), region="us"))
    assert violations(err) == [("default_region", "UNKNOWN_VALUE")]
    assert suppression.parse_suppression("acme", request(("email", "a@example.com"), region="")).entries


def test_purge_ids_must_be_event_ids_and_give_their_receive_time() -> None:
    # A microsecond that float arithmetic rounds: the range must hold it all the same.
    received = dt.datetime.now(dt.UTC).replace(microsecond=891_000)
    prep = prepare.prepare([track()], received, validation.Limits())
    event_id = prep.to_store[0].event_id
    parsed = suppression.parse_purge(ingest_pb2.PurgeEventsRequest(event_ids=[event_id.upper(), event_id]))
    assert parsed.event_ids == (event_id,)
    ((lo, hi),) = parsed.ranges
    assert lo <= received < hi
    assert hi - lo <= dt.timedelta(milliseconds=3)
    with pytest.raises(InvalidArgument) as err:
        suppression.parse_purge(
            ingest_pb2.PurgeEventsRequest(
                event_ids=[event_id, "nope", "6f1c3c1e-2b7e-4c1a-9d3e-2f6f1c3c1e2b", event_id.replace("-", "")]
            )
        )
    assert violations(err) == [(f"event_ids[{i}]", "INVALID_FORMAT") for i in (1, 2, 3)]
    with pytest.raises(InvalidArgument) as err:
        suppression.parse_purge(ingest_pb2.PurgeEventsRequest(event_ids=[event_id] * 1001))
    assert violations(err) == [("event_ids", "TOO_MANY")]


def test_an_id_from_beyond_year_9999_names_nothing() -> None:
    far = "ffffffff-ffff-7fff-bfff-ffffffffffff"
    assert suppression.parse_purge(ingest_pb2.PurgeEventsRequest(event_ids=[far])).event_ids == ()


def test_identifiers_match_in_any_spelling_the_normalizer_accepts() -> None:
    lst = listed("acme", ("email", "ada@example.com"), ("phone", "+14155550100"), ("crm_id", "C-1"))
    assert lst.suppresses("email", "  Ada@Example.COM ")
    assert lst.suppresses("phone", "(415) 555-0100")
    assert lst.suppresses("phone", "+1 415 555 0100")
    assert lst.suppresses("crm_id", " C-1 ")  # no stored normalizer: trimmed
    assert not lst.suppresses("crm_id", "c-1")
    assert not lst.suppresses("email", "ada@example.org")
    assert not lst.suppresses("phone", "not a phone")  # the normalizer refuses it: no match
    assert not lst.suppresses("user_id", "ada@example.com")  # another type
    # Another tenant's list holds other hashes for the same person.
    assert not listed("other", ("email", "bob@example.com")).suppresses("email", "ada@example.com")


def test_the_stored_region_reads_national_numbers() -> None:
    uk = {"phone": TypeNormalizer("phone", "GB")}
    lst = listed("acme", ("phone", "+442079460000"), normalizers=uk)
    assert lst.suppresses("phone", "020 7946 0000")
    assert not listed("acme", ("phone", "+442079460000")).suppresses("phone", "020 7946 0000")  # read as US


def test_suppressed_events_leave_the_batch_and_duplicates_follow_them() -> None:
    erased = track("erased", email="  ADA@example.com")
    keep = track("keep", email="bob@example.com")
    bad = track("bad", email="ada@example.com")
    bad.ClearField("track")  # invalid: rejected before any suppression
    call = interaction("call")
    call.identifiers[0].value = "(415) 555-0100"
    again = track("erased", email="bob@example.com")  # same message id as a suppressed event
    events = [erased, keep, bad, call, again]
    prep = prepare.prepare(events, dt.datetime.now(dt.UTC), validation.Limits())
    lst = listed("acme", ("email", "ada@example.com"), ("phone", "+14155550100"))
    kept, dropped = suppression.drop_suppressed(prep, events, lst)
    assert dropped == 3
    assert [r.status for r in kept.results] == [SUPPRESSED, UNSPECIFIED, REJECTED, SUPPRESSED, SUPPRESSED]
    assert [n.message_id for n in kept.to_store] == ["keep"]
    assert kept.positions == [1]
    assert kept.in_batch_duplicates == {}
    assert all(not r.event_id and not r.violations for r in kept.results if r.status == SUPPRESSED)


def test_a_batch_without_suppressed_identifiers_is_untouched() -> None:
    events = [track("a", email="bob@example.com"), track("a", email="bob@example.com")]
    prep = prepare.prepare(events, dt.datetime.now(dt.UTC), validation.Limits())
    same, dropped = suppression.drop_suppressed(prep, events, listed("acme", ("email", "ada@example.com")))
    assert same is prep and dropped == 0


class FakeSource:
    """An in-memory suppression store that counts the queries made of it."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.rows: dict[str, list[tuple[int, str, bytes]]] = {}
        self.version_queries = 0
        self.loads: list[tuple[str, int]] = []

    def add(self, tenant: str, id_type: str, value: str) -> None:
        v = self.versions.get(tenant, 0) + 1
        self.versions[tenant] = v
        self.rows.setdefault(tenant, []).append((v, id_type, identifier_hash(tenant, id_type, value)))

    def suppression_versions(self) -> Mapping[str, int]:
        self.version_queries += 1
        return dict(self.versions)

    def suppression_changes(self, tenant_id: str, after_version: int) -> SuppressionChanges:
        self.loads.append((tenant_id, after_version))
        entries = [(t, h) for v, t, h in self.rows.get(tenant_id, []) if v > after_version]
        return SuppressionChanges(self.versions.get(tenant_id, 0), entries, NORMALIZERS)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_asks_at_most_once_per_ttl_and_loads_only_what_changed() -> None:
    source, clock = FakeSource(), Clock()
    cache = suppression.SuppressionCache(source, ttl=2.0, clock=clock)
    assert cache.get("quiet") is None
    assert cache.get("quiet") is None and cache.get("acme") is None
    assert source.version_queries == 1  # tenants without lists cost a dict look-up, no query

    source.add("acme", "email", "ada@example.com")
    clock.now += 1.9
    assert cache.get("acme") is None  # within the ttl: not seen yet
    clock.now += 0.1
    first = cache.get("acme")
    assert first is not None and first.suppresses("email", "Ada@example.com")
    assert source.version_queries == 2 and source.loads == [("acme", 0)]
    assert cache.get("acme") is first and cache.get("quiet") is None

    source.add("acme", "phone", "+14155550100")
    clock.now += 2.0
    second = cache.get("acme")
    assert (
        second is not None
        and second.suppresses("phone", "4155550100")
        and second.suppresses("email", "ada@example.com")
    )
    assert source.loads == [("acme", 0), ("acme", 1)]  # only what the list gained


def test_invalidate_and_a_zero_ttl_read_the_versions_again() -> None:
    source, clock = FakeSource(), Clock()
    cache = suppression.SuppressionCache(source, ttl=300.0, clock=clock)
    assert cache.get("acme") is None
    source.add("acme", "email", "ada@example.com")
    cache.invalidate()
    assert cache.get("acme") is not None
    always = suppression.SuppressionCache(source, ttl=0.0, clock=clock)
    for _ in range(3):
        always.get("quiet")
    assert source.version_queries == 2 + 3


def test_the_cache_time_is_a_setting_of_0_to_300_seconds() -> None:
    assert IngestSettings().suppression_cache_seconds == 2.0
    variable = "TESSERA_INGEST_SUPPRESSION_CACHE_SECONDS"
    assert IngestSettings.from_env({variable: "0"}).suppression_cache_seconds == 0.0
    with pytest.raises(SettingsError, match=variable):
        IngestSettings.from_env({variable: "301"})
