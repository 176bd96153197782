"""The MCP tools: one per REST API operation an agent needs, each a thin call with the caller's token.

Each tool's docstring and argument descriptions are what an agent reads (``tools/list``); keep them exact. A tool
sends only the arguments it was given, so the API's defaults and limits apply (and its 4xx messages, naming the
field, come back as the tool's error). Which token a call carries is the transport's business: the server's
lifespan yields a ``Backend`` that gives each tool call its ``RestClient`` (stdio: the user's token from the
environment; Streamable HTTP: the Authorization header of the request that carried the call).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Literal, Protocol, cast

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from tmuxi import __version__
from tmuxi.mcp.client import ApiError, RestClient, given, segment

SERVER_NAME = "tmuxi"
INSTRUCTIONS = """\
Persistent terminal sessions (tmux, bash) on tmuxi, as the user whose token this server carries; a person may be
watching the same session live. Create one (create_session) or pick one (list_sessions), then:
- exec runs a command line and answers with its output and exit code. A command still running when timeout_s ends
  keeps running (on_timeout "background"): the answer carries exec_id and cursor; exec_poll gives only the output
  after a cursor, exec_input feeds its stdin, exec_signal / exec_stop end it. background=true starts a job and
  returns at once (several may run in one session); list_execs shows them.
- send_and_wait types into the terminal (text, or keys such as C-c) and waits for the shell prompt, for the screen
  to be quiet, or for a regex, then answers with the screen: for interactive programs. read_screen shows it.
- write_file / read_file / list_dir work on files under the user's home directory.
- delete_session ends a session and everything running in it.
Errors come back with the REST API's message, which names what was wrong."""


class Backend(Protocol):
    """Gives a tool call its REST client (with the right token)."""

    def client(self, ctx: Context) -> RestClient: ...


BackendFactory = Callable[[], AbstractAsyncContextManager[Backend]]


async def _call(ctx: Context, method: str, path: str, *, json: dict[str, Any] | None = None,
                params: dict[str, Any] | None = None) -> Any:
    backend = cast(Backend, ctx.request_context.lifespan_context)  # what build_server's lifespan yields
    try:
        return await backend.client(ctx).call(method, path, json=json, params=params)
    except ApiError as exc:  # an anticipated failure: its text reaches the agent
        raise ToolError(str(exc)) from exc


def _session(session_id: str, *rest: str) -> str:
    return "/".join(["/sessions", segment(session_id), *(segment(r) for r in rest)])


SessionId = Annotated[str, Field(description="the session's id (from create_session or list_sessions)")]
ExecId = Annotated[str, Field(description="the exec_id an exec answered with")]
Result = dict[str, Any]

# --- sessions ------------------------------------------------------------------------------------------------


async def create_session(
    ctx: Context,
    name: Annotated[str | None, Field(description="a label for the session (1-64 characters)")] = None,
    cols: Annotated[int | None, Field(description="terminal width in columns (default 120)")] = None,
    rows: Annotated[int | None, Field(description="terminal height in rows (default 40)")] = None,
) -> Result:
    """Create a terminal session: a tmux session running bash in the user's home directory. Answers with the
    session (its `id` is what every other tool takes as session_id). Sessions count against the user's quota and
    end after a while without activity: delete_session when done."""
    out: Result = await _call(ctx, "POST", "/sessions", json=given(name=name, cols=cols, rows=rows))
    return out


async def list_sessions(
    ctx: Context,
    state: Annotated[str | None, Field(description='"live" (default: creating or active), "all", or one state: '
                                                   "creating, active, deleting, deleted, exited, lost, failed")] = None,
    limit: Annotated[int | None, Field(description="sessions per page, 1-1000 (default 100)")] = None,
    cursor: Annotated[str | None, Field(description="next_cursor of the previous page")] = None,
) -> Result:
    """List the user's sessions, newest first: {"sessions": [...], "next_cursor"}; pass next_cursor back as cursor
    for the next page (null: no more)."""
    out: Result = await _call(ctx, "GET", "/sessions", params=given(state=state, limit=limit, cursor=cursor))
    return out


async def delete_session(ctx: Context, session_id: SessionId) -> Result:
    """Delete a session: its shell and everything running in it are ended. Answers {"deleted": session_id}."""
    await _call(ctx, "DELETE", _session(session_id))
    return {"deleted": session_id}


# --- commands --------------------------------------------------------------------------------------------------


