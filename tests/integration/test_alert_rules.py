"""The Prometheus alert rules (ops/prometheus/rules), their promtool unit tests, the scrape config and the Grafana
dashboard (ops/grafana/tmuxi-main.json): valid for promtool (Debian's prometheus package: scripts/setup.sh), the
guide's rules and panels all there, and every metric they name one the project's processes really export -- read
from a live scrape of a tmux host's and the WebSocket gateway's /metrics, so renaming a metric breaks this test."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.hosting import wait_for
from tmuxi.host_client import SECRET_HEADER
from tmuxi.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "ops" / "prometheus"
RULE_FILES = [PROM / "rules" / "critical.yml", PROM / "rules" / "warning.yml"]
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = ROOT / "ops" / "grafana" / "tmuxi-main.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed: scripts/setup.sh installs "
                                                              "Debian's prometheus package")

# operations-guide.md, "Alert Configurations" and "Monitoring Dashboards"
GUIDE_RULES = {"ServiceDown": "critical", "HighErrorRate": "critical", "DatabaseDown": "critical",
               "RedisDown": "critical", "HighResponseTime": "warning", "HighMemoryUsage": "warning",
               "HighCPUUsage": "warning", "PodCrashLooping": "warning"}
GUIDE_PANELS = {"Service Health", "Request Rate", "Response Time", "Active Sessions", "Error Rate"}
# Series Prometheus makes itself for every scrape target
SYNTHETIC = {"up"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def rules() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are neither functions, aggregations (followed
    by a parenthesis), label names (inside matchers or by/without/on lists) nor keywords."""
    bare = _RANGE.sub("", _GROUPING.sub("", _MATCHERS.sub("", _STRING.sub("", expr))))
    return {m for m in _IDENT.findall(bare) if m.lower() not in _KEYWORDS}


def exported_names(exposition: str) -> set[str]:
    """The sample names a /metrics text can hold, from its TYPE lines -- so a labelled metric no request has used
    yet still counts (prometheus_client's suffixes for each type)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",), "info": ("_info",)}
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind == "counter":  # the text format names a counter's family with its _total
                name = name.removesuffix("_total")
            names.update(name + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_name_extraction_finds_metrics_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.95, sum by (job, le) (rate(a_bucket{route!~".*/exec|x_total"}[5m]))) > 0.015 '
            'and on (instance) b_total offset 5m unless c')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


@needs_promtool
def test_promtool_checks_the_rule_files_and_finds_the_guides_rules() -> None:
    r = promtool("check", "rules", *RULE_FILES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS: 4 rules found") == 2, r.stdout
    assert {rule["alert"]: rule["labels"]["severity"] for rule in rules()} == GUIDE_RULES


@needs_promtool
def test_promtool_unit_tests_of_every_rule_pass() -> None:
    checks = [c for p in TEST_FILES for t in yaml.safe_load(p.read_text())["tests"] for c in t["alert_rule_test"]]
    # every rule is tested both ways: where it fires (exp_alerts) and where it stays quiet ([])
    assert {c["alertname"] for c in checks if c["exp_alerts"]} == set(GUIDE_RULES)
    assert {c["alertname"] for c in checks if not c["exp_alerts"]} == set(GUIDE_RULES)
    r = promtool("test", "rules", *TEST_FILES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(TEST_FILES), r.stdout


@needs_promtool
def test_the_scrape_config_loads_both_rule_files_and_names_the_jobs_the_rules_select(tmp_path: Path) -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert [PROM / f for f in config["rule_files"]] == RULE_FILES
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"tmux-host", "tmux-ws-gateway", "tmux-api-gateway"}
    assert all(re.search(r'job=~"tmux-host\|tmux-ws-gateway"', r["expr"]) for r in rules()
               if r["alert"] in ("ServiceDown", "HighMemoryUsage", "HighCPUUsage", "PodCrashLooping"))
    # Debian 12's promtool (2.42) predates http_headers (Prometheus 3.0): the rest is checked without it
    for job in config["scrape_configs"]:
        job.pop("http_headers", None)
    config["rule_files"] = [str(p) for p in RULE_FILES]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    r = promtool("check", "config", tmp_path / "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 2 rule files found" in r.stdout, r.stdout


def test_the_dashboard_has_the_guides_panels_and_websocket_ones() -> None:
    board = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in board["panels"]]
    assert len(titles) == len(set(titles))
    assert set(titles) >= GUIDE_PANELS
    assert {t for t in titles if t.startswith("WebSocket")} >= {"WebSocket Connections", "WebSocket Messages",
                                                                  "WebSocket Errors"}
    legends = {t["legendFormat"] for p in board["panels"] if p["title"] == "Response Time" for t in p["targets"]}
    assert any("95th" in x for x in legends) and any("50th" in x for x in legends)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]  # the dashboard's Prometheus variable


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


def _scrape(url: str, headers: dict[str, str] | None = None, *, holding: str = "") -> str | None:
    r = httpx.get(url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.text if holding in r.text else None


def _rest(ws_gateway_url: str) -> str | None:
    """The REST gateway's metrics (served by the WebSocket gateway) once they count an api request."""
    r = httpx.get(ws_gateway_url + "/metrics/rest", timeout=10)
    assert r.status_code == 200, r.text
    return r.text if 'tmux_requests_total{component="api"' in r.text else None


