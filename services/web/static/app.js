// Ringfence operator console: plain ES module, no build step. Every call goes to the console's
// own JSON API (routes.py), which makes the same signed requests as the CLI for the signed-in
// operator; errors show the service's own message. Text from the fleet is only ever put in the
// page as text (textContent), never as HTML.

const main = document.getElementById("main");
let me = null; // {user, csrf, expires, vendor}
let cleanup = []; // closers of the current page (live tail, join, timers, player)

// --- small helpers -------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (method !== "GET" && me) init.headers["X-CSRF-Token"] = me.csrf;
  const reply = await fetch(path, init);
  const text = await reply.text();
  let data;
  try { data = JSON.parse(text); } catch { data = { error: text || reply.statusText }; }
  if (!reply.ok) throw new Error(data.error || `${reply.status} ${reply.statusText}`);
  return data;
}

const errorBox = (message) => h("p", { class: "error", role: "alert", text: message });
const note = (message, cls = "ok") => h("p", { class: cls, role: "status", text: message });
const loading = () => h("p", { class: "loading", role: "status", text: "Loading…" });
const empty = (message) => h("p", { class: "empty", text: message });

// Replace `box`'s content with what `work` returns (a node), showing loading and errors.
async function fill(box, work) {
  box.replaceChildren(loading());
  try {
    box.replaceChildren(await work());
  } catch (err) {
    box.replaceChildren(errorBox(err.message));
  }
}

function table(headers, rows) {
  return h("div", { class: "scroll" },
    h("table", {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, rows)));
}

function field(label, input) {
  return h("label", { class: "field" }, h("span", { text: label }), input);
}

function shortTime(text) {
  if (!text) return "-";
  const d = new Date(text);
  return isNaN(d) ? text : d.toISOString().replace(/\.\d+Z$/, "Z");
}

function duration(seconds) {
  let s = Math.max(0, Math.round(seconds));
  const hrs = Math.floor(s / 3600), min = Math.floor((s % 3600) / 60);
  s %= 60;
  return hrs ? `${hrs}h${min}m${s}s` : min ? `${min}m${s}s` : `${s}s`;
}

function summary(ev) {
  const skip = new Set(["event", "ei", "uid", "code", "time", "cluster_name", "user", "login", "sid", "namespace",
    "server_id", "server_hostname", "hash"]);
  if (ev.event === "session.network") {
    return `${ev.program || ""} ${ev.dst_addr}:${ev.dst_port} ${ev.operation ? "send" : "connect"} ` +
      `${ev.action ? "denied" : "observed"}`;
  }
  if (ev.event === "session.command") return `${ev.program || ""}: ${(ev.argv || []).join(" ") || ev.path || ""}`;
  if (ev.event === "session.disk") return `${ev.program || ""}: ${ev.path || ""}`;
  return Object.entries(ev).filter(([k, v]) => !skip.has(k) && v !== "" && v !== 0 && v !== false &&
    !(Array.isArray(v) && !v.length)).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
    .join(" ");
}

// An event row with a button that shows the whole event as JSON.
function eventRows(ev) {
  const detail = h("tr", { class: "detail", hidden: true },
    h("td", { colspan: "6" }, h("pre", { text: JSON.stringify(ev, null, 2) })));
  const toggle = h("button", {
    type: "button", class: "link", "aria-expanded": "false", text: shortTime(ev.time),
    onclick: () => {
      detail.hidden = !detail.hidden;
      toggle.setAttribute("aria-expanded", String(!detail.hidden));
    },
  });
  return [h("tr", {},
    h("td", {}, toggle), h("td", { text: ev.event }), h("td", { text: ev.code }), h("td", { text: ev.user || "-" }),
    h("td", { class: "mono", text: (ev.sid || "-").slice(0, 8) }), h("td", { class: "summary", text: summary(ev) })),
  detail];
}

const EVENT_HEADERS = ["Time", "Type", "Code", "User", "Session", "Details"];

// --- audit events ---------------------------------------------------------------------------------------

