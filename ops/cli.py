"""``python -m ops``: the operations guide's procedures as commands, for this design (Lambda + ECS tmux hosts +
PostgreSQL + Redis; locally the stack ``make run`` starts).

    python -m ops health [--json]                         # exit 0 healthy, 1 degraded, 2 down
    python -m ops incidents [--open] [--since 7d]
    python -m ops logs analyze [FILE...] [--since 1h] [--slow-ms 200] [--top 10]
    python -m ops capacity [--growth-percent 10 --months 3]
    python -m ops maintenance weekly|monthly
    python -m ops upgrade-check [--no-backup]
    python -m ops backup / restore MANIFEST --database-url URL

Settings are the services' own (``TMUXI_*``). With no database named, the commands use the database of the local
stack running under the data dir (``TMUXI_DATA_DIR``, else ``./.data``), so they work beside ``make run``.
Every report prints a Rich table, or with ``--json`` one JSON document on stdout (progress goes to stderr)."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ops import reports
from ops.logs import LogReport
from ops.reports import DEGRADED, DOWN, OK, SKIPPED, OpsError

app = typer.Typer(
    help="Operator CLI: the operations guide's procedures for this system (runbooks: docs/runbooks/). Settings: "
         "TMUXI_*; with no database named, the local stack running under the data dir (make run). --json on "
         "every report; exit codes: 0 ok, 1 degraded or a step failed, 2 down or the report could not be made.",
    no_args_is_help=True, add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
logs_app = typer.Typer(help="Log analysis (the guide's analyze-logs.sh).", no_args_is_help=True)
app.add_typer(logs_app, name="logs")

out = Console()
err = Console(stderr=True)
_STYLE = {OK: "green", DEGRADED: "yellow", DOWN: "red", SKIPPED: "dim", "failed": "red", "unavailable": "yellow"}
EXIT = {OK: 0, DEGRADED: 1, DOWN: 2}

JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON document on stdout instead of tables")]
GatewayOpt = Annotated[str | None, typer.Option(
    "--gateway-url", help="the REST API (default: the local gateway, http://127.0.0.1:$TMUXI_GATEWAY_PORT)")]

# The guide's weekly and monthly checklists as the maintenance function's tasks (functions/maintenance/handler.py)
# and this CLI's reports. A task the deployed function does not know is reported unavailable, not failed.
# weekly: health; failed jobs (a report); alerts (open incidents); database maintenance (vacuum); cache and
# session clean-up (reconcile, cleanup, prune_live); log rotation is CloudWatch's retention, rows' is `retention`.
# monthly: backup (and its verification: the runbook's restore drill), performance and capacity review.
WEEKLY = ("health", "reconcile", "cleanup", "prune_live", "retention", "vacuum")
MONTHLY = ("backup", "retention", "vacuum", "capacity")


def _styled(status: str) -> str:
    return f"[{_STYLE.get(status, 'white')}]{status}[/]"


def _dump(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=str, indent=2) + "\n")


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


def _optional(module: str, what: str) -> ModuleType:
    """A module another part of the project provides, imported when a command needs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            raise OpsError(f"{what} needs `{module}`, which this checkout does not have yet: update the code "
                           "(git pull) or use the procedure in docs/runbooks/") from exc
        raise


@app.callback()
def _setup() -> None:
    reports.use_local_stack_if_unset()
    # The services' logger writes its JSON lines to stdout, as Lambda wants; it binds the stream when it is made
    # (on import): made here, it writes to stderr, so stdout keeps the one report (--json) whatever a command runs.
    with contextlib.redirect_stdout(sys.stderr):
        import tmuxi.observability  # noqa: F401


# --- health ----------------------------------------------------------------------------------------------------
@app.command()
def health(json_out: JsonOpt = False, gateway_url: GatewayOpt = None) -> None:
    """Health check report: PostgreSQL, migrations, Redis, each tmux host, the gateway. Exit 0/1/2."""
    checks = reports.health_checks(reports.gateway_url(gateway_url))
    status = reports.overall(checks)
    if json_out:
        _dump({"status": status, "checks": reports.checks_json(checks)})
    else:
        table = Table(title=f"Health: {status}", title_style=_STYLE[status])
        for col in ("component", "status", "detail"):
            table.add_column(col)
        for c in checks:
            table.add_row(c.component, _styled(c.status), c.detail)
        out.print(table)
    raise typer.Exit(EXIT[status])


# --- incidents -------------------------------------------------------------------------------------------------
@app.command()
def incidents(open_only: Annotated[bool, typer.Option("--open", help="only those not resolved")] = False,
              since: Annotated[str | None, typer.Option(help="30m, 2h, 7d or an ISO time")] = None,
              json_out: JsonOpt = False) -> None:
    """Incident report from the alerts function's records."""
    try:
        rows = reports.incidents(open_only, reports.parse_since(since))
    except OpsError as exc:
        raise _fail(str(exc)) from None
    if json_out:
        _dump({"incidents": rows})
        return
    table = Table(title=f"Incidents ({len(rows)})")
    cols = ["id", "priority", "key", "title", "status", "opened_at", "resolved_at", "update_count"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in cols))
    out.print(table)


