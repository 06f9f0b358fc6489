"""A process for the leader-election test: it campaigns with the real :class:`Leadership` on a
PostgreSQL advisory lock and, while it leads, runs a singleton job through the real
:class:`Periodic`; each run is a row (holder, start, end, by the database's clock) in a table.

    python -m tests.support.leader_worker DATABASE_URL LOCK TABLE --lease 3 --renew 1
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from typing import Any

import psycopg2

from services.core.leader import AdvisoryLockCampaign, Leadership, identity, libpq_url
from services.core.periodic import Periodic
from services.core.telemetry import configure_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("database_url")
    parser.add_argument("lock")
    parser.add_argument("table")
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--renew", type=float, default=1.0)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--job-seconds", type=float, default=0.1)
    args = parser.parse_args(argv)
    configure_logging("leader-worker", "INFO")
    me = identity()
    campaign = AdvisoryLockCampaign(
        args.database_url, args.lock, lease_seconds=args.lease, renew_seconds=args.renew, application_name="leader-test"
    )
    leadership = Leadership("leader-test", campaign, lease_seconds=args.lease, renew_seconds=args.renew, identity=me)
    conn: Any = psycopg2.connect(libpq_url(args.database_url))
    conn.autocommit = True

    def job() -> None:
        with conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {args.table} (holder, started_at) VALUES (%s, clock_timestamp()) RETURNING id",
                (me,),
            )
            (run_id,) = cur.fetchone()
            time.sleep(args.job_seconds)
            cur.execute(f"UPDATE {args.table} SET ended_at = clock_timestamp() WHERE id = %s", (run_id,))

    periodic = Periodic("singleton job", args.interval, job, retry_seconds=args.interval, leader=leadership)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    leadership.start()
    periodic.start()
    stop.wait()
    periodic.stop(5)  # the work stops first, then the lock goes, as in the service bootstrap
    leadership.stop(5)
    conn.close()


if __name__ == "__main__":
    main()