function eventsPage() {
  const inputs = {
    type: h("input", { name: "type", placeholder: "session.network,lock.created" }),
    since: h("input", { name: "since", placeholder: "1h", value: "24h" }),
    from: h("input", { name: "from", placeholder: "2026-01-01T00:00:00Z" }),
    to: h("input", { name: "to", placeholder: "RFC 3339" }),
    user: h("input", { name: "user" }),
    sid: h("input", { name: "sid" }),
    limit: h("input", { name: "limit", type: "number", min: "1", max: "10000", value: "50" }),
    order: h("select", { name: "order" }, h("option", { value: "desc", text: "newest first" }),
      h("option", { value: "asc", text: "oldest first" })),
  };
  const results = h("div", { class: "results" });
  const live = h("div", { class: "results", id: "live", "aria-live": "polite" });
  const liveToggle = h("button", { type: "button", "aria-pressed": "false", text: "Follow live" });
  const pages = []; // next keys: pages[i] is the key that starts page i

  const query = (page) => {
    const q = new URLSearchParams();
    for (const [k, el] of Object.entries(inputs)) if (el.value.trim()) q.set(k, el.value.trim());
    if (page) q.set("page", page);
    return q;
  };

  const search = (index) => fill(results, async () => {
    const data = await api(`/api/events?${query(pages[index])}`);
    const nav = h("div", { class: "pager" },
      h("button", { type: "button", disabled: index === 0, text: "Previous page", onclick: () => search(index - 1) }),
      h("span", { text: `page ${index + 1}` }),
      h("button", { type: "button", disabled: !data.next, text: "Next page", onclick: () => {
        pages[index + 1] = data.next;
        search(index + 1);
      } }));
    if (!data.events.length) return h("div", {}, empty("No events match."), nav);
    return h("div", {}, table(EVENT_HEADERS, data.events.map(eventRows)), nav);
  });

  let source = null;
  const stopLive = () => {
    if (source) source.close();
    source = null;
    liveToggle.setAttribute("aria-pressed", "false");
    liveToggle.textContent = "Follow live";
  };
  cleanup.push(stopLive);
  liveToggle.addEventListener("click", () => {
    if (source) return stopLive();
    const q = new URLSearchParams();
    if (inputs.type.value.trim()) q.set("type", inputs.type.value.trim());
    const body = h("tbody", {});
    live.replaceChildren(note("Waiting for new events…", "loading"), h("div", { class: "scroll" },
      h("table", {}, h("thead", {}, h("tr", {}, EVENT_HEADERS.map((t) => h("th", { scope: "col", text: t })))), body)));
    source = new EventSource(`/api/events/live?${q}`);
    source.onmessage = (msg) => {
      live.firstChild.textContent = "Following new events.";
      body.prepend(...eventRows(JSON.parse(msg.data)));
    };
    source.onerror = () => {
      // EventSource hides why; the console refuses with a JSON error before a stream opens.
      stopLive();
      const probe = new AbortController();
      fetch(`/api/events/live?${q}`, { credentials: "same-origin", signal: probe.signal }).then(async (r) => {
        let message = "the live tail stopped (the console or its connection went away)";
        if (r.ok) probe.abort();
        else message = (await r.json().catch(() => ({}))).error || message;
        live.replaceChildren(errorBox(message));
      }).catch((err) => live.replaceChildren(errorBox(err.message)));
    };
    liveToggle.setAttribute("aria-pressed", "true");
    liveToggle.textContent = "Stop following";
  });

  const form = h("form", { class: "filters", onsubmit: (e) => {
    e.preventDefault();
    pages.length = 0;
    search(0);
  } }, Object.entries(inputs).map(([k, el]) => field(k, el)),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", text: "Search" }), liveToggle));
  main.replaceChildren(h("h1", { text: "Audit events" }), form, live, results);
  search(0);
}

// --- recordings -----------------------------------------------------------------------------------------

function recordingsPage() {
  const user = h("input", { name: "user" });
  const results = h("div", { class: "results" });
  const load = () => fill(results, async () => {
    const q = new URLSearchParams({ limit: "200" });
    if (user.value.trim()) q.set("user", user.value.trim());
    const data = await api(`/api/recordings?${q}`);
    if (!data.recordings.length) return empty("No recordings yet.");
    return table(["Session", "User", "Login", "Node", "Started", "Duration"], data.recordings.map((r) => h("tr", {},
      h("td", {}, h("a", { href: `#/recordings/${encodeURIComponent(r.sid)}`, class: "mono", text: r.sid })),
      h("td", { text: r.user || "-" }), h("td", { text: r.login || "-" }), h("td", { text: r.server_hostname || "-" }),
      h("td", { text: shortTime(r.started) }),
      h("td", { text: duration(r.duration) + (r.ended ? "" : " (open)") }))));
  });
  main.replaceChildren(h("h1", { text: "Recordings" }),
    h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); load(); } }, field("user", user),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", text: "List" }))), results);
  load();
}

