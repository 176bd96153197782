# syntax=docker/dockerfile:1
# The tmux host (`python -m tmux_host`), for ECS Fargate (the CDK app builds it for linux/arm64 with the
# repository root as context: .dockerignore lets in only what is copied below). Debian bookworm's python3 (3.11)
# and tmux (3.3a) are what the host's tests run against; a Debian stable release keeps those upstream versions
# for its whole life, so the packages are not pinned further (hadolint DL3008): security updates come in with a
# rebuild. The Python dependencies are pinned and hash-checked: tmux_host/requirements.lock
# (`python -m layers.build lock`).
#
# The container runs as root on purpose: the host switches users' shells to accounts of their own (their own
# uid, their own 0700 home, an environment built from scratch) and re-executes itself under setpriv keeping only
# the capabilities that needs (tmux_host/accounts.py; README "Security model"). Run it with an init as PID 1 to
# reap users' orphaned processes: ECS `initProcessEnabled` (cdk/host.py sets it), `docker run --init` locally.

# --- the virtualenv: locked wheels only, no compiler, no sdist -------------------------------------------------
FROM debian:bookworm-slim AS venv
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY tmux_host/requirements.lock /tmp/requirements.lock
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-input \
      --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.lock \
 && /opt/venv/bin/pip uninstall --yes --disable-pip-version-check pip setuptools

# --- the image ---------------------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# util-linux: setpriv (users' shells: --reuid/--regid --clear-groups --no-new-privs; the host's own capabilities);
# procps: ps/pkill in users' shells; ca-certificates: TLS to AWS, PostgreSQL and Redis.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 tmux util-linux procps ca-certificates bash \
 && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/venv /opt/venv
COPY layers/tmuxi /opt/tmuxi/tmuxi
COPY tmux_host /opt/tmuxi/tmux_host
# The code on the venv's path (a .pth: no PYTHONPATH for anything to inherit), compiled now (nobody writes
# bytecode at run time); the host's state directory, which users' accounts must be able to pass through (0711),
# and the service's own HOME, which nothing of a user's may read (0700, outside the data directory a task volume
# may be mounted on).
RUN echo /opt/tmuxi > /opt/venv/lib/python3.11/site-packages/tmuxi.pth \
 && python3 -m compileall -q /opt/tmuxi \
 && install -d -m 0711 /var/lib/tmuxi \
 && install -d -m 0700 /var/lib/tmuxi-service

# Settings (layers/tmuxi/settings.py, TMUXI_<FIELD>); the CDK app sets the rest, secrets from Secrets Manager.
ENV HOME=/var/lib/tmuxi-service \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    TMUXI_DATA_DIR=/var/lib/tmuxi \
    TMUXI_HOST_BIND=0.0.0.0 \
    TMUXI_HOST_PORT=7001 \
    TMUXI_ISOLATION=required
WORKDIR /var/lib/tmuxi-service
EXPOSE 7001
# What ECS sends to stop a task: uvicorn shuts the host down gracefully on it (tmux_host/__main__.py).
STOPSIGNAL SIGTERM
# /health answers 503 only when the host cannot serve (degraded is 200). ECS runs the task definition's own check
# (cdk/host.py), this one serves `docker run`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import urllib.request; from tmuxi.settings import get_settings; urllib.request.urlopen(f'http://127.0.0.1:{get_settings().host_port}/health', timeout=4)"]
CMD ["/opt/venv/bin/python", "-m", "tmux_host"]
