// The replay page: pick one of your sessions (ended ones too), pick one of its recordings (asciicast v2, one per
// session per host run), play it with asciinema-player. The recording is fetched here with the Authorization
// header and handed to the player as data: the player never fetches anything itself.
//
// For tests and the curious: `window.tmuxi.player` is the player playing, if any.

import { api, setupLogin, showError } from "./api.js";

const $ = (id) => document.getElementById(id);
const select = $("session");
const hook = { player: null, recording: null };
window.tmuxi = hook;

function setStatus(text) {
  $("status").textContent = text;
}

function stopPlayer() {
  if (hook.player) hook.player.dispose();
  hook.player = null;
  hook.recording = null;
  $("player").replaceChildren();
}

async function refreshSessions() {
  let list;
  try {
    list = await api("GET", "/sessions?state=all&limit=200");
  } catch (err) {
    showError(err);
    return;
  }
  const wanted = select.value || location.hash.slice(1);
  select.replaceChildren(new Option("(choose a session)", ""));
  for (const s of list.sessions) {
    const when = new Date(s.created_at).toLocaleString();
    select.append(new Option(`${s.name || s.id.slice(0, 8)} (${s.state}, ${when})`, s.id)); // text, not markup
  }
  if (wanted && list.sessions.some((s) => s.id === wanted)) select.value = wanted;
  await listRecordings();
}

// GET /sessions/{id}/recordings: a list of recordings, each an object with its name (and what else the API
// says about it: size, times), or just a name
function recordingsOf(body) {
  const items = Array.isArray(body) ? body : (body?.recordings ?? body?.items ?? []);
  return items.map((r) => (typeof r === "string" ? { name: r } : { ...r, name: r.name ?? r.key }));
}

async function listRecordings() {
  const sid = select.value;
  const ul = $("recordings");
  ul.replaceChildren();
  if (!sid) {
    setStatus("");
    return;
  }
  history.replaceState(null, "", `#${sid}`);
  let recordings;
  try {
    recordings = recordingsOf(await api("GET", `/sessions/${encodeURIComponent(sid)}/recordings`));
  } catch (err) {
    showError(err);
    return;
  }
  if (select.value !== sid) return;
  showError(null);
  setStatus(recordings.length ? `${recordings.length} recording(s)` : "no recordings (yet)");
  for (const r of recordings) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "recording";
    const size = typeof r.size === "number" ? `, ${(r.size / 1024).toFixed(1)} KiB` : "";
    b.textContent = `▶ ${r.name}${size}`;
    b.dataset.name = r.name;
    b.addEventListener("click", () => play(sid, r.name));
    const li = document.createElement("li");
    li.append(b);
    ul.append(li);
  }
}

async function play(sid, name) {
  stopPlayer();
  setStatus(`loading ${name}…`);
  let text;
  try {
    text = await api("GET", `/sessions/${encodeURIComponent(sid)}/recordings/${encodeURIComponent(name)}`,
      undefined, { text: true });
  } catch (err) {
    showError(err);
    setStatus("");
    return;
  }
  showError(null);
  setStatus(`playing ${name}`);
  hook.recording = name;
  hook.player = AsciinemaPlayer.create({ data: text }, $("player"), {
    autoPlay: true, idleTimeLimit: 1, fit: "both", controls: true,
    logger: { log() {}, debug() {}, info() {}, warn: console.warn, error: (...a) => showError(a.join(" ")) },
  });
  hook.player.addEventListener("ended", () => setStatus(`played ${name}`));
}

select.addEventListener("change", () => {
  stopPlayer();
  listRecordings();
});
$("refresh").addEventListener("click", () => refreshSessions());

setupLogin(() => {
  $("app").hidden = false;
  refreshSessions();
}, () => {
  stopPlayer();
  $("app").hidden = true;
});