function recordingPage(sid) {
  const stage = h("div", { class: "player", id: "player" });
  const timeline = h("div", { class: "timeline" });
  const speed = h("select", { name: "speed" }, ["0.5", "1", "2", "4", "8"].map((s) =>
    h("option", { value: s, selected: s === "1", text: `${s}×` })));
  let player = null;
  let started = null; // Date of the session start, for the timeline's offsets

  const create = (startAt = 0) => {
    if (player) player.dispose();
    if (!window.AsciinemaPlayer) {
      stage.replaceChildren(errorBox("asciinema-player is not installed: run `make setup` (scripts/web_assets.sh)"));
      return;
    }
    stage.replaceChildren();
    player = window.AsciinemaPlayer.create(`/api/recordings/${encodeURIComponent(sid)}.cast`, stage, {
      speed: Number(speed.value), startAt, fit: "width", controls: true, autoPlay: startAt > 0,
    });
    stage.dataset.speed = speed.value; // which player is showing, for the browser tests
    window.ringfencePlayer = player;
  };
  cleanup.push(() => player && player.dispose());
  speed.addEventListener("change", async () => create(player ? await player.getCurrentTime() : 0));

  const loadTimeline = () => fill(timeline, async () => {
    const [recs, events] = await Promise.all([
      api(`/api/recordings?limit=1000`),
      api(`/api/events?${new URLSearchParams({ sid, order: "asc", limit: "1000" })}`),
    ]);
    const info = recs.recordings.find((r) => r.sid === sid);
    started = info && info.started ? new Date(info.started) : null;
    if (!events.events.length) return empty("No events recorded for this session.");
    return h("ol", { class: "events-timeline" }, events.events.map((ev) => {
      const offset = started ? (new Date(ev.time) - started) / 1000 : 0;
      return h("li", {}, h("button", { type: "button", class: "link", onclick: () => player && player.seek(offset),
        title: "play from here", text: `${duration(offset)}` }), ` ${ev.event} `,
      h("span", { class: "summary", text: summary(ev) }));
    }));
  });

  main.replaceChildren(h("h1", {}, "Recording ", h("span", { class: "mono", text: sid })),
    h("p", {}, h("a", { href: "#/recordings", text: "← all recordings" })),
    h("div", { class: "split" }, h("section", { "aria-label": "Playback" }, stage,
      h("div", { class: "actions" }, field("speed", speed))),
    h("section", { "aria-label": "Session events" }, h("h2", { text: "Session events" }), timeline)));
  // The player script loads with `defer`; a module runs after it, so it is there (or missing).
  create();
  loadTimeline();
}

// --- active sessions and join ------------------------------------------------------------------------------

function sessionsPage() {
  const results = h("div", { class: "results" });
  const status = h("div", {});
  const kill = async (sid) => {
    const message = window.prompt(`End session ${sid}? Message shown to the user:`, "session terminated by an operator");
    if (message === null) return;
    try {
      const data = await api(`/api/sessions/${encodeURIComponent(sid)}/kill`, { method: "POST", body: { message } });
      status.replaceChildren(note(data.message));
      load();
    } catch (err) {
      status.replaceChildren(errorBox(err.message));
    }
  };
  const load = () => fill(results, async () => {
    const data = await api("/api/sessions");
    if (!data.sessions.length) return empty("No active sessions.");
    return table(["Session", "User", "Login", "Node", "Client", "Started", ""], data.sessions.map((s) => h("tr", {},
      h("td", { class: "mono", text: s.sid }), h("td", { text: s.user || "-" }), h("td", { text: s.login || "-" }),
      h("td", { text: s.server_hostname || "-" }), h("td", { text: s.addr_remote || "-" }),
      h("td", { text: shortTime(s.started) }),
      h("td", { class: "row-actions" },
        s.interactive ? h("a", { href: `#/sessions/${encodeURIComponent(s.sid)}/join`, class: "button", text: "Join" }) : "",
        h("button", { type: "button", class: "danger", text: "Kill", onclick: () => kill(s.sid) })))));
  });
  main.replaceChildren(h("h1", { text: "Active sessions" }),
    h("div", { class: "actions" }, h("button", { type: "button", text: "Refresh", onclick: load })), status, results);
  load();
  const timer = setInterval(() => { if (!document.hidden) load(); }, 10000);
  cleanup.push(() => clearInterval(timer));
}

