// Shared by the console's pages: DOM building (textContent only: data is never parsed as HTML), number
// formatting, JSON fetching with the session cookie, polling, and uPlot charts.
"use strict";

const ft = (() => {
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node[k] = v;
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function bytes(n) {
    if (typeof n !== "number") return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n, i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function count(n) {
    if (typeof n !== "number") return "-";
    if (Math.abs(n) >= 1e9) return (n / 1e9).toFixed(1) + " G";
    if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + " M";
    if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + " k";
    return String(n);
  }

  function ago(t, now) {
    if (typeof t !== "number") return "never";
    const d = Math.max(0, now - t);
    if (d < 120) return d.toFixed(0) + " s ago";
    if (d < 7200) return (d / 60).toFixed(0) + " min ago";
    if (d < 172800) return (d / 3600).toFixed(1) + " h ago";
    return new Date(t * 1000).toISOString().slice(0, 16) + "Z";
  }

  function age(seconds) {
    if (typeof seconds !== "number") return "-";
    if (seconds < 120) return seconds.toFixed(0) + " s";
    if (seconds < 7200) return (seconds / 60).toFixed(0) + " min";
    if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }

  function showError(text) {
    const box = document.getElementById("error");
    if (!box) return;
    box.textContent = text || "";
    box.hidden = !text;
  }

  async function getJSON(url) {
    const resp = await fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } });
    if (resp.status === 401) { window.location.assign("/console"); throw new Error("logged out"); }
    let doc;
    try { doc = await resp.json(); } catch (e) { throw new Error("HTTP " + resp.status + " from " + url); }
    if (!resp.ok) throw new Error(doc && doc.error ? doc.error : "HTTP " + resp.status);
    return doc;
  }

  // Call fn now and every ms milliseconds (the next call waits for the previous one); errors are shown, and
  // so is a warning text fn returns (e.g. the store could not answer part of the page); else the box is cleared.
  function poll(fn, ms) {
    let timer = null;
    const live = document.getElementById("live");
    async function tick() {
      try {
        const warning = await fn();
        showError(typeof warning === "string" ? warning : "");
        if (live) { live.className = "live"; live.textContent = "live · " + new Date().toISOString().slice(11, 19) + "Z"; }
      } catch (e) {
        showError(String(e.message || e));
        if (live) { live.className = "live stale"; live.textContent = "not updated"; }
      }
      timer = window.setTimeout(tick, ms);
    }
    tick();
    return { again() { if (timer) window.clearTimeout(timer); tick(); } };
  }

  const palette = ["#2f6fdf", "#e4572e", "#17a34a", "#9333ea", "#eab308", "#0891b2", "#db2777", "#65a30d", "#78716c", "#334155"];

  // A time series chart in `box`: times (s) and {name: values}; re-created when the series set changes.
  function chart(box, times, named, unit) {
    const names = Object.keys(named);
    const key = names.join("\u0000") + "|" + unit;
    const data = [times, ...names.map((n) => named[n])];
    if (box._plot && box._key === key) { box._plot.setData(data); return; }
    if (box._plot) box._plot.destroy();
    box.textContent = "";
    const fmt = unit === "bytes" ? bytes : count;
    const opts = {
      width: Math.max(320, box.clientWidth - 4), height: 300,
      scales: { x: { time: true } },
      axes: [{}, { values: (u, vals) => vals.map(fmt), size: 70 }],
      series: [{}, ...names.map((n, i) => ({ label: n || "total", stroke: palette[i % palette.length], width: 1.5,
        value: (u, v) => v === null ? "-" : fmt(v) }))],
    };
    box._plot = new uPlot(opts, data, box);
    box._key = key;
  }

  // A sparkline (no axes, no legend) in `box`.
  function spark(box, times, values) {
    const data = [times, values];
    if (box._plot) { box._plot.setData(data); return; }
    box._plot = new uPlot({
      width: 160, height: 30, legend: { show: false }, cursor: { show: false },
      scales: { x: { time: false } }, axes: [{ show: false }, { show: false }],
      series: [{}, { stroke: "#2f6fdf", fill: "rgba(47,111,223,0.15)", width: 1 }],
    }, data, box);
  }

  function navCurrent() {
    const page = document.body.dataset.page;
    const link = document.getElementById("nav-" + (page === "agent" ? "agents" : page));
    if (link) link.className = "current";
  }

  // Rows of a table answer {columns, rows} into thead/tbody of `table` (text only).
  function fillTable(table, columns, rows, numeric) {
    const thead = table.tHead, tbody = table.tBodies[0];
    thead.textContent = "";
    tbody.textContent = "";
    const hr = el("tr");
    for (const c of columns) hr.appendChild(el("th", {}, c));
    thead.appendChild(hr);
    for (const r of rows) {
      const tr = el("tr");
      r.forEach((v, i) => {
        const td = el("td", { "data-col": columns[i] }, v === null ? "" : (typeof v === "object" ? JSON.stringify(v) : v));
        if (typeof v === "number" || (numeric && numeric.has(columns[i]))) td.className = "num";
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    }
  }

  navCurrent();
  return { el, bytes, count, ago, age, getJSON, poll, chart, spark, showError, fillTable };
})();
