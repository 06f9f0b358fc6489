"""The JSON API's pure parts, without I/O: identifier guessing, parameter parsing, the gRPC-to-HTTP
error mapping with the services' field violations, the settings, and the generated OpenAPI document
(valid OpenAPI 3.1, schemas that follow the proto3 JSON mapping and accept what the API renders)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import grpc
import jsonschema
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from openapi_spec_validator import validate

from services.core.settings import Settings, SettingsError
from services.gateway import params
from services.gateway.api import JsonApi, error_response
from services.gateway.openapi import render
from services.gateway.params import Param
from services.gateway.settings import GatewaySettings, origins
from services.gateway.statuses import FieldViolation, HttpError, field_violations, from_rpc_error
from tessera.v1 import event_pb2, metrics_pb2, profile_pb2, quality_pb2


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("ada@example.com", ("email", "ada@example.com")),
        ("  Ada@Example.com ", ("email", "Ada@Example.com")),
        ("+44 20 7946 0958", ("phone", "+44 20 7946 0958")),
        ("(415) 555-0142", ("phone", "(415) 555-0142")),
        ("4155550142", ("phone", "4155550142")),
        ("u-42", ("user_id", "u-42")),
        ("42abc", ("user_id", "42abc")),
        ("()-", ("user_id", "()-")),  # no digit: not a phone
    ],
)
def test_identifier_guessing(q: str, expected: tuple[str, str]) -> None:
    assert params.guess_identifier(q) == expected


def test_lookup_wants_exactly_one_of_identifier_and_q() -> None:
    assert params.lookup("phone:+14155550100", None) == ("phone", "+14155550100")
    assert params.lookup("user_id:a:b", None) == ("user_id", "a:b")  # the value may hold colons
    for identifier, q in ((None, None), ("email:a@b.c", "x"), ("nocolon", None), ("Email:x", None), ("email:", None)):
        with pytest.raises(HttpError) as err:
            params.lookup(identifier, q)
        assert err.value.status == 400 and [v.field for v in err.value.violations] == ["identifier"]
    with pytest.raises(HttpError) as blank:
        params.lookup(None, "   ")
    assert [v.field for v in blank.value.violations] == ["q"]


SPECS = (
    Param("pageSize", "integer", minimum=1, maximum=100),
    Param("pageToken"),
    Param("channel", "enum", repeated=True, enum=("web", "voice")),
    Param("startTime", "date-time"),
    Param("flag", "boolean"),
    Param("id", "uuid", location="path", required=True),
    Param("must", required=True),
)


def parsed(query: list[tuple[str, str]], path: dict[str, str] | None = None) -> dict[str, Any]:
    return params.parse(SPECS, [("must", "x"), *query], {"id": "6B4C8E23-0356-4F9A-8C16-E7AD19F12EC0", **(path or {})})


def test_parameters_parse_to_values() -> None:
    start = ("startTime", "2026-05-01T10:00:00+02:00")
    out = parsed([("pageSize", "10"), ("channel", "web"), ("channel", "voice"), start,
                  ("flag", "true"), ("pageToken", ""), ("unknown", "ignored")])  # fmt: skip
    assert out["pageSize"] == 10 and out["channel"] == ["web", "voice"] and out["flag"] is True
    assert out["startTime"] == dt.datetime(2026, 5, 1, 8, 0, tzinfo=dt.UTC)
    assert out["pageToken"] is None  # empty is absent
    assert out["id"] == "6b4c8e23-0356-4f9a-8c16-e7ad19f12ec0"
    assert "unknown" not in out


@pytest.mark.parametrize(
    ("query", "path", "field"),
    [
        ([("pageSize", "abc")], None, "pageSize"),
        ([("pageSize", "0")], None, "pageSize"),
        ([("pageSize", "101")], None, "pageSize"),
        ([("pageSize", "1"), ("pageSize", "2")], None, "pageSize"),
        ([("pageSize", "9" * 40)], None, "pageSize"),
        ([("channel", "pigeon")], None, "channel"),
        ([("channel", "web")] * 21, None, "channel"),
        ([("startTime", "yesterday")], None, "startTime"),
        ([("startTime", "2026-05-01T10:00:00")], None, "startTime"),  # no offset
        ([("startTime", "2026-13-01T10:00:00Z")], None, "startTime"),
        ([("flag", "yes")], None, "flag"),
        ([("pageToken", "a\x00b")], None, "pageToken"),
        ([("pageToken", "x" * 2000)], None, "pageToken"),
        ([], {"id": "not-a-uuid"}, "id"),
    ],
)
def test_bad_parameters_name_themselves(query: list[tuple[str, str]], path: dict[str, str] | None, field: str) -> None:
    with pytest.raises(HttpError) as err:
        parsed(query, path)
    assert err.value.status == 400 and err.value.grpc_status == "INVALID_ARGUMENT"
    assert [v.field for v in err.value.violations] == [field]


def test_a_missing_required_parameter() -> None:
    with pytest.raises(HttpError) as err:
        params.parse(SPECS, [], {"id": "6b4c8e23-0356-4f9a-8c16-e7ad19f12ec0"})
    assert [(v.field, v.description) for v in err.value.violations] == [("must", "required")]


def test_metric_filters_group_values_by_dimension() -> None:
    assert params.metric_filters(["channel:voice", "queue:vip", "channel:chat"]) == [
        ("channel", ["voice", "chat"]),
        ("queue", ["vip"]),
    ]
    with pytest.raises(HttpError) as err:
        params.metric_filters(["channel"])
    assert [v.field for v in err.value.violations] == ["filter"]


# ---- errors ----------------------------------------------------------------------------------


def rpc_error(code: grpc.StatusCode, details: str, *extra: Any) -> grpc.aio.AioRpcError:
    """An error as a service's interceptor sends it: google.rpc.Status in grpc-status-details-bin."""
    status = status_pb2.Status(code=code.value[0], message=details)
    for detail in extra:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def test_field_violations_come_from_the_services_bad_request() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="metrics", description="name at least one"),
            error_details_pb2.BadRequest.FieldViolation(field="metrics[1]", description="unknown", reason="UNKNOWN"),
        ]
    )
    err = from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "invalid query", bad), "metrics", "API key")
    assert (err.status, err.grpc_status, err.message) == (400, "INVALID_ARGUMENT", "invalid query")
    assert err.violations == (
        FieldViolation("metrics", "name at least one"),
        FieldViolation("metrics[1]", "unknown", "UNKNOWN"),
    )
    body = error_response(err)
    assert body.status == 400 and body.text is not None

    shaped = json.loads(body.text)
    assert shaped == {
        "error": {
            "code": 400,
            "status": "INVALID_ARGUMENT",
            "message": "invalid query",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [
                        {"field": "metrics", "description": "name at least one"},
                        {"field": "metrics[1]", "description": "unknown", "reason": "UNKNOWN"},
                    ],
                }
            ],
        }
    }


