// fleet web portal: device lists paged on the server, the device page, and the rollout progress
// chart. Loaded before app.js, which calls window.fleetDeviceViews(ui) with its shared helpers.
"use strict";

window.fleetDeviceViews = function (ui) {
  const { h, fill, badge, bar, fmtTime, api, errorBox, confirmAction, canWrite, subscribe } = ui;
  const PAGE_SIZES = [25, 50, 100, 200];
  const IN_FLIGHT = ["OFFERED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "INSTALLING", "REBOOTING",
    "SOAKING", "ROLLING_BACK"];
  const FAILED = ["FAILED", "TIMED_OUT", "ROLLED_BACK"];

  const DEVICE_ACTIONS = {
    retry: {
      label: "Retry",
      states: ["FAILED", "TIMED_OUT"],
      title: (d) => `Retry ${d}?`,
      text: "The device gets a new attempt in this rollout, offered as the policy allows. A device that " +
        "failed while installing is not retried: it never installs the same update twice.",
      done: "new attempt queued",
    },
    cancel: {
      label: "Cancel",
      states: ["PENDING", "QUEUED"],
      title: (d) => `Cancel ${d}'s update?`,
      text: "The device has not been offered the update yet and will not be. This cannot be undone.",
      done: "canceled",
    },
    stop: {
      label: "Stop",
      states: ["OFFERED", "DOWNLOADING", "DOWNLOADED", "VERIFIED"],
      title: (d) => `Ask ${d} to stop?`,
      text: "The device drops the download and its update ends CANCELED. If it has already begun " +
        "installing by the time it hears this, the install finishes: an install is never interrupted.",
      done: "stop requested",
    },
  };

  function toMs(value) {
    if (value === null || value === undefined) return null;
    return typeof value === "number" ? value * 1000 : Date.parse(value);
  }

  function fmtDuration(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function deviceLink(id) {
    return h("a", { href: `#/devices/${encodeURIComponent(id)}`, "data-device-link": id }, id);
  }

  function presence(online) {
    if (online === null || online === undefined) return h("span", { class: "muted" }, "—");
    return h("span", { class: `presence ${online ? "on" : "off"}` }, online ? "online" : "offline");
  }

  // ------------------------------------------------------------------ paging over the API
  // Filters and cursors of one list; `load()` fetches the current page, `next()`/`prev()` move.
  function pager(path, pageSize) {
    const p = { filters: {}, cursors: [null], index: 0, size: pageSize, items: [], nextCursor: null, seq: 0 };
    p.url = () => {
      const params = new URLSearchParams({ limit: String(p.size) });
      for (const [key, value] of Object.entries(p.filters)) if (value !== "") params.set(key, value);
      const cursor = p.cursors[p.index];
      if (cursor) params.set("cursor", cursor);
      return `${path}?${params}`;
    };
    // Always fetches what the page asks for now; an answer overtaken by a later request (a poll
    // racing a click on Next) is dropped, so items, cursor and page label never disagree.
    p.load = async () => {
      const mine = ++p.seq;
      const body = await api(p.url());
      if (mine !== p.seq) return false;
      p.items = body.items;
      p.nextCursor = body.next_cursor;
      return true;
    };
    p.reset = (filters) => {
      p.filters = filters;
      p.cursors = [null];
      p.index = 0;
    };
    p.next = () => {
      if (!p.nextCursor) return false;
      p.cursors = p.cursors.slice(0, p.index + 1).concat([p.nextCursor]);
      p.index += 1;
      return true;
    };
    p.prev = () => {
      if (p.index === 0) return false;
      p.index -= 1;
      return true;
    };
    return p;
  }

  // A filter form whose fields map to query parameters; calls apply(filters) on submit or change.
  function filterForm(id, fields, apply) {
    const inputs = {};
    const nodes = fields.map(([param, label, kind, options]) => {
      const input = kind === "select"
        ? h("select", { id: `${id}-${param}`, name: param }, options.map(([value, text]) => h("option", { value }, text)))
        : h("input", { id: `${id}-${param}`, name: param, placeholder: options || "" });
      inputs[param] = input;
      if (kind === "select") input.addEventListener("change", () => apply(values()));
      return h("label", {}, label, input);
    });
    const values = () => Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value.trim()]));
    const form = h("form", { class: "filters", id, onsubmit: (event) => {
      event.preventDefault();
      apply(values());
    } }, nodes, h("div", { class: "actions" }, h("button", { type: "submit", class: "secondary" }, "Filter")));
    return { form, values };
  }

  function pagerControls(p, idPrefix, go, total) {
    const from = p.items.length ? p.index * p.size + 1 : 0;
    const to = p.index * p.size + p.items.length;
    const of = total === null || total === undefined ? "" : ` of ${total}`;
    const size = h("select", { id: `${idPrefix}-size`, "aria-label": "rows per page" },
      PAGE_SIZES.map((n) => h("option", { value: n, selected: n === p.size }, `${n} / page`)));
    size.addEventListener("change", () => {
      p.size = Number(size.value);
      p.cursors = [null];
      p.index = 0;
      go();
    });
    return h("div", { class: "pager" },
      h("button", { type: "button", class: "secondary small", id: `${idPrefix}-prev`, disabled: p.index === 0,
        onclick: () => p.prev() && go() }, "‹ Previous"),
      h("span", { id: `${idPrefix}-info`, class: "muted" },
        p.items.length ? `Page ${p.index + 1} · ${from}–${to}${of}` : "No devices match."),
      h("button", { type: "button", class: "secondary small", id: `${idPrefix}-next`, disabled: !p.nextCursor,
        onclick: () => p.next() && go() }, "Next ›"),
      size);
  }

  // ------------------------------------------------------------------ a rollout's devices
  // Server-side filtered and paged; rows on the page follow their live portal documents.
  function rolloutDevices(rolloutId, message) {
    const p = pager(`/v1/rollouts/${rolloutId}/devices`, 50);
    const live = new Map();
    let unsubscribe = () => {};
    let counts = {};
    let total = 0;
    const body = h("div", {});
    const title = h("h2", {}, "Devices");
    const states = [["", "any state"], ...ui.STATE_ORDER.map((s) => [s, s])];
    const { form } = filterForm("device-filters", [
      ["state", "State", "select", states],
      ["q", "Device id", "text", "part of the id"],
      ["error_code", "Error", "text", "e.g. checksum_mismatch"],
      ["online", "Presence", "select", [["", "any"], ["true", "online"], ["false", "offline"]]],
      ["model", "Model", "text", "sensor-v2"],
      ["version", "Running version", "text", "1.0.0"],
      ["tag", "Tag", "text", "pilot"],
    ], (filters) => {
      p.reset(filters);
      load();
    });
    const node = h("div", { class: "panel", id: "devices-panel" }, title, form, body);

    function matching() {
      const active = Object.entries(p.filters).filter(([, v]) => v !== "");
      if (!active.length) return total;
      if (active.length === 1 && active[0][0] === "state") return counts[active[0][1]] || 0;
      return null;  // other filters: the count is not known without a query
    }

    function shown(item) {
      const doc = live.get(item.device_id);
      if (!doc || doc.ts * 1000 < Date.parse(item.updated_at)) return item;
      return { ...item, state: doc.state, progress: doc.progress, attempt: doc.attempt,
        error_code: doc.error || item.error_code, running_version: doc.running_version || item.running_version };
    }

    function actionButton(row) {
      const found = Object.entries(DEVICE_ACTIONS).find(([, spec]) => spec.states.includes(row.state));
      if (!found) return null;
      const [name, spec] = found;
      return h("button", {
        type: "button",
        class: name === "retry" ? "secondary small" : "danger small",
        "data-device-action": name,
        "data-device": row.device_id,
        onclick: async () => {
          if (!(await confirmAction(spec.title(row.device_id), spec.text, spec.label))) return;
          message.replaceChildren();
          try {
            const answer = await api(
              `/v1/rollouts/${rolloutId}/devices/${encodeURIComponent(row.device_id)}/${name}`, { method: "POST" });
            message.replaceChildren(h("p", { class: "notice", id: "device-action-result" },
              `${row.device_id}: ${spec.done} (${answer.state}, attempt ${answer.attempt})`));
            live.delete(row.device_id);
            await load();
          } catch (err) {
            message.replaceChildren(errorBox(err));
          }
        },
      }, spec.label);
    }

    function render() {
      const rows = p.items.map(shown);
      const known = matching();
      title.textContent = known === null ? "Devices" : `Devices (${known})`;
      fill(body,
        h("div", { class: "table-wrap" }, h("table", { id: "device-table" },
          h("thead", {}, h("tr", {}, h("th", {}, "Device"), h("th", {}, "State"), h("th", {}, "Progress"),
            h("th", { class: "num hide-sm" }, "Attempt"), h("th", { class: "hide-sm" }, "Running"),
            h("th", { class: "hide-sm" }, "Presence"), h("th", {}, "Error"), canWrite() ? h("th", {}, "Actions") : null)),
          h("tbody", {}, rows.map((d) => h("tr", { "data-device": d.device_id, "data-state": d.state },
            h("td", {}, deviceLink(d.device_id)),
            h("td", {}, badge(d.state)),
            h("td", {}, bar((d.progress || 0) / 100, { mini: true, busy: !ui.END_STATES.has(d.state) }),
              h("span", {}, `${d.progress || 0}%`)),
            h("td", { class: "num hide-sm" }, d.attempt),
            h("td", { class: "hide-sm" }, d.running_version || "—"),
            h("td", { class: "hide-sm" }, presence(d.online)),
            h("td", { class: d.error_code ? "error" : "muted" }, d.error_code || "—"),
            canWrite() ? h("td", { class: "row-actions" }, actionButton(d)) : null))))),
        pagerControls(p, "devices-page", load, known));
    }

    function follow() {
      unsubscribe();
      const base = `fleet/v1/portal/rollouts/${rolloutId}/devices/`;
      const topics = p.items.map((item) => base + item.device_id);
      live.clear();
      unsubscribe = topics.length ? subscribe(topics, (topic, doc) => {
        const id = topic.slice(base.length);
        const known = live.get(id);
        if (doc && (!known || doc.ts >= known.ts)) live.set(id, doc);
        schedule();
      }) : () => {};
    }

    let queued = false;
    function schedule() {
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => {
        queued = false;
        render();
      });
    }

    async function load() {
      const before = p.items.map((i) => i.device_id).join(",");
      if (!(await p.load())) return;
      if (p.items.map((i) => i.device_id).join(",") !== before) follow();
      render();
    }

    const poll = setInterval(() => {
      if (!document.hidden) load().catch(() => {});
    }, 3000);
    return {
      node,
      load,
      setCounts(summaryCounts, summaryTotal) {
        counts = summaryCounts || {};
        total = summaryTotal || 0;
        const known = matching();
        if (known !== null) title.textContent = `Devices (${known})`;
      },
      stop() {
        clearInterval(poll);
        unsubscribe();
      },
    };
  }

  // ------------------------------------------------------------------ fleet page: every device
  function fleetDevices() {
    const p = pager("/v1/devices", 50);
    const body = h("div", {});
    const { form } = filterForm("fleet-filters", [
      ["q", "Device id", "text", "part of the id"],
      ["model", "Model", "text", "sensor-v2"],
      ["version", "Version", "text", "1.0.0"],
      ["online", "Presence", "select", [["", "any"], ["true", "online"], ["false", "offline"]]],
      ["tag", "Tag", "text", "pilot"],
    ], (filters) => {
      p.reset(filters);
      load().catch((err) => fill(body, errorBox(err)));
    });
    async function load() {
      if (!(await p.load())) return;
      fill(body,
        h("div", { class: "table-wrap" }, h("table", { id: "fleet-devices" },
          h("thead", {}, h("tr", {}, h("th", {}, "Device"), h("th", {}, "Model"), h("th", {}, "Version"),
            h("th", {}, "Presence"), h("th", { class: "hide-sm" }, "Tags"), h("th", { class: "hide-sm" }, "Last seen"))),
          h("tbody", {}, p.items.map((d) => h("tr", { "data-device": d.id },
            h("td", {}, deviceLink(d.id)), h("td", {}, d.model), h("td", {}, d.firmware_version),
            h("td", {}, presence(d.online)), h("td", { class: "hide-sm" }, (d.tags || []).join(", ") || "—"),
            h("td", { class: "hide-sm" }, fmtTime(d.last_seen))))))),
        pagerControls(p, "fleet-page", () => load().catch((err) => fill(body, errorBox(err))), null));
    }
    return { node: h("div", { class: "panel", id: "fleet-devices-panel" }, h("h2", {}, "Devices"), form, body), load };
  }

  // ------------------------------------------------------------------ the device page
  function eventText(e) {
    const move = e.from_state || e.to_state ? `${e.from_state || "—"} → ${e.to_state || "—"}` : "";
    const detail = e.detail ? Object.entries(e.detail).filter(([, v]) => v !== null && v !== "")
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ") : "";
    return [move, e.attempt ? `attempt ${e.attempt}` : "", detail].filter(Boolean).join(" · ");
  }

  async function deviceView(deviceId) {
    const head = h("div", { class: "rollout-head" });
    const facts = h("div", { class: "panel" });
    const updates = h("div", { class: "panel" });
    const timeline = h("div", { class: "panel" });
    const message = h("div", {});
    ui.show(head, message, facts, updates, timeline);

    async function load() {
      const d = await api(`/v1/devices/${encodeURIComponent(deviceId)}?history=50&events=200`);
      fill(head, h("h1", { id: "device-name" }, d.id), h("span", { id: "device-online" }, presence(d.online)));
      const labels = Object.entries(d.labels || {}).map(([k, v]) => `${k}:${v}`).join(", ");
      fill(facts, h("div", { class: "kv" },
        h("span", {}, "Model"), h("span", {}, d.model),
        h("span", {}, "Running"), h("span", { id: "device-version" }, d.firmware_version),
        h("span", {}, "Slot"), h("span", {}, d.slot || "—"),
        h("span", {}, "Agent"), h("span", {}, d.agent_version || "—"),
        h("span", {}, "Last seen"), h("span", {}, fmtTime(d.last_seen)),
        h("span", {}, "Labels"), h("span", {}, labels || "—"),
        h("span", {}, "Tags"), h("span", { id: "device-tags" }, (d.tags || []).join(", ") || "—"),
        h("span", {}, "Registered"), h("span", {}, fmtTime(d.created_at))));
      fill(updates, h("h2", {}, "Updates"),
        d.updates.length ? h("div", { class: "table-wrap" }, h("table", { id: "device-updates" },
          h("thead", {}, h("tr", {}, h("th", {}, "Rollout"), h("th", {}, "Firmware"), h("th", {}, "State"),
            h("th", { class: "num" }, "Attempt"), h("th", {}, "Error"), h("th", { class: "hide-sm" }, "Offered"),
            h("th", { class: "hide-sm" }, "Ended"))),
          h("tbody", {}, d.updates.map((u) => h("tr", { "data-rollout": u.rollout_id },
            h("td", {}, h("a", { href: `#/rollouts/${u.rollout_id}` }, `#${u.rollout_id} ${u.rollout_name}`)),
            h("td", {}, u.firmware_version), h("td", {}, badge(u.state)), h("td", { class: "num" }, u.attempt),
            h("td", { class: u.error_code ? "error" : "muted" }, u.error_code || "—"),
            h("td", { class: "hide-sm" }, fmtTime(u.offered_at)), h("td", { class: "hide-sm" }, fmtTime(u.finished_at)))))))
          : h("p", { class: "muted" }, "No rollout has included this device."));
      fill(timeline, h("h2", {}, `Timeline (latest ${d.events.length} events)`),
        d.events.length ? h("ol", { class: "timeline", id: "device-timeline" }, d.events.map((e) =>
          h("li", { "data-event": e.name, "data-kind": e.kind, class: e.accepted ? "" : "rejected" },
            h("time", { datetime: e.created_at }, fmtTime(e.created_at)),
            h("b", {}, e.kind === "report" ? `reported ${e.name}` : e.name.replaceAll("_", " ")),
            e.rollout_id ? h("a", { href: `#/rollouts/${e.rollout_id}`, class: "muted" }, ` rollout #${e.rollout_id}`) : null,
            h("span", { class: "muted" }, eventText(e)))))
          : h("p", { class: "muted" }, "No events recorded (or older than the retention age)."));
    }

    await load();
    const poll = setInterval(() => {
      if (!document.hidden) load().catch((err) => message.replaceChildren(errorBox(err)));
    }, 5000);
    return () => clearInterval(poll);
  }

  // ------------------------------------------------------------------ progress chart
  // Succeeded, failed and in flight over time: history from the events API, the newest point
  // from the live summary. Plain SVG, drawn here.
  const SERIES = [["succeeded", "Succeeded"], ["failed", "Failed"], ["in_flight", "In flight"]];

  function progressChart(rolloutId) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("id", "progress-svg");
    svg.setAttribute("viewBox", "0 0 600 160");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const legend = h("div", { class: "legend", id: "chart-legend" });
    const axis = h("div", { class: "axis muted" });
    const node = h("div", { class: "panel", id: "progress-chart" }, h("h2", {}, "Progress over time"), svg, axis, legend);
    let history = [];
    let latest = null;
    let wasRunning = false;

    function draw() {
      const points = latest ? history.concat([latest]) : history;
      const ns = "http://www.w3.org/2000/svg";
      svg.replaceChildren();
      if (points.length < 2) {
        fill(axis, "Waiting for the first minute of progress…");
        return;
      }
      const t0 = points[0].t;
      const span = Math.max(1, points[points.length - 1].t - t0);
      const top = Math.max(1, ...points.map((p) => Math.max(p.succeeded, p.failed, p.in_flight)));
      for (let i = 1; i <= 3; i++) {
        const line = document.createElementNS(ns, "line");
        const y = 150 - (140 * i) / 4;
        for (const [k, v] of Object.entries({ x1: 0, x2: 600, y1: y, y2: y, class: "grid-line" })) line.setAttribute(k, v);
        svg.append(line);
      }
      for (const [key] of SERIES) {
        const line = document.createElementNS(ns, "polyline");
        line.setAttribute("data-series", key);
        line.setAttribute("class", `series s-${key}`);
        line.setAttribute("points", points.map((p) =>
          `${((p.t - t0) / span * 600).toFixed(1)},${(150 - (p[key] / top) * 140).toFixed(1)}`).join(" "));
        svg.append(line);
      }
      fill(axis, h("span", {}, new Date(t0).toLocaleTimeString()), h("span", {}, `max ${top}`),
        h("span", {}, new Date(points[points.length - 1].t).toLocaleTimeString()));
      const last = points[points.length - 1];
      fill(legend, SERIES.map(([key, label]) => h("span", { "data-series": key, class: `key s-${key}` },
        `${label}: ${last[key]}`)));
    }

    async function load() {
      const body = await api(`/v1/rollouts/${rolloutId}/progress?bucket_s=10`);
      history = body.points.map((p) => ({ t: Date.parse(p.at), succeeded: p.succeeded, failed: p.failed,
        in_flight: p.in_flight }));
      draw();
    }

    const poll = setInterval(() => {
      if (!document.hidden) load().catch(() => {});
    }, 15000);
    return {
      node,
      load,
      live(counts, ts, running) {
        if (!running) {
          // Just ended: the history now reaches the end; the live point is no longer needed.
          if (wasRunning) load().then(() => { latest = null; draw(); }).catch(() => {});
          wasRunning = false;
          return;
        }
        wasRunning = true;
        if (!counts) return;
        const sum = (keys) => keys.reduce((a, k) => a + (counts[k] || 0), 0);
        latest = { t: ts ? ts * 1000 : Date.now(), succeeded: counts.SUCCEEDED || 0, failed: sum(FAILED),
          in_flight: sum(IN_FLIGHT) };
        draw();
      },
      stop() {
        clearInterval(poll);
      },
    };
  }

  function waveTiming(w) {
    const start = toMs(w.started_at);
    if (start === null) return null;
    const end = toMs(w.finished_at);
    const text = end === null ? `running for ${fmtDuration(Date.now() - start)}` : `took ${fmtDuration(end - start)}`;
    return h("span", { class: "muted", "data-wave-duration": w.index }, ` · ${text}`);
  }

  return { rolloutDevices, fleetDevices, deviceView, progressChart, waveTiming };
};
