// The web terminal: log in, list and create sessions, attach one over the WebSocket API (docs/websocket.md).
//
// One connection at a time. The page keeps the output stream's id and its position in it (the `seq` of the last
// `output` frame plus its decoded length); when the connection drops it gets a fresh ticket, connects again
// (backing off: 0.5 s doubling up to 30 s, with jitter) and attaches with `stream` + `last_seq`, so the host
// sends exactly the bytes it missed, or a snapshot when it no longer holds them.
//
// For tests and the curious: `window.tmuxi` holds the terminal, this page's state and the open WebSocket.

import { api, setupLogin, showError, token } from "./api.js";

const PING_EVERY_MS = 5 * 60 * 1000; // the gateway closes a connection idle for 10 minutes
const PONG_WITHIN_MS = 30 * 1000; // else the connection is taken for dead and replaced
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30 * 1000;
const INPUT_CHUNK = 4096; // code points per `input` frame: even all escaped (\u001b: 6 bytes each) < 32 KB
const RESIZE_LIMITS = { cols: [10, 1000], rows: [5, 500] };

const $ = (id) => document.getElementById(id);

const state = {
  session: null, // {id, name} of the session shown, null when none
  stream: null, // the output stream attached to, and the position reached in it
  pos: 0,
  ws: null, // the current connection (replaced ones are forgotten)
  attached: false,
  readOnly: false,
  ended: null, // why the session can no longer be attached ("exited", "deleted", "not_found"...)
  backoffMs: 0,
  reconnectTimer: null,
  connects: 0, // connections opened for this session (1 + reconnects)
  gaps: 0, // snapshots with gap: true (output lost in between)
  sent: { cols: 0, rows: 0 }, // the size last sent in a `resize`
};

// --- the terminal -----------------------------------------------------------------------------------------

const term = new Terminal({ cursorBlink: true, scrollback: 5000, fontSize: 14,
  fontFamily: "DejaVu Sans Mono, Menlo, Consolas, monospace" });
const fit = new FitAddon.FitAddon();
term.loadAddon(fit);
let opened = false;

function decode(b64) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(b64);
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

// The whole buffer (scrollback and screen) as text, wrapped lines joined.
function bufferText() {
  const buf = term.buffer.active;
  const lines = [];
  for (let i = 0; i < buf.length; i++) {
    const line = buf.getLine(i);
    if (!line) continue;
    const text = line.translateToString(true);
    if (line.isWrapped && lines.length) lines[lines.length - 1] += text;
    else lines.push(text);
  }
  return lines.join("\n");
}

window.tmuxi = {
  term, state, bufferText,
  get ws() { return state.ws; },
};

function setStatus(text) {
  $("status").textContent = text;
}

function clamp(v, [lo, hi]) {
  return Math.max(lo, Math.min(hi, v));
}

function showSize() {
  const el = $("size");
  el.textContent = `${term.cols}x${term.rows}`;
  el.dataset.cols = term.cols;
  el.dataset.rows = term.rows;
}

// Fit the terminal to its box, and tell the pane when that changed its size (or always, with `force`).
function fitAndResize(force = false) {
  if (!opened) return;
  try {
    fit.fit();
  } catch {
    return; // not laid out (hidden)
  }
  showSize();
  sendSize(force);
}

function sendSize(force) {
  if (!state.attached || state.readOnly) return;
  const cols = clamp(term.cols, RESIZE_LIMITS.cols);
  const rows = clamp(term.rows, RESIZE_LIMITS.rows);
  if (!force && cols === state.sent.cols && rows === state.sent.rows) return;
  if (send({ action: "resize", cols, rows })) state.sent = { cols, rows };
}

term.onResize(() => {
  showSize();
  sendSize(false);
});

// keystrokes (and pastes) -> `input`, in frames under API Gateway's 32 KB
term.onData((data) => {
  const points = Array.from(data); // never split a surrogate pair
  for (let i = 0; i < points.length; i += INPUT_CHUNK) {
    sendInput({ data: points.slice(i, i + INPUT_CHUNK).join("") });
  }
});
term.onBinary((data) => { // mouse reports in some modes: bytes as a binary string
  for (let i = 0; i < data.length; i += INPUT_CHUNK * 3) {
    sendInput({ data_b64: btoa(data.slice(i, i + INPUT_CHUNK * 3)) });
  }
});