@pytest.mark.parametrize(
    ("code", "status", "name"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401, "UNAUTHENTICATED"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "PERMISSION_DENIED"),
        (grpc.StatusCode.NOT_FOUND, 404, "NOT_FOUND"),
        (grpc.StatusCode.FAILED_PRECONDITION, 400, "FAILED_PRECONDITION"),
        (grpc.StatusCode.UNAVAILABLE, 503, "UNAVAILABLE"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 503, "UNAVAILABLE"),
        (grpc.StatusCode.INTERNAL, 500, "INTERNAL"),
        (grpc.StatusCode.UNKNOWN, 500, "INTERNAL"),
    ],
)
def test_status_mapping_and_generic_5xx(code: grpc.StatusCode, status: int, name: str) -> None:
    err = from_rpc_error(rpc_error(code, "secret internals: SELECT * FROM profile"), "profile", "API key")
    assert (err.status, err.grpc_status) == (status, name)
    response = error_response(err)
    assert response.text is not None
    if status >= 500 or status == 401:
        assert "secret" not in response.text
    if status == 503:
        assert response.headers["Retry-After"] == "5"
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_rate_limit_keeps_retry_after() -> None:
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    err = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", info))
    assert (err.status, err.retry_after, err.grpc_status) == (429, 3, "RESOURCE_EXHAUSTED")
    assert error_response(err).headers["Retry-After"] == "3"


def test_malformed_details_are_no_violations() -> None:
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", b"\xff\xfe not a status"))
    assert field_violations(trailing) == ()
    assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT


# ---- settings --------------------------------------------------------------------------------


def test_cors_origins_are_exact_origins() -> None:
    assert origins("https://console.example.com, http://localhost:3000,") == (
        "https://console.example.com",
        "http://localhost:3000",
    )
    assert origins("") == ()
    for bad in ("*", "https://a.example.com/", "https://a.example.com/path", "ftp://x.example", "example.com",
                "https://*.example.com", "https://user@example.com"):  # fmt: skip
        with pytest.raises(ValueError, match="origin"):
            origins(bad)


def test_gateway_settings_from_env() -> None:
    own = GatewaySettings.from_env(
        {
            "TESSERA_GATEWAY_PROFILE_ADDRESS": "profile:50053",
            "TESSERA_GATEWAY_METRICS_ADDRESS": "metrics:50054",
            "TESSERA_GATEWAY_CORS_ORIGINS": "https://console.example.com",
            "TESSERA_GATEWAY_READ_DEADLINE_SECONDS": "2.5",
        }
    )
    assert (own.profile_address, own.metrics_address, own.read_deadline_seconds) == (
        "profile:50053",
        "metrics:50054",
        2.5,
    )
    assert own.cors_origins == ("https://console.example.com",)
    defaults = GatewaySettings.from_env({})
    assert (defaults.profile_address, defaults.metrics_address) == ("localhost:50053", "localhost:50054")
    assert defaults.cors_origins == () and defaults.read_deadline_seconds == 5.0
    with pytest.raises(SettingsError) as err:
        GatewaySettings.from_env(
            {
                "TESSERA_GATEWAY_PROFILE_ADDRESS": "no port",
                "TESSERA_GATEWAY_CORS_ORIGINS": "*",
                "TESSERA_GATEWAY_READ_DEADLINE_SECONDS": "0",
            }
        )
    for name in ("PROFILE_ADDRESS", "CORS_ORIGINS", "READ_DEADLINE_SECONDS"):
        assert f"TESSERA_GATEWAY_{name}" in str(err.value)


