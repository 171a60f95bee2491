// The flows page: series per agent or exporter, top talkers, both under one nfdump-style filter.
"use strict";
(() => {
  const form = document.getElementById("controls");
  const params = new URLSearchParams(window.location.search);
  for (const name of ["range", "group", "metric", "by", "filter"]) {
    if (params.has(name)) form.elements[name].value = params.get(name);
  }

  function query(extra) {
    const q = new URLSearchParams();
    q.set("range", form.elements.range.value);
    q.set("filter", form.elements.filter.value);
    for (const [k, v] of Object.entries(extra)) q.set(k, v);
    return q.toString();
  }

  async function refresh() {
    const metric = form.elements.metric.value;
    const [series, top] = await Promise.all([
      ft.getJSON("/console/api/series?" + query({ group: form.elements.group.value })),
      ft.getJSON("/console/api/top?" + query({ by: form.elements.by.value, order: metric === "flows" ? "flows" : metric, limit: "20" })),
    ]);
    const named = {};
    for (const [g, m] of Object.entries(series.groups)) named[g] = m[metric];
    if (!Object.keys(named).length) named["no flows"] = series.times.map(() => 0);
    ft.chart(document.getElementById("chart"), series.times, named, metric === "bytes" ? "bytes" : "count");
    ft.fillTable(document.getElementById("top"), top.columns, top.rows);
    document.getElementById("note").textContent =
      (series.bucket_s / 60) + "-minute buckets" + (series.clamped ? "; range clamped to " + (series.range_s / 86400) + " days" : "");
  }

  const p = ft.poll(refresh, 10000);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams(new FormData(form));
    window.history.replaceState(null, "", "?" + q.toString());
    p.again();
  });
  for (const name of ["range", "group", "metric", "by"]) form.elements[name].addEventListener("change", () => p.again());
})();
