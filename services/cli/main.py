"""The ``tessera`` command: services, migrations, tenants, import, demo data, benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.cli.registry import SERVICES
from services.core.settings import Settings, SettingsError
from services.core.streams import STREAMS as STREAM_NAMES


def _settings() -> Settings:
    from services.cli.runtime import with_runtime

    return with_runtime(Settings.from_env())


def runtime_port(service: str) -> int:
    """The port of ``service``: its setting, else the one a running ``tessera up`` uses."""
    from services.cli.runtime import service_port

    return service_port(service)


def _engine(settings: Settings):  # type: ignore[no-untyped-def]
    from services.core import db

    return db.make_engine(settings.require_database_url(), application_name="cli", pool_size=2, instrument=False)


def cmd_serve(args: argparse.Namespace) -> int:
    from services.cli import registry
    from services.core.server import HttpServiceDefinition, serve

    if args.service not in registry.available():
        print(f"tessera: the {args.service} service is not part of this build", file=sys.stderr)
        return 2
    found = registry.definition(args.service)
    if isinstance(found, HttpServiceDefinition):  # the gateway: HTTP, with its own server loop
        found.run(Settings.from_env(), found.settings_from_env())
        return 0
    serve(found, Settings.from_env())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.cli.up import up

    return up(Settings.from_env(), demo=not args.no_demo, demo_customers=args.demo_customers)


def cmd_migrate(_args: argparse.Namespace) -> int:
    from services.cli.registry import migrate_all

    engine = _engine(_settings())
    try:
        done = migrate_all(engine)
    finally:
        engine.dispose()
    print(f"migrated: {', '.join(done)}")
    return 0


def cmd_tenant(args: argparse.Namespace) -> int:
    from services.core import tenancy

    engine = _engine(_settings())
    try:
        if args.action == "create":
            key = tenancy.create_tenant(engine, args.name, args.display_name)
            if args.json:
                print(json.dumps({"tenant": args.name, "api_key": key}))
            else:
                print(f"tenant: {args.name}\napi key (shown once, store it now): {key}")
        elif args.action == "list":
            rows = tenancy.list_tenants(engine)
            if args.json:
                print(json.dumps(rows, default=str))
            else:
                for row in rows:
                    print(f"{row['tenant_id']:<24} keys={row['active_keys']} created={row['created_at']:%Y-%m-%d}")
        elif args.action == "create-key":
            key = tenancy.create_api_key(engine, args.name, args.description or "")
            print(json.dumps({"tenant": args.name, "api_key": key}) if args.json else key)
        elif args.action == "set-limits":
            if args.dedupe_days is not None:
                days = None if args.dedupe_days == 0 else args.dedupe_days
                tenancy.set_dedupe_window(engine, args.name, days)
                print(f"{args.name}: dedupe window {days or 'default'} days")
            if args.dedupe_days is None or args.rate is not None or args.burst is not None:
                tenancy.set_rate_limit(engine, args.name, args.rate, args.burst)
                print(f"{args.name}: ingest rate {args.rate or 'default'} events/s, burst {args.burst or 'default'}")
        elif args.action == "revoke-key":
            if not tenancy.revoke_api_key(engine, args.name, args.key_id):
                print(f"no active key {args.key_id} for tenant {args.name}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
    finally:
        engine.dispose()
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    import datetime as dt

    from services.ingest.storage import EventStore

    if args.keep_months < 1:
        print("--keep-months must be at least 1", file=sys.stderr)
        return 2
    today = dt.datetime.now(dt.UTC).date().replace(day=1)
    month = today.year * 12 + today.month - 1 - args.keep_months
    cutoff = dt.date(month // 12, month % 12 + 1, 1)
    engine = _engine(_settings())
    try:
        dropped = EventStore(engine).drop_partitions_before(cutoff)
    finally:
        engine.dispose()
    print(f"dropped {len(dropped)} event partitions ending on or before {cutoff}: {', '.join(dropped) or '-'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from services.cli.client import StreamIngester, open_channel
    from services.cli.importer import import_file

    api_key = args.api_key or os.environ.get("TESSERA_API_KEY")
    if not api_key:
        print("no API key: pass --api-key or set TESSERA_API_KEY", file=sys.stderr)
        return 2
    path = Path(args.file)
    if not path.is_file():
        print(f"no such file: {path}", file=sys.stderr)
        return 2
    target = args.target or f"localhost:{runtime_port('ingest')}"
    with open_channel(target, tls=args.tls) as channel:
        report = import_file(
            path,
            StreamIngester(channel, api_key),
            fmt=args.format,
            batch_size=args.batch_size,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    tally = report.tally
    if args.json:
        print(
            json.dumps(
                {
                    "accepted": tally.accepted,
                    "duplicate": tally.duplicate,
                    "rejected": report.rejected,
                    "rejections": report.rejection_lines(args.show),
                }
            )
        )
    else:
        print(f"accepted: {tally.accepted}  duplicate: {tally.duplicate}  rejected: {report.rejected}")
        lines = report.rejection_lines(args.show)
        if lines:
            print(f"first {len(lines)} rejections:")
            for line in lines:
                print(f"  {line}")
    return 1 if report.rejected and args.strict else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.cli.demo import generate, to_jsonl

    events = generate(seed=args.seed, customers=args.customers, days=args.days)
    if args.file == "-":
        count = to_jsonl(events, sys.stdout)
    else:
        with open(args.file, "w", encoding="utf-8") as fp:
            count = to_jsonl(events, fp)
    print(f"wrote {count} events to {args.file}", file=sys.stderr)
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """Messages a consumer gave up on after its attempts: list them, or put them back on their
    stream once the cause is fixed (consumers are idempotent, so a replay applies nothing twice)."""
    from services.core import streams
    from services.core.bus import Bus, connect

    settings = _settings()
    client = connect(settings.require_redis_url())
    bus = Bus(client, settings.redis_prefix)
    try:
        if args.action == "replay":
            moved = bus.replay_dead_letters(args.tenant, args.stream, args.id or None)
            print(json.dumps({"replayed": moved}) if args.json else f"replayed {moved} message(s)")
            return 0
        rows = []
        for dead_id, letter in bus.dead_letters(args.tenant, args.stream, count=args.limit):
            carries = streams.describe(args.stream, letter.envelope)
            rows.append(
                {
                    "id": dead_id,
                    "event_id": carries.removeprefix("event ") if carries.startswith("event ") else "",
                    "carries": carries,
                    "group": letter.group,
                    "attempts": letter.attempts,
                    "reason": letter.reason,
                    "original_id": letter.original_id,
                }
            )
        if args.json:
            print(json.dumps(rows))
        elif not rows:
            print("no dead letters")
        else:
            for r in rows:
                print(f"{r['id']}  {r['carries'] or '-'}  group {r['group']}  attempts {r['attempts']}")
                print(f"    {r['reason']}")
        return 0
    finally:
        client.close()


def cmd_bench(args: argparse.Namespace) -> int:
    from bench import run_scenario

    return run_scenario(args.scenario, seconds=args.seconds, as_json=args.json, extra=args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run one service")
    p.add_argument("service", choices=SERVICES)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("up", help="run every service (embedded PostgreSQL and Redis unless configured)")
    p.add_argument("--no-demo", action="store_true", help="do not load the demo dataset")
    p.add_argument("--demo-customers", type=int, default=2000, help="size of the demo dataset")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("migrate", help="apply database migrations for every service")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("tenant", help="manage tenants and API keys")
    p.add_argument("action", choices=["create", "list", "create-key", "revoke-key", "set-limits"])
    p.add_argument("name", nargs="?", default="")
    p.add_argument("key_id", nargs="?", default="")
    p.add_argument("--display-name")
    p.add_argument("--rate", type=float, help="set-limits: ingest events/s (omit for the default)")
    p.add_argument("--burst", type=float, help="set-limits: bucket size in events (omit for the default)")
    p.add_argument(
        "--dedupe-days", type=int, help="set-limits: days a message id is remembered, 1-90 (0 for the default)"
    )
    p.add_argument("--description")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tenant)

    p = sub.add_parser("retention", help="drop raw-event partitions older than N whole months")
    p.add_argument("--keep-months", type=int, required=True)
    p.set_defaults(func=cmd_retention)

    p = sub.add_parser("import", help="stream JSONL or CSV events through the ingest API")
    p.add_argument("file")
    p.add_argument("--format", choices=["jsonl", "csv"])
    p.add_argument("--target", help="ingest address (default localhost:$TESSERA_INGEST_PORT)")
    p.add_argument("--api-key", help="default: $TESSERA_API_KEY")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--show", type=int, default=10, help="how many rejections to print")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 if anything was rejected")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("demo", help="write the demo dataset as JSONL")
    p.add_argument("action", choices=["export"])
    p.add_argument("file", help="output path, or - for stdout")
    p.add_argument("--customers", type=int, default=2000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("dead-letters", help="list or replay messages consumers gave up on")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("tenant")
    p.add_argument("--stream", default="events", choices=list(STREAM_NAMES))
    p.add_argument("--id", action="append", help="replay: only this dead-letter id (repeatable)")
    p.add_argument("--limit", type=int, default=100, help="list: at most this many")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead_letters)

    from services.cli.metrics_cmd import add_parser as add_metrics

    add_metrics(sub)

    from services.cli.health_cmd import add_parser as add_health

    add_health(sub)

    from services.cli.identity_cmd import add_parser as add_identity

    add_identity(sub)

    p = sub.add_parser("bench", help="run a benchmark scenario")
    p.add_argument("scenario")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--existing-keys", type=int, default=0, help="ingest: dedupe keys to pre-fill (also measured at 0)")
    p.add_argument(
        "--dataset", help="identity-accuracy: febrl1-4, households, all or a comma-separated list (default febrl4)"
    )
    p.add_argument(
        "--matching", choices=["off", "on"], default="off", help="identity: probabilistic matching for the tenant"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tenant" and args.action != "list" and not args.name:
        print("tenant: NAME is required", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"tessera: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from services.core.errors import TesseraError

        if isinstance(exc, TesseraError):
            print(f"tessera: {exc.message}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