# ---- OpenAPI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return JsonApi(Settings(), GatewaySettings(), lambda: False).openapi()


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "basic", "cookie"}
    assert doc["components"]["securitySchemes"]["cookie"] == {
        "type": "apiKey",
        "in": "cookie",
        "name": "tessera_session",
    }


def test_every_route_is_documented_with_its_errors(doc: dict[str, Any]) -> None:
    api = JsonApi(Settings(), GatewaySettings(), lambda: False)
    for route, _handler in api.routes():
        op = doc["paths"][route.path][route.method.lower()]
        for code in ("400", "404", "429", "503", *(("401",) if route.auth else ())):
            assert op["responses"][code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }
        assert "Retry-After" in op["responses"]["429"]["headers"]
        assert bool(op["security"]) is route.auth
    timeline = doc["paths"]["/api/v1/profiles/{profile_id}/timeline"]["get"]["parameters"]
    by_name = {p["name"]: p for p in timeline}
    assert by_name["profile_id"]["in"] == "path" and by_name["profile_id"]["required"] is True
    assert by_name["pageSize"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert "voice" in by_name["channel"]["schema"]["items"]["enum"]
    assert by_name["startTime"]["schema"] == {"type": "string", "format": "date-time"}
    query = {p["name"]: p for p in doc["paths"]["/api/v1/metrics/query"]["get"]["parameters"]}
    assert query["granularity"]["schema"]["enum"][:4] == ["hour", "day", "week", "month"]


def test_schemas_follow_the_proto3_json_mapping(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    profile = schemas["Profile"]
    assert profile["properties"]["eventCount"]["type"] == "string"  # int64
    assert profile["properties"]["firstSeen"] == {"type": "string", "format": "date-time"}
    assert profile["properties"]["traits"] == {"type": "array", "items": {"$ref": "#/components/schemas/Trait"}}
    assert "firstSeen" not in profile["required"] and "profileId" in profile["required"]
    assert schemas["Channel"] == {"type": "string", "enum": [v.name for v in event_pb2.Channel.DESCRIPTOR.values]}
    score = schemas["Score"]
    assert score["required"] == ["sampleSize"]  # optional doubles may be absent
    window = schemas["MetricWindow"]["properties"]["scores"]
    assert window == {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Score"}}
    alert_rule = schemas.get("AlertRule")
    assert alert_rule is None or "sentimentBelow" not in alert_rule.get("required", [])
    event = schemas["Event"]
    oneof = [f.json_name for f in event_pb2.Event.DESCRIPTOR.oneofs[0].fields]
    assert not set(oneof) & set(event.get("required", []))
    for name, schema in schemas.items():
        if schema.get("type") == "object" and "properties" in schema and name not in ("Error",):
            assert schema["additionalProperties"] is False, name


def _validator(doc: dict[str, Any], name: str) -> jsonschema.protocols.Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_rendered_messages_validate_against_their_schemas(doc: dict[str, Any]) -> None:
    context = profile_pb2.GetCustomerContextResponse()
    context.profile.profile_id = "6b4c8e23-0356-4f9a-8c16-e7ad19f12ec0"
    context.profile.event_count = 12
    context.profile.first_seen.FromDatetime(dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    trait = context.profile.traits.add(key="name", source="crm")
    trait.value.string_value = "Ada"
    context.recent_interactions.add(interaction_id="c1", channel=event_pb2.CHANNEL_VOICE, handle_seconds=12.5)
    context.contacts.last_7_days = 3
    context.scores.metrics.nps.value = 50.0
    context.scores.metrics.windows.add(window="30d").scores["nps"].sample_size = 4
    _validator(doc, "GetCustomerContextResponse").validate(render(context))
    _validator(doc, "GetCustomerContextResponse").validate(render(profile_pb2.GetCustomerContextResponse()))
    series = metrics_pb2.QueryMetricsResponse(time_zone="UTC")
    point = series.series.add(metric="nps", group={"channel": "voice"}).points.add(pending=1)
    point.start_time.FromDatetime(dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    _validator(doc, "QueryMetricsResponse").validate(render(series))
    alerts = quality_pb2.ListAlertsResponse()
    alerts.alerts.add(name="alerts/a", state=quality_pb2.ALERT_STATE_OPEN)
    _validator(doc, "ListAlertsResponse").validate(render(alerts))
    with pytest.raises(jsonschema.ValidationError):
        _validator(doc, "ListAlertsResponse").validate({"alerts": [], "extra": 1})
    error = error_response(HttpError(400, "bad", violations=(FieldViolation("pageSize", "must be an integer"),)))
    assert error.text is not None

    _validator(doc, "Error").validate(json.loads(error.text))
