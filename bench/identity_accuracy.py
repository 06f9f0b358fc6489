"""``tessera bench identity-accuracy``: probabilistic matching measured end to end on FEBRL4.

Ingest and identity run as their own processes. A tenant turns probabilistic matching on through
``UpdateIdentityRules``; the 10,000 FEBRL4 records are then sent through the public ingest API one
record per call, in a seeded random order, each as an Identify event whose only identifier is an
opaque per-call ``anonymous_id`` (never the data set's record id, which is used for scoring only;
the social-security number is sent as the fuzzy ``national_id`` trait). When identity has applied
them all, the profiles it built are compared with the true links: pairwise precision, recall, F1.
Target: F1 of at least 0.99 in this streaming mode.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from bench.common import (
    Backends,
    backends,
    log,
    machine_facts,
    print_report,
    setup_logging,
    spawn,
    utc_now,
)
from bench.identity_accuracy_offline import SEED, load_traits, pair_counts
from services.core import db, tenancy
from services.core.harness import free_port, run_token, serve_argv, wait_serving
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2, ingest_pb2_grpc

TARGET_F1 = 0.99


def _env(be: Backends, **extra: str) -> dict[str, str]:
    return be.env(
        TESSERA_TENANT_REFRESH_SECONDS="0.5",
        TESSERA_IDENTITY_RULES_CACHE_SECONDS="0",
        TESSERA_INGEST_RATE_LIMIT="1000000",
        TESSERA_LOG_LEVEL="WARNING",
        **extra,
    )


def _event(n: int, traits: dict[str, Any]) -> event_pb2.Event:
    ev = event_pb2.Event(
        message_id=f"febrl-{n}",
        channel=event_pb2.CHANNEL_OTHER,
        source="febrl4",
        identifiers=[event_pb2.Identifier(type="anonymous_id", value=f"febrl-{n}")],
        identify=event_pb2.Identify(),
    )
    ev.identify.traits.update(traits)
    return ev


def _applied(engine: sa.Engine, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM identity.event_links WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )


def _profiles_by_message(engine: sa.Engine, tenant_id: str) -> dict[str, str]:
    """anonymous_id (febrl-N) -> the live profile that holds it."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id_value, profile_id::text FROM identity.identifiers WHERE tenant_id = :t"),
            {"t": tenant_id},
        )
        return {str(v): str(p) for v, p in rows}


def _count(engine: sa.Engine, table: str, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(f"SELECT count(*) FROM identity.{table} WHERE tenant_id = :t"),
                {"t": tenant_id},
            ).scalar_one()
        )


