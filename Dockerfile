# syntax=docker/dockerfile:1
# The voice coach relay in a container: `python -m serve` (Hypercorn configured by hypercorn.toml) on
# $HOST:$PORT. tests/test_nginx.py runs this image's CMD, from a copy of exactly the files the COPY
# lines below take, as two instances behind nginx.
#
# The embedded PostgreSQL (the `embedded` extra) is for development and tests and is not installed
# here: a container is given DATABASE_URL (and JWT_SECRET, GEMINI_API_KEY; see .env.example and
# compose.yaml).
#
# Stopping: SIGTERM (tini, PID 1, passes it on) starts the drain (lifecycle.py): /readyz turns 503,
# new voice sockets are closed 1012, live calls get DRAIN_SECONDS (default 20) to end and are then
# closed 1012 "Server restarting" and their rows finalised (up to FINALISE_TIMEOUT, 10 s); then
# Hypercorn waits up to graceful_timeout (5 s, hypercorn.toml) for its connections, and the process
# exits 0. The orchestrator's stop grace period (compose `stop_grace_period`, Kubernetes
# `terminationGracePeriodSeconds`) must exceed DRAIN_SECONDS + graceful_timeout, plus the 10 s
# finalise bound for a worst case: 35 s with the defaults (compose.yaml gives 45 s). A shorter one
# cuts live calls with SIGKILL: callers see 1006 and their session rows stay open.

# --- builder: the dependencies, in a virtualenv -------------------------------------------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only pyproject.toml first: this layer is rebuilt when the dependencies change, not the source.
# The project itself is not pip-installed: it reads hypercorn.toml, queries.sql, migrations/ and
# static/ next to its modules, so it runs from /app (below).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt

# --- runtime ------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
# tini as PID 1 forwards SIGTERM to the service and reaps zombies. Python as PID 1 would ignore a
# SIGTERM sent before the app installs its handler (start-up, migrations): `docker stop` would then
# wait out the whole grace period.
RUN apt-get update \
 && apt-get install -y --no-install-recommends 'tini=0.19.0-1*' \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin coach
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The source, after the dependencies; owned by root, so read-only to the service's user.
COPY *.py hypercorn.toml queries.sql ./
COPY migrations/ migrations/
COPY static/ static/
RUN python -m compileall -q /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    LOG_FORMAT=json
# `coach`, by number: runtimes (Kubernetes' runAsNonRoot) can then check that it is not root.
USER 10001:10001
EXPOSE 8000
# Liveness only (no database): readiness is /readyz, for load balancers that can probe it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import http.client, os; c = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('PORT', '8000')), timeout=2); c.request('GET', '/healthz'); raise SystemExit(c.getresponse().status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "serve"]