function sendInput(fields) {
  if (!state.attached || state.readOnly) return; // typed while disconnected: not queued (nor guessed)
  send({ action: "input", ...fields });
}

function send(msg) {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(msg));
  return true;
}

function openTerminal() {
  if (opened) return;
  term.open($("terminal"));
  opened = true;
  // the window, the sidebar, anything that changes the terminal's box: fit once per frame at most
  let pending = false;
  new ResizeObserver(() => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fitAndResize();
    });
  }).observe($("terminal"));
  fitAndResize();
}

// --- the connection ---------------------------------------------------------------------------------------

let config = null;

async function wsUrl() {
  if (!config) {
    const r = await fetch("config.json", { cache: "no-store" });
    if (!r.ok) throw new Error(`config.json: ${r.status}`);
    config = await r.json();
  }
  return config.ws_url;
}

async function connect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  const session = state.session;
  if (!session || state.ended || !token()) return;
  setStatus(state.connects ? "reconnecting…" : "connecting…");
  let url;
  let ticket;
  try {
    url = await wsUrl();
    ({ ticket } = await api("POST", "/ws/tickets"));
  } catch (err) {
    if (state.session !== session) return;
    if (err.status !== 401) { // 401: logged out, nothing to retry
      showError(err);
      scheduleReconnect();
    }
    return;
  }
  if (state.session !== session || state.ws) return; // switched, or connected meanwhile
  // the ticket is single-use and short-lived: the only credential a WebSocket URL ever carries
  const ws = new WebSocket(`${url}?ticket=${encodeURIComponent(ticket)}`);
  state.ws = ws;
  state.connects += 1;
  let pingTimer = null;
  let pongTimer = null;
  ws.onopen = () => {
    const msg = { action: "attach", session_id: session.id };
    if (state.stream !== null) Object.assign(msg, { stream: state.stream, last_seq: state.pos });
    ws.send(JSON.stringify(msg));
    pingTimer = setInterval(() => {
      ws.send(JSON.stringify({ action: "ping", id: String(Date.now()) }));
      clearTimeout(pongTimer);
      pongTimer = setTimeout(() => drop(ws, "no answer to ping"), PONG_WITHIN_MS);
    }, PING_EVERY_MS);
  };
  ws.onmessage = (ev) => {
    if (ws !== state.ws) return;
    let m;
    try {
      m = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (m.type === "pong") clearTimeout(pongTimer);
    else onFrame(ws, m);
  };
  ws.onclose = (ev) => {
    clearInterval(pingTimer);
    clearTimeout(pongTimer);
    if (ws !== state.ws) return; // replaced or closed on purpose
    state.ws = null;
    state.attached = false;
    if (state.ended) return;
    setStatus(`disconnected (${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`);
    scheduleReconnect();
  };
}

// Forget `ws` (its events no longer count) and close it; reconnect unless the session is over.
function drop(ws, why) {
  if (ws !== state.ws) return;
  state.ws = null;
  state.attached = false;
  ws.close();
  if (!state.ended && state.session) {
    setStatus(`disconnected (${why})`);
    scheduleReconnect();
  }
}

function scheduleReconnect() {
  if (state.reconnectTimer || !state.session || state.ended || !token()) return;
  state.backoffMs = state.backoffMs ? Math.min(state.backoffMs * 2, BACKOFF_MAX_MS) : BACKOFF_FIRST_MS;
  const delay = state.backoffMs * (0.75 + Math.random() * 0.5);
  setStatus(`${$("status").textContent}; reconnecting in ${(delay / 1000).toFixed(1)} s`);
  state.reconnectTimer = setTimeout(connect, delay);
}

window.addEventListener("online", () => { // back on the network: no need to wait out the backoff
  if (state.reconnectTimer) connect();
});