def _run(limit: int | None) -> dict[str, Any]:
    stream = load_traits()
    random.Random(SEED).shuffle(stream)
    if limit:
        stream = stream[:limit]
    with backends("accuracy") as be:
        ingest_port, identity_port = free_port(), free_port()
        ingest = spawn(
            "ingest",
            serve_argv("ingest"),
            _env(be, TESSERA_INGEST_PORT=str(ingest_port)),
            be.workdir,
        )
        identity = spawn(
            "identity",
            serve_argv("identity"),
            _env(be, TESSERA_IDENTITY_PORT=str(identity_port), TESSERA_CONSUMER_BATCH_SIZE="50"),
            be.workdir,
        )
        engine = db.make_engine(be.database_url, application_name="bench-accuracy", pool_size=2, instrument=False)
        try:
            wait_serving(f"127.0.0.1:{ingest_port}", ingest)
            wait_serving(f"127.0.0.1:{identity_port}", identity)
            tenant_id = f"febrl-{run_token()}"
            key = tenancy.create_tenant(engine, tenant_id)
            md = (("authorization", f"Bearer {key}"),)
            with grpc.insecure_channel(f"127.0.0.1:{identity_port}") as ch:
                rules = identity_pb2.IdentityRules(probabilistic=identity_pb2.ProbabilisticMatching(enabled=True))
                identity_pb2_grpc.IdentityServiceStub(ch).UpdateIdentityRules(
                    identity_pb2.UpdateIdentityRulesRequest(
                        rules=rules, update_mask=field_mask_pb2.FieldMask(paths=["probabilistic"])
                    ),
                    metadata=md,
                    timeout=10,
                )
            log.info("streaming %d FEBRL4 records, one per IngestEvents call", len(stream))
            started = time.monotonic()
            rec_of: dict[str, str] = {}
            with grpc.insecure_channel(f"127.0.0.1:{ingest_port}") as ch:
                stub = ingest_pb2_grpc.IngestServiceStub(ch)
                for n, (rec_id, traits) in enumerate(stream):
                    rec_of[f"febrl-{n}"] = rec_id
                    resp = stub.IngestEvents(
                        ingest_pb2.IngestEventsRequest(events=[_event(n, traits)]), metadata=md, timeout=30
                    )
                    if resp.accepted_count + resp.duplicate_count != 1:
                        raise RuntimeError(f"record {n} was not accepted: {resp}")
            sent_s = time.monotonic() - started
            deadline = time.monotonic() + 600
            while _applied(engine, tenant_id) < len(stream):
                if time.monotonic() > deadline or not identity.alive():
                    raise RuntimeError(f"identity applied {_applied(engine, tenant_id)} of {len(stream)}")
                time.sleep(0.2)
            total_s = time.monotonic() - started
            owner = _profiles_by_message(engine, tenant_id)
            groups: dict[str, list[str]] = {}
            for anon, rec_id in rec_of.items():
                groups.setdefault(owner[anon], []).append(rec_id)
            predicted, tp = pair_counts(groups.values())
            _, actual = pair_counts([list(rec_of.values())])
            merges = _count(engine, "merges", tenant_id)
            suggestions = _count(engine, "match_suggestions", tenant_id)
        finally:
            engine.dispose()
            for child in (identity, ingest):
                child.stop()
    precision = tp / predicted if predicted else 1.0
    recall = tp / actual if actual else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "scenario": "identity-accuracy",
        "date": utc_now(),
        "machine": machine_facts(),
        "backends": be.mode,
        "records": len(stream),
        "true_pairs": actual,
        "predicted_pairs": predicted,
        "true_positive_pairs": tp,
        "precision": round(precision, 5),
        "recall": round(recall, 5),
        "f1": round(f1, 5),
        "target_f1": TARGET_F1,
        "meets_target": f1 >= TARGET_F1,
        "profiles": len(groups),
        "merges": merges,
        "suggestions": suggestions,
        "ingest_seconds": round(sent_s, 2),
        "end_to_end_seconds": round(total_s, 2),
        "records_per_s_end_to_end": round(len(stream) / total_s, 1),
    }


def table(rep: dict[str, Any]) -> str:
    rows = [
        ("records streamed", f"{rep['records']:,}"),
        ("true pairs / predicted / correct", f"{rep['true_pairs']:,} / {rep['predicted_pairs']:,} / "
         f"{rep['true_positive_pairs']:,}"),
        ("precision", f"{rep['precision']:.4f}"),
        ("recall", f"{rep['recall']:.4f}"),
        ("F1", f"{rep['f1']:.4f} (target {rep['target_f1']}: {'met' if rep['meets_target'] else 'NOT met'})"),
        ("profiles / merges / open suggestions", f"{rep['profiles']:,} / {rep['merges']:,} / {rep['suggestions']:,}"),
        ("end to end", f"{rep['end_to_end_seconds']} s ({rep['records_per_s_end_to_end']} records/s, one per call)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    """``--seconds`` does not apply: the data set sets the length. ``TESSERA_BENCH_RECORDS`` limits it."""
    import os

    setup_logging()
    limit = int(os.environ.get("TESSERA_BENCH_RECORDS", "0") or 0) or None

    def produce() -> dict[str, Any]:
        rep = _run(limit)
        rep["ok"] = bool(rep["meets_target"] or limit)  # a partial run has no target to meet
        return rep

    return print_report(produce, table, as_json)
