// The agents page: one row per agent, refreshed every few seconds.
"use strict";
(() => {
  const tbody = document.querySelector("#agents tbody");
  const sparks = new Map();  // agent id -> the sparkline's box (kept across refreshes)

  function drops(d) {
    const parts = [];
    for (const [k, v] of Object.entries(d || {})) {
      if (typeof v === "number" && v > 0) parts.push(k + "=" + v);
    }
    return parts.length ? parts.join(", ") : "none";
  }

  function render(doc) {
    const rows = [];
    for (const a of doc.agents) {
      const tr = ft.el("tr", { "data-agent": a.id, "data-state": a.state });
      const link = ft.el("a", { href: "/console/agent?id=" + encodeURIComponent(a.id), "class": "agent-link" }, a.id);
      const name = ft.el("td", { "data-col": "agent" });
      name.appendChild(link);
      tr.appendChild(name);
      const st = ft.el("td", { "data-col": "state" });
      st.appendChild(ft.el("span", { "class": "state state-" + a.state }, a.state));
      tr.appendChild(st);
      tr.appendChild(ft.el("td", { "data-col": "last_seen" }, ft.ago(a.last_seen, doc.now)));
      const backlog = a.backlog === null || a.backlog === undefined ? "-" :
        String(a.backlog) + (typeof a.backlog_age === "number" ? " (oldest " + ft.age(a.backlog_age) + ")" : "");
      tr.appendChild(ft.el("td", { "data-col": "backlog", "class": "num" }, backlog));
      tr.appendChild(ft.el("td", { "data-col": "upload", "class": "num" },
        typeof a.upload_bps === "number" ? ft.bytes(a.upload_bps) + "/s" : "-"));
      tr.appendChild(ft.el("td", { "data-col": "wire", "class": "num", "data-wire": a.wire_bytes, "data-raw": a.raw_bytes },
        ft.bytes(a.wire_bytes) + " / " + ft.bytes(a.raw_bytes) + (typeof a.ratio === "number" ? " (" + a.ratio.toFixed(1) + "x)" : "")));
      tr.appendChild(ft.el("td", { "data-col": "rung" }, a.rung || "-"));
      tr.appendChild(ft.el("td", { "data-col": "drops" }, drops(a.drops)));
      const cell = ft.el("td", { "data-col": "spark" });
      let box = sparks.get(a.id);
      if (!box) { box = ft.el("div", { "class": "spark" }); sparks.set(a.id, box); }
      cell.appendChild(box);
      tr.appendChild(cell);
      rows.push([tr, box, a]);
    }
    tbody.replaceChildren(...rows.map((r) => r[0]));
    const t0 = doc.now - doc.spark_range_s, step = doc.spark_bucket_s;
    const times = [];
    for (let t = Math.floor(t0 / step) * step; t <= doc.now; t += step) times.push(t);
    for (const [, box, a] of rows) {
      const byT = new Map((a.spark || []).map(([t, b]) => [t, b]));
      ft.spark(box, times, times.map((t) => byT.get(t) || 0));
    }
    const s = doc.states || {};
    document.getElementById("summary").textContent =
      doc.agents.length + " agents: " + ["alive", "late", "silent", "never", "revoked"]
        .filter((k) => s[k]).map((k) => s[k] + " " + k).join(", ") +
      " (late after " + doc.late_s + " s, silent after " + doc.silent_s + " s)" +
      (doc.store_error ? " — store: " + doc.store_error : "");
    const rt = document.querySelector("#rungs tbody");
    rt.replaceChildren(...Object.entries(doc.rungs || {}).map(([name, r]) => {
      const tr = ft.el("tr", { "data-rung": name });
      tr.appendChild(ft.el("td", {}, name));
      for (const k of ["requests", "acked", "refused"]) tr.appendChild(ft.el("td", { "class": "num" }, r[k] || 0));
      tr.appendChild(ft.el("td", { "class": "num" }, ft.bytes(r.bytes_in || 0)));
      tr.appendChild(ft.el("td", { "class": "num" }, ft.bytes(r.bytes_out || 0)));
      return tr;
    }));
  }

  // The udp-forward mapping: what the collector shows as an exporter -> agent, original exporter.
  function renderSources(doc) {
    const tb = document.querySelector("#sources tbody");
    tb.replaceChildren(...doc.sources.map((r) => {
      const tr = ft.el("tr", { "data-source": r.source_address + ":" + r.source_port });
      const host = String(r.source_address).includes(":") ? "[" + r.source_address + "]" : r.source_address;
      tr.appendChild(ft.el("td", { "data-col": "source" }, host + ":" + r.source_port));
      const cell = ft.el("td", { "data-col": "agent" });
      cell.appendChild(ft.el("a", { href: "/console/agent?id=" + encodeURIComponent(r.agent), "class": "agent-link" }, r.agent));
      tr.appendChild(cell);
      tr.appendChild(ft.el("td", { "data-col": "exporter" }, r.exporter));
      tr.appendChild(ft.el("td", { "data-col": "mode" }, r.mode));
      return tr;
    }));
  }

  ft.poll(async () => {
    render(await ft.getJSON("/console/api/agents"));
    let sources;
    try {
      sources = await ft.getJSON("/console/api/sources");  // a failure here leaves the agents shown
    } catch (e) {
      return "sources: " + String(e.message || e);
    }
    renderSources(sources);
    return sources.error ? "sources: " + sources.error : "";
  }, 3000);
})();
