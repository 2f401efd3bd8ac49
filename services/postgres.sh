#!/usr/bin/env bash
# PostgreSQL 15 (Debian's package) on 127.0.0.1, for the tests that store sweeps in a database:
# a database `dnnrun` owned by the role `dnnrun`, password `testonly-7c41e9` (scram-sha-256 over TCP;
# a word that appears nowhere else, so that tests can look for it where it must not be written), so
# postgresql://dnnrun@127.0.0.1:PORT/dnnrun with PGPASSWORD=testonly-7c41e9. Run as root; the server runs
# as the postgres user. Idempotent: with the server up and the role able to log in, it returns at once.
# Usage: services/postgres.sh [PORT]   (default $DNNRUN_POSTGRES_PORT, else 5433)
set -euo pipefail

PORT=${1:-${DNNRUN_POSTGRES_PORT:-5433}}
BIN=/usr/lib/postgresql/15/bin
PASSWORD=testonly-7c41e9 # also in tests/services.py and in the ALTER ROLE below
HOME_DIR=/var/lib/dnnrun-postgres
DATA=$HOME_DIR/$PORT/data
SOCKETS=$HOME_DIR/$PORT/run # the server's Unix socket (the superuser's way in)
LOG=$HOME_DIR/$PORT/server.log

die() {
    echo "services/postgres.sh: $*" >&2
    if [[ -f $LOG ]]; then
        echo "--- last lines of $LOG" >&2
        tail -n 15 "$LOG" >&2
    fi
    exit 1
}

[[ $PORT =~ ^[0-9]+$ ]] || die "the port must be a number, got '$PORT'"

logs_in() { # the role dnnrun reaches its database over TCP with its password
    PGPASSWORD=$PASSWORD PGCONNECT_TIMEOUT=5 "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U dnnrun -d dnnrun -XAtqc 'select 1' \
        >/dev/null 2>&1
}

if [[ -x $BIN/pg_isready ]] && "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && logs_in; then
    exit 0
fi

[[ $(id -u) == 0 ]] || die "must run as root (it runs the server as the postgres user)"
if [[ ! -x $BIN/postgres ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends postgresql-15 >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends postgresql-15 >/dev/null; } \
        || die "apt-get could not install postgresql-15"
fi

as_postgres() {
    runuser -u postgres -- "$@"
}

mkdir -p "$HOME_DIR/$PORT" "$SOCKETS"
chown postgres:postgres "$HOME_DIR" "$HOME_DIR/$PORT" "$SOCKETS"
if [[ ! -s $DATA/PG_VERSION ]]; then
    rm -rf "$DATA"
    as_postgres "$BIN/initdb" -D "$DATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 -E UTF8 \
        --locale=C.UTF-8 >"$HOME_DIR/$PORT/initdb.log" 2>&1 || die "initdb failed: $(tail -n 5 "$HOME_DIR/$PORT/initdb.log")"
fi

if ! as_postgres "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && die "another server listens on 127.0.0.1:$PORT; choose another port"
    as_postgres "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -o "-p $PORT -k $SOCKETS -c listen_addresses=127.0.0.1" \
        start >/dev/null || die "the server did not start"
fi
for _ in $(seq 100); do
    "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && break
    sleep 0.1
done
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" || die "pg_isready: the server does not accept connections on port $PORT"

# The role and its database, made once.
as_postgres "$BIN/psql" -h "$SOCKETS" -p "$PORT" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 >/dev/null <<'SQL' \
    || die "could not create the role and database dnnrun"
SELECT 'CREATE ROLE dnnrun LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dnnrun') \gexec
SET password_encryption = 'scram-sha-256';
ALTER ROLE dnnrun LOGIN PASSWORD 'testonly-7c41e9';
SELECT 'CREATE DATABASE dnnrun OWNER dnnrun' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'dnnrun') \gexec
SQL
logs_in || die "the role dnnrun cannot log in to 127.0.0.1:$PORT/dnnrun with its password"
