"""Read the ``google.rpc`` details a server attached to a failed call."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def bad_request(err: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    out: list[tuple[str, str]] = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            out.extend((v.field, v.description) for v in br.field_violations)
    return out


def retry_delay(err: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def precondition_failures(err: grpc.RpcError) -> list[tuple[str, str]]:
    """(type, subject) of each PreconditionFailure violation."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    out: list[tuple[str, str]] = []
    for detail in status.details:
        pf = error_details_pb2.PreconditionFailure()
        if detail.Unpack(pf):
            out.extend((v.type, v.subject) for v in pf.violations)
    return out