def _gauge(gauge: Any, component: str) -> float:
    value: float = gauge.labels(component=component)._value.get()
    return value


def test_the_up_gauges_say_whether_the_last_health_check_reached_each_dependency(
        stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """postgres_up / redis_up (DatabaseDown, RedisDown) follow the health check: 0 while nothing answers at the
    configured addresses, 1 again once the real PostgreSQL and Redis are configured back."""
    from local.services import free_port
    from tests.conftest import reset_process_state
    from tmuxi.observability import POSTGRES_UP, REDIS_UP
    from tmuxi.services import health

    with monkeypatch.context() as m:
        m.setenv("TMUXI_DATABASE_URL", f"postgresql://tmuxi:x@127.0.0.1:{free_port()}/tmuxi")
        m.setenv("TMUXI_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
        m.setattr(health, "_db_checks", (float("-inf"), {}))  # not the answer cached from a check just before
        reset_process_state()
        try:
            checks = health.health("probe").checks
            assert (checks["postgres"], checks["redis"]) == ("down", "down"), checks
            assert (_gauge(POSTGRES_UP, "probe"), _gauge(REDIS_UP, "probe")) == (0, 0)
        finally:
            m.undo()
            reset_process_state()
    monkeypatch.setattr(health, "_db_checks", (float("-inf"), {}))
    checks = health.health("probe").checks
    assert (checks["postgres"], checks["redis"]) == ("ok", "ok"), checks
    assert (_gauge(POSTGRES_UP, "probe"), _gauge(REDIS_UP, "probe")) == (1, 1)


@needs_tmux
def test_every_metric_in_the_rules_and_the_dashboard_is_one_the_stack_exports(stack: Any) -> None:
    secret = get_settings().host_secret
    assert secret is not None
    host_id = sorted(stack.stack.host_ports)[0]
    host_url = stack.stack.host_url(host_id)
    # the host's heartbeat reached PostgreSQL: postgres_up{component="host"} 1 (DatabaseDown reads it)
    host_text: str = wait_for(lambda: _scrape(host_url, {SECRET_HEADER: secret.get_secret_value()},
                                              holding='postgres_up{component="host"} 1.0'),
                              what="the host's postgres_up after a heartbeat")
    # the WebSocket gateway checks its function's PostgreSQL and Redis on each scrape
    ws_text = _scrape(stack.stack.ws_gateway_url)
    assert ws_text is not None
    assert 'postgres_up{component="ws"} 1.0' in ws_text and 'redis_up{component="ws"} 1.0' in ws_text, ws_text
    assert "redis_up{" not in host_text  # the host does not use Redis: nothing to read as "down"

    # the REST gateway's workers, added up (prometheus_client's multiprocess mode), after a request through it
    stack.client.get("/health")
    rest_text: str = wait_for(lambda: _rest(stack.stack.ws_gateway_url), what="the REST gateway's request metrics")

    exported = exported_names(host_text) | exported_names(ws_text) | exported_names(rest_text) | SYNTHETIC
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds"} <= \
        exported_names(host_text)
    used = {name: where for where, exprs in (("rules", [r["expr"] for r in rules()]),
                                             ("dashboard", dashboard_exprs()))
            for e in exprs for name in metric_names(e)}
    assert len(used) >= 15, used  # the extraction found the names (a broken one would find none and pass)
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"metrics used but not exported by the host or the gateway: {missing}"
