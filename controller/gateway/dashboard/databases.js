// Databases: the list, and a database's page with its shards and a query console
// (results table and per-shard status).

import { call } from "./api.js";
import { h, replace, status, table, when } from "./dom.js";
import { errorBox, errorPanel, field, onSubmit } from "./forms.js";
import { listAll } from "./live.js";

export function databasesPage(root) {
  const holder = h("div", {});
  replace(root, h("h1", {}, "Databases"),
    h("p", { class: "help" }, "Create one with: a67 db create <name>"), holder);
  listAll(call, "/api/v1/databases", "databases").then((items) => {
    replace(holder, table("Your databases", [
      { title: "Name", cell: (d) => h("a", { href: `#/databases/${encodeURIComponent(d.id)}` }, d.name || d.id) },
      { title: "Dialect", cell: (d) => d.dialect || "-" },
      { title: "Shards", cell: (d) => String((d.shards || []).length) },
      { title: "Tables", cell: (d) => (d.tables || []).map((t) => t.name).join(", ") || "-" },
      { title: "Created", cell: (d) => when(d.created_at) },
    ], items, "No databases yet."));
  }, (error) => replace(holder, errorPanel(error)));
}

export function databasePage(root, [id]) {
  const path = `/api/v1/databases/${encodeURIComponent(id)}`;
  const heading = h("h1", {}, "Database");
  const shards = h("section", {});
  const results = h("section", { "aria-live": "polite", "aria-labelledby": "results-title" });
  const form = h("form", { class: "card", novalidate: true },
    errorBox(),
    field("SQL", { name: "query", multiline: true, rows: 4, required: true, spellcheck: "false" }),
    h("button", { type: "submit" }, "Run"));
  onSubmit(form, async (data) => {
    const reply = await call("POST", `${path}/query`, { query: data.get("query") });
    const columns = (reply.columns || []).map((c, i) => ({ title: c.name || `column ${i + 1}`, cell: (row) => cellText(row[i]) }));
    replace(results, h("h2", { id: "results-title" }, "Result"),
      h("p", {}, `${reply.rows_returned || 0} rows from ${reply.shards_queried || 0} shards in ${reply.execution_time_ms || 0} ms${reply.partial ? " (partial: some shards did not answer)" : ""}.`),
      columns.length ? table("Rows", columns, reply.data || [], "No rows.") : null,
      h("h3", {}, "Shards"),
      table("Shard status", [
        { title: "Shard", cell: (s) => String(s.shard_index || 0) },
        { title: "Status", cell: (s) => status(s.status || "-") },
        { title: "Node", cell: (s) => (s.node_id || "-").slice(0, 8) },
        { title: "Error", cell: (s) => s.error_message || "" },
      ], reply.shard_statuses || [], "No shard was asked."));
  }, { query: "query" });
  replace(root, h("p", {}, h("a", { href: "#/databases" }, "← Databases")), heading, shards,
    h("h2", {}, "Query"), form, results);
  call("GET", path).then(({ database: d }) => {
    heading.textContent = `Database ${d.name}`;
    replace(shards, h("h2", {}, "Shards"), table("Shards", [
      { title: "Shard", cell: (s) => String(s.shard_index || 0) },
      { title: "Primary node", cell: (s) => (s.primary_node_id || "-").slice(0, 8) },
      { title: "Replicas", cell: (s) => (s.replica_node_ids || []).map((r) => r.slice(0, 8)).join(", ") || "-" },
    ], d.shards || [], "No shards."));
  }, (error) => replace(shards, errorPanel(error)));
}

function cellText(value) {
  if (value === null || value === undefined) return h("span", { class: "null" }, "NULL");
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}
