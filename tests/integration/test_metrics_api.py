"""MetricsService through the real pipeline: events go in at ingest, identity resolves them, the
metrics consumer builds facts and rollups; scores, series, definitions, settings, erasure,
validation and tenant isolation are read back over gRPC."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from sqlalchemy.engine import Engine

from services.core.server import RunningServer
from services.metrics.definitions import METRICS
from services.metrics.quality_rollup import QUALITY_METRICS
from tessera.v1 import event_pb2, metrics_pb2, metrics_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support.events import uid
from tests.support.grpc_errors import bad_request
from tests.support.profile import Apis, apis, base, code_of, interaction, survey, wait_until

pytestmark = pytest.mark.integration

DAY = dt.timedelta(days=1)


def message(*idents: tuple[str, str], interaction_id: str, author: int, text: str, **kw: Any) -> event_pb2.Event:
    ev = base(*idents, channel=event_pb2.CHANNEL_CHAT, **kw)
    ev.message.interaction_id = interaction_id
    ev.message.author = author  # type: ignore[assignment]
    ev.message.text = text
    return ev


class Metrics:
    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self.stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        self.metadata = metadata

    def customer(self, name: str) -> metrics_pb2.CustomerMetrics:
        resp: metrics_pb2.GetCustomerMetricsResponse = self.stub.GetCustomerMetrics(
            metrics_pb2.GetCustomerMetricsRequest(profile=name), metadata=self.metadata, timeout=10
        )
        return resp.metrics

    def query(self, **kw: Any) -> metrics_pb2.QueryMetricsResponse:
        resp: metrics_pb2.QueryMetricsResponse = self.stub.QueryMetrics(
            metrics_pb2.QueryMetricsRequest(**kw), metadata=self.metadata, timeout=10
        )
        return resp

    def wait_scores(self, name: str, metric: str, n: int) -> metrics_pb2.CustomerMetrics:
        def ready() -> metrics_pb2.CustomerMetrics | None:
            got = self.customer(name)
            lifetime = {w.window: w for w in got.windows}["lifetime"]
            return got if lifetime.scores[metric].sample_size >= n else None

        return wait_until(ready, 30, f"{metric} from {n} observations")


@pytest.fixture
def m(metrics_channel: grpc.Channel, tenant: TenantKey) -> Metrics:
    return Metrics(metrics_channel, tenant.metadata)


def _range(start: dt.datetime, end: dt.datetime) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, t in (("start_time", start), ("end_time", end)):
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(t)
        out[name] = ts
    return out


def _profile(api: Apis, phone: str) -> str:
    """The profile that owns the phone, once profile has applied it."""

    def found() -> str | None:
        try:
            return api.get(ident=("phone", phone)).name
        except grpc.RpcError:
            return None

    return wait_until(found, 30, f"a profile with {phone}")


def _contact(api: Apis, phone: str, at: dt.datetime, **kw: Any) -> str:
    iid = uid("call")
    api.send(interaction(("phone", phone), interaction_id=iid, at=at, **kw))
    return iid


def test_a_customers_scores_come_from_their_calls_surveys_and_chats(
    api: Apis, m: Metrics, metrics_server: RunningServer
) -> None:
    phone = "+14155550101"
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - 10 * DAY
    iid = _contact(api, phone, start, talk=300.0)
    api.send(
        survey(("phone", phone), kind=event_pb2.SURVEY_TYPE_NPS, score=10, at=start + dt.timedelta(hours=1)),
        survey(("phone", phone), kind=event_pb2.SURVEY_TYPE_CSAT, score=2, at=start + dt.timedelta(hours=1)),
        message(
            ("phone", phone),
            interaction_id=iid,
            author=event_pb2.AUTHOR_CUSTOMER,
            text="This is terrible, I am very angry",
            at=start,
        ),
    )
    profile = _profile(api, phone)
    got = m.wait_scores(profile, "sentiment", 1)
    got = m.wait_scores(profile, "csat", 1)
    assert got.profile == profile
    assert got.nps.value == 100 and got.nps.sample_size == 1 and got.nps.ci_low < 100
    assert got.csat.value == 0 and got.csat.sample_size == 1
    assert got.aht_seconds.value == pytest.approx(330.0)  # talk 300 + hold 10 + wrap-up 20
    assert got.sentiment.value < -0.5
    assert [p.interaction_id for p in got.sentiment_trend] == [iid]
    windows = {w.window: w for w in got.windows}
    assert set(windows) == {"lifetime", "30d", "90d"}
    assert set(windows["30d"].scores) == {d.name for d in METRICS}
    # The contact is 10 days old: its 7-day window has closed without a repeat.
    assert got.fcr.value == 100 and got.fcr_pending == 0


def test_a_merged_away_id_answers_with_the_survivor_and_both_customers_facts(api: Apis, m: Metrics) -> None:
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) - 2 * DAY
    _contact(api, "+14155550102", at)
    _contact(api, "+14155550103", at + dt.timedelta(hours=2))
    a = _profile(api, "+14155550102")
    b = _profile(api, "+14155550103")
    m.wait_scores(a, "aht_seconds", 1)
    m.wait_scores(b, "aht_seconds", 1)
    api.merge(a, b)

    def merged() -> metrics_pb2.CustomerMetrics | None:
        got = m.customer(b)
        return got if got.profile == a and got.aht_seconds.sample_size == 2 else None

    got = wait_until(merged, 30, "metrics following the merge")
    # Same customer, same reason, 2 hours apart: the first contact was not resolved.
    assert got.fcr.sample_size == 1 and got.fcr.value == 0 and got.fcr_pending == 1


def test_series_by_channel_with_sample_sizes_and_intervals(api: Apis, m: Metrics) -> None:
    day0 = dt.datetime.now(dt.UTC).replace(hour=12, minute=0, second=0, microsecond=0) - 5 * DAY
    for i, score in enumerate([10, 9, 3]):
        api.send(
            survey(("email", f"s{i}@example.com"), kind=event_pb2.SURVEY_TYPE_NPS, score=score, at=day0, channel=3)
        )
    api.send(survey(("email", "s9@example.com"), kind=event_pb2.SURVEY_TYPE_NPS, score=0, at=day0 + DAY, channel=5))

    def series() -> metrics_pb2.QueryMetricsResponse | None:
        resp = m.query(
            metrics=["nps", "survey_responses"],
            granularity=metrics_pb2.GRANULARITY_DAY,
            group_by=["channel"],
            **_range(day0 - DAY, day0 + 2 * DAY),
        )
        total = sum(p.score.sample_size for s in resp.series if s.metric == "nps" for p in s.points)
        return resp if total == 4 else None

    resp = wait_until(series, 30, "4 NPS answers in the rollups")
    nps = {s.group["channel"]: s.points for s in resp.series if s.metric == "nps"}
    assert set(nps) == {"email", "chat"}
    [email] = nps["email"]
    assert email.score.value == pytest.approx(100 / 3) and email.score.sample_size == 3
    assert email.score.ci_low < email.score.value < email.score.ci_high
    [chat] = nps["chat"]
    assert chat.score.value == -100 and chat.start_time.ToDatetime(tzinfo=dt.UTC) == (day0 + DAY).replace(hour=0)
    assert resp.time_zone == "UTC"


def test_a_time_zone_change_rebuilds_the_day_buckets(api: Apis, m: Metrics) -> None:
    # 02:00 UTC is still the previous day in New York.
    at = dt.datetime.now(dt.UTC).replace(hour=2, minute=0, second=0, microsecond=0) - 3 * DAY
    api.send(survey(("email", "tz@example.com"), kind=event_pb2.SURVEY_TYPE_CSAT, score=5, at=at))
    window = _range(at - 3 * DAY, at + 3 * DAY)

    def day_of_answer() -> dt.datetime | None:
        resp = m.query(metrics=["csat"], granularity=metrics_pb2.GRANULARITY_DAY, **window)
        points = [p for s in resp.series for p in s.points]
        return points[0].start_time.ToDatetime(tzinfo=dt.UTC) if points else None

    assert wait_until(day_of_answer, 30, "the CSAT answer") == at.replace(hour=0)
    m.stub.UpdateMetricsSettings(
        metrics_pb2.UpdateMetricsSettingsRequest(
            settings=metrics_pb2.MetricsSettings(time_zone="America/New_York"),
            update_mask=field_mask_pb2.FieldMask(paths=["time_zone"]),
        ),
        metadata=m.metadata,
        timeout=30,
    )
    local_midnight = (at - DAY).replace(hour=0)
    found = day_of_answer()
    assert found is not None and found.date() == local_midnight.date() and found.hour in (4, 5)


def test_bad_queries_and_settings_name_the_field(m: Metrics) -> None:
    now = dt.datetime.now(dt.UTC)
    err = code_of(
        lambda: m.query(
            metrics=["nps", "happiness"],
            group_by=["colour"],
            granularity=metrics_pb2.GRANULARITY_DAY,
            **_range(now - 5 * DAY, now),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in bad_request(err)} == {"metrics[1]", "group_by[0]"}
    err = code_of(
        lambda: m.query(metrics=["nps"], granularity=metrics_pb2.GRANULARITY_HOUR, **_range(now - 399 * DAY, now))
    )
    assert [f for f, _ in bad_request(err)] == ["granularity"]
    err = code_of(
        lambda: m.query(metrics=["nps"], granularity=metrics_pb2.GRANULARITY_DAY, **_range(now - 999 * DAY, now))
    )
    assert [f for f, _ in bad_request(err)] == ["end_time"]
    err = code_of(
        lambda: m.stub.UpdateMetricsSettings(
            metrics_pb2.UpdateMetricsSettingsRequest(
                settings=metrics_pb2.MetricsSettings(time_zone="Nowhere/Land", fcr_window_days=500),
                update_mask=field_mask_pb2.FieldMask(paths=["time_zone", "fcr_window_days"]),
            ),
            metadata=m.metadata,
            timeout=10,
        )
    )
    assert {f for f, _ in bad_request(err)} == {"settings.time_zone", "settings.fcr_window_days"}
    err = code_of(lambda: m.customer("customers/42"))
    assert [f for f, _ in bad_request(err)] == ["profile"]


def test_definitions_are_the_ones_the_code_computes(m: Metrics) -> None:
    resp = m.stub.ListMetricDefinitions(metrics_pb2.ListMetricDefinitionsRequest(), metadata=m.metadata, timeout=10)
    assert [(d.name, d.definition, d.formula) for d in resp.definitions][: len(METRICS)] == [
        (x.name, x.definition, x.formula) for x in METRICS
    ]
    quality = [(d.name, d.formula) for d in resp.definitions][len(METRICS) :]
    assert quality == [(x.name, x.formula) for x in QUALITY_METRICS]
    assert list(resp.dimensions) == ["channel", "queue", "agent", "reason", "source"]


def test_another_tenant_sees_none_of_it(api: Apis, m: Metrics, metrics_channel: grpc.Channel, engine: Engine) -> None:
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) - DAY
    _contact(api, "+14155550104", at)
    profile = _profile(api, "+14155550104")
    m.wait_scores(profile, "aht_seconds", 1)
    other = Metrics(metrics_channel, make_tenant(engine, "other").metadata)
    theirs = other.customer(profile)
    assert theirs.aht_seconds.sample_size == 0 and theirs.nps.sample_size == 0
    resp = other.query(
        metrics=["contact_volume"], granularity=metrics_pb2.GRANULARITY_ALL, **_range(at - DAY, at + DAY)
    )
    assert list(resp.series) == []
    assert (
        other.stub.EraseCustomerMetrics(
            metrics_pb2.EraseCustomerMetricsRequest(profile_ids=[profile.removeprefix("profiles/")]),
            metadata=other.metadata,
            timeout=10,
        ).erased_count
        == 0
    )
    assert m.customer(profile).aht_seconds.sample_size == 1
    # Their settings are theirs: a time zone set by the other tenant changes nothing here.
    other.stub.UpdateMetricsSettings(
        metrics_pb2.UpdateMetricsSettingsRequest(
            settings=metrics_pb2.MetricsSettings(time_zone="Asia/Tokyo", max_points=10),
            update_mask=field_mask_pb2.FieldMask(paths=["time_zone", "max_points"]),
        ),
        metadata=other.metadata,
        timeout=10,
    )
    mine = m.stub.GetMetricsSettings(metrics_pb2.GetMetricsSettingsRequest(), metadata=m.metadata, timeout=10)
    assert (mine.settings.time_zone, mine.settings.max_points, mine.settings.fcr_window_days) == ("UTC", 5000, 7)


def test_erased_customers_are_not_found_and_rollups_keep_anonymous_counts(api: Apis, m: Metrics) -> None:
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) - 20 * DAY
    _contact(api, "+14155550105", at)
    profile = _profile(api, "+14155550105")
    m.wait_scores(profile, "aht_seconds", 1)
    window = _range(at - DAY, at + DAY)
    before = m.query(metrics=["contact_volume"], granularity=metrics_pb2.GRANULARITY_ALL, **window)
    resp = m.stub.EraseCustomerMetrics(
        metrics_pb2.EraseCustomerMetricsRequest(profile_ids=[profile.removeprefix("profiles/")]),
        metadata=m.metadata,
        timeout=10,
    )
    assert resp.erased_count == 1
    err = code_of(lambda: m.customer(profile))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert m.query(metrics=["contact_volume"], granularity=metrics_pb2.GRANULARITY_ALL, **window) == before


def test_the_customer_context_carries_the_scores_from_metrics(
    engine: Engine,
    ingest_channel: grpc.Channel,
    identity_channel: grpc.Channel,
    metrics_server: RunningServer,
    start_profile_server: Any,
    tenant: TenantKey,
) -> None:
    profile_server = start_profile_server(metrics_address=f"127.0.0.1:{metrics_server.port}")
    with grpc.insecure_channel(f"127.0.0.1:{profile_server.port}") as channel:
        drive = apis(ingest_channel, identity_channel, channel, engine, tenant.tenant_id, tenant.metadata)
        at = dt.datetime.now(dt.UTC).replace(microsecond=0) - DAY
        drive.send(
            interaction(("phone", "+14155550106"), interaction_id=uid("call"), at=at),
            survey(("phone", "+14155550106"), kind=event_pb2.SURVEY_TYPE_NPS, score=9, at=at),
        )
        profile = _profile(drive, "+14155550106")
        with grpc.insecure_channel(f"127.0.0.1:{metrics_server.port}") as direct:
            Metrics(direct, tenant.metadata).wait_scores(profile, "nps", 1)

        def scored() -> Any:
            ctx = drive.context(ident=("phone", "+14155550106"))
            return ctx if ctx.scores.metrics.nps.sample_size == 1 else None

        ctx = wait_until(scored, 30, "the context's scores")
        assert ctx.scores.missing_reason == ""
        assert ctx.scores.metrics.nps.value == 100
        assert ctx.scores.metrics.profile == profile


def test_the_cli_prints_a_series_as_a_table(
    api: Apis, metrics_server: RunningServer, tenant: TenantKey, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli.main import main

    at = dt.datetime.now(dt.UTC).replace(hour=10, minute=0, second=0, microsecond=0) - 2 * DAY
    api.send(survey(("email", "cli@example.com"), kind=event_pb2.SURVEY_TYPE_CES, score=6, at=at, channel=3))
    common = ["--target", f"127.0.0.1:{metrics_server.port}", "--api-key", tenant.api_key]

    def printed() -> str | None:
        code = main(
            ["metrics", "query", "--metric", "ces_agree,ces_mean", "--from", "7d", "--group-by", "channel", *common]
        )
        out = capsys.readouterr().out
        return out if code == 0 and "ces_mean" in out else None

    out = wait_until(printed, 30, "the CES answer in the table")
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "group", "bucket", "(UTC)", "value", "n", "95%", "CI", "pending"]
    agree = next(line for line in lines if line.startswith("ces_agree"))
    assert "channel=email" in agree and at.strftime("%Y-%m-%d 00:00") in agree and " 100.0 " in agree
    assert main(["metrics", "query", "--metric", "nope", *common]) == 1
    assert "metrics[0]: unknown metric 'nope'" in capsys.readouterr().err
