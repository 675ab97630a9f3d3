// The update page: reads reflashd's API, follows its event stream, posts the operator's choices.
// The access token is typed in once and kept in this tab's sessionStorage; every call sends it in
// X-Reflash-Token, the event stream (EventSource sends no headers) as ?token=.
"use strict";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("reflash-token") || "";
let stream = null;
let status = null;
let release = null;

class Refused extends Error {}

async function api(method, path, body) {
  const options = { method, headers: { "X-Reflash-Token": token } };
  if (method === "POST") {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body || {});
  }
  const response = await fetch(path, options);
  let doc;
  try { doc = await response.json(); } catch (e) { doc = { error: `HTTP ${response.status}` }; }
  if (response.status === 401) { refuse(doc.error); throw new Refused(doc.error); }
  if (!response.ok) throw new Error(doc.error || `HTTP ${response.status}`);
  return doc;
}

function refuse(line) {
  $("access").hidden = false;
  $("refusal").textContent = line || "refused";
  if (stream) { stream.close(); stream = null; }
}

function say(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function mib(bytes) { return (bytes / 1048576).toFixed(1); }

function stateWords(s) {
  const d = s.download;
  switch (s.state) {
    case "downloading": return `downloading ${d.file}` + (d.running ? "" : " (stopped)");
    case "downloaded": return `downloaded ${d.version}: ready to install`;
    case "staged": return `staged ${s.staged ? s.staged.version : ""}: installed at the next reboot` +
      (s.reboot_at ? `, scheduled for ${new Date(s.reboot_at).toLocaleString()}` : "");
    case "on-trial": return `on trial: ${s.trial.summary}`;
    default: return "idle";
  }
}

function render(s) {
  status = s;
  $("access").hidden = true;
  $("running").textContent = `${s.product} ${s.version || "(unknown version)"}`;
  $("state").textContent = stateWords(s);
  $("state").dataset.state = s.state;
  const last = s.last_result;
  $("last").textContent = last ? last.summary : "none recorded";
  $("last").dataset.outcome = last ? last.outcome : "";
  const d = s.download;
  const downloading = s.state === "downloading";
  $("progress").hidden = !d || d.phase === "failed";
  if (d) {
    $("progress").value = d.percent || 0;
    $("progress-text").textContent = d.phase === "failed" ? d.error :
      `${d.percent === null ? "" : d.percent + "% "}(${mib(d.done)}${d.size ? " of " + mib(d.size) : ""} MiB)`;
  } else {
    $("progress-text").textContent = "";
  }
  const busy = s.operation !== null;
  const have = d && d.phase === "downloaded" && release && d.version === release.newest.version;
  $("download").disabled = busy || downloading || have || s.state === "staged" || !(release && release.available);
  $("install").disabled = busy || s.state !== "downloaded";
  $("cancel").disabled = !(s.state === "staged" || downloading || (d && d.phase === "downloaded"));
  if (s.state !== "downloaded") $("confirm-box").hidden = true;
}

async function check() {
  try {
    release = await api("POST", "/api/check", {});
    $("newest-version").textContent = release.newest.version;
    $("check-message").textContent = release.message;
    $("notes").textContent = release.newest.notes;
    const rss = release.rss;
    $("rss").hidden = !/^https?:\/\//.test(rss);
    if (!$("rss").hidden) $("rss").href = rss;
    if (status) render(status);
  } catch (e) {
    if (!(e instanceof Refused)) $("check-message").textContent = e.message;
  }
}

function follow() {
  if (stream) stream.close();
  stream = new EventSource("/api/events?token=" + encodeURIComponent(token));
  stream.addEventListener("status", (event) => render(JSON.parse(event.data)));
  stream.onerror = async () => {
    // A stream the daemon refused is not retried by the browser: ask once to tell a refusal apart.
    if (stream && stream.readyState === EventSource.CLOSED) {
      try { render(await api("GET", "/api/status")); setTimeout(follow, 2000); } catch (e) { /* shown */ }
    }
  };
}

async function act(label, method, path, body) {
  say(`${label}…`);
  try {
    const answer = await api(method, path, body);
    say(answer.message || "done");
    return answer;
  } catch (e) {
    say(e.message, true);
    return null;
  }
}

async function start() {
  try {
    render(await api("GET", "/api/status"));
  } catch (e) {
    if (!(e instanceof Refused)) say(e.message, true);
    return;
  }
  follow();
  await check();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-save").addEventListener("click", () => {
    token = $("token").value.trim();
    sessionStorage.setItem("reflash-token", token);
    start();
  });
  $("check").addEventListener("click", check);
  $("download").addEventListener("click", () => act("Starting the download", "POST", "/api/download", { latest: true }));
  $("install").addEventListener("click", () => {
    const version = status && status.download ? status.download.version : "the update";
    $("confirm-text").textContent =
      `Installing ${version} reboots the appliance: it is unavailable for a few minutes while the recovery installs it.`;
    $("confirm-box").hidden = false;
  });
  $("confirm-back").addEventListener("click", () => { $("confirm-box").hidden = true; });
  $("confirm-install").addEventListener("click", async () => {
    let reboot = "now";
    if ($("when-at").checked) {
      const at = new Date($("reboot-at").value);
      if (isNaN(at)) { say("choose the time of the reboot", true); return; }
      reboot = at.toISOString();
    }
    $("confirm-box").hidden = true;
    await act("Installing", "POST", "/api/install", { reboot });
  });
  $("cancel").addEventListener("click", () => act("Cancelling", "POST", "/api/cancel", { discard: $("discard").checked }));
  start();
});
