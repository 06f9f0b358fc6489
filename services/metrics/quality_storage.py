"""Quality's tables: categories, form versions, transcripts, evaluations and people's answers.

The consumer calls :meth:`QualityStore.apply` after the facts of a batch are written: it keeps
the batch's messages and evaluates again every ended interaction the batch touched (and the
customer's earlier contacts whose repeat outcome it may change), writing an evaluation only when
it differs from the stored one, so a redelivered batch changes nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from psycopg2.extras import execute_values
from sqlalchemy.engine import Engine

from services.core import db, streams
from services.core.errors import AlreadyExists, NotFound
from services.core.outbox import EnvelopeTable, Outbox, Pending
from services.core.telemetry import inject_traceparent
from services.metrics import alerts as al
from services.metrics import categories as cat
from services.metrics import evaluate as ev
from services.metrics import forms
from services.metrics import quality_rollup as qr
from services.metrics.derive import day_of, hour_of
from services.metrics.facts import LEG, SURVEY, Fact
from services.metrics.storage import (
    FACT_SELECT,
    first_time,
    lock_customers,
    lock_final_survivor,
    lock_with_survivors,
    with_survivors,
)
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import event_pb2, quality_pb2, stream_pb2

_MERGE_EVALUATIONS = (
    "INSERT INTO metrics.evaluations AS e SELECT * FROM pg_temp.evaluations_delta "
    "ON CONFLICT (tenant_id, interaction_id, form_id) DO UPDATE SET form_version = EXCLUDED.form_version, "
    "profile_id = EXCLUDED.profile_id, score = EXCLUDED.score, auto_failed = EXCLUDED.auto_failed, "
    "started_at = EXCLUDED.started_at, body = EXCLUDED.body, day = EXCLUDED.day, evaluated_at = now()"
)
_MERGE_ROLLUP = (
    "INSERT INTO metrics.quality_rollup_day AS r SELECT * FROM pg_temp.quality_rollup_day_delta "
    "ON CONFLICT (tenant_id, day, form_id, question_id, agent, team, queue, channel) DO UPDATE SET "
    "n = r.n + EXCLUDED.n, auto_failed = r.auto_failed + EXCLUDED.auto_failed, passed = r.passed + EXCLUDED.passed, "
    "score_sum = r.score_sum + EXCLUDED.score_sum, score_sq = r.score_sq + EXCLUDED.score_sq"
)
_EVALUATION_COLUMNS = (
    "tenant_id, interaction_id, form_id, form_version, profile_id, score, auto_failed, started_at, body, day"
)


#: The metrics service's outbox (alerts to the tenant's ``alerts`` stream).
OUTBOX = EnvelopeTable("metrics")
_fired = metrics.get_meter("tessera.quality").create_counter("tessera.quality.alerts", description="alerts fired")


@dataclass(frozen=True)
class MessageRow:
    """A message as the consumer received it (its text is what categories read)."""

    event_id: str
    interaction_id: str
    profile_id: str
    at: dt.datetime
    offset_seconds: float | None
    author: int
    compound: float
    text: str


def _category(spec: bytes) -> quality_pb2.Category:
    out = quality_pb2.Category()
    out.ParseFromString(spec)
    return out


def _form(spec: bytes) -> quality_pb2.EvaluationForm:
    out = quality_pb2.EvaluationForm()
    out.ParseFromString(spec)
    return out


def _evaluation(body: bytes) -> quality_pb2.Evaluation:
    out = quality_pb2.Evaluation()
    out.ParseFromString(body)
    return out


#: The batch's messages (staged by COPY: the driver's quoting of kilobytes of text was most of the
#: insert) under their survivor, unless erased; a message seen before is kept as it was.
_MERGE_MESSAGES = (
    "INSERT INTO metrics.messages SELECT v.tenant_id, v.event_id, v.interaction_id, "
    "coalesce(a.survivor, v.profile_id), v.at, v.offset_seconds, v.author, v.compound, v.text "
    "FROM pg_temp.messages_delta v LEFT JOIN metrics.aliases a ON a.tenant_id = v.tenant_id "
    "AND a.profile_id = v.profile_id WHERE NOT EXISTS (SELECT 1 FROM metrics.erased r "
    "WHERE r.tenant_id = v.tenant_id AND r.profile_id = coalesce(a.survivor, v.profile_id)) "
    "ORDER BY v.event_id ON CONFLICT (tenant_id, event_id) DO NOTHING"
)


class QualityStore:
    def __init__(self, engine: Engine, reader: Engine | None = None, outbox: Outbox | None = None) -> None:
        self.engine = engine
        self.reader = reader or engine
        #: The relay that publishes the alerts this store commits (the sweep does it otherwise).
        self.outbox = outbox

    # -- categories ------------------------------------------------------------------------------

    def create_category(self, tenant_id: str, category_id: str, category: quality_pb2.Category) -> None:
        with db.raw_transaction(self.engine, "quality.create_category") as (cur, _):
            cur.execute(
                "INSERT INTO metrics.categories (tenant_id, category_id, spec) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (tenant_id, category_id, category.SerializeToString(deterministic=True)),
            )
            if cur.rowcount == 0:
                raise AlreadyExists(f"category {category_id!r} already exists")

    def update_category(self, tenant_id: str, category_id: str, category: quality_pb2.Category) -> None:
        with db.raw_transaction(self.engine, "quality.update_category") as (cur, _):
            cur.execute(
                "UPDATE metrics.categories SET spec = %s, updated_at = now() WHERE tenant_id = %s AND category_id = %s",
                (category.SerializeToString(deterministic=True), tenant_id, category_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no category {category_id!r}")

    def categories(self, tenant_id: str, cur: Any = None) -> dict[str, quality_pb2.Category]:
        """The tenant's categories by name, each with its update time."""
        if cur is None:
            with db.raw_transaction(self.reader, "quality.categories") as (c, _):
                return self.categories(tenant_id, c)
        cur.execute(
            "SELECT category_id, spec, updated_at FROM metrics.categories WHERE tenant_id = %s ORDER BY 1",
            (tenant_id,),
        )
        out = {}
        for category_id, spec, updated in cur.fetchall():
            c = _category(bytes(spec))
            c.name = f"categories/{category_id}"
            c.update_time.FromDatetime(updated)
            out[c.name] = c
        return out

    # -- forms -----------------------------------------------------------------------------------

    def save_form(self, tenant_id: str, form_id: str, form: quality_pb2.EvaluationForm, create: bool) -> int:
        """Store a new version (1 when creating); returns it."""
        with db.raw_transaction(self.engine, "quality.save_form") as (cur, _):
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 9))", (f"{tenant_id}:{form_id}",))
            cur.execute(
                "SELECT coalesce(max(version), 0) FROM metrics.forms WHERE tenant_id = %s AND form_id = %s",
                (tenant_id, form_id),
            )
            latest = int(cur.fetchone()[0])
            if create and latest:
                raise AlreadyExists(f"form {form_id!r} already exists")
            if not create and not latest:
                raise NotFound(f"no form {form_id!r}")
            version = latest + 1
            spec = quality_pb2.EvaluationForm()
            spec.CopyFrom(form)
            spec.name, spec.version = f"evaluationForms/{form_id}", version
            spec.ClearField("create_time")
            cur.execute(
                "INSERT INTO metrics.forms (tenant_id, form_id, version, spec) VALUES (%s, %s, %s, %s)",
                (tenant_id, form_id, version, spec.SerializeToString(deterministic=True)),
            )
        return version

    def form(self, tenant_id: str, form_id: str, version: int = 0) -> quality_pb2.EvaluationForm:
        with db.raw_transaction(self.reader, "quality.form") as (cur, _):
            cur.execute(
                "SELECT spec, created_at FROM metrics.forms WHERE tenant_id = %s AND form_id = %s "
                "AND (%s = 0 OR version = %s) ORDER BY version DESC LIMIT 1",
                (tenant_id, form_id, version, version),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no form {form_id!r}" + (f" version {version}" if version else ""))
        out = _form(bytes(row[0]))
        out.create_time.FromDatetime(row[1])
        return out

    def latest_forms(self, tenant_id: str, cur: Any = None) -> list[quality_pb2.EvaluationForm]:
        if cur is None:
            with db.raw_transaction(self.reader, "quality.forms") as (c, _):
                return self.latest_forms(tenant_id, c)
        cur.execute(
            "SELECT DISTINCT ON (form_id) spec, created_at FROM metrics.forms WHERE tenant_id = %s "
            "ORDER BY form_id, version DESC",
            (tenant_id,),
        )
        out = []
        for spec, created in cur.fetchall():
            f = _form(bytes(spec))
            f.create_time.FromDatetime(created)
            out.append(f)
        return out

    # -- the consumer's writes -------------------------------------------------------------------

    def apply(
        self,
        tenant_id: str,
        messages: Sequence[MessageRow],
        facts: Sequence[Fact],
        config: MetricsConfig,
        now: dt.datetime | None = None,
    ) -> int:
        """Keep the messages and evaluate what they and the facts touched; returns how many
        evaluations changed. A tenant without forms only keeps the transcripts."""
        now = now or dt.datetime.now(dt.UTC)
        pending: Pending | None
        with db.raw_transaction(self.engine, "quality.apply", len(messages)) as (cur, _):
            if messages:
                tenant, e = db.copy_value(tenant_id), db.COPY_ESCAPES
                lines = "".join(
                    f"{tenant}\t{m.event_id.translate(e)}\t{m.interaction_id.translate(e)}\t"
                    f"{m.profile_id.translate(e)}\t{m.at.isoformat()}\t{db.copy_value(m.offset_seconds)}\t"
                    f"{m.author}\t{m.compound!r}\t{m.text.translate(e)}\n"
                    for m in messages
                )
                db.copy_merge(cur, "metrics.messages", lines, _MERGE_MESSAGES)
            touched = {m.interaction_id for m in messages} | {f.interaction_id for f in facts if f.interaction_id}
            touched.discard("")
            changed, pending, iids = 0, None, list[str]()
            if touched:
                changed, pending, iids = self._judge(cur, tenant_id, touched, facts, config, now)
            self._follow_merges(cur, tenant_id, [m.event_id for m in messages], iids)
        if pending is not None and self.outbox is not None:
            self.outbox.submit(pending)
        return changed

    def _judge(
        self,
        cur: Any,
        tenant_id: str,
        touched: set[str],
        facts: Sequence[Fact],
        config: MetricsConfig,
        now: dt.datetime,
    ) -> tuple[int, Pending | None, list[str]]:
        """Alerts on the touched interactions, then their evaluations and those of the earlier
        contacts whose repeat outcome a new contact may change: (evaluations changed, alerts to
        publish, interactions evaluated)."""
        pending: Pending | None = None
        rules = self.alert_rules(tenant_id, cur)
        known: dict[str, quality_pb2.Category] | None = None  # read once for both steps
        if rules:
            known = self.categories(tenant_id, cur)
            pending = self._alerts(cur, tenant_id, sorted(touched), rules, now, known)
        form_list = self.latest_forms(tenant_id, cur)
        if not form_list:
            return 0, pending, []
        iids = set(touched)
        window = dt.timedelta(days=config.fcr_window_days)
        legs = [f for f in facts if f.kind == LEG]
        if legs:
            # A leg resolved before a merge and applied after it names the merged-away customer,
            # and its facts were stored under the survivor: the earlier contacts are the survivor's.
            # (The merge's own re-evaluation ran before this leg was stored, so it is up to us.)
            cur.execute(
                "SELECT DISTINCT interaction_id FROM metrics.facts WHERE tenant_id = %s AND kind = 1 "
                "AND profile_id = ANY(%s) AND coalesce(started_at, at) >= %s AND coalesce(started_at, at) <= %s",
                (
                    tenant_id,
                    sorted(with_survivors(cur, tenant_id, (f.profile_id for f in legs))),
                    min(f.start for f in legs) - window,
                    max(f.start for f in legs),
                ),
            )
            iids.update(r[0] for r in cur.fetchall())
        ordered = sorted(iids)
        return self._evaluate(cur, tenant_id, ordered, form_list, config, now, known), pending, ordered

    def _follow_merges(self, cur: Any, tenant_id: str, event_ids: Sequence[str], iids: Sequence[str]) -> None:
        """Move what this transaction wrote under a merged-away customer to the survivor. The rows'
        customers are locked first, so a merge either committed before (its alias is seen here) or
        waits for this commit (and its own move then finds these rows): none is left behind."""
        if not event_ids and not iids:
            return
        cur.execute(
            "SELECT profile_id FROM metrics.messages WHERE tenant_id = %s AND event_id = ANY(%s) UNION "
            "SELECT profile_id FROM metrics.evaluations WHERE tenant_id = %s AND interaction_id = ANY(%s)",
            (tenant_id, list(event_ids), tenant_id, list(iids)),
        )
        alias = lock_with_survivors(cur, tenant_id, sorted(r[0] for r in cur.fetchall() if r[0]))
        if not alias:
            return
        pairs = (list(alias), list(alias.values()))
        cur.execute(
            "UPDATE metrics.messages m SET profile_id = a.s FROM unnest(%s::text[], %s::text[]) a (p, s) "
            "WHERE m.tenant_id = %s AND m.event_id = ANY(%s) AND m.profile_id = a.p",
            (*pairs, tenant_id, list(event_ids)),
        )
        cur.execute(
            "UPDATE metrics.evaluations e SET profile_id = a.s FROM unnest(%s::text[], %s::text[]) a (p, s) "
            "WHERE e.tenant_id = %s AND e.interaction_id = ANY(%s) AND e.profile_id = a.p",
            (*pairs, tenant_id, list(iids)),
        )

    # -- alerts ----------------------------------------------------------------------------------

    def create_alert_rule(self, tenant_id: str, rule_id: str, rule: quality_pb2.AlertRule) -> quality_pb2.AlertRule:
        spec = quality_pb2.AlertRule()
        spec.CopyFrom(rule)
        spec.name = f"alertRules/{rule_id}"
        spec.ClearField("create_time")
        with db.raw_transaction(self.engine, "quality.create_alert_rule") as (cur, _):
            cur.execute(
                "INSERT INTO metrics.alert_rules (tenant_id, rule_id, spec) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING "
                "RETURNING created_at",
                (tenant_id, rule_id, spec.SerializeToString(deterministic=True)),
            )
            row = cur.fetchone()
        if row is None:
            raise AlreadyExists(f"alert rule {rule_id!r} already exists")
        spec.create_time.FromDatetime(row[0])
        return spec

    def delete_alert_rule(self, tenant_id: str, rule_id: str) -> None:
        with db.raw_transaction(self.engine, "quality.delete_alert_rule") as (cur, _):
            cur.execute("DELETE FROM metrics.alert_rules WHERE tenant_id = %s AND rule_id = %s", (tenant_id, rule_id))
            if cur.rowcount == 0:
                raise NotFound(f"no alert rule {rule_id!r}")

    def alert_rules(self, tenant_id: str, cur: Any = None) -> list[quality_pb2.AlertRule]:
        if cur is None:
            with db.raw_transaction(self.reader, "quality.alert_rules") as (c, _):
                return self.alert_rules(tenant_id, c)
        cur.execute(
            "SELECT spec, created_at FROM metrics.alert_rules WHERE tenant_id = %s ORDER BY rule_id", (tenant_id,)
        )
        out = []
        for spec, created in cur.fetchall():
            r = quality_pb2.AlertRule()
            r.ParseFromString(bytes(spec))
            r.create_time.FromDatetime(created)
            out.append(r)
        return out

    def _alerts(
        self,
        cur: Any,
        tenant_id: str,
        iids: Sequence[str],
        rules: Sequence[quality_pb2.AlertRule],
        now: dt.datetime,
        known: dict[str, quality_pb2.Category],
    ) -> Pending | None:
        """Fire the rules on the touched interactions; each fires once per interaction (the
        unique key), and what fired now goes to the outbox in this transaction."""
        legs, _surveys = self._legs_and_surveys(cur, tenant_id, iids)
        cur.execute(
            "SELECT interaction_id, event_id, author, text, at, offset_seconds, compound, profile_id "
            "FROM metrics.messages WHERE tenant_id = %s AND interaction_id = ANY(%s) ORDER BY at, event_id",
            (tenant_id, list(iids)),
        )
        transcripts: dict[str, list[tuple[Any, ...]]] = {}
        owners: dict[str, str] = {}
        for row in cur.fetchall():
            transcripts.setdefault(row[0], []).append(row[1:7])
            owners.setdefault(row[0], row[7])
        for iid, fs in legs.items():
            owners[iid] = min(fs, key=lambda f: (f.start, f.leg_id)).profile_id
        history_needed = any(r.WhichOneof("condition") in ("contact_after_low_nps", "repeated_reason") for r in rules)
        contacts: dict[str, list[tuple[dt.datetime, str, str]]] = {}
        nps: dict[str, list[tuple[dt.datetime, int, str]]] = {}
        if history_needed and legs:
            cur.execute(
                "SELECT profile_id, kind, coalesce(started_at, at), interaction_id, reason, survey_type, score, "
                "event_id FROM metrics.facts WHERE tenant_id = %s AND profile_id = ANY(%s) AND kind IN (1, 2)",
                (tenant_id, sorted({owners[i] for i in legs})),
            )
            for pid, kind, at, iid, reason, survey_type, score, event_id in cur.fetchall():
                if kind == LEG:
                    contacts.setdefault(pid, []).append((at, iid, reason))
                elif survey_type == 1 and score is not None:  # SURVEY_TYPE_NPS
                    nps.setdefault(pid, []).append((at, int(score), event_id))
        rows = []
        for iid in iids:
            if iid not in owners:
                continue
            pid = owners[iid]
            first = min(legs[iid], key=lambda f: (f.start, f.leg_id)) if iid in legs else None
            lines, scores = _transcript(transcripts.get(iid, []), first.start if first else None)
            w = al.Watched(iid, pid, legs.get(iid, ()), lines, scores, contacts.get(pid, ()), nps.get(pid, ()))
            for rule in rules:
                fired = al.fire(rule, w, known)
                if fired is None:
                    continue
                rule_id = rule.name.removeprefix("alertRules/")
                alert_id = hashlib.sha256(f"{rule_id}\x1f{iid}".encode()).hexdigest()[:20]
                alert = quality_pb2.Alert(
                    name=f"alerts/{alert_id}",
                    rule=rule.name,
                    rule_display_name=rule.display_name,
                    interaction_id=iid,
                    profile=f"profiles/{pid}",
                    queue=w.queue,
                    agent_id=w.agent,
                    description=fired.description,
                    evidence=list(fired.evidence),
                    state=quality_pb2.ALERT_STATE_OPEN,
                )
                alert.fire_time.FromDatetime(now)
                rows.append((tenant_id, alert_id, rule_id, iid, pid, w.queue, w.agent, alert.SerializeToString()))
        if not rows:
            return None
        inserted = execute_values(
            cur,
            "INSERT INTO metrics.alerts (tenant_id, alert_id, rule_id, interaction_id, profile_id, queue, agent, body) "
            "VALUES %s ON CONFLICT DO NOTHING RETURNING body",
            rows,
            fetch=True,
        )
        if not inserted:
            return None
        traceparent = inject_traceparent()  # the consumer span that fired it: the event's trace
        envelopes = [
            stream_pb2.AlertEnvelope(
                tenant_id=tenant_id, traceparent=traceparent, alert=_alert(bytes(r[0]))
            ).SerializeToString()
            for r in inserted
        ]
        _fired.add(len(envelopes))
        return OUTBOX.insert(cur, tenant_id, streams.ALERTS.name, envelopes)

    def alert_feed(
        self, tenant_id: str, after: int, limit: int, queues: Sequence[str], agents: Sequence[str]
    ) -> list[tuple[int, quality_pb2.Alert]]:
        """Alerts after ``after`` in firing order (filtered)."""
        with db.raw_transaction(self.reader, "quality.alert_feed") as (cur, _):
            cur.execute(
                "SELECT seq, body, acknowledged_by FROM metrics.alerts WHERE tenant_id = %s AND seq > %s "
                "AND (cardinality(%s::text[]) = 0 OR queue = ANY(%s)) "
                "AND (cardinality(%s::text[]) = 0 OR agent = ANY(%s)) ORDER BY seq LIMIT %s",
                (tenant_id, after, list(queues), list(queues), list(agents), list(agents), limit),
            )
            rows = cur.fetchall()
        return [(int(seq), _alert(bytes(body), ack)) for seq, body, ack in rows]

    def alert_head(self, tenant_id: str) -> int:
        """The newest alert's position (where a watch with no cursor starts)."""
        with db.raw_transaction(self.reader, "quality.alert_head") as (cur, _):
            cur.execute("SELECT coalesce(max(seq), 0) FROM metrics.alerts WHERE tenant_id = %s", (tenant_id,))
            return int(cur.fetchone()[0])

    def alerts(
        self, tenant_id: str, *, profile_id: str = "", interaction_id: str = "", acknowledged: bool, limit: int
    ) -> list[quality_pb2.Alert]:
        """The alerts of an interaction, of a customer, or (neither named) of the whole tenant, newest
        first."""
        column, value = ("interaction_id", interaction_id) if interaction_id else ("profile_id", profile_id)
        which = f"AND {column} = %s " if value else ""
        params = (tenant_id, value, acknowledged, limit) if value else (tenant_id, acknowledged, limit)
        with db.raw_transaction(self.reader, "quality.alerts") as (cur, _):
            cur.execute(
                f"SELECT body, acknowledged_by FROM metrics.alerts WHERE tenant_id = %s {which}"  # noqa: S608
                "AND (%s OR acknowledged_by IS NULL) ORDER BY seq DESC LIMIT %s",
                params,
            )
            return [_alert(bytes(body), ack) for body, ack in cur.fetchall()]

    def acknowledge(self, tenant_id: str, alert_id: str, who: str) -> quality_pb2.Alert:
        with db.raw_transaction(self.engine, "quality.acknowledge") as (cur, _):
            cur.execute(
                "UPDATE metrics.alerts SET acknowledged_by = coalesce(acknowledged_by, %s) WHERE tenant_id = %s "
                "AND alert_id = %s RETURNING body, acknowledged_by",
                (who, tenant_id, alert_id),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no alert {alert_id!r}")
        return _alert(bytes(row[0]), row[1])

    def reevaluate(self, tenant_id: str, form_id: str, config: MetricsConfig, batch: int = 500) -> int:
        """Evaluate every ended interaction of the tenant that ``form_id`` applies to again, now,
        in batches; returns how many evaluations changed. (The service queues the same work with
        :meth:`request_reevaluation`; this is for tools and benchmarks.)"""
        changed, after = 0, ""
        while True:
            with db.raw_transaction(self.engine, "quality.reevaluate") as (cur, _):
                done, after = self._reevaluate_batch(cur, tenant_id, form_id, after, config, batch)
            changed += done
            if not after:
                return changed

    def request_reevaluation(self, tenant_id: str, form_ids: Sequence[str]) -> None:
        """Queue the forms' interactions for evaluation again (from the start, if already queued)."""
        if not form_ids:
            return
        with db.raw_transaction(self.engine, "quality.request_reevaluation") as (cur, _):
            execute_values(
                cur,
                "INSERT INTO metrics.reevaluations (tenant_id, form_id) VALUES %s ON CONFLICT (tenant_id, form_id) "
                "DO UPDATE SET after = '', requested_at = clock_timestamp()",
                [(tenant_id, f) for f in sorted(set(form_ids))],
            )

    def reevaluation_step(self, configs: Callable[[str], MetricsConfig], batch: int = 500) -> int:
        """One batch of the oldest queued re-evaluation (any replica may run it: the row is taken
        with SKIP LOCKED and its progress saved in the same transaction); 1 when a batch was done,
        0 when nothing is queued."""
        with db.raw_transaction(self.engine, "quality.reevaluation_step") as (cur, _):
            cur.execute(
                "SELECT tenant_id, form_id, after FROM metrics.reevaluations ORDER BY requested_at "
                "LIMIT 1 FOR UPDATE SKIP LOCKED"
            )
            row = cur.fetchone()
            if row is None:
                return 0
            tenant_id, form_id, after = row
            _changed, next_after = self._reevaluate_batch(cur, tenant_id, form_id, after, configs(tenant_id), batch)
            if next_after:
                cur.execute(
                    "UPDATE metrics.reevaluations SET after = %s WHERE tenant_id = %s AND form_id = %s",
                    (next_after, tenant_id, form_id),
                )
            else:
                cur.execute(
                    "DELETE FROM metrics.reevaluations WHERE tenant_id = %s AND form_id = %s", (tenant_id, form_id)
                )
            return 1

    def drain_reevaluations(self, configs: Callable[[str], MetricsConfig], budget_seconds: float = 2.0) -> int:
        """Queued re-evaluation batches for up to ``budget_seconds`` (the periodic job)."""
        deadline = time.monotonic() + budget_seconds
        steps = 0
        while time.monotonic() < deadline and self.reevaluation_step(configs):
            steps += 1
        return steps

    def _reevaluate_batch(
        self, cur: Any, tenant_id: str, form_id: str, after: str, config: MetricsConfig, batch: int
    ) -> tuple[int, str]:
        """Evaluate the next ``batch`` ended interactions after ``after``; (changed, the last one
        done, or "" when there are no more)."""
        cur.execute(
            "SELECT DISTINCT interaction_id FROM metrics.facts WHERE tenant_id = %s AND kind = 1 "
            "AND ended_at IS NOT NULL AND interaction_id > %s ORDER BY 1 LIMIT %s",
            (tenant_id, after, batch),
        )
        iids = [r[0] for r in cur.fetchall()]
        if not iids:
            return 0, ""
        form_list = [f for f in self.latest_forms(tenant_id, cur) if f.name == f"evaluationForms/{form_id}"]
        changed = self._evaluate(cur, tenant_id, iids, form_list, config, dt.datetime.now(dt.UTC)) if form_list else 0
        return changed, iids[-1] if len(iids) == batch else ""

    def _evaluate(
        self,
        cur: Any,
        tenant_id: str,
        iids: Sequence[str],
        form_list: Sequence[quality_pb2.EvaluationForm],
        config: MetricsConfig,
        now: dt.datetime,
        known: dict[str, quality_pb2.Category] | None = None,
    ) -> int:
        window = dt.timedelta(days=config.fcr_window_days)
        tz = config.tz
        cur.execute(
            "SELECT pg_advisory_xact_lock(k) FROM (SELECT hashtextextended(x, 10) AS k FROM unnest(%s::text[]) x "
            "ORDER BY 1) s",
            ([f"{tenant_id}:{i}" for i in iids],),
        )
        legs, surveys = self._legs_and_surveys(cur, tenant_id, iids)
        ended = [i for i in iids if any(f.ended_at is not None for f in legs.get(i, ()))]
        if not ended:
            return 0
        cur.execute(
            "SELECT interaction_id, event_id, author, text, at, offset_seconds, compound FROM metrics.messages "
            "WHERE tenant_id = %s AND interaction_id = ANY(%s) ORDER BY at, event_id",
            (tenant_id, ended),
        )
        transcripts: dict[str, list[tuple[Any, ...]]] = {}
        for row in cur.fetchall():
            transcripts.setdefault(row[0], []).append(row[1:])
        repeats = self._repeats(cur, tenant_id, {i: legs[i] for i in ended}, window, now)
        cur.execute(
            "SELECT interaction_id, form_id, question_id, value, not_applicable, reviewer, reason, at "
            "FROM metrics.overrides WHERE tenant_id = %s AND interaction_id = ANY(%s)",
            (tenant_id, ended),
        )
        human: dict[tuple[str, str], dict[str, ev.HumanAnswer]] = {}
        for iid, form_id, qid, value, na, reviewer, reason, at in cur.fetchall():
            human.setdefault((iid, form_id), {})[qid] = ev.HumanAnswer(value, na, reviewer, reason, at)
        cur.execute(
            "SELECT interaction_id, form_id, body FROM metrics.evaluations WHERE tenant_id = %s "
            "AND interaction_id = ANY(%s)",
            (tenant_id, ended),
        )
        stored = {(r[0], r[1]): bytes(r[2]) for r in cur.fetchall()}
        if known is None:
            known = self.categories(tenant_id, cur)
        rows = []
        delta: dict[tuple[Any, ...], list[float]] = {}
        for iid in ended:
            interaction = _interaction(iid, legs[iid], transcripts.get(iid, []), surveys.get(iid, []), repeats[iid])
            first = interaction.first
            for form in form_list:
                if not forms.applies(form, first.channel, first.queue, interaction.reason):
                    continue
                form_id = form.name.removeprefix("evaluationForms/")
                result = ev.evaluate(form, interaction, known, human.get((iid, form_id)))
                body = result.SerializeToString(deterministic=True)
                old = stored.get((iid, form_id))
                if old == body:
                    continue
                day = day_of(hour_of(first.start, tz), tz)
                for key, d in qr.difference(_evaluation(old) if old is not None else None, result).items():
                    found = delta.setdefault((day, *key), [0, 0, 0, 0, 0.0])
                    for k, v in enumerate(d):
                        found[k] += v
                rows.append(
                    (
                        tenant_id,
                        iid,
                        form_id,
                        form.version,
                        interaction.profile_id,
                        result.score if result.HasField("score") else None,
                        result.auto_failed,
                        first.start,
                        body,
                        day,
                    )
                )
        if delta:
            e, t = db.COPY_ESCAPES, tenant_id.translate(db.COPY_ESCAPES)
            text = "".join(  # formatted by hand: about 18 rows per evaluation
                f"{t}\t{day.isoformat()}\t{form.translate(e)}\t{question.translate(e)}\t{agent.translate(e)}\t"
                f"{team.translate(e)}\t{queue.translate(e)}\t{channel}\t{int(d[0])}\t{int(d[1])}\t{int(d[2])}\t"
                f"{int(d[3])}\t{d[4]!r}\n"
                for (day, form, question, agent, team, queue, channel), d in sorted(delta.items())
            )
            db.copy_merge(cur, "metrics.quality_rollup_day", text, _MERGE_ROLLUP)
        if rows:
            # COPY, not VALUES: the bodies are kilobytes, and bytes.hex() is far cheaper than the
            # driver quoting each one.
            text = "".join("\t".join(map(db.copy_value, r)) + "\n" for r in sorted(rows, key=lambda r: (r[1], r[2])))
            db.copy_merge(cur, "metrics.evaluations", text, _MERGE_EVALUATIONS, _EVALUATION_COLUMNS)
        return len(rows)

    @staticmethod
    def _legs_and_surveys(
        cur: Any, tenant_id: str, iids: Sequence[str]
    ) -> tuple[dict[str, list[Fact]], dict[str, list[ev.Survey]]]:
        cur.execute(
            FACT_SELECT + "WHERE tenant_id = %s AND interaction_id = ANY(%s) AND kind IN (1, 2)",
            (tenant_id, list(iids)),
        )
        legs: dict[str, list[Fact]] = {}
        surveys: dict[str, list[ev.Survey]] = {}
        for row in cur.fetchall():
            f = Fact(*row)
            if f.kind == LEG:
                legs.setdefault(f.interaction_id, []).append(f)
            elif f.kind == SURVEY and f.score is not None:
                surveys.setdefault(f.interaction_id, []).append(ev.Survey(f.event_id, f.survey_type, f.score))
        return legs, surveys

    @staticmethod
    def _repeats(
        cur: Any, tenant_id: str, legs: dict[str, list[Fact]], window: dt.timedelta, now: dt.datetime
    ) -> dict[str, tuple[bool | None, str]]:
        """Per interaction: whether the same customer came back on the same reason within the
        window (None while it is open and nobody has), and why."""
        profiles = sorted({min(fs, key=lambda f: (f.start, f.leg_id)).profile_id for fs in legs.values()})
        cur.execute(
            "SELECT profile_id, interaction_id, reason, coalesce(started_at, at) FROM metrics.facts "
            "WHERE tenant_id = %s AND kind = 1 AND profile_id = ANY(%s) AND reason <> ''",
            (tenant_id, profiles),
        )
        contacts: dict[tuple[str, str], list[tuple[dt.datetime, str]]] = {}
        for profile_id, iid, reason, start in cur.fetchall():
            contacts.setdefault((profile_id, reason), []).append((start, iid))
        out: dict[str, tuple[bool | None, str]] = {}
        for iid, fs in legs.items():
            ix = ev.Interaction(iid, fs[0].profile_id, fs)
            first = ix.first
            reason = ix.reason
            if not reason:
                out[iid] = (False, "the contact names no reason, so no repeat can be matched")
                continue
            later = sorted(
                (s, other)
                for s, other in contacts.get((first.profile_id, reason), [])
                if other != iid and first.start < s <= first.start + window
            )
            if later:
                out[iid] = (True, f"contact {later[0][1]} on {reason!r} followed on {later[0][0]:%Y-%m-%d %H:%M} UTC")
            elif first.start + window <= now:
                out[iid] = (False, f"no contact on {reason!r} within {window.days} days")
            else:
                closes = first.start + window
                out[iid] = (None, f"no contact on {reason!r} so far; the window closes {closes:%Y-%m-%d %H:%M} UTC")
        return out

    # -- identity changes ------------------------------------------------------------------------

    def apply_merge(
        self, tenant_id: str, survivor: str, absorbed: str, config: MetricsConfig | None = None, key: str = ""
    ) -> int:
        """Move the absorbed customer's transcripts and evaluations to the survivor (once per change
        ``key``), then (given the tenant's settings) evaluate the survivor's interactions again;
        returns how many changed."""
        with db.raw_transaction(self.engine, "quality.merge") as (cur, _):
            lock_customers(cur, tenant_id, (survivor, absorbed))
            target = lock_final_survivor(cur, tenant_id, survivor, absorbed)
            if not key or first_time(cur, tenant_id, "quality:" + key):
                for table in ("messages", "evaluations"):
                    cur.execute(
                        f"UPDATE metrics.{table} SET profile_id = %s WHERE tenant_id = %s AND profile_id = %s",  # noqa: S608
                        (target, tenant_id, absorbed),
                    )
        return self.reevaluate_customers(tenant_id, [target], config) if config is not None else 0

    def reevaluate_customers(
        self, tenant_id: str, profiles: Sequence[str], config: MetricsConfig, now: dt.datetime | None = None
    ) -> int:
        """Evaluate these customers' interactions again. A merge or a split changes which contacts
        are one customer's, and with that the answers that look across contacts (did the same
        reason come back within the window?), whatever order the events and the change came in.
        Its own transaction: the interactions' locks are taken without holding any customer's."""
        with db.raw_transaction(self.engine, "quality.reevaluate_customers") as (cur, _):
            forms_now = self.latest_forms(tenant_id, cur)
            if not forms_now:
                return 0
            cur.execute(
                "SELECT DISTINCT interaction_id FROM metrics.facts WHERE tenant_id = %s AND kind = 1 "
                "AND profile_id = ANY(%s) AND interaction_id <> ''",
                (tenant_id, list(profiles)),
            )
            iids = sorted(r[0] for r in cur.fetchall())
            if not iids:
                return 0
            return self._evaluate(cur, tenant_id, iids, forms_now, config, now or dt.datetime.now(dt.UTC))

    def apply_split(
        self,
        tenant_id: str,
        new_profile_id: str,
        moved_event_ids: Sequence[str],
        config: MetricsConfig | None = None,
        *,
        profile_id: str = "",
        key: str = "",
    ) -> int:
        """Move what the split took to the new customer (once per change ``key``); given the
        settings, evaluate both customers' interactions again. Returns how many evaluations changed."""
        moved = self._move_split(tenant_id, profile_id, new_profile_id, moved_event_ids, key)
        if config is None:
            return 0
        return self.reevaluate_customers(tenant_id, moved, config)

    def _move_split(
        self, tenant_id: str, profile_id: str, new_profile_id: str, moved_event_ids: Sequence[str], key: str
    ) -> list[str]:
        """The move, to whom the new customer is now (merged on since, perhaps); returns the
        customers whose interactions to evaluate again."""
        with db.raw_transaction(self.engine, "quality.split") as (cur, _):
            lock_customers(cur, tenant_id, [p for p in (profile_id, new_profile_id) if p])
            target = lock_final_survivor(cur, tenant_id, new_profile_id, profile_id)
            source = lock_final_survivor(cur, tenant_id, profile_id, new_profile_id) if profile_id else ""
            if not key or first_time(cur, tenant_id, "quality:" + key):
                cur.execute(
                    "UPDATE metrics.messages SET profile_id = %s WHERE tenant_id = %s AND event_id = ANY(%s)",
                    (target, tenant_id, list(moved_event_ids)),
                )
                cur.execute(
                    "UPDATE metrics.evaluations e SET profile_id = %s FROM metrics.facts f WHERE e.tenant_id = %s "
                    "AND f.tenant_id = e.tenant_id AND f.interaction_id = e.interaction_id AND f.kind = 1 "
                    "AND f.event_id = ANY(%s)",
                    (target, tenant_id, list(moved_event_ids)),
                )
        return sorted({p for p in (source, target) if p})

    def erase(self, tenant_id: str, profile_ids: Sequence[str]) -> None:
        """Forget the customers' transcripts, evaluations and the answers people gave on them."""
        ids = sorted(set(profile_ids))
        with db.raw_transaction(self.engine, "quality.erase") as (cur, _):
            cur.execute(
                "DELETE FROM metrics.overrides o USING metrics.evaluations e WHERE o.tenant_id = %s "
                "AND e.tenant_id = o.tenant_id AND e.interaction_id = o.interaction_id AND e.form_id = o.form_id "
                "AND e.profile_id = ANY(%s)",
                (tenant_id, ids),
            )
            cur.execute(
                "DELETE FROM metrics.evaluations WHERE tenant_id = %s AND profile_id = ANY(%s)", (tenant_id, ids)
            )
            cur.execute("DELETE FROM metrics.messages WHERE tenant_id = %s AND profile_id = ANY(%s)", (tenant_id, ids))

    # -- reads and reviews -----------------------------------------------------------------------

    def evaluation(self, tenant_id: str, interaction_id: str, form_id: str) -> quality_pb2.Evaluation:
        with db.raw_transaction(self.reader, "quality.evaluation") as (cur, _):
            cur.execute(
                "SELECT body, evaluated_at FROM metrics.evaluations WHERE tenant_id = %s AND interaction_id = %s "
                "AND form_id = %s",
                (tenant_id, interaction_id, form_id),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no evaluation of interaction {interaction_id!r} under form {form_id!r}")
        out = _evaluation(bytes(row[0]))
        out.evaluate_time.FromDatetime(row[1])
        return out

    def evaluations(
        self,
        tenant_id: str,
        *,
        interaction_id: str = "",
        profile_id: str = "",
        after: tuple[str, str, str] | None = None,
        limit: int = 20,
    ) -> list[quality_pb2.Evaluation]:
        """Newest interaction first; ``after`` is the (start, interaction, form) of the last row seen."""
        column, value = ("interaction_id", interaction_id) if interaction_id else ("profile_id", profile_id)
        params: list[Any] = [tenant_id, value]
        page = ""
        if after:
            page = "AND (started_at, interaction_id, form_id) < (%s::timestamptz, %s, %s) "
            params.extend(after)
        params.append(limit)
        with db.raw_transaction(self.reader, "quality.evaluations") as (cur, _):
            cur.execute(
                f"SELECT body, evaluated_at FROM metrics.evaluations WHERE tenant_id = %s AND {column} = %s "  # noqa: S608
                f"{page}ORDER BY started_at DESC, interaction_id DESC, form_id DESC LIMIT %s",
                params,
            )
            rows = cur.fetchall()
        out = []
        for body, at in rows:
            e = _evaluation(bytes(body))
            e.evaluate_time.FromDatetime(at)
            out.append(e)
        return out

    def override(
        self,
        tenant_id: str,
        interaction_id: str,
        form_id: str,
        question_id: str,
        answer: tuple[str, bool],
        automatic: tuple[str, bool],
        reviewer: str,
        reason: str,
        config: MetricsConfig,
    ) -> None:
        """Record a person's answer and evaluate the interaction again with it."""
        with db.raw_transaction(self.engine, "quality.override") as (cur, _):
            cur.execute(
                "INSERT INTO metrics.overrides (tenant_id, interaction_id, form_id, question_id, value, "
                "not_applicable, automatic_value, automatic, reviewer, reason) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant_id, interaction_id, form_id, question_id) DO UPDATE SET value = EXCLUDED.value, "
                "not_applicable = EXCLUDED.not_applicable, reviewer = EXCLUDED.reviewer, reason = EXCLUDED.reason, "
                "at = now()",
                (
                    tenant_id,
                    interaction_id,
                    form_id,
                    question_id,
                    answer[0],
                    answer[1],
                    automatic[0],
                    automatic[1],
                    reviewer,
                    reason,
                ),
            )
            form_list = [f for f in self.latest_forms(tenant_id, cur) if f.name == f"evaluationForms/{form_id}"]
            self._evaluate(cur, tenant_id, [interaction_id], form_list, config, dt.datetime.now(dt.UTC))

    def agreement(self, tenant_id: str, form_id: str) -> dict[str, tuple[int, int]]:
        """Per question: automatic answers a person reviewed, and how many they left as they were."""
        with db.raw_transaction(self.reader, "quality.agreement") as (cur, _):
            cur.execute(
                "SELECT question_id, count(*), count(*) FILTER (WHERE value = automatic_value "
                "AND not_applicable = (automatic_value = '')) FROM metrics.overrides "
                "WHERE tenant_id = %s AND form_id = %s AND automatic GROUP BY 1",
                (tenant_id, form_id),
            )
            return {q: (int(n), int(a)) for q, n, a in cur.fetchall()}


def _transcript(rows: Iterable[tuple[Any, ...]], start: dt.datetime | None) -> tuple[list[cat.Line], list[float]]:
    """Transcript lines (offsets from the message or from the interaction's start) and the
    customer's scores, in time order."""
    lines: list[cat.Line] = []
    scores: list[float] = []
    rows = list(rows)
    origin = start or (min(r[3] for r in rows) if rows else None)
    for event_id, author, text, at, offset, compound in rows:
        at_offset = offset if offset is not None else (at - origin).total_seconds() if origin else 0.0
        lines.append(cat.Line(event_id, author, text, at_offset))
        if author == event_pb2.AUTHOR_CUSTOMER:
            scores.append(compound)
    lines.sort(key=lambda x: (x.offset, x.event_id))  # the rules' order, once per interaction
    return lines, scores


def _interaction(
    iid: str,
    legs: list[Fact],
    transcript: Iterable[tuple[Any, ...]],
    surveys: list[ev.Survey],
    repeat: tuple[bool | None, str],
) -> ev.Interaction:
    first = min(legs, key=lambda f: (f.start, f.leg_id))
    lines, scores = _transcript(transcript, first.start)
    return ev.Interaction(
        iid,
        first.profile_id,
        legs,
        transcript=lines,
        customer_scores=scores,
        surveys=sorted(surveys, key=lambda s: s.event_id),
        repeat=repeat[0],
        repeat_evidence=repeat[1],
    )


def _alert(body: bytes, acknowledged_by: str | None = None) -> quality_pb2.Alert:
    out = quality_pb2.Alert()
    out.ParseFromString(body)
    if acknowledged_by:
        out.state = quality_pb2.ALERT_STATE_ACKNOWLEDGED
        out.acknowledged_by = acknowledged_by
    return out
