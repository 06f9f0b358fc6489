"""Every service as its own processes, some with replicas, on one database and one Redis (a single
node or a cluster): what ``tests/system`` runs, kills and compares.

- :class:`Deployment` starts ``tessera serve`` processes the way the chart runs pods: each replica
  on its own port, peers reached through every replica's address (gRPC's ``ipv4:`` list, as a
  Service would spread them), short consumer claim and leader lease times so a crash is noticed
  in seconds.
- :class:`Pump` sends a dataset through IngestEvents in batches, across the ingest replicas, and
  retries what was not answered; it keeps the message ids that were acknowledged. With a gateway,
  a share of the track events (those :func:`segment_message` maps back exactly) goes through its
  Segment ``/v1/batch`` instead, where HTTP 200 is the acknowledgement.
- :func:`settle` waits until every stream is read and acknowledged by every group, no outbox holds
  anything, and two snapshots in a row agree.
- :func:`snapshot` reads the outcome from the database with every server-assigned id (profile
  ids, event ids) replaced by what the user can name: a profile by its identifiers, an event by its
  message id. Two runs of the same data compare equal exactly when they agree.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import itertools
import json
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg2
from google.protobuf import json_format

from services.cli import registry
from services.core import db, harness
from services.core.bus import RedisClient
from services.gateway import segment
from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc, quality_pb2

#: Short enough that a killed replica's messages are reclaimed, and its leadership taken over, in
#: seconds; the services' defaults are for production.
FAST_RECOVERY = {
    "TESSERA_CONSUMER_CLAIM_IDLE_MS": "3000",
    "TESSERA_CONSUMER_BLOCK_MS": "200",
    "TESSERA_TENANT_REFRESH_SECONDS": "0.5",
    "TESSERA_OUTBOX_GRACE_SECONDS": "1",
    "TESSERA_OUTBOX_SWEEP_SECONDS": "0.5",
    "TESSERA_LEADER_LEASE_SECONDS": "3",
    "TESSERA_LEADER_RENEW_SECONDS": "1",
    "TESSERA_SHUTDOWN_GRACE_SECONDS": "2",
    "TESSERA_PROFILE_RULES_CACHE_SECONDS": "1",
    "TESSERA_IDENTITY_RULES_CACHE_SECONDS": "1",
    "TESSERA_METRICS_SETTINGS_CACHE_SECONDS": "1",
    # Nine processes with two pools each must fit in one PostgreSQL's connections beside the others.
    "TESSERA_DB_POOL_SIZE": "3",
}


@dataclass
class Replica:
    service: str
    index: int
    port: int
    process: harness.ServiceProcess

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Deployment:
    """``replicas`` processes of each service, all on ``scratch``'s database and Redis."""

    scratch: harness.Scratch
    logs: Path
    replicas: Mapping[str, int]
    env: Mapping[str, str] = field(default_factory=dict)
    #: Also one gateway process (HTTP), reaching every replica of ingest, profile and metrics.
    gateway: bool = False
    running: dict[str, list[Replica]] = field(default_factory=dict)

    def start(self) -> Deployment:
        services = registry.grpc_available()
        ports = {s: [harness.free_port() for _ in range(self.replicas.get(s, 1))] for s in services}
        every = {s: "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports[s]) for s in ports}
        peers = {
            f"TESSERA_PROFILE_{s.upper()}_ADDRESS": every[s] for s in ("identity", "ingest", "metrics") if s in ports
        }
        base = self.scratch.env(**FAST_RECOVERY, **peers, **self.env)
        for service in services:
            self.running[service] = []
            for n, port in enumerate(ports[service]):
                env = {**base, f"TESSERA_{service.upper()}_PORT": str(port)}
                proc = harness.ServiceProcess.service(service, env, self.logs / f"{service}-{n}.log").start()
                self.running[service].append(Replica(service, n, port, proc))
        if self.gateway:
            port = harness.free_port()
            env = {
                **base,
                "TESSERA_GATEWAY_PORT": str(port),
                **{
                    f"TESSERA_GATEWAY_{s.upper()}_ADDRESS": every[s]
                    for s in ("ingest", "profile", "metrics")
                    if s in every
                },
            }
            proc = harness.ServiceProcess.service("gateway", env, self.logs / "gateway-0.log").start()
            self.running["gateway"] = [Replica("gateway", 0, port, proc)]
        for replica in self.all():
            if replica.service == "gateway":
                harness.wait_http(f"http://{replica.target}/readyz", replica.process, timeout=90)
            else:
                harness.wait_serving(replica.target, replica.process, timeout=90)
        return self

    def all(self) -> list[Replica]:
        return [r for rs in self.running.values() for r in rs]

    def targets(self, service: str) -> list[str]:
        return [r.target for r in self.running[service]]

    def kill(self, service: str, index: int = 0) -> None:
        """SIGKILL, as a crashed pod."""
        self.running[service][index].process.kill()

    def restart(self, service: str, index: int = 0) -> None:
        """Start a killed replica again, on its port (a pod restarted by its Deployment)."""
        replica = self.running[service][index]
        replica.process.start()
        harness.wait_serving(replica.target, replica.process, timeout=90)

    def stop(self) -> None:
        for replica in self.all():
            replica.process.stop(grace=5)

    def logs_tail(self) -> str:
        return "\n".join(f"--- {r.service}-{r.index}\n{r.process.log_tail(15)}" for r in self.all())


#: The identifier types a Segment message can carry (userId, anonymousId, traits.email/phone).
SEGMENT_IDENTIFIERS = {"user_id": "userId", "anonymous_id": "anonymousId"}
SEGMENT_TRAITS = ("email", "phone")


def segment_message(ev: event_pb2.Event) -> dict[str, Any] | None:
    """The event as a Segment track message, or None unless the gateway's mapping of that message
    is the event itself in everything the outcome depends on. Only ``source`` (``segment:track``:
    which nothing compared reads for a track) and a ``channel`` key added to the context (how
    Segment says the channel) may differ. Identifies are never routed: their traits carry the
    source into profile.traits."""
    if ev.WhichOneof("payload") != "track" or ev.channel == event_pb2.CHANNEL_UNSPECIFIED:
        return None
    context = json_format.MessageToDict(ev.context) if ev.HasField("context") else {}
    if "channel" in context or "traits" in context:
        return None
    msg: dict[str, Any] = {
        "type": "track",
        "messageId": ev.message_id,
        "timestamp": ev.timestamp.ToDatetime(tzinfo=dt.UTC).isoformat(),
        "event": ev.track.event,
        "context": {**context, "channel": event_pb2.Channel.Name(ev.channel).removeprefix("CHANNEL_").lower()},
    }
    if ev.HasField("properties"):
        msg["properties"] = json_format.MessageToDict(ev.properties)
    traits: dict[str, str] = {}
    for ident in ev.identifiers:
        if ident.type in SEGMENT_IDENTIFIERS and SEGMENT_IDENTIFIERS[ident.type] not in msg:
            msg[SEGMENT_IDENTIFIERS[ident.type]] = ident.value
        elif ident.type in SEGMENT_TRAITS and ident.type not in traits:
            traits[ident.type] = ident.value
        else:
            return None  # a type Segment cannot say, or two of one type
    if traits:
        msg["traits"] = traits
    try:
        mapped = segment.to_event(json.loads(json.dumps(msg)), None, dt.datetime.now(dt.UTC))
    except (segment.BadField, ValueError, TypeError):
        return None
    mapped.source = ev.source
    del mapped.context["channel"]
    if not context:
        mapped.ClearField("context")
    if not ev.HasField("properties") and not mapped.properties.fields:
        mapped.ClearField("properties")  # Segment's mapping always sets them, empty when absent
    return msg if mapped == ev else None


def via_gateway(ev: event_pb2.Event) -> bool:
    """Half of the events :func:`segment_message` can express, the same half in every run."""
    return zlib.crc32(ev.message_id.encode()) % 2 == 0 and segment_message(ev) is not None


class Pump:
    """The dataset through IngestEvents, ``batch`` events per call, spread over the ingest
    replicas; an unanswered batch is sent again (to the next replica) until it is answered.
    With ``gateway`` (host:port), the events :func:`via_gateway` picks of each batch go through
    the gateway's /v1/batch instead (HTTP 200: all acknowledged; 429/5xx or no answer: again)."""

    def __init__(self, targets: Sequence[str], api_key: str, batch: int = 100, gateway: str | None = None) -> None:
        self.channels = [grpc.insecure_channel(t) for t in targets]
        self.stubs = [ingest_pb2_grpc.IngestServiceStub(c) for c in self.channels]
        self.metadata = (("authorization", f"Bearer {api_key}"),)
        self.basic = "Basic " + base64.b64encode(f"{api_key}:".encode()).decode()
        self.gateway = gateway
        self.batch = batch
        self.acknowledged: set[str] = set()
        self.rejected: list[str] = []
        self.retries = 0
        self.sent_via_gateway = 0
        self._next = itertools.cycle(range(len(self.stubs)))

    def send(self, events: Sequence[event_pb2.Event], between: Callable[[int], None] = lambda _n: None) -> None:
        """Send everything; ``between(n)`` runs after the n-th batch is answered (to break things)."""
        for n, start in enumerate(range(0, len(events), self.batch)):
            chunk = list(events[start : start + self.batch])
            http_part = [e for e in chunk if via_gateway(e)] if self.gateway else []
            if http_part:
                grpc_part = [e for e in chunk if not via_gateway(e)]
                self._send_http(http_part)
            else:
                grpc_part = chunk
            if grpc_part:
                self._send(grpc_part)
            between(n)

    def _send_http(self, chunk: list[event_pb2.Event]) -> None:
        assert self.gateway is not None
        messages = [segment_message(e) for e in chunk]
        body = json.dumps({"batch": messages}).encode()
        host, _, port = self.gateway.rpartition(":")
        deadline = time.monotonic() + 120
        while True:
            conn = http.client.HTTPConnection(host, int(port), timeout=15)
            try:
                conn.request(
                    "POST",
                    "/v1/batch",
                    body=body,
                    headers={"Content-Type": "application/json", "Authorization": self.basic},
                )
                resp = conn.getresponse()
                answer = resp.read()
            except (OSError, http.client.HTTPException):
                status, answer = 0, b""
            else:
                status = resp.status
            finally:
                conn.close()
            if status == 200:
                self.acknowledged.update(e.message_id for e in chunk)
                self.sent_via_gateway += len(chunk)
                return
            if (status in (0, 429) or status >= 500) and time.monotonic() < deadline:
                self.retries += 1
                time.sleep(0.2)
                continue
            raise AssertionError(f"the gateway answered {status}: {answer[:500]!r}")

    def _send(self, chunk: list[event_pb2.Event]) -> None:
        deadline = time.monotonic() + 120
        while True:
            stub = self.stubs[next(self._next)]
            try:
                resp = stub.IngestEvents(
                    ingest_pb2.IngestEventsRequest(events=chunk), metadata=self.metadata, timeout=10
                )
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                time.sleep(0.2)
                continue
            break
        for event, result in zip(chunk, resp.results, strict=True):
            if result.status in (ingest_pb2.EVENT_STATUS_ACCEPTED, ingest_pb2.EVENT_STATUS_DUPLICATE):
                self.acknowledged.add(event.message_id)
            else:
                self.rejected.append(event.message_id)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


# ---- waiting for the system to finish -----------------------------------------------------------


def stream_backlog(client: RedisClient, prefix: str) -> dict[str, int]:
    """For every stream under ``prefix`` and each of its groups, what is not yet read and
    acknowledged (0 when done); dead-letter streams count by their length."""
    out: dict[str, int] = {}
    for raw in client.scan_iter(match=f"{prefix}:*", count=1000, _type="stream"):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        if key.endswith(":dead"):
            out[key] = int(client.xlen(key))
            continue
        info: Any = client.xinfo_stream(key)
        last = _text(info["last-generated-id"])
        groups: Any = client.xinfo_groups(key)
        for group in groups:
            behind = 0 if _text(group["last-delivered-id"]) == last else 1
            out[f"{key}/{_text(group['name'])}"] = int(group["pending"]) + behind
    return out


def outbox_rows(database_url: str) -> int:
    with psycopg2.connect(_dsn(database_url)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'outbox' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        total = 0
        for (schema,) in cur.fetchall():
            cur.execute(f'SELECT count(*) FROM "{schema}".outbox')
            total += int(cur.fetchone()[0])
        cur.execute("SELECT count(*) FROM metrics.reevaluations")
        total += int(cur.fetchone()[0])
    conn.close()
    return total


def settle(
    client: RedisClient, scratch: harness.Scratch, tenant_id: str, timeout: float = 240.0, what: str = ""
) -> Snapshot:
    """Wait until nothing is in flight anywhere and the outcome stops changing; return it."""
    deadline = time.monotonic() + timeout
    previous: Snapshot | None = None
    while True:
        backlog = {k: v for k, v in stream_backlog(client, scratch.redis_prefix).items() if v}
        rows = outbox_rows(scratch.database_url)
        if not backlog and not rows:
            current = snapshot(scratch.database_url, tenant_id)
            if previous is not None and current == previous:
                return current
            previous = current
        else:
            previous = None
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not settle: backlog {backlog}, outbox/queue rows {rows}")
        time.sleep(1.0)


# ---- what a run produced, in the user's names ---------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    events: tuple[tuple[str, int], ...]  # message id, how many times stored
    partition: frozenset[frozenset[str]]  # identity's profiles, each as its identifiers
    profile_partition: frozenset[frozenset[str]]  # the profile service's, the same way
    traits: tuple[tuple[str, str, str, str], ...]  # profile, key, value, source
    facts: tuple[tuple[Any, ...], ...]
    rollups: tuple[tuple[Any, ...], ...]
    evaluations: tuple[tuple[Any, ...], ...]
    # Alerts fire while a conversation happens, on what has arrived by then: the order of arrival
    # (which replicas and crashes change) may rightly change them, so they are shown, not compared.
    alerts: tuple[tuple[str, str], ...] = field(compare=False)

    def counts(self) -> dict[str, int]:
        return {
            "events": len(self.events),
            "profiles": len(self.partition),
            "traits": len(self.traits),
            "facts": len(self.facts),
            "rollup rows": len(self.rollups),
            "evaluations": len(self.evaluations),
            "alerts": len(self.alerts),
        }

    def differences(self, other: Snapshot) -> dict[str, str]:
        """Per part, a short account of what differs (empty when the runs agree)."""
        out: dict[str, str] = {}
        for name, spec in self.__dataclass_fields__.items():
            if not spec.compare:
                continue
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                a, b = set(mine), set(theirs)
                out[name] = f"only here {sorted(map(str, a - b))[:3]} ({len(a - b)}), only there " + (
                    f"{sorted(map(str, b - a))[:3]} ({len(b - a)})"
                )
        return out


def _label(identifiers: Iterable[str]) -> str:
    return "|".join(sorted(identifiers))


def snapshot(database_url: str, tenant_id: str) -> Snapshot:
    with psycopg2.connect(_dsn(database_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT message_id, count(*) FROM ingest.events WHERE tenant_id = %s GROUP BY 1", (tenant_id,))
        events = tuple(sorted((m, int(n)) for m, n in cur.fetchall()))
        cur.execute("SELECT event_id::text, message_id FROM ingest.events WHERE tenant_id = %s", (tenant_id,))
        message_of = dict(cur.fetchall())

        cur.execute(
            "SELECT i.profile_id::text, i.id_type || ':' || i.id_value FROM identity.identifiers i "
            "JOIN identity.profiles p USING (tenant_id, profile_id) "
            "WHERE i.tenant_id = %s AND p.merged_into IS NULL AND p.erased_at IS NULL",
            (tenant_id,),
        )
        members: dict[str, set[str]] = {}
        for pid, ident in cur.fetchall():
            members.setdefault(pid, set()).add(ident)
        partition = frozenset(frozenset(m) for m in members.values())

        cur.execute(
            "SELECT profile_id::text, id_type || ':' || id_value FROM profile.identifiers WHERE tenant_id = %s",
            (tenant_id,),
        )
        held: dict[str, set[str]] = {}
        for pid, ident in cur.fetchall():
            held.setdefault(pid, set()).add(ident)
        profile_partition = frozenset(frozenset(m) for m in held.values())
        name = {pid: _label(ids) for pid, ids in held.items()}
        name.update({pid: _label(ids) for pid, ids in members.items() if pid not in name})

        cur.execute(
            "SELECT profile_id::text, trait_key, value::text, source FROM profile.traits WHERE tenant_id = %s",
            (tenant_id,),
        )
        traits = tuple(sorted((name.get(p, "?" + p), k, v, s or "") for p, k, v, s in cur.fetchall()))

        cur.execute(
            "SELECT * FROM metrics.facts WHERE tenant_id = %s",
            (tenant_id,),
        )
        columns = [d[0] for d in cur.description]
        facts = []
        for row in cur.fetchall():
            rec = dict(zip(columns, row, strict=True))
            del rec["tenant_id"]  # runs compare across tenants
            rec["event_id"] = message_of.get(rec["event_id"], rec["event_id"])
            rec["profile_id"] = name.get(rec["profile_id"] or "", rec["profile_id"])
            rec["fact_key"] = _unassigned(rec["fact_key"], message_of)
            facts.append(tuple(sorted((k, str(v)) for k, v in rec.items())))

        cur.execute("SELECT * FROM metrics.rollup_day WHERE tenant_id = %s", (tenant_id,))
        columns = [d[0] for d in cur.description]
        counts = [n for n, c in enumerate(columns) if c not in ROLLUP_KEYS]
        # A bucket whose every sum is zero (what a move of contributions leaves) is no bucket.
        rollups = tuple(
            sorted(
                tuple(str(v) for c, v in zip(columns, row, strict=True) if c != "tenant_id")
                for row in cur.fetchall()
                if any(_nonzero(row[n]) for n in counts)
            )
        )

        cur.execute(
            "SELECT interaction_id, form_id, form_version, profile_id, body FROM metrics.evaluations "
            "WHERE tenant_id = %s",
            (tenant_id,),
        )
        evaluations = []
        for iid, form, version, pid, body in cur.fetchall():
            ev = quality_pb2.Evaluation.FromString(bytes(body))
            ev.ClearField("evaluate_time")
            ev.ClearField("profile")
            ev.ClearField("name")
            # Evidence names events (and contacts) by their server-assigned ids.
            text = UUID.sub(lambda m: message_of.get(m[0], name.get(m[0], m[0])), json_format.MessageToJson(ev))
            evaluations.append((iid, form, version, name.get(pid or "", pid), text))

        cur.execute("SELECT rule_id, interaction_id FROM metrics.alerts WHERE tenant_id = %s", (tenant_id,))
        alerts = tuple(sorted(cur.fetchall()))
    conn.close()
    return Snapshot(
        events,
        partition,
        profile_partition,
        traits,
        tuple(sorted(facts)),
        rollups,
        tuple(sorted(evaluations)),
        alerts,
    )


#: The columns that say which bucket a rollup row is; the rest are sums.
ROLLUP_KEYS = frozenset({"tenant_id", "grouping", "bucket", "channel", "queue", "agent", "reason", "source"})
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _nonzero(value: object) -> bool:
    if isinstance(value, list):
        return any(value)
    return bool(value)


def _unassigned(key: str, message_of: Mapping[str, str]) -> str:
    """A fact key with any server-assigned event id in it replaced by its message id."""
    for part in key.split(":"):
        if part in message_of:
            key = key.replace(part, message_of[part])
    return key


def _dsn(url: str) -> str:
    """What psycopg2 takes, from the SQLAlchemy-style URL the harness hands out."""
    return db.sa_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def duplicates(events: Iterable[tuple[str, int]]) -> Counter[str]:
    return Counter({m: n for m, n in events if n != 1})
