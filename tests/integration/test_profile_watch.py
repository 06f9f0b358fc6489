"""WatchProfiles: resumable from the last cursor with no gap and no duplicate while changes keep
coming; an empty cursor starts from now; the kinds filter; cursors of another tenant, forged or
from the future are INVALID_ARGUMENT."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator, Sequence

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core.pagination import decode_feed_cursor as decode_cursor
from services.core.pagination import encode_feed_cursor as encode_cursor
from tessera.v1 import profile_pb2
from tests.conftest import make_tenant
from tests.support.grpc_errors import bad_request
from tests.support.profile import NOW, Apis, identify, traits_of, wait_until

pytestmark = [pytest.mark.integration]

P = profile_pb2
Change = tuple[str, int, str, str, tuple[str, ...]]


def head(engine: Engine, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT coalesce((SELECT seq FROM profile.feed_heads WHERE tenant_id = :t), 0)"),
                {"t": tenant_id},
            ).scalar_one()
        )


def settled_head(engine: Engine, tenant_id: str, quiet: float = 0.6) -> int:
    """The feed head once it has not moved for ``quiet`` seconds."""
    last, since = head(engine, tenant_id), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        now = head(engine, tenant_id)
        if now != last:
            last, since = now, time.monotonic()
    return last


def as_tuple(m: P.WatchProfilesResponse) -> Change:
    return (m.cursor, m.kind, m.profile, m.other_profile, tuple(m.changed_traits))


def watch(
    api: Apis, cursor: str = "", kinds: Sequence[int] = (), timeout: float = 30
) -> Iterator[P.WatchProfilesResponse]:
    return api.profile.WatchProfiles(  # type: ignore[no-any-return]
        P.WatchProfilesRequest(cursor=cursor, kinds=list(kinds)),  # type: ignore[arg-type]
        metadata=api.metadata,
        timeout=timeout,
    )


def read(api: Apis, cursor: str, n: int, kinds: Sequence[int] = (), timeout: float = 30) -> list[Change]:
    """Up to ``n`` changes after ``cursor`` (fewer when ``timeout`` runs out first), then disconnect."""
    stream = watch(api, cursor, kinds, timeout)
    out: list[Change] = []
    try:
        for msg in stream:
            out.append(as_tuple(msg))
            if len(out) == n:
                break
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        stream.cancel()  # type: ignore[attr-defined]
    return out


class Collector(threading.Thread):
    """An uninterrupted watcher: everything after ``cursor``, until stopped."""

    def __init__(self, api: Apis, cursor: str, kinds: Sequence[int] = ()) -> None:
        super().__init__(daemon=True)
        self.changes: list[Change] = []
        self.stream = watch(api, cursor, kinds, timeout=60)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for msg in self.stream:
                self.changes.append(as_tuple(msg))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err

    def stop(self) -> list[Change]:
        self.stream.cancel()  # type: ignore[attr-defined]
        self.join(5)
        assert self.error is None, self.error
        return self.changes


def start_cursor(api: Apis) -> str:
    """A cursor at the tenant's current head: the first change of a fresh profile, watched from now."""
    seen: list[Change] = []
    stream = watch(api)
    ready = threading.Event()

    def reader() -> None:
        ready.set()
        for msg in stream:
            seen.append(as_tuple(msg))
            return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    ready.wait(5)
    time.sleep(0.3)  # the stream has read the head by now
    api.send(identify(("email", "first@watch.example"), traits={"n": 0}, at=NOW))
    t.join(20)
    stream.cancel()  # type: ignore[attr-defined]
    assert seen, "no change arrived"
    return seen[0][0]