async def exec_command(
    ctx: Context,
    session_id: SessionId,
    command: Annotated[str, Field(description="a shell command line, run by the session's bash as if typed (it "
                                              "may span lines: heredocs, scripts); at most 4 MiB")],
    timeout_s: Annotated[float | None, Field(description="how long this call waits for the command, in seconds "
                                                         "(default 20, at most 25)")] = None,
    on_timeout: Annotated[Literal["background", "kill"] | None, Field(
        description='when timeout_s ends first: "background" (default) leaves the command running and answers '
                    'with its exec_id (continue with exec_poll); "kill" stops it')] = None,
    background: Annotated[bool | None, Field(
        description="run it as a background job and answer at once (several may run in one session; its stdin "
                    "comes from exec_input)")] = None,
    streams: Annotated[Literal["split", "merged"] | None, Field(
        description='"split" (default): stdout and stderr apart; "merged": both in order, in `output`')] = None,
    encoding: Annotated[Literal["utf-8", "base64"] | None, Field(
        description='"utf-8" (default; bytes that are not UTF-8 become U+FFFD and `lossy` is true) or "base64" '
                    "(exact bytes)")] = None,
    max_output_bytes: Annotated[int | None, Field(
        description="cap per stream; past it the head and the tail are kept, with a marker and the total "
                    "size")] = None,
) -> Result:
    """Run a command line in a session's shell and wait for it: answers with exit_code, stdout, stderr (or
    `output` when merged), the byte totals, `truncated`, and `running`/`timed_out`. A command that is still
    running when timeout_s ends keeps running (unless on_timeout is "kill"): use exec_id and cursor from the
    answer with exec_poll for more output, exec_input to type into it, exec_stop or exec_signal to end it. The
    command and its output show in the terminal as if typed, for anyone watching."""
    body = given(command=command, timeout_s=timeout_s, on_timeout=on_timeout, background=background,
                 streams=streams, encoding=encoding, max_output_bytes=max_output_bytes)
    out: Result = await _call(ctx, "POST", _session(session_id, "exec"), json=body)
    return out


async def exec_poll(
    ctx: Context,
    session_id: SessionId,
    exec_id: ExecId,
    cursor: Annotated[str | None, Field(description="the cursor of the previous answer: only output after it "
                                                    "comes back (none: from the start)")] = None,
    wait_s: Annotated[float | None, Field(description="wait up to this many seconds for new output or the end "
                                                      "(at most 25)")] = None,
) -> Result:
    """More of a command's output since `cursor` (never repeated), and whether it is still running; its
    exit_code once it has ended. Pass the answer's cursor to the next exec_poll."""
    out: Result = await _call(ctx, "GET", _session(session_id, "execs", exec_id),
                              params=given(cursor=cursor, wait_s=wait_s))
    return out


async def list_execs(ctx: Context, session_id: SessionId) -> Result:
    """The session's commands started by exec: {"execs": [{exec_id, command, running, exit_code, background,
    started_at}]}."""
    out: Result = await _call(ctx, "GET", _session(session_id, "execs"))
    return out


async def exec_input(
    ctx: Context,
    session_id: SessionId,
    exec_id: ExecId,
    text: Annotated[str | None, Field(description="UTF-8 text to send to the command's stdin")] = None,
    data_b64: Annotated[str | None, Field(description="raw bytes to send, base64 (instead of text)")] = None,
    enter: Annotated[bool, Field(description="send a newline after it")] = False,
    eof: Annotated[bool, Field(description="then close the command's stdin (end of input)")] = False,
) -> Result:
    """Send input to a running command's stdin (not to the terminal: use send_and_wait for that). Answers
    {"sent": true}."""
    await _call(ctx, "POST", _session(session_id, "execs", exec_id, "input"),
                json={**given(text=text, data_b64=data_b64), "enter": enter, "eof": eof})
    return {"sent": True}


async def exec_signal(
    ctx: Context,
    session_id: SessionId,
    exec_id: ExecId,
    signal: Annotated[Literal["INT", "TERM", "KILL", "HUP", "QUIT", "USR1", "USR2"],
                      Field(description="the signal to send")],
) -> Result:
    """Send a signal to a running command (INT is Ctrl-C). Answers {"sent": true}; exec_poll shows the outcome."""
    await _call(ctx, "POST", _session(session_id, "execs", exec_id, "signal"), json={"signal": signal})
    return {"sent": True}


async def exec_stop(
    ctx: Context,
    session_id: SessionId,
    exec_id: ExecId,
    grace_s: Annotated[float | None, Field(description="seconds between TERM and KILL")] = None,
) -> Result:
    """Stop a running command: TERM, then KILL after grace_s. Answers with its final result (exit code and the
    output not yet read)."""
    out: Result = await _call(ctx, "DELETE", _session(session_id, "execs", exec_id),
                              params=given(grace_s=grace_s))
    return out


# --- the terminal ----------------------------------------------------------------------------------------------


