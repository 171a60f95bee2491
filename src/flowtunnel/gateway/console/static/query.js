// The query page: an nfdump-style filter or read-only SQL, results as a table, CSV download of the same.
"use strict";
(() => {
  const form = document.getElementById("qform");
  const csv = document.getElementById("csv");

  function params() {
    const q = new URLSearchParams();
    for (const name of ["mode", "range", "limit", "q"]) q.set(name, form.elements[name].value);
    return q;
  }

  function syncCsv() {
    const q = params();
    q.set("format", "csv");
    csv.href = "/console/api/query?" + q.toString();
  }

  async function run() {
    const note = document.getElementById("note");
    note.textContent = "running…";
    try {
      const doc = await ft.getJSON("/console/api/query?" + params().toString());
      ft.fillTable(document.getElementById("result"), doc.columns, doc.rows);
      note.textContent = doc.rows.length + " rows" + (doc.truncated ? " (more not shown: raise the row limit or narrow the filter)" : "") +
        (doc.clamped ? "; range clamped" : "");
      ft.showError("");
    } catch (e) {
      note.textContent = "";
      ft.fillTable(document.getElementById("result"), [], []);
      ft.showError(String(e.message || e));
    }
  }

  form.addEventListener("input", syncCsv);
  form.addEventListener("submit", (ev) => { ev.preventDefault(); syncCsv(); run(); });
  syncCsv();
})();
