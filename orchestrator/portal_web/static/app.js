// fleet web portal: plain JavaScript, hash routing, REST for lists and writes, and MQTT over
// WebSockets (mqtt.js) for live rollout progress from the retained fleet/v1/portal/# topics.
"use strict";

(function () {
  const TOKEN_KEY = "fleet.portal.token";
  const END_STATES = new Set(["SUCCEEDED", "FAILED", "ROLLED_BACK", "TIMED_OUT", "SKIPPED", "CANCELED"]);
  const STATE_ORDER = [
    "PENDING", "QUEUED", "OFFERED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "INSTALLING", "REBOOTING",
    "SOAKING", "ROLLING_BACK",
    "RETRYING", "SUCCEEDED", "FAILED", "ROLLED_BACK", "TIMED_OUT", "SKIPPED", "CANCELED",
  ];
  const MAX_DEVICE_PAGES = 100;

  const view = document.getElementById("view");
  const liveBadge = document.getElementById("live");

  // ------------------------------------------------------------------ small DOM helpers
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // replaceChildren() would print null/false children as text; drop them instead.
  function fill(el, ...nodes) {
    el.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
  }

  function show(...nodes) {
    fill(view, ...nodes);
  }

  function badge(state) {
    return h("span", { class: `badge s-${state}` }, state);
  }

  function bar(fraction, opts) {
    const pct = Math.max(0, Math.min(100, fraction * 100));
    const fill = h("div", { class: `fill${opts && opts.busy ? " busy" : ""}` });
    fill.style.width = `${pct}%`;
    return h("div", { class: `bar${opts && opts.big ? " big" : ""}${opts && opts.mini ? " mini" : ""}` }, fill);
  }

  function fmtTime(iso) {
    return iso ? new Date(iso).toLocaleString() : "—";
  }

  function fmtEta(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 60) return `${Math.round(seconds)} s`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function targetText(target) {
    if (!target) return "—";
    const parts = [];
    if (target.device_ids) parts.push(`${target.device_ids.length} listed devices`);
    if (target.group) parts.push(`group ${target.group}`);
    if (target.model) parts.push(`model ${target.model}`);
    const labels = Object.entries(target.labels || {}).map(([k, v]) => `${k}:${v}`);
    if (labels.length) parts.push(`labels ${labels.join(", ")}`);
    if ((target.tags || []).length) parts.push(`tags ${target.tags.join(", ")}`);
    if (target.versions) parts.push(`versions ${target.versions}`);
    return parts.join(", ") || "all devices";
  }

  function windowText(w) {
    if (w.cron) return `${w.cron} for ${fmtEta(w.duration_s)} (${w.timezone || "UTC"})`;
    return `${fmtTime(w.start)} to ${fmtTime(w.end)}`;
  }

  // What holds a running rollout back: rate, window, offline devices, end time (orchestrator/pacing.py).
  function pacingNodes(pacing, skipped, policy) {
    const rows = [];
    const kv = (id, label, value) => rows.push(h("span", {}, label), h("span", { id }, value));
    if (pacing && pacing.rate_per_minute != null) {
      kv("rollout-rate", "Rate", `${pacing.rate_per_minute} offers/min now · ${pacing.offered_last_minute} in the last minute`);
    }
    if (pacing && pacing.window_open != null) {
      const text = pacing.window_open
        ? `open until ${fmtTime(pacing.window_closes_at)}`
        : `closed · next opens ${fmtTime(pacing.next_window_at)}`;
      const waiting = pacing.waiting_for_window ? ` · ${pacing.waiting_for_window} verified, waiting to install` : "";
      kv("rollout-window", "Window", text + waiting);
    }
    if (policy && (policy.windows || []).length) {
      kv("rollout-windows", "Windows", policy.windows.map(windowText).join("; "));
    }
    if (policy && policy.soak) {
      kv("rollout-soak", "Soak", `each device stays healthy ${fmtEta(policy.soak.duration_s)} after updating ` +
        `(heartbeat every ${fmtEta(policy.soak.heartbeat_s)}); unhealthy ones roll back`);
    }
    if (pacing && pacing.soaking) kv("rollout-soaking", "Soaking", `${pacing.soaking} devices reporting health`);
    if (pacing && pacing.waiting_offline) kv("rollout-offline", "Offline", `${pacing.waiting_offline} devices wait to come online`);
    if (pacing && (pacing.end_at || pacing.continuous)) {
      const kind = pacing.continuous ? "Continuous" : "Ends";
      kv("rollout-end", kind, pacing.end_at ? `until ${fmtTime(pacing.end_at)}` : "new matching devices join");
    }
    const reasons = Object.entries(skipped || {});
    if (reasons.length) {
      kv("rollout-skipped", "Skipped", reasons.map(([reason, n]) => `${n} ${reason.replaceAll("_", " ")}`).join(" · "));
    }
    return rows.length ? h("div", { class: "kv", id: "rollout-pacing", style: "margin-top:1rem" }, rows) : null;
  }

  function fmtPercent(value) {
    return `${Math.floor(value * 10) / 10}%`.replace(".0%", "%");
  }

  // ------------------------------------------------------------------ API
  function token() {
    return localStorage.getItem(TOKEN_KEY);
  }

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  async function api(path, options) {
    const opts = Object.assign({ method: "GET" }, options || {});
    const headers = { Accept: "application/json", Authorization: `Bearer ${token()}` };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method: opts.method,
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    });
    let body = null;
    try {
      body = await response.json();
    } catch (_err) {
      body = null;
    }
    if (response.status === 401) {
      logout("Your token was not accepted (unknown or revoked). Paste a valid one.");
      throw new ApiError(401, body);
    }
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  async function allPages(path, maxPages) {
    const items = [];
    let cursor = null;
    for (let page = 0; page < maxPages; page++) {
      const sep = path.includes("?") ? "&" : "?";
      const url = cursor ? `${path}${sep}cursor=${encodeURIComponent(cursor)}` : path;
      const body = await api(url);
      items.push(...body.items);
      cursor = body.next_cursor;
      if (!cursor) return { items, complete: true };
    }
    return { items, complete: false };
  }

  function errorBox(err) {
    return h("p", { class: "error", role: "alert" }, err instanceof Error ? err.message : String(err));
  }

  // ------------------------------------------------------------------ MQTT (live progress)
  const live = {
    client: null,
    config: null,
    handlers: new Map(), // topic filter -> handler(topic, doc|null)
  };

  function setLive(state, text) {
    liveBadge.dataset.state = state;
    liveBadge.textContent = text;
  }

  function topicMatches(filter, topic) {
    const f = filter.split("/");
    const t = topic.split("/");
    for (let i = 0; i < f.length; i++) {
      if (f[i] === "#") return true;
      if (i >= t.length) return false;
      if (f[i] !== "+" && f[i] !== t[i]) return false;
    }
    return f.length === t.length;
  }

  async function ensureMqtt() {
    if (live.client) return live.client;
    if (typeof mqtt === "undefined") throw new Error("mqtt.js did not load");
    live.config = await api("/v1/portal/config");
    const options = {
      clientId: `portal-${Math.random().toString(16).slice(2, 12)}`,
      clean: true,
      reconnectPeriod: 2000,
      connectTimeout: 10000,
      protocolVersion: 4,
    };
    if (live.config.mqtt_username) {
      options.username = live.config.mqtt_username;
      options.password = live.config.mqtt_password || "";
    }
    setLive("connecting", "connecting");
    const client = mqtt.connect(live.config.mqtt_ws_url, options);
    client.on("connect", () => {
      setLive("on", "live");
      // A new session after a reconnect: subscribe again (retained documents are resent).
      for (const filter of live.handlers.keys()) client.subscribe(filter, { qos: 1 });
    });
    client.on("reconnect", () => setLive("connecting", "reconnecting"));
    client.on("offline", () => setLive("off", "offline"));
    client.on("error", (err) => setLive("off", `error: ${err.message}`));
    client.on("message", (topic, payload) => {
      let doc = null;
      if (payload && payload.length) {
        try {
          doc = JSON.parse(new TextDecoder().decode(payload));
        } catch (_err) {
          return;
        }
      }
      for (const [filter, handler] of live.handlers) {
        if (topicMatches(filter, topic)) handler(topic, doc);
      }
    });
    live.client = client;
    return client;
  }

  function subscribe(filters, handler) {
    for (const filter of filters) live.handlers.set(filter, handler);
    if (live.client && live.client.connected) live.client.subscribe(filters, { qos: 1 });
    return () => {
      for (const filter of filters) live.handlers.delete(filter);
      if (live.client && live.client.connected) live.client.unsubscribe(filters);
    };
  }

  function stopMqtt() {
    if (live.client) live.client.end(true);
    live.client = null;
    live.handlers.clear();
    setLive("off", "idle");
  }

  // ------------------------------------------------------------------ confirmation dialog
  function confirmAction(title, text, okLabel) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm-ok").textContent = okLabel;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
    });
  }

  // ------------------------------------------------------------------ who is signed in
  // The API enforces roles on every call; the page only hides what a viewer may not do.
  const me = { role: null, name: null };

  async function whoAmI() {
    if (!me.role) {
      const config = await api("/v1/portal/config");
      me.role = config.role;
      me.name = config.token_name;
    }
    document.body.dataset.role = me.role;
    for (const link of document.querySelectorAll("[data-write]")) link.hidden = me.role !== "operator";
    return me;
  }

  function canWrite() {
    return me.role === "operator";
  }

  // ------------------------------------------------------------------ views
  function loginView(message) {
    const input = h("input", {
      id: "token", name: "token", type: "password", autocomplete: "off", required: true,
      placeholder: "fleet_…",
    });
    const status = h("p", { class: "error", role: "alert" }, message || "");
    const form = h(
      "form",
      {
        class: "stack panel login",
        id: "login-form",
        onsubmit: async (event) => {
          event.preventDefault();
          localStorage.setItem(TOKEN_KEY, input.value.trim());
          try {
            await api("/v1/portal/config");
          } catch (err) {
            if (!(err instanceof ApiError && err.status === 401)) status.textContent = err.message;
            return;
          }
          route();
        },
      },
      h("h1", {}, "Sign in"),
      h("p", { class: "muted" },
        "Paste an API token from `fleet token create --role viewer|operator --name NAME`. " +
        "Viewer tokens can watch; operator tokens can also create and control rollouts. " +
        "The token stays in this browser's local storage."),
      h("label", {}, "API token", input),
      status,
      h("div", { class: "actions" }, h("button", { type: "submit" }, "Sign in")),
    );
    show(form);
    input.focus();
  }

  function logout(message) {
    localStorage.removeItem(TOKEN_KEY);
    me.role = null;
    me.name = null;
    stopMqtt();
    document.getElementById("nav").hidden = true;
    document.getElementById("logout").hidden = true;
    loginView(message);
  }

  async function overviewView() {
    show(h("h1", {}, "Fleet"), h("p", { class: "muted" }, "Loading devices…"));
    const list = views.fleetDevices();
    const { items, complete } = await allPages("/v1/devices?limit=1000", MAX_DEVICE_PAGES);
    const online = items.filter((d) => d.online).length;
    const byModel = new Map();
    for (const device of items) {
      if (!byModel.has(device.model)) byModel.set(device.model, new Map());
      const versions = byModel.get(device.model);
      const entry = versions.get(device.firmware_version) || { total: 0, online: 0 };
      entry.total += 1;
      if (device.online) entry.online += 1;
      versions.set(device.firmware_version, entry);
    }
    const rows = [];
    for (const model of [...byModel.keys()].sort()) {
      const versions = byModel.get(model);
      for (const version of [...versions.keys()].sort()) {
        const entry = versions.get(version);
        rows.push(h("tr", {},
          h("td", {}, model), h("td", {}, version),
          h("td", { class: "num" }, entry.total), h("td", { class: "num" }, entry.online)));
      }
    }
    show(
      h("h1", {}, "Fleet"),
      complete ? null : h("p", { class: "notice" }, `Showing the first ${items.length} devices.`),
      h("div", { class: "grid" },
        h("div", { class: "panel" }, h("div", { class: "muted" }, "Devices"),
          h("div", { class: "stat", id: "device-total" }, items.length)),
        h("div", { class: "panel" }, h("div", { class: "muted" }, "Online"),
          h("div", { class: "stat", id: "device-online" }, online)),
        h("div", { class: "panel" }, h("div", { class: "muted" }, "Models"),
          h("div", { class: "stat" }, byModel.size))),
      h("div", { class: "panel" },
        h("h2", {}, "Devices by model and version"),
        h("div", { class: "table-wrap" },
          h("table", { id: "fleet-table" },
            h("thead", {}, h("tr", {}, h("th", {}, "Model"), h("th", {}, "Version"),
              h("th", { class: "num" }, "Devices"), h("th", { class: "num" }, "Online"))),
            h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 4 }, "No devices yet.")))))),
      list.node,
    );
    await list.load();
  }

  async function firmwareView() {
    const { items } = await allPages("/v1/firmware?limit=1000", 10);
    const rows = items.map((fw) => h("tr", {},
      h("td", { class: "num" }, fw.id), h("td", {}, fw.model), h("td", {}, fw.version),
      h("td", { class: "num" }, `${(fw.size / 1024).toFixed(1)} KiB`),
      h("td", { class: "hide-sm", title: fw.sha256 }, `${fw.sha256.slice(0, 16)}…`),
      h("td", { class: "hide-sm" }, fmtTime(fw.created_at))));
    show(
      h("h1", {}, "Firmware"),
      h("div", { class: "panel table-wrap" },
        h("table", { id: "firmware-table" },
          h("thead", {}, h("tr", {}, h("th", { class: "num" }, "ID"), h("th", {}, "Model"),
            h("th", {}, "Version"), h("th", { class: "num" }, "Size"), h("th", { class: "hide-sm" }, "SHA-256"),
            h("th", { class: "hide-sm" }, "Uploaded"))),
          h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 6 }, "No firmware uploaded."))))),
    );
  }

  async function rolloutsView() {
    const body = await api("/v1/rollouts?limit=200");
    const rows = body.items.map((r) => h("tr", {},
      h("td", { class: "num" }, r.id),
      h("td", {}, h("a", { href: `#/rollouts/${r.id}` }, r.name)),
      h("td", {}, badge(r.status)),
      h("td", { class: "num" }, r.total),
      h("td", { class: "hide-sm" }, fmtTime(r.created_at))));
    show(
      h("div", { class: "rollout-head" }, h("h1", {}, "Rollouts"),
        canWrite() ? h("div", { class: "actions" }, h("a", { class: "button", href: "#/rollouts/new" }, "New rollout"))
          : null),
      h("div", { class: "panel table-wrap" },
        h("table", { id: "rollout-table" },
          h("thead", {}, h("tr", {}, h("th", { class: "num" }, "ID"), h("th", {}, "Name"), h("th", {}, "Status"),
            h("th", { class: "num" }, "Devices"), h("th", { class: "hide-sm" }, "Created"))),
          h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 5 }, "No rollouts yet."))))),
    );
  }

  async function auditView() {
    const filters = { action: "", actor: "", target: "", outcome: "" };
    const inputs = Object.fromEntries(Object.keys(filters).map((k) => [k, h("input", {
      id: `audit-${k}`, name: k,
      placeholder: { action: "rollout.*", actor: "api:ops", target: "rollout:7", outcome: "forbidden" }[k],
    })]));
    const table = h("div", { class: "panel table-wrap" });
    async function load() {
      const params = new URLSearchParams({ limit: "200" });
      for (const key of ["action", "actor", "outcome"]) if (inputs[key].value.trim()) params.set(key, inputs[key].value.trim());
      const target = inputs.target.value.trim();
      if (target) {
        const [kind, id] = target.split(":");
        params.set("target_kind", kind);
        if (id) params.set("target_id", id);
      }
      const body = await api(`/v1/audit?${params}`);
      fill(table, h("table", { id: "audit-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "When"), h("th", {}, "Actor"), h("th", {}, "Action"),
          h("th", {}, "Target"), h("th", {}, "Outcome"), h("th", { class: "hide-sm" }, "Detail"))),
        h("tbody", {}, body.items.length ? body.items.map((e) => h("tr", { "data-action": e.action },
          h("td", {}, fmtTime(e.created_at)), h("td", {}, e.actor), h("td", {}, e.action),
          h("td", {}, e.target_id ? `${e.target_kind}:${e.target_id}` : (e.target_kind || "—")),
          h("td", { class: e.outcome === "ok" ? "" : "error" }, e.outcome),
          h("td", { class: "hide-sm muted" }, e.detail ? Object.entries(e.detail).map(([k, v]) =>
            `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ") : "")))
          : h("tr", {}, h("td", { colspan: 6 }, "No entries.")))));
    }
    const form = h("form", { class: "panel form-grid", id: "audit-form", onsubmit: async (event) => {
      event.preventDefault();
      await load();
    } },
    ...Object.entries(inputs).map(([k, input]) => h("label", {}, k[0].toUpperCase() + k.slice(1), input)),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Filter")));
    show(h("h1", {}, "Audit log"),
      h("p", { class: "muted" }, "Every write through the API, whatever its outcome, and the engine's own " +
        "actions. Entries are never changed."), form, table);
    await load();
  }

  function parseLabels(text) {
    const labels = {};
    for (const part of text.split(/[,\n]/).map((s) => s.trim()).filter(Boolean)) {
      const at = part.indexOf(":");
      if (at <= 0) throw new Error(`label "${part}" must look like key:value`);
      labels[part.slice(0, at).trim()] = part.slice(at + 1).trim();
    }
    return labels;
  }

  function parseWaves(text) {
    const waves = text.split(/[,\s]+/).filter(Boolean).map((w) => (/^\d+$/.test(w) ? Number(w) : w));
    if (!waves.length) throw new Error("give at least one wave, e.g. 10%, 100%");
    return waves;
  }

  function parseWindow(line) {
    if (line.includes("..") && !line.includes(";")) {
      const [start, end] = line.split("..").map((t) => t.trim());
      return { start, end };
    }
    const [cron, duration, zone] = line.split(";").map((t) => t.trim());
    const match = /^(\d+(?:\.\d+)?)\s*([smhd]?)$/.exec(duration || "");
    if (!cron || !match) throw new Error(`window "${line}": write CRON;DURATION;ZONE, e.g. 0 2 * * mon-fri;2h;UTC`);
    const unit = { "": 1, s: 1, m: 60, h: 3600, d: 86400 }[match[2]];
    const spec = { cron, duration_s: Number(match[1]) * unit };
    if (zone) spec.timezone = zone;
    return spec;
  }

  async function newRolloutView() {
    const { items: all } = await allPages("/v1/firmware?limit=1000", 10);
    const firmware = all.filter((fw) => !fw.deprecated_at);  // a deprecated image takes no new rollout
    const groups = await api("/v1/groups");
    const field = (label, input, hint) => h("label", {}, label, input, hint ? h("small", {}, hint) : null);
    const fwSelect = h("select", { name: "firmware_id", id: "firmware_id", required: true },
      firmware.map((fw) => h("option", { value: fw.id }, `${fw.model} ${fw.version} (#${fw.id})`)));
    const name = h("input", { name: "name", id: "name", required: true, maxlength: 200 });
    const model = h("input", { name: "model", id: "target_model", placeholder: "sensor-v2" });
    const labels = h("input", { name: "labels", id: "target_labels", placeholder: "site:berlin, ring:beta" });
    const deviceIds = h("textarea", { name: "device_ids", id: "target_device_ids", rows: 3,
      placeholder: "sensor-000001 sensor-000002 …" });
    const waves = h("input", { name: "waves", id: "waves", value: "1%, 10%, 100%", required: true });
    const success = h("input", { name: "success_threshold", id: "success_threshold", type: "number",
      min: 0, max: 100, step: "any", value: 95, required: true });
    const failCount = h("input", { name: "failure_threshold_count", id: "failure_threshold_count",
      type: "number", min: 1, step: 1 });
    const failPercent = h("input", { name: "failure_threshold_percent", id: "failure_threshold_percent",
      type: "number", min: 0, max: 100, step: "any" });
    const inFlight = h("input", { name: "max_in_flight", id: "max_in_flight", type: "number", min: 1,
      step: 1, value: 1000, required: true });
    const tags = h("input", { name: "tags", id: "target_tags", placeholder: "pilot, berlin" });
    const versions = h("input", { name: "versions", id: "target_versions", placeholder: ">=1.0,<1.1" });
    const groupSelect = h("select", { name: "group", id: "target_group" },
      groups.map((g) => h("option", { value: g.name }, `${g.name} (${g.devices} devices)`)));
    const windows = h("textarea", { name: "windows", id: "windows", rows: 2,
      placeholder: "0 2 * * mon-fri;2h;Europe/Berlin" });
    const endAt = h("input", { name: "end_at", id: "end_at", type: "datetime-local" });
    const continuous = h("input", { name: "continuous", id: "continuous", type: "checkbox" });
    const soak = h("input", { name: "soak", id: "soak", type: "number", min: 1, step: "any" });
    const heartbeat = h("input", { name: "heartbeat", id: "soak_heartbeat", type: "number", min: 0.5, step: "any",
      value: 30 });
    const rate = h("input", { name: "rate", id: "rate", type: "number", min: 1, step: 1 });
    const rateFactor = h("input", { name: "rate_factor", id: "rate_factor", type: "number", min: 1, max: 10,
      step: "any", value: 2 });
    const rateEvery = h("input", { name: "rate_every", id: "rate_every", type: "number", min: 1, step: 1 });
    const rateMax = h("input", { name: "rate_max", id: "rate_max", type: "number", min: 1, step: 1 });
    const modeModel = h("input", { type: "radio", name: "mode", value: "model", checked: true, id: "mode_model" });
    const modeGroup = h("input", { type: "radio", name: "mode", value: "group", id: "mode_group",
      disabled: !groups.length });
    const modeIds = h("input", { type: "radio", name: "mode", value: "ids", id: "mode_ids" });
    const byModel = h("div", { class: "form-grid" },
      field("Model", model), field("Labels", labels, "all must match; key:value, comma separated"),
      field("Tags", tags, "operator tags, all must match"));
    const byGroup = h("div", {}, field("Group", groupSelect, "a saved filter (POST /v1/groups)"));
    const byIds = h("div", {}, field("Device IDs", deviceIds, "separated by spaces, commas or lines"));
    const syncMode = () => {
      byModel.hidden = !modeModel.checked;
      byGroup.hidden = !modeGroup.checked;
      byIds.hidden = !modeIds.checked;
    };
    for (const radio of [modeModel, modeGroup, modeIds]) radio.addEventListener("change", syncMode);
    const status = h("p", { class: "error", role: "alert", id: "form-error" });
    const submit = h("button", { type: "submit", id: "create-rollout" }, "Create and start");

    const form = h("form", {
      class: "stack panel",
      id: "rollout-form",
      onsubmit: async (event) => {
        event.preventDefault();
        status.textContent = "";
        let body;
        try {
          const target = {};
          if (modeModel.checked) {
            if (!model.value.trim()) throw new Error("give a model");
            target.model = model.value.trim();
            target.labels = parseLabels(labels.value);
            target.tags = tags.value.split(/[\s,]+/).filter(Boolean);
          } else if (modeGroup.checked) {
            target.group = groupSelect.value;
          } else {
            const ids = deviceIds.value.split(/[\s,]+/).filter(Boolean);
            if (!ids.length) throw new Error("give at least one device id");
            target.device_ids = ids;
          }
          const policy = {
            waves: parseWaves(waves.value),
            success_threshold: Number(success.value) / 100,
            max_in_flight: Number(inFlight.value),
          };
          if (failCount.value) policy.failure_threshold_count = Number(failCount.value);
          if (failPercent.value) policy.failure_threshold_percent = Number(failPercent.value);
          if (versions.value.trim()) target.versions = versions.value.trim();
          policy.windows = windows.value.split("\n").map((l) => l.trim()).filter(Boolean).map(parseWindow);
          if (endAt.value) policy.end_at = new Date(endAt.value).toISOString();
          if (continuous.checked) policy.continuous = true;
          if (soak.value) policy.soak = { duration_s: Number(soak.value), heartbeat_s: Number(heartbeat.value || 30) };
          if (rate.value) {
            policy.rate = { initial_per_minute: Number(rate.value), factor: Number(rateFactor.value || 2) };
            if (rateEvery.value) policy.rate.every_succeeded = Number(rateEvery.value);
            if (rateMax.value) policy.rate.max_per_minute = Number(rateMax.value);
          }
          body = { name: name.value.trim(), firmware_id: Number(fwSelect.value), target, policy };
        } catch (err) {
          status.textContent = err.message;
          return;
        }
        submit.disabled = true;
        try {
          const rollout = await api("/v1/rollouts", { method: "POST", body });
          location.hash = `#/rollouts/${rollout.id}`;
        } catch (err) {
          status.textContent = err.body && err.body.field ? `${err.message}` : err.message;
          submit.disabled = false;
        }
      },
    },
    h("h1", {}, "New rollout"),
    firmware.length ? null : h("p", { class: "notice" }, "Upload firmware first (POST /v1/firmware)."),
    h("div", { class: "form-grid" }, field("Name", name), field("Firmware", fwSelect)),
    h("fieldset", {}, h("legend", {}, "Target"),
      h("div", { class: "radio" }, h("label", {}, modeModel, "Model and labels"),
        h("label", {}, modeGroup, "Saved group"), h("label", {}, modeIds, "Device IDs")),
      byModel, byGroup, byIds,
      field("Running versions", versions, "optional PEP 440 constraint; others are skipped as incompatible")),
    h("fieldset", {}, h("legend", {}, "Policy"),
      h("div", { class: "form-grid" },
        field("Waves", waves, "cumulative percents or device counts, e.g. 1%, 10%, 100%"),
        field("Max in flight", inFlight, "devices updating at the same time"),
        field("Success threshold (%)", success, "share of a wave's finished devices that must succeed"),
        field("Halt after failures (count)", failCount, "optional"),
        field("Halt at failure rate (%)", failPercent, "optional; checked after 10 devices finished"))),
    h("fieldset", {}, h("legend", {}, "Schedule and pace"),
      h("div", { class: "form-grid" },
        field("Maintenance windows", windows,
          "install only inside: one per line, CRON;DURATION;ZONE or START..END; empty: any time"),
        field("End at", endAt, "no offer after this (your local time); devices not reached are skipped"),
        field("Rate (offers/min)", rate, "optional; starts here"),
        field("Rate factor", rateFactor, "multiplied on each step"),
        field("Step every … successes", rateEvery, "optional"),
        field("Max rate (offers/min)", rateMax, "optional"),
        field("Soak (seconds)", soak, "optional: each device must stay healthy this long, else it rolls back"),
        field("Heartbeat (seconds)", heartbeat, "how often a soaking device reports health"),
        h("label", { class: "check" }, continuous, "Continuous: devices that match later join, until the end"))),
    status,
    h("div", { class: "actions" }, submit),
    );
    show(form);
    syncMode();
    name.focus();
  }

  // ------------------------------------------------------------------ rollout page (live)
  const ACTIONS = {
    pause: {
      label: "Pause",
      allowed: ["RUNNING"],
      title: "Pause this rollout?",
      text: "Pausing only affects devices that have not started yet: they will not be offered the update " +
        "until you resume. Devices already downloading or installing finish their update.",
    },
    resume: {
      label: "Resume",
      allowed: ["PAUSED"],
      title: "Resume this rollout?",
      text: "Resuming offers the update again to devices that have not started yet, wave by wave.",
    },
    abort: {
      label: "Abort",
      allowed: ["SCHEDULED", "RUNNING", "PAUSED"],
      title: "Abort this rollout?",
      text: "Aborting cancels the update only for devices that have not started yet. Devices already " +
        "downloading or installing finish their update. An aborted rollout cannot be resumed.",
    },
  };

  async function rolloutView(rolloutId) {
    const state = { detail: null, summary: null, renderQueued: false, error: null };
    const head = h("div", { class: "rollout-head" });
    const overview = h("div", { class: "panel", id: "rollout-summary" });
    const wavesPanel = h("div", { class: "panel" });
    const message = h("div", { id: "action-error" });
    const devices = views.rolloutDevices(rolloutId, message);
    const chart = views.progressChart(rolloutId);
    show(head, message, overview, chart.node, wavesPanel, devices.node);

    function current() {
      // The retained summary is the live truth; the REST detail fills in until it arrives.
      const d = state.detail || {};
      const s = state.summary || {};
      return {
        name: s.name || d.name || `Rollout ${rolloutId}`,
        status: s.status || d.status || "…",
        total: s.total ?? d.total ?? 0,
        counts: s.counts || d.counts || {},
        percent: s.percent ?? d.percent ?? 0,
        waves: s.waves || d.waves || [],
        current_wave: s.current_wave ?? d.current_wave ?? null,
        eta_seconds: s.eta_seconds ?? d.eta_seconds ?? null,
        pacing: s.ts ? (s.pacing ?? null) : (d.pacing ?? null),
        skipped: s.skipped || d.skipped || {},
        ts: s.ts || null,
      };
    }

    function actionButtons(status) {
      return Object.entries(ACTIONS).map(([action, spec]) => h("button", {
        type: "button",
        id: `action-${action}`,
        class: action === "abort" ? "danger" : "secondary",
        disabled: !spec.allowed.includes(status),
        onclick: async () => {
          if (!(await confirmAction(spec.title, spec.text, spec.label))) return;
          message.replaceChildren();
          try {
            state.detail = Object.assign({}, state.detail || {}, await api(
              `/v1/rollouts/${rolloutId}/${action}`, { method: "POST" }));
            if (state.summary) state.summary.status = state.detail.status;
            render();
          } catch (err) {
            message.replaceChildren(errorBox(err));
          }
        },
      }, spec.label));
    }

    function render() {
      state.renderQueued = false;
      const c = current();
      fill(head, 
        h("h1", { id: "rollout-name" }, c.name),
        h("span", { id: "rollout-status", "data-status": c.status }, badge(c.status)),
        canWrite() ? h("div", { class: "actions" }, actionButtons(c.status)) : null,
      );
      const ended = Object.entries(c.counts).filter(([k]) => END_STATES.has(k)).reduce((a, [, v]) => a + v, 0);
      const countNodes = STATE_ORDER.filter((k) => c.counts[k]).map((k) =>
        h("div", { class: "count", "data-state": k }, h("b", { "data-count": k }, c.counts[k]), h("span", {}, k)));
      overview.dataset.source = state.summary ? "mqtt" : (state.detail ? "api" : "none");
      overview.dataset.ts = c.ts || "";
      const detail = state.detail;
      fill(overview, 
        h("div", { class: "bar-label" },
          h("span", {}, h("b", { id: "rollout-percent" }, fmtPercent(c.percent)), " done"),
          h("span", { class: "muted" }, `${ended} / ${c.total} devices · ETA `,
            h("span", { id: "rollout-eta" }, c.status === "RUNNING" ? fmtEta(c.eta_seconds) : "—"))),
        bar(c.percent / 100, { big: true, busy: c.status === "RUNNING" }),
        h("h2", { style: "margin-top:1rem" }, "Devices per state"),
        h("div", { class: "counts", id: "rollout-counts" },
          countNodes.length ? countNodes : h("span", { class: "muted" }, "no devices yet")),
        detail && detail.reason ? h("p", { class: "notice" }, `Reason: ${detail.reason}`) : null,
        pacingNodes(c.pacing, c.skipped, detail && detail.policy),
        detail ? h("div", { class: "kv muted", style: "margin-top:1rem" },
          h("span", {}, "Firmware"), h("span", {}, `#${detail.firmware_id}`),
          h("span", {}, "Target"), h("span", {}, targetText(detail.target)),
          h("span", {}, "Started"), h("span", {}, fmtTime(detail.started_at))) : null,
      );
      fill(wavesPanel, 
        h("h2", {}, "Waves"),
        h("div", { class: "waves", id: "rollout-waves" }, c.waves.map((w) => h("div", { "data-wave": w.index },
          h("div", { class: "bar-label" },
            h("span", {}, `Wave ${w.index + 1} `, badge(w.status)),
            h("span", { class: "muted" }, `${w.done} / ${w.size} done · ${w.succeeded} succeeded`,
              views.waveTiming(w))),
          bar(w.size ? w.done / w.size : 0, { busy: w.status === "RUNNING" })))),
      );
      devices.setCounts(c.counts, c.total);
      chart.live(c.counts, c.ts, ["RUNNING", "PAUSED"].includes(c.status));
    }

    function scheduleRender() {
      if (state.renderQueued) return;
      state.renderQueued = true;
      requestAnimationFrame(render);
    }

    const summaryTopic = `fleet/v1/portal/rollouts/${rolloutId}`;
    const unsubscribe = subscribe([summaryTopic], (_topic, doc) => {
      if (doc && (!state.summary || doc.ts >= state.summary.ts)) state.summary = doc;
      scheduleRender();
    });
    render();
    ensureMqtt().catch((err) => message.replaceChildren(errorBox(`live updates unavailable: ${err.message}`)));
    try {
      state.detail = await api(`/v1/rollouts/${rolloutId}`);
      scheduleRender();
      await Promise.all([devices.load(), chart.load()]);
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
    return () => {
      devices.stop();
      chart.stop();
      unsubscribe();
    };
  }

  const views = window.fleetDeviceViews({
    h, fill, show, badge, bar, fmtTime, api, errorBox, confirmAction, canWrite, subscribe, END_STATES, STATE_ORDER,
  });

  // ------------------------------------------------------------------ routing
  let leave = null;
  let generation = 0;

  async function route() {
    const mine = ++generation;
    if (leave) {
      leave();
      leave = null;
    }
    if (!token()) {
      logout("");
      return;
    }
    document.getElementById("nav").hidden = false;
    document.getElementById("logout").hidden = false;
    try {
      await whoAmI();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) show(errorBox(err));
      return;
    }
    const hash = location.hash.replace(/^#/, "") || "/";
    const parts = hash.split("/").filter(Boolean);
    let nav = "overview";
    try {
      if (parts[0] === "firmware") {
        nav = "firmware";
        markNav(nav);
        await firmwareView();
      } else if (parts[0] === "devices" && parts[1]) {
        markNav(nav);
        const stop = await views.deviceView(decodeURIComponent(parts[1]));
        if (mine === generation) leave = stop;
        else stop();
      } else if (parts[0] === "audit") {
        nav = "audit";
        markNav(nav);
        await auditView();
      } else if (parts[0] === "rollouts" && parts[1] === "new" && !canWrite()) {
        show(h("h1", {}, "New rollout"), h("p", { class: "notice", id: "viewer-notice" },
          "This token is a viewer: it can watch rollouts but not create them. Sign in with an operator token."));
      } else if (parts[0] === "rollouts" && parts[1] === "new") {
        nav = "new";
        markNav(nav);
        await newRolloutView();
      } else if (parts[0] === "rollouts" && /^\d+$/.test(parts[1] || "")) {
        nav = "rollouts";
        markNav(nav);
        const unsubscribe = await rolloutView(Number(parts[1]));
        if (mine === generation) leave = unsubscribe;
        else unsubscribe();
      } else if (parts[0] === "rollouts") {
        nav = "rollouts";
        markNav(nav);
        await rolloutsView();
      } else {
        markNav(nav);
        await overviewView();
      }
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) show(errorBox(err));
    }
  }

  function markNav(active) {
    for (const link of document.querySelectorAll("[data-nav]")) {
      link.classList.toggle("active", link.dataset.nav === active);
    }
  }

  document.getElementById("logout").addEventListener("click", () => logout("Signed out."));
  window.addEventListener("hashchange", route);
  route();
})();