# --- logs ------------------------------------------------------------------------------------------------------
@logs_app.command("analyze")
def logs_analyze(
    files: Annotated[list[Path] | None, typer.Argument(help="log files (default: the local stack's logs)")] = None,
    since: Annotated[str | None, typer.Option(help="only lines from this far back: 60m, 2h, 1d, or an ISO time")]
    = None,
    slow_ms: Annotated[float, typer.Option(help="a request this slow (ms) or slower is reported")] = 200.0,
    top: Annotated[int, typer.Option(help="how many slowest requests and users to list")] = 10,
    json_out: JsonOpt = False,
) -> None:
    """Error summary, status codes, slow requests, top users, recent errors."""
    from tmuxi.settings import get_settings

    if not files:
        logs_dir = get_settings().data_dir / "logs"
        files = sorted(logs_dir.glob("*.log"))
        if not files:
            raise _fail(f"no log files given and none in {logs_dir}: name them, or run the stack (`make run`)")
    try:
        cutoff = reports.parse_since(since)
    except OpsError as exc:
        raise _fail(str(exc)) from None
    report = LogReport(slow_ms=slow_ms, top=top)
    with _progress() as bar:
        task = bar.add_task("reading logs", total=sum(f.stat().st_size for f in files if f.exists()))
        for f in files:
            if not f.exists():
                raise _fail(f"{f}: no such file")
            with f.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    report.feed((line,), f.name, cutoff)
                    bar.advance(task, len(line))
    result = report.result()
    if json_out:
        _dump({"files": [str(f) for f in files], **result})
        return
    out.print(f"{result['lines']} lines ({result['json_lines']} JSON), {result['requests']} requests, "
              f"5xx rate {result['error_rate']:.2%}")
    _table("Errors by message", ("count", "message"), [(e["count"], e["message"]) for e in result["errors"]])
    _table("HTTP status codes", ("status", "count"), list(result["status_codes"].items()))
    _table(f"Slow requests (>= {slow_ms:g} ms) by route", ("route", "count"),
           [(r["route"], r["count"]) for r in result["slow_by_route"]])
    _table("Slowest", ("duration ms", "status", "route", "when", "file"),
           [(r["duration"], r["status"], r["route"], r["timestamp"], r["source"]) for r in result["slowest"]])
    _table("Top users", ("user", "lines"), [(u["user"], u["count"]) for u in result["top_users"]])
    if result["recent_errors"]:
        out.print("[bold]Recent errors[/]")
        for line in result["recent_errors"]:
            out.print(line, markup=False, highlight=False)


def _table(title: str, cols: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    table = Table(title=title)
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(v) for v in r))
    out.print(table if rows else f"{title}: none")


# --- capacity --------------------------------------------------------------------------------------------------
@app.command()
def capacity(growth_percent: Annotated[float | None, typer.Option(
                 help="growth of sessions per month, % (default: observed over the last 60 days)")] = None,
             months: Annotated[int, typer.Option(min=1, max=36, help="months to project")] = 3,
             json_out: JsonOpt = False) -> None:
    """Sessions and capacity per host, the guide's scaling recommendation and projection."""
    try:
        rep = reports.capacity(growth_percent, months)
    except OpsError as exc:
        raise _fail(str(exc)) from None
    if json_out:
        _dump(rep)
        return
    _table("Hosts", ("host", "live", "draining", "sessions", "capacity", "sessions (db)"),
           [(h["id"], h["live"], h["draining"], h["active_sessions"], h["capacity"], h["db_sessions"])
            for h in rep["hosts"]])
    rec, proj = rep["recommendation"], rep["projection"]
    out.print(f"Current: {rep['current_sessions']} sessions of {rep['capacity']} ({rep['utilisation']:.1%}): "
              f"{rec['action']}, {rec['timeline']}")
    if proj["growth_percent_per_month"] is None:
        out.print("Projection: no growth given and too little history (--growth-percent N)")
        return
    out.print(f"Growth: {proj['growth_percent_per_month']}% a month ({proj['growth_source']}); "
              f"months to the limit: {proj.get('months_to_limit')}; {proj.get('verdict')}")
    _table("Projection", ("month", "sessions"), [(m["month"], m["sessions"]) for m in proj.get("months", [])])


