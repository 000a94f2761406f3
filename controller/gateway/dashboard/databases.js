// Databases: the list, and a database's page with its shards and a query console
// (results table and per-shard status).

import { call } from "./api.js";
import { h, replace, status, table, when } from "./dom.js";
import { errorBox, errorPanel, field, fieldViolations, onSubmit, selectField } from "./forms.js";
import { listAll } from "./live.js";

export function databasesPage(root) {
  const holder = h("div", {});
  const create = h("section", { class: "card", id: "create-database", hidden: true, "aria-labelledby": "create-db-title" });
  const toggle = h("button", { type: "button", "aria-expanded": "false", "aria-controls": "create-database" }, "New database");
  toggle.addEventListener("click", () => {
    create.hidden = !create.hidden;
    toggle.setAttribute("aria-expanded", String(!create.hidden));
    if (!create.hidden) renderCreate(create).then(() => create.querySelector("input").focus());
  });
  replace(root, h("div", { class: "page-head" }, h("h1", {}, "Databases"), toggle), create,
    h("p", { class: "help" }, "Or from a terminal: a67 db create <name>"), holder);
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

// The create form: name, dialect, sharding, and the nodes that hold the shards (shard i on
// the i-th chosen node, round robin; nodes offering "database" are chosen at first).
async function renderCreate(section) {
  let nodes = [];
  try {
    nodes = (await listAll(call, "/api/v1/nodes", "nodes")).filter((n) => n.status !== "NODE_STATUS_REMOVED");
  } catch (error) {
    replace(section, errorPanel(error));
    return;
  }
  const offersDb = (n) => ((n.capabilities || {}).node_types || []).includes("database");
  const nodeSelect = h("select", { name: "nodes", id: "db-nodes", multiple: true, size: Math.min(5, Math.max(2, nodes.length)) },
    nodes.map((n) => h("option", { value: n.id, selected: offersDb(n) ? true : undefined },
      `${n.id.slice(0, 8)} ${n.region || ""} (${((n.capabilities || {}).node_types || []).join(", ")})`)));
  const form = h("form", { novalidate: true },
    errorBox(),
    h("div", { class: "row" },
      field("Name", { name: "name", autocomplete: "off", spellcheck: "false", required: true }, "Like shop: a-z, 0-9, _ and -."),
      selectField("Dialect", { name: "dialect", value: "sqlite" }, [["sqlite", "SQLite"], ["postgres", "PostgreSQL"]])),
    h("div", { class: "row" },
      selectField("Sharding", { name: "strategy", value: "SHARDING_STRATEGY_HASH" }, [["SHARDING_STRATEGY_HASH", "Hash of the key"]]),
      field("Shards", { name: "shard_count", type: "number", min: 1, max: 64, value: 1, required: true }),
      field("Sharding key", { name: "sharding_key", autocomplete: "off", spellcheck: "false", required: true, placeholder: "customer_id" },
        "The column that decides a row's shard.")),
    h("div", { class: "field" }, h("label", { for: "db-nodes" }, "Nodes for the shards"), nodeSelect,
      h("p", { class: "help" }, nodes.length ? "Shard 1 goes on the first chosen node, shard 2 on the next, and so on." : "You have no nodes: enroll one with the database type first.")),
    h("button", { type: "submit" }, "Create database"));
  onSubmit(form, async (data) => {
    const count = Number(data.get("shard_count")) || 0;
    const chosen = data.getAll("nodes");
    if (!chosen.length) throw fieldViolations("Choose where the shards go.", [["shards", "Choose at least one node."]]);
    const reply = await call("POST", "/api/v1/databases", {
      name: data.get("name").trim(), dialect: data.get("dialect"),
      sharding: { strategy: data.get("strategy"), shard_count: count, sharding_key: data.get("sharding_key").trim() },
      shards: Array.from({ length: Math.max(count, 0) }, (_, i) => ({ shard_index: i, primary_node_id: chosen[i % chosen.length] })),
      request_id: crypto.randomUUID(),
    });
    location.hash = `#/databases/${encodeURIComponent(reply.database.id)}`;
  }, { name: "name", dialect: "dialect", "sharding.strategy": "strategy", "sharding.shard_count": "shard_count",
    "sharding.sharding_key": "sharding_key", shards: "nodes" });
  replace(section, h("h2", { id: "create-db-title" }, "New database"), form);
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
  const schema = h("section", { id: "schema", "aria-labelledby": "schema-title" });
  const ddlForm = h("form", { class: "card", novalidate: true },
    errorBox(),
    field("Schema change (DDL)", { name: "ddl", multiline: true, rows: 3, required: true, spellcheck: "false",
      placeholder: "CREATE TABLE orders (id INTEGER, customer_id INTEGER, PRIMARY KEY (customer_id, id))" },
    "CREATE, ALTER or DROP TABLE, or CREATE INDEX: applied on every shard."),
    h("button", { type: "submit" }, "Apply schema"));
  onSubmit(ddlForm, async (data) => {
    const reply = await call("POST", `${path}/schema`, { ddl: data.get("ddl") });
    ddlForm.elements.namedItem("ddl").value = "";
    render(reply.database);
    schema.querySelector("h2").focus();
  }, { ddl: "ddl" });
  replace(root, h("p", {}, h("a", { href: "#/databases" }, "← Databases")), heading, shards, schema, ddlForm,
    h("h2", {}, "Query"), form, results);
  const render = (d) => {
    heading.textContent = `Database ${d.name}`;
    const tables = d.tables || [];
    replace(schema, h("h2", { id: "schema-title", tabindex: "-1" }, "Schema"),
      tables.length ? tables.map((t) => h("div", { class: "schema-table" }, h("h3", {}, t.name),
        table(`Columns of ${t.name}`, [
          { title: "Column", cell: (c) => c.name },
          { title: "Type", cell: (c) => c.type || "-" },
          { title: "Null", cell: (c) => c.nullable ? "yes" : "no" },
        ], t.columns || [], "No columns."))) : h("p", { class: "empty" }, "No tables yet: apply a schema below."));
    replace(shards, h("h2", {}, "Shards"), table("Shards", [
      { title: "Shard", cell: (s) => String(s.shard_index || 0) },
      { title: "Primary node", cell: (s) => (s.primary_node_id || "-").slice(0, 8) },
      { title: "Replicas", cell: (s) => (s.replica_node_ids || []).map((r) => r.slice(0, 8)).join(", ") || "-" },
    ], d.shards || [], "No shards."));
  };
  call("GET", path).then(({ database: d }) => render(d), (error) => replace(shards, errorPanel(error)));
}

function cellText(value) {
  if (value === null || value === undefined) return h("span", { class: "null" }, "NULL");
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}