function onFrame(ws, m) {
  switch (m.type) {
    case "attached":
      if (m.stream !== state.stream) state.pos = m.seq; // a new stream: a snapshot follows
      state.stream = m.stream;
      state.attached = true;
      state.readOnly = Boolean(m.read_only);
      state.backoffMs = 0;
      showError(null);
      setStatus(`attached: ${state.session.name || state.session.id}${state.readOnly ? " (read-only)" : ""}`);
      fitAndResize(true); // the pane takes this page's size, at once
      break;
    case "output": {
      const bytes = decode(m.data);
      const end = m.seq + bytes.length;
      if (end <= state.pos) break; // already shown
      term.write(m.seq < state.pos ? bytes.subarray(state.pos - m.seq) : bytes);
      state.pos = end;
      break;
    }
    case "snapshot":
      term.write(decode(m.data));
      state.pos = m.seq;
      if (m.gap) {
        state.gaps += 1;
        showError("Some output was lost while this page was away; the screen was redrawn.");
      }
      break;
    case "detached":
      state.attached = false;
      if (m.state) {
        state.ended = m.state;
        setStatus(`session ${m.state}`);
        drop(ws, m.state);
        refreshSessions();
      } else {
        drop(ws, `detached: ${m.reason}`); // not asked for: attach again
      }
      break;
    case "error":
      showError(`${m.code}: ${m.message}`);
      if (m.code === "not_found" || m.code === "forbidden") {
        state.ended = m.code;
        setStatus(m.code === "not_found" ? "session not found (ended?)" : "not allowed");
        drop(ws, m.code);
      } else if (m.code === "unavailable" && !state.attached) {
        drop(ws, "unavailable");
      }
      break;
    default:
      break;
  }
}

// --- sessions ---------------------------------------------------------------------------------------------

function leave() {
  clearTimeout(state.reconnectTimer);
  const ws = state.ws;
  Object.assign(state, { session: null, stream: null, pos: 0, ws: null, attached: false, ended: null,
    backoffMs: 0, reconnectTimer: null, connects: 0, gaps: 0, sent: { cols: 0, rows: 0 } });
  if (ws) {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ action: "detach" }));
    ws.close();
  }
  $("detach").hidden = true;
  setStatus("not attached");
}

function attach(session) {
  leave();
  state.session = { id: session.id, name: session.name };
  history.replaceState(null, "", `#${session.id}`);
  $("replay-link").href = `replay.html#${session.id}`;
  $("detach").hidden = false;
  term.reset();
  fitAndResize();
  term.focus();
  markCurrent();
  connect();
}

function markCurrent() {
  for (const b of $("sessions").querySelectorAll("button")) {
    b.setAttribute("aria-current", String(b.dataset.id === state.session?.id));
  }
}

async function refreshSessions() {
  let list;
  try {
    list = await api("GET", "/sessions?state=live&limit=100");
  } catch (err) {
    showError(err);
    return [];
  }
  const ul = $("sessions");
  ul.replaceChildren();
  for (const s of list.sessions) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.id = s.id;
    b.textContent = `${s.name || s.id.slice(0, 8)} (${s.state})`; // text, never markup: names are the users'
    b.title = s.id;
    b.addEventListener("click", () => attach(s));
    const li = document.createElement("li");
    li.append(b);
    ul.append(li);
  }
  if (!list.sessions.length) {
    const li = document.createElement("li");
    li.textContent = "none yet";
    ul.append(li);
  }
  markCurrent();
  return list.sessions;
}

$("create").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const button = form.querySelector("button");
  button.disabled = true;
  const size = opened ? fit.proposeDimensions() : undefined;
  const body = {};
  if (form.elements.name.value) body.name = form.elements.name.value;
  if (size && size.cols && size.rows) {
    body.cols = clamp(size.cols, RESIZE_LIMITS.cols);
    body.rows = clamp(size.rows, RESIZE_LIMITS.rows);
  }
  try {
    const s = await api("POST", "/sessions", body);
    form.elements.name.value = "";
    showError(null);
    await refreshSessions();
    attach(s);
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
});

$("refresh").addEventListener("click", () => refreshSessions());
$("detach").addEventListener("click", () => {
  leave();
  history.replaceState(null, "", location.pathname);
  markCurrent();
});

setupLogin(async () => {
  $("app").hidden = false;
  openTerminal();
  const sessions = await refreshSessions();
  const wanted = location.hash.slice(1); // the session this tab had attached (a reload)
  const s = sessions.find((x) => x.id === wanted);
  if (s) attach(s);
}, () => {
  leave();
  $("app").hidden = true;
});