# --- maintenance -----------------------------------------------------------------------------------------------
@app.command()
def maintenance(schedule: Annotated[str, typer.Argument(help="weekly or monthly")],
                json_out: JsonOpt = False, gateway_url: GatewayOpt = None) -> None:
    """The guide's weekly or monthly maintenance: the maintenance function's tasks, then the reports."""
    if schedule not in ("weekly", "monthly"):
        raise _fail(f"unknown schedule {schedule!r}: weekly or monthly", 2)
    tasks = WEEKLY if schedule == "weekly" else MONTHLY
    steps: list[dict[str, Any]] = []
    # the handler's JSON log lines and metrics go to stdout, as in Lambda: here they go to stderr, beside the
    # progress, and stdout keeps the one report (its logger binds to the stream it finds when first used)
    with contextlib.redirect_stdout(sys.stderr), _progress() as bar:
        task = bar.add_task(f"{schedule} maintenance", total=len(tasks) + 2)
        for name in tasks:
            bar.update(task, description=f"task {name}")
            steps.append(_run_task(name))
            bar.advance(task)
        bar.update(task, description="health")
        checks = reports.health_checks(reports.gateway_url(gateway_url))
        status = reports.overall(checks)
        steps.append({"step": "health report", "status": status,
                      "detail": "; ".join(f"{c.component} {c.status}" for c in checks if c.status != OK) or "all ok"})
        bar.advance(task)
        bar.update(task, description="incidents / capacity")
        steps.append(_report_step("open incidents", lambda: f"{len(reports.incidents(True, None))} open"))
        steps.append(_report_step("failed maintenance runs (7 days)", _failed_runs_line))
        if schedule == "monthly":
            steps.append(_report_step("capacity", _capacity_line))
        bar.advance(task)
    failed = [s for s in steps if s["status"] in ("failed", DOWN)]
    if json_out:
        _dump({"schedule": schedule, "status": "failed" if failed else OK, "steps": steps})
    else:
        table = Table(title=f"{schedule.capitalize()} maintenance")
        for c in ("step", "status", "duration ms", "detail"):
            table.add_column(c)
        for s in steps:
            table.add_row(s["step"], _styled(s["status"]), str(s.get("duration", "")), str(s["detail"]))
        out.print(table)
    raise typer.Exit(1 if failed else 0)


def _run_task(name: str) -> dict[str, Any]:
    """One task, as EventBridge invokes it: the maintenance function's handler, in process."""
    from functions.maintenance.handler import handler
    from local.lambda_context import LambdaContext

    t0 = time.perf_counter()
    try:
        res = handler({"task": name}, LambdaContext(function_name="maintenance"))
        status = OK if res.get("status") == OK else str(res.get("status", "failed"))  # "skipped": already running
        detail = ", ".join(f"{k}={v}" for k, v in (res.get("result") or {}).items()) or "done"
    except ValueError as exc:
        if "unknown maintenance task" not in str(exc):
            raise
        status, detail = "unavailable", "the maintenance function in this checkout has no such task"
    except Exception as exc:  # the handler logged it; the checklist goes on, as the guide's script does
        status, detail = "failed", f"{type(exc).__name__}: {str(exc)[:200]}"
    return {"step": f"task {name}", "status": status, "detail": detail,
            "duration": round((time.perf_counter() - t0) * 1000, 1)}


def _report_step(name: str, fn: Any) -> dict[str, Any]:
    """A report as a step: ``fn`` gives its detail, or (status, detail) when what it found is a warning."""
    try:
        got = fn()
    except OpsError as exc:
        return {"step": name, "status": "unavailable", "detail": str(exc)}
    status, detail = got if isinstance(got, tuple) else (OK, got)
    return {"step": name, "status": status, "detail": detail}


def _failed_runs_line() -> tuple[str, str]:
    """Earlier runs that failed are for a person to read (degraded), not a failure of this checklist."""
    runs = reports.failed_maintenance_runs(7)
    lines = [f"{r['task']} {r['status']} at {r['started_at']:%Y-%m-%d %H:%M}: {r['error'] or ''}" for r in runs[:5]]
    return (DEGRADED, f"{len(runs)}: " + "; ".join(lines)) if runs else (OK, "none")


def _capacity_line() -> str:
    rep = reports.capacity(None, 3)
    return (f"{rep['current_sessions']}/{rep['capacity']} sessions ({rep['utilisation']:.1%}): "
            f"{rep['recommendation']['action']}; {rep['projection'].get('verdict', 'no projection')}")