def test_resume_after_disconnects_misses_nothing_and_repeats_nothing(api: Apis) -> None:
    # Something before the watch starts: an empty cursor does not replay it.
    api.send(identify(("email", "old@watch.example"), traits={"n": -1}, at=NOW))
    api.wait_applied(1)
    old = api.get(ident=("email", "old@watch.example")).name
    settled_head(api.engine, api.tenant_id)
    cursor = start_cursor(api)
    truth = Collector(api, cursor)
    truth.start()
    people = [("email", f"p{i}@watch.example") for i in range(4)]
    sent = threading.Event()

    def produce() -> None:
        for round_ in range(6):
            # Each round a second newer than the last, so each one's traits win (latest by event
            # time; at one time the tie-break by event id could keep an earlier round's values).
            at = NOW + dt.timedelta(seconds=round_)
            api.send(*(identify(p, traits={"n": round_, "round": f"r{round_}"}, at=at) for p in people))
            time.sleep(0.05)
        sent.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    resumed: list[Change] = []
    position = cursor
    reconnects = 0
    # Read a few, disconnect, reconnect from the last cursor, while the producer keeps going.
    while not sent.is_set() or len(resumed) < len(truth.changes) or reconnects < 3:
        got = read(api, position, 3, timeout=1.0)
        reconnects += 1
        resumed.extend(got)
        if got:
            position = got[-1][0]
        if sent.is_set() and not got:
            break
    producer.join(30)
    api.wait_applied(2 + 6 * len(people))
    final = encode_cursor(api.tenant_id, settled_head(api.engine, api.tenant_id))
    # The uninterrupted watcher sees everything after the start cursor, up to the head.
    wait_until(lambda: truth.changes and truth.changes[-1][0] == final, 10, "the uninterrupted watcher at the head")
    resumed.extend(read(api, position, 10_000, timeout=1.0))
    assert reconnects >= 3
    everything = truth.stop()
    assert resumed == everything
    # Dense: every change after the start cursor, once, in order.
    seqs = [decode_cursor(api.tenant_id, c[0]) for c in everything]
    start = decode_cursor(api.tenant_id, cursor)
    assert start is not None and seqs == list(range(start + 1, start + 1 + len(seqs)))
    assert everything[-1][0] == final
    assert old not in {c[2] for c in everything}
    names = {api.get(ident=p).name for p in people}
    assert names <= {c[2] for c in everything} <= names | {api.get(ident=("email", "first@watch.example")).name}
    # Each person: created once, then updated; updates name the traits that changed.
    for name in names:
        kinds = [c[1] for c in everything if c[2] == name]
        assert kinds[0] == P.PROFILE_EVENT_KIND_CREATED and kinds.count(P.PROFILE_EVENT_KIND_CREATED) == 1
        assert set(kinds[1:]) <= {P.PROFILE_EVENT_KIND_UPDATED}
        # Six rounds, each changing both traits. A change is per consumer batch, so rounds that
        # land in one batch show up as one change: at most six after the creation. Two consumers
        # apply batches side by side, so an older round can land after a newer one: its event
        # joins the timeline (an update) but its values lose (latest by event time), so that
        # update names no trait. Whichever order, the newest round's values win.
        updates = [set(c[4]) for c in everything if c[2] == name and c[1] == P.PROFILE_EVENT_KIND_UPDATED]
        assert len(updates) <= 5 and all(u in ({"n", "round"}, set()) for u in updates), updates
    for person in people:
        assert traits_of(api.get(ident=person)) == {"n": 5, "round": "r5"}
    # Nothing after the last change: a watch from it waits (and is ended by its deadline).
    quiet = watch(api, everything[-1][0], timeout=0.5)
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(quiet))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


def test_kinds_filter_merges_and_splits(api: Apis) -> None:
    a, b = ("email", "a@kinds.example"), ("phone", "+14155550188")
    api.send(identify(a, traits={"x": 1}, at=NOW), identify(b, traits={"y": 1}, at=NOW))
    api.wait_applied(2)
    pa, pb = api.get(ident=a).name, api.get(ident=b).name
    settled_head(api.engine, api.tenant_id)
    cursor = start_cursor(api)
    merges = Collector(api, cursor, [P.PROFILE_EVENT_KIND_MERGED, P.PROFILE_EVENT_KIND_SPLIT])
    merges.start()
    api.merge(pa, pb)
    api.wait_merged(pb, pa)
    api.send(identify(a, traits={"x": 2}, at=NOW))  # an update, filtered out
    api.wait_applied(4)
    split = api.unmerge(pa, b)
    new = f"profiles/{split.absorbed_profile_id}"
    api.wait_owner(b, new)
    wait_until(lambda: len(merges.changes) >= 2, 10, "merge and split on the feed")
    time.sleep(0.3)
    got = merges.stop()
    assert [(c[1], c[2], c[3]) for c in got] == [
        (P.PROFILE_EVENT_KIND_MERGED, pa, pb),
        (P.PROFILE_EVENT_KIND_SPLIT, pa, new),
    ]
    # Resuming a filtered watch from a filtered cursor skips what the filter skips, no more.
    after_merge = read(api, got[0][0], 1, [P.PROFILE_EVENT_KIND_SPLIT])
    assert after_merge == [got[1]]


def test_cursors_of_another_tenant_forged_or_from_the_future_are_invalid(api: Apis, engine: Engine) -> None:
    api.send(identify(("email", "c@cursor.example"), traits={"x": 1}, at=NOW))
    api.wait_applied(1)
    top = settled_head(engine, api.tenant_id)
    other = make_tenant(engine, "w")
    own = encode_cursor(api.tenant_id, top)
    for cursor in (
        encode_cursor(other.tenant_id, 1),  # what the other tenant's first change's cursor is
        encode_cursor(api.tenant_id, top + 1000),  # a change that has not happened
        own[:-2],
        own + "x",
        "",
    ):
        stream = watch(api, cursor, timeout=1.0)
        try:
            first = next(iter(stream))
        except grpc.RpcError as err:
            if cursor == "":
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
                continue
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (cursor, err.details())  # type: ignore[attr-defined]
            assert [f for f, _ in bad_request(err)] == ["cursor"]  # type: ignore[arg-type]
        else:
            raise AssertionError(f"cursor {cursor!r} was accepted: {first}")
