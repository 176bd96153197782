// What both pages share: the REST API on this origin, the login, and showing errors.
//
// The token lives in this tab's sessionStorage (so a reload or the other page in the same tab stays logged in)
// and travels only in the Authorization header: never in a URL, a cookie or a log line.

const TOKEN_KEY = "tmuxi.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let onLoggedOut = () => {};

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// `GET`/`POST`/... `path` with the token; the JSON answer (null for 204), or its text with `{text: true}`.
// A refusal throws an ApiError carrying the API's error code and message; a 401 on an authenticated call also
// logs the page out (the token expired or was revoked).
export async function api(method, path, body, { text = false } = {}) {
  const headers = {};
  const current = token();
  if (current) headers.authorization = `Bearer ${current}`;
  const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network", `${method} ${path}: the API cannot be reached (${err.message})`);
  }
  if (!r.ok) {
    let code = `http_${r.status}`;
    let message = r.statusText || "failed";
    try {
      const b = await r.json();
      code = b?.error?.code ?? code;
      message = b?.error?.message ?? b?.message ?? message;
    } catch {
      // not JSON: keep the status line
    }
    if (r.status === 401 && current) {
      setToken(null);
      onLoggedOut();
    }
    throw new ApiError(r.status, code, `${method} ${path}: ${message} (${r.status})`);
  }
  if (text) return r.text();
  if (r.status === 204) return null;
  return r.json();
}

export async function logout() {
  if (token()) {
    try {
      await api("POST", "/auth/revoke");
    } catch {
      // logged out here whatever the API says
    }
  }
  setToken(null);
  onLoggedOut();
}

// Show `err` (an Error or a string) in the page's alert line; null clears it.
export function showError(err) {
  const el = document.getElementById("error");
  if (!el) return;
  el.textContent = err ? String(err.message ?? err) : "";
  el.hidden = !err;
}

// Wire the page's login form and log-out button: `onLogin()` runs once logged in (at once when this tab
// already holds a token), `onLogout()` whenever the page is logged out (button, or a 401).
export function setupLogin(onLogin, onLogout) {
  const form = document.getElementById("login");
  const out = document.getElementById("logout");
  const loggedIn = (yes) => {
    form.hidden = yes;
    out.hidden = !yes;
  };
  onLoggedOut = () => {
    loggedIn(false);
    onLogout();
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault(); // never a form submission: the password stays out of URLs and history
    const username = form.elements.username.value;
    const password = form.elements.password.value;
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      setToken(null);
      const b = await api("POST", "/auth/token", { username, password });
      setToken(b.access_token);
      form.elements.password.value = "";
      showError(null);
      loggedIn(true);
      onLogin();
    } catch (err) {
      showError(err.status === 401 ? "Wrong username or password." : err);
    } finally {
      button.disabled = false;
    }
  });
  out.addEventListener("click", () => logout());
  if (token()) {
    loggedIn(true);
    onLogin();
  } else {
    loggedIn(false);
  }
}