# --- upgrade check ---------------------------------------------------------------------------------------------
@app.command("upgrade-check")
def upgrade_check(
    no_backup: Annotated[bool, typer.Option("--no-backup", help="skip the pre-upgrade backup")] = False,
    store_url: Annotated[str | None, typer.Option(help="where the backup goes (ops.backup_cmds' default)")] = None,
    username: Annotated[str | None, typer.Option(help="smoke test user (default: the local dev user)")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="a file holding the smoke test user's password (default: <data dir>/dev-credentials.json)")] = None,
    json_out: JsonOpt = False, gateway_url: GatewayOpt = None,
) -> None:
    """Before and after an upgrade: backup, the migrations pending, and a smoke test through the gateway."""
    steps: list[dict[str, Any]] = []
    with _progress() as bar:
        task = bar.add_task("upgrade check", total=3)
        bar.update(task, description="backup")
        steps.append(_backup_step(no_backup, store_url))
        bar.advance(task)
        bar.update(task, description="migrations")
        try:
            mig = reports.pending_migrations()
            steps.append({"step": "migrations (dry run)", "status": OK, "data": mig,
                          "detail": f"schema at {mig['current']}; pending: {', '.join(mig['pending']) or 'none'}"})
        except OpsError as exc:
            steps.append({"step": "migrations (dry run)", "status": "failed", "detail": str(exc)})
        bar.advance(task)
        bar.update(task, description="smoke test")
        creds = _smoke_credentials(username, password_file)
        if creds is None:
            steps.append({"step": "smoke test", "status": "failed",
                          "detail": "no credentials: --username and --password-file, or run `make run` "
                                    "(it writes <data dir>/dev-credentials.json)"})
        else:
            for s in reports.smoke_test(reports.gateway_url(gateway_url), *creds):
                steps.append({**s, "step": f"smoke: {s['step']}", "status": OK if s["status"] == OK else "failed"})
        bar.advance(task)
    failed = [s for s in steps if s["status"] == "failed"]
    if json_out:
        _dump({"status": "failed" if failed else OK, "steps": steps})
    else:
        table = Table(title="Upgrade check")
        for c in ("step", "status", "detail"):
            table.add_column(c)
        for s in steps:
            table.add_row(s["step"], _styled(s["status"]), str(s["detail"]))
        out.print(table)
    raise typer.Exit(1 if failed else 0)


def _backup_step(skip: bool, store_url: str | None) -> dict[str, Any]:
    if skip:
        return {"step": "backup", "status": SKIPPED, "detail": "--no-backup"}
    try:
        mod = _optional("ops.backup_cmds", "the pre-upgrade backup")
    except OpsError as exc:
        return {"step": "backup", "status": "failed", "detail": f"{exc} (or --no-backup)"}
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        # its report goes into this step, not onto our stdout (which --json keeps to one document)
        with contextlib.redirect_stdout(buf):
            code = mod.backup(store_url, True)
    except typer.Exit as exc:
        code = exc.exit_code
    except Exception as exc:
        return {"step": "backup", "status": "failed", "detail": f"{type(exc).__name__}: {str(exc)[:300]}"}
    text = buf.getvalue().strip()
    try:  # its --json document (EMF metric lines, printed to stdout as Lambda wants, may come before it)
        data: Any = json.loads(text[text.rindex("\n{\n") + 1:] if "\n{\n" in text else text) if text else None
    except ValueError:
        data = text[-500:]
    ok = code in (None, 0)
    return {"step": "backup", "status": OK if ok else "failed", "data": data,
            "detail": f"done in {(time.perf_counter() - t0):.1f}s" if ok else f"exit code {code}: {text[-300:]}"}


def _smoke_credentials(username: str | None, password_file: Path | None) -> tuple[str, str] | None:
    from tmuxi.settings import get_settings

    if password_file is not None:
        text = password_file.read_text()
        try:  # the dev credentials' JSON, or a bare password
            data = json.loads(text)
            return str(username or data["username"]), str(data["password"])
        except (ValueError, KeyError, TypeError):
            if username is None:
                return None
            return username, text.strip()
    return reports.dev_credentials(get_settings().data_dir)


# --- backup / restore ------------------------------------------------------------------------------------------
@app.command()
def backup(store_url: Annotated[str | None, typer.Option(help="where the backup goes")] = None,
           json_out: JsonOpt = False) -> None:
    """Back up the database (delegates to ops/backup_cmds.py)."""
    try:
        mod = _optional("ops.backup_cmds", "backup")
    except OpsError as exc:
        raise _fail(str(exc)) from None
    code = mod.backup(store_url, json_out)
    raise typer.Exit(int(code or 0))


@app.command()
def restore(manifest: Annotated[str, typer.Argument(help="the backup's manifest (as `backup` printed it)")],
            database_url: Annotated[str, typer.Option(help="an EMPTY database to restore into")],
            json_out: JsonOpt = False) -> None:
    """Restore a backup into an empty database and verify it (delegates to ops/backup_cmds.py)."""
    try:
        mod = _optional("ops.backup_cmds", "restore")
    except OpsError as exc:
        raise _fail(str(exc)) from None
    code = mod.restore(manifest, database_url, json_out)
    raise typer.Exit(int(code or 0))


def main() -> None:
    try:
        app()
    except OpsError as exc:  # a report that cannot be made: the message names the fix
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