async function joinPage(sid) {
  const status = h("div", {}, note("Joining…", "loading"));
  const screen = h("div", { class: "terminal", id: "terminal" });
  main.replaceChildren(h("h1", {}, "Session ", h("span", { class: "mono", text: sid })),
    h("p", {}, h("a", { href: "#/sessions", text: "← active sessions" }), " Read-only: you see the output; ",
      "leaving this page leaves the session."), status, screen);
  let Terminal;
  try {
    ({ Terminal } = await import("/static/vendor/xterm.mjs"));
  } catch {
    status.replaceChildren(errorBox("xterm.js is not installed: run `make setup` (scripts/web_assets.sh)"));
    return;
  }
  const term = new Terminal({ disableStdin: true, convertEol: false, cols: 100, rows: 30, scrollback: 5000 });
  term.open(screen);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/api/sessions/${encodeURIComponent(sid)}/join?` +
    new URLSearchParams({ csrf: me.csrf }));
  let ended = false;
  ws.onmessage = (msg) => {
    const m = JSON.parse(msg.data);
    if (m.joined) status.replaceChildren(note(`Joined; watching session ${sid} (recorded as session.join).`));
    if (m.o !== undefined) term.write(m.o);
    if (m.r) {
      const [w, hgt] = m.r.split("x").map(Number);
      if (w > 0 && hgt > 0) term.resize(Math.min(w, 500), Math.min(hgt, 200));
    }
    if (m.end) { ended = true; status.replaceChildren(note("The session ended.")); }
    if (m.error) { ended = true; status.replaceChildren(errorBox(m.error)); }
  };
  ws.onclose = () => { if (!ended) status.replaceChildren(note("Disconnected from the session.", "empty")); };
  cleanup.push(() => { ended = true; ws.close(); term.dispose(); });
}

// --- locks ---------------------------------------------------------------------------------------------

const TARGETS = ["user", "role", "login", "server_id", "mfa_device", "device", "access_request", "windows_desktop"];

function targetText(target) {
  return Object.entries(target || {}).filter(([, v]) => v).map(([k, v]) => `${k}=${v}`).join(", ");
}

function locksPage() {
  const results = h("div", { class: "results" });
  const status = h("div", {});
  const act = async (work) => {
    try {
      const data = await work();
      status.replaceChildren(note(data.message));
      load();
    } catch (err) {
      status.replaceChildren(errorBox(err.message));
    }
  };
  const load = () => fill(results, async () => {
    const data = await api("/api/locks");
    if (!data.locks.length) return empty("No locks in force.");
    return table(["Name", "Target", "Message", "Expires", "Created by", ""], data.locks.map((l) => h("tr", {},
      h("td", { class: "mono", text: l.metadata.name }), h("td", { text: targetText(l.spec.target) }),
      h("td", { text: l.spec.message || "" }), h("td", { text: l.spec.expires || "never" }),
      h("td", { text: l.spec.created_by || "" }),
      h("td", {}, h("button", { type: "button", class: "danger", text: "Remove", "aria-label": `Remove lock ${l.metadata.name}`,
        onclick: () => act(() => api(`/api/locks/${encodeURIComponent(l.metadata.name)}`, { method: "DELETE" })) })))));
  });
  const targetInputs = (prefix) => Object.fromEntries(TARGETS.map((t) => [t, h("input", { name: `${prefix}-${t}` })]));
  const collect = (inputs) => Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value.trim()])
    .filter(([, v]) => v));
  const lockTargets = targetInputs("lock");
  const message = h("input", { name: "message" });
  const ttl = h("input", { name: "ttl", placeholder: "10h" });
  const expires = h("input", { name: "expires", placeholder: "2026-08-14T22:27:00Z" });
  const unlockTargets = targetInputs("unlock");
  main.replaceChildren(h("h1", { text: "Locks" }), status, results,
    h("div", { class: "split" },
      h("form", { class: "card", "aria-label": "Create a lock", onsubmit: (e) => {
        e.preventDefault();
        act(() => api("/api/locks", { method: "POST", body: { target: collect(lockTargets), message: message.value,
          ttl: ttl.value, expires: expires.value } }));
      } }, h("h2", { text: "Create a lock" }), Object.entries(lockTargets).map(([k, el]) => field(k, el)),
      field("message", message), field("ttl", ttl), field("expires", expires),
      h("button", { type: "submit", class: "primary", text: "Create lock" })),
      h("form", { class: "card", "aria-label": "Unlock a target", onsubmit: (e) => {
        e.preventDefault();
        act(() => api("/api/unlock", { method: "POST", body: collect(unlockTargets) }));
      } }, h("h2", { text: "Unlock a target" }), Object.entries(unlockTargets).map(([k, el]) => field(k, el)),
      h("button", { type: "submit", text: "Unlock" }))));
  load();
}

// --- resources as YAML (network restrictions, roles, users) ------------------------------------------------

function yamlEditor(title, text, after) {
  const area = h("textarea", { name: "yaml", rows: "18", spellcheck: "false", "aria-label": `${title} (YAML)` });
  area.value = text;
  const status = h("div", {});
  const form = h("form", { class: "card editor", onsubmit: async (e) => {
    e.preventDefault();
    status.replaceChildren(loading());
    try {
      const data = await api("/api/resources", { method: "POST", body: { yaml: area.value } });
      status.replaceChildren(...data.messages.map((m) => note(m, m.startsWith("warning:") ? "empty" : "ok")));
      if (after) after();
    } catch (err) {
      status.replaceChildren(errorBox(err.message));
    }
  } }, h("h2", { text: title }), area, h("div", { class: "actions" },
    h("button", { type: "submit", class: "primary", text: "Save" })), status);
  return form;
}

function networkPage() {
  const view = h("div", { class: "results" });
  const status = h("div", {});
  const load = () => fill(view, async () => {
    const data = await api("/api/resources/network_restrictions");
    const rows = data.items.flatMap((nr) => ["allow", "deny"].flatMap((list) =>
      (nr.spec[list] || []).map((r) => h("tr", {}, h("td", { text: list }), h("td", { class: "mono", text: r.cidr })))));
    const template = "kind: network_restrictions\nversion: v4\nmetadata:\n  name: network-restrictions\nspec:\n" +
      "  allow:\n  - cidr: 127.0.0.0/8\n  deny: []\n";
    return h("div", {},
      data.items.length ? table(["List", "CIDR"], rows) : empty("No network restrictions: every destination is allowed."),
      yamlEditor("Edit as YAML", data.yaml || template, load),
      data.items.length ? h("button", { type: "button", class: "danger", text: "Reset to allow all", onclick: async () => {
        try {
          status.replaceChildren(note((await api("/api/resources/network_restrictions",
            { method: "DELETE" })).message));
          load();
        } catch (err) { status.replaceChildren(errorBox(err.message)); }
      } }) : "");
  });
  main.replaceChildren(h("h1", { text: "Network restrictions" }), status, view);
  load();
}

function usersPage() {
  const usersBox = h("div", { class: "results" });
  const rolesBox = h("div", { class: "results" });
  const editor = h("div", {});
  const status = h("div", {});
  const reload = () => { loadUsers(); loadRoles(); };
  const edit = async (kind, name) => {
    editor.replaceChildren(loading());
    try {
      const data = await api(`/api/resources/${kind}/${encodeURIComponent(name)}`);
      editor.replaceChildren(yamlEditor(`Edit ${kind} ${name}`, data.yaml, reload));
      editor.querySelector("textarea").focus();
    } catch (err) { editor.replaceChildren(errorBox(err.message)); }
  };
  const remove = async (kind, name) => {
    if (!window.confirm(`Delete ${kind} ${name}?`)) return;
    try {
      status.replaceChildren(note((await api(`/api/resources/${kind}/${encodeURIComponent(name)}`,
        { method: "DELETE" })).message));
      reload();
    } catch (err) { status.replaceChildren(errorBox(err.message)); }
  };
  const buttons = (kind, name) => h("td", { class: "row-actions" },
    h("button", { type: "button", text: "Edit", "aria-label": `Edit ${kind} ${name}`, onclick: () => edit(kind, name) }),
    h("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${kind} ${name}`,
      onclick: () => remove(kind, name) }));
  const loadUsers = () => fill(usersBox, async () => {
    const data = await api("/api/resources/user");
    if (!data.items.length) return empty("No users.");
    return table(["User", "Roles", "SSH keys", "Operator key", ""], data.items.map((u) => h("tr", {},
      h("td", { text: u.metadata.name }), h("td", { text: (u.spec.roles || []).join(", ") || "-" }),
      h("td", { text: String((u.spec.ssh_public_keys || []).length) }),
      h("td", { class: "mono", text: u.spec.operator_nkey ? `${u.spec.operator_nkey.slice(0, 12)}…` : "-" }),
      buttons("user", u.metadata.name))));
  });
  const loadRoles = () => fill(rolesBox, async () => {
    const data = await api("/api/resources/role");
    if (!data.items.length) return empty("No roles.");
    const rules = (r) => (r.spec.allow?.rules || []).map((x) => `${x.resources.join(",")}: ${x.verbs.join(",")}`).join("; ");
    return table(["Role", "Allows", "Logins", ""], data.items.map((r) => h("tr", {},
      h("td", { text: r.metadata.name }), h("td", { text: rules(r) || "-" }),
      h("td", { text: (r.spec.allow?.logins || []).join(", ") || "-" }), buttons("role", r.metadata.name))));
  });
  const newRole = "kind: role\nversion: v5\nmetadata:\n  name: NAME\nspec:\n  allow:\n    rules:\n" +
    "    - resources: [lock]\n      verbs: [list, read]\n";
  main.replaceChildren(h("h1", { text: "Users and roles" }), status,
    h("h2", { text: "Users" }), usersBox, h("h2", { text: "Roles" }), rolesBox,
    h("div", { class: "actions" }, h("button", { type: "button", text: "New role",
      onclick: () => editor.replaceChildren(yamlEditor("New role", newRole, reload)) })), editor);
  reload();
}