async def send_and_wait(
    ctx: Context,
    session_id: SessionId,
    text: Annotated[str | None, Field(description="UTF-8 text to type (sent literally)")] = None,
    keys: Annotated[list[str] | None, Field(description='tmux key names instead, e.g. ["C-c"], ["Up", "Enter"]')]
    = None,
    data_b64: Annotated[str | None, Field(description="raw bytes to type, base64 (instead of text)")] = None,
    enter: Annotated[bool | None, Field(description="press Enter after it (default: yes for text, no for keys and "
                                                    "data_b64)")] = None,
    until: Annotated[Literal["prompt", "quiet", "pattern"], Field(
        description='"prompt": the shell is back at its prompt; "quiet": the screen has not changed for quiet_ms; '
                    '"pattern": the regex `pattern` appears on the screen')] = "prompt",
    pattern: Annotated[str | None, Field(description='a regular expression, for until="pattern"')] = None,
    quiet_ms: Annotated[int | None, Field(description='for until="quiet" (default 300)')] = None,
    timeout_s: Annotated[float | None, Field(description="give up after this many seconds (default 10, at most "
                                                         "25)")] = None,
) -> Result:
    """Type into the session's terminal (as a person at the keyboard would: to whatever program is in the
    foreground), then wait until the shell prompt is back, the screen is quiet, or a pattern appears. Answers
    {"matched": bool (false: timed out), "waited_ms", "screen": {"text", "cols", "rows", "cursor_x",
    "cursor_y"}}. Give exactly one of text, keys or data_b64."""
    if enter is None:
        enter = text is not None
    wait = given(until=until, pattern=pattern, quiet_ms=quiet_ms, timeout_s=timeout_s)
    out: Result = await _call(ctx, "POST", _session(session_id, "input"),
                              json={**given(text=text, keys=keys, data_b64=data_b64), "enter": enter, "wait": wait})
    return out


async def read_screen(
    ctx: Context,
    session_id: SessionId,
    escapes: Annotated[bool, Field(description="keep colours and other escape sequences")] = False,
    history: Annotated[int | None, Field(description="also this many lines of scrollback above the screen")] = None,
) -> Result:
    """The terminal's screen as text: {"text", "cols", "rows", "cursor_x", "cursor_y", "escapes"}."""
    out: Result = await _call(ctx, "GET", _session(session_id, "screen"),
                              params=given(escapes="true" if escapes else None, history=history))
    return out


# --- files -----------------------------------------------------------------------------------------------------

FilePath = Annotated[str, Field(description="relative to the user's home directory (or absolute inside it)")]


async def write_file(
    ctx: Context,
    session_id: SessionId,
    path: FilePath,
    content: Annotated[str | None, Field(description="the file's text (UTF-8)")] = None,
    content_b64: Annotated[str | None, Field(description="the file's bytes, base64 (instead of content)")] = None,
    mode: Annotated[str | None, Field(description='permissions, an octal string such as "0755" (default '
                                                  '"0644")')] = None,
) -> Result:
    """Write a file (created or replaced; at most 4 MiB), owned by the user. Answers {path, size, mode,
    sha256}."""
    out: Result = await _call(ctx, "PUT", _session(session_id, "files"),
                              json=given(path=path, content=content, content_b64=content_b64, mode=mode))
    return out


async def read_file(
    ctx: Context,
    session_id: SessionId,
    path: FilePath,
    encoding: Annotated[Literal["base64"] | None, Field(description='"base64": always the exact bytes, base64')]
    = None,
) -> Result:
    """Read a file (at most 4 MiB): {path, size, mode, encoding, content, sha256}. `content` is text when the
    file is valid UTF-8 (encoding "utf-8"), else base64 (encoding "base64")."""
    out: Result = await _call(ctx, "GET", _session(session_id, "files"), params=given(path=path, encoding=encoding))
    return out


async def list_dir(
    ctx: Context,
    session_id: SessionId,
    path: Annotated[str, Field(description="a directory, relative to the user's home (default: the home)")] = ".",
) -> Result:
    """List a directory: {path, entries: [{name, type ("file", "dir", "link", "other"), size, mode, mtime}]}."""
    out: Result = await _call(ctx, "GET", _session(session_id, "files", "list"), params={"path": path})
    return out


_READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
_DESTROY = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
# A command can do anything the user can: neither read-only nor harmless.
_RUN = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=True)

TOOLS: dict[str, tuple[Callable[..., Any], ToolAnnotations]] = {
    "create_session": (create_session, _WRITE),
    "list_sessions": (list_sessions, _READ),
    "delete_session": (delete_session, _DESTROY),
    "exec": (exec_command, _RUN),
    "exec_poll": (exec_poll, _READ),
    "list_execs": (list_execs, _READ),
    "exec_input": (exec_input, _RUN),
    "exec_signal": (exec_signal, _DESTROY),
    "exec_stop": (exec_stop, _DESTROY),
    "send_and_wait": (send_and_wait, _RUN),
    "read_screen": (read_screen, _READ),
    "write_file": (write_file, _DESTROY),  # replaces a file that is there
    "read_file": (read_file, _READ),
    "list_dir": (list_dir, _READ),
}


def build_server(backend: BackendFactory) -> MCPServer[Backend]:
    """The MCP server with every tool; ``backend`` is entered once per server run (stdio: the process; Streamable
    HTTP: one request) and gives each tool call its REST client."""
    server: MCPServer[Backend] = MCPServer(
        SERVER_NAME, version=__version__, instructions=INSTRUCTIONS, lifespan=lambda _server: backend(),
        # (a tool's failure is logged at INFO with its message by the SDK; nothing else it logs is needed)
        log_level="WARNING")
    for name, (fn, hints) in TOOLS.items():
        server.add_tool(fn, name=name, description=inspect.cleandoc(fn.__doc__ or ""), annotations=hints)
    return server
