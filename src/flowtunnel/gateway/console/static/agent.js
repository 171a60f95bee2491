// One agent: its figures, its exporters (the store's exporter_stats) and its flow history per exporter.
"use strict";
(() => {
  const id = new URLSearchParams(window.location.search).get("id") || "";
  const range = document.getElementById("range");
  document.getElementById("agent-id").textContent = id;
  document.title = "flowtunnel console — agent " + id;

  function fact(dl, name, value) {
    dl.appendChild(ft.el("dt", {}, name));
    dl.appendChild(ft.el("dd", { "data-fact": name }, value));
  }

  function render(doc) {
    const a = doc.agent;
    const st = document.getElementById("agent-state");
    st.textContent = a.state;
    st.className = "state state-" + a.state;
    const dl = document.getElementById("agent-facts");
    dl.textContent = "";
    fact(dl, "last seen", ft.ago(a.last_seen, doc.now));
    fact(dl, "acked datagrams", a.acked);
    fact(dl, "datagrams", a.datagrams);
    fact(dl, "records stored", a.records === null ? "-" : a.records);
    fact(dl, "backlog", a.backlog === null ? "-" : a.backlog +
      (typeof a.backlog_age === "number" ? " (oldest waiting " + ft.age(a.backlog_age) + ")" : ""));
    fact(dl, "upload", typeof a.upload_bps === "number" ? ft.bytes(a.upload_bps) + "/s" : "-");
    fact(dl, "wire / raw", ft.bytes(a.wire_bytes) + " / " + ft.bytes(a.raw_bytes));
    fact(dl, "rung", a.rung || "-");
    for (const [k, v] of Object.entries(a.drops || {})) fact(dl, k, v === null ? "-" : v);
    for (const [k, v] of Object.entries(a.rejected || {})) fact(dl, "rejected " + k, v);
    const tbody = document.querySelector("#exporters tbody");
    tbody.replaceChildren(...doc.exporters.map((e) => {
      const tr = ft.el("tr", { "data-exporter": e.exporter });
      tr.appendChild(ft.el("td", { "data-col": "exporter" }, e.exporter));
      for (const k of ["last_version", "datagrams", "records", "undecodable", "set_errors", "seq_lost", "seq_resets"]) {
        tr.appendChild(ft.el("td", { "data-col": k, "class": "num" }, e[k] === null ? "-" : e[k]));
      }
      tr.appendChild(ft.el("td", {}, e.first_seen || "-"));
      tr.appendChild(ft.el("td", {}, e.last_seen || "-"));
      return tr;
    }));
    document.querySelector("#sources tbody").replaceChildren(...(doc.sources || []).map((r) => {
      const tr = ft.el("tr", { "data-exporter": r.exporter });
      const host = String(r.source_address).includes(":") ? "[" + r.source_address + "]" : r.source_address;
      tr.appendChild(ft.el("td", { "data-col": "source" }, host + ":" + r.source_port));
      tr.appendChild(ft.el("td", { "data-col": "exporter" }, r.exporter));
      tr.appendChild(ft.el("td", { "data-col": "mode" }, r.mode));
      return tr;
    }));
    const s = doc.series;
    if (s && s.times) {
      const named = {};
      for (const [g, m] of Object.entries(s.groups)) named[g] = m.bytes;
      ft.chart(document.getElementById("chart"), s.times, named, "bytes");
    }
    return doc.store_error ? "store: " + doc.store_error : "";  // shown in the error box by ft.poll
  }

  const p = ft.poll(async () => render(await ft.getJSON(
    "/console/api/agent?id=" + encodeURIComponent(id) + "&range=" + encodeURIComponent(range.value))), 5000);
  range.addEventListener("change", () => p.again());
})();