// --- routing and sign-in -----------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/events$/, eventsPage],
  [/^#\/recordings$/, recordingsPage],
  [/^#\/recordings\/([^/]+)$/, recordingPage],
  [/^#\/sessions$/, sessionsPage],
  [/^#\/sessions\/([^/]+)\/join$/, joinPage],
  [/^#\/locks$/, locksPage],
  [/^#\/network$/, networkPage],
  [/^#\/users$/, usersPage],
];

// A link followed moves the focus to the new page's content; the first load leaves it at the top.
function route(event) {
  for (const close of cleanup.splice(0)) {
    try { close(); } catch { /* already closed */ }
  }
  const hash = location.hash || "#/events";
  for (const link of document.querySelectorAll("nav a")) {
    if (hash.startsWith(link.getAttribute("href"))) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const [pattern, page] of ROUTES) {
    const m = hash.match(pattern);
    if (m) {
      page(...m.slice(1).map(decodeURIComponent));
      if (event) main.focus({ preventScroll: true });
      return;
    }
  }
  location.hash = "#/events";
}

async function start() {
  try {
    me = await api("/api/me");
  } catch (err) {
    main.replaceChildren(h("h1", { text: "Sign in" }), errorBox(err.message),
      h("p", {}, "Run ", h("code", { text: "ringfence web login" }), " and open the URL it prints."));
    return;
  }
  document.getElementById("who").textContent = `signed in as ${me.user}`;
  const logout = document.getElementById("logout");
  logout.hidden = false;
  logout.addEventListener("click", async () => {
    await api("/api/logout", { method: "POST" }).catch(() => {});
    location.reload();
  });
  window.addEventListener("hashchange", route);
  route(null);
}

start();
