// Nodes: the live table, a node's page (details, metrics chart, drain/undrain/remove),
// and enrolling a node (the token and the agent command, as `a67 nodes enroll` prints them).

import { call } from "./api.js";
import { h, label, percent, refreshContent, replace, status, table, when } from "./dom.js";
import { errorBox, errorPanel, field, onSubmit } from "./forms.js";
import { every, listAll, REFRESH_MS } from "./live.js";
import { lineChart } from "./chart.js";

const AGENT_DATA_DIR = "~/.local/share/automator67-agent";
let config = null;

function gatewayConfig() {
  config = config || fetch("/config.json").then((r) => r.json()).catch(() => ({}));
  return config;
}

// POSIX shell quoting, as Python's shlex.quote.
export function shellQuote(word) {
  if (word === "") return "''";
  if (/^[A-Za-z0-9@%+=:,./_-]+$/.test(word)) return word;
  return `'${word.replaceAll("'", `'"'"'`)}'`;
}

function quoteWord(word) {
  return word.startsWith("~/") ? `~/${shellQuote(word.slice(2))}` : shellQuote(word);
}

export function agentCommand(token, controller, { region, nodeTypes, tlsCa } = {}) {
  const words = ["a67", "agent", "--controller", controller, "--data-dir", AGENT_DATA_DIR];
  if (region) words.push("--region", region);
  if (nodeTypes) words.push("--node-types", nodeTypes);
  if (tlsCa) words.push("--controller-tls-ca", tlsCa);
  return `A67_AGENT_TOKEN=${token} ${words.map(quoteWord).join(" ")}`;
}

const statusText = (node) => label(node.status, "NODE_STATUS_");

export function nodesPage(root) {
  const summary = h("p", { class: "summary", "aria-live": "polite" });
  const holder = h("div", {});
  const enroll = h("section", { class: "card", "aria-labelledby": "enroll-title", hidden: true });
  const toggle = h("button", { type: "button", "aria-expanded": "false", "aria-controls": "enroll" }, "Enroll a node");
  enroll.id = "enroll";
  toggle.addEventListener("click", () => {
    enroll.hidden = !enroll.hidden;
    toggle.setAttribute("aria-expanded", String(!enroll.hidden));
    if (!enroll.hidden) {
      renderEnroll(enroll);
      enroll.querySelector("input").focus();
    }
  });
  replace(root,
    h("div", { class: "page-head" }, h("h1", {}, "Nodes"), toggle),
    enroll, summary, holder);
  let lastError = "";
  return every(REFRESH_MS, async () => {
    try {
      const nodes = await listAll(call, "/api/v1/nodes", "nodes");
      lastError = "";
      // busy nodes are up and schedulable too (CPU over 90 %): counted apart, not as down
      const ready = nodes.filter((n) => n.status === "NODE_STATUS_READY").length;
      const busy = nodes.filter((n) => n.status === "NODE_STATUS_BUSY").length;
      const text = nodes.length
        ? `${nodes.length} node${nodes.length === 1 ? "" : "s"}, ${ready} ready${busy ? `, ${busy} busy` : ""}`
        : "";
      if (summary.textContent !== text) summary.textContent = text;
      refreshContent(holder, table("Your nodes", [
        { title: "Node", cell: (n) => h("a", { href: `#/nodes/${encodeURIComponent(n.id)}` }, n.id.slice(0, 8)) },
        { title: "Status", cell: (n) => status(statusText(n)) },
        { title: "Region", cell: (n) => n.region || "-" },
        { title: "CPU", cell: (n) => percent(n.metrics && n.metrics.cpu_percent) },
        { title: "Memory", cell: (n) => percent(n.metrics && n.metrics.memory_percent) },
        { title: "Requests", cell: (n) => String((n.metrics && n.metrics.active_requests) || 0) },
        { title: "Replicas", cell: (n) => String(n.deployments || 0) },
        { title: "Last heartbeat", cell: (n) => when(n.last_heartbeat) },
      ], nodes, "No nodes yet. Enroll one: it appears here as soon as its agent connects."));
    } catch (error) {
      if (error.message !== lastError) replace(holder, errorPanel(error));
      lastError = error.message;
    }
  });
}

function renderEnroll(section) {
  const result = h("div", { class: "enroll-result" });
  const form = h("form", { novalidate: true },
    errorBox(),
    h("div", { class: "row" },
      field("Nodes that may use it", { name: "max_uses", type: "number", min: 1, max: 100, value: 1, required: true }),
      field("Valid for (seconds)", { name: "ttl_seconds", type: "number", min: 60, max: 86400, value: 3600, required: true })),
    h("div", { class: "row" },
      field("Region (optional)", { name: "region", autocomplete: "off" }),
      field("Node types (optional)", { name: "node_types", autocomplete: "off", placeholder: "compute,database" })),
    h("button", { type: "submit" }, "Create token"));
  onSubmit(form, async (data) => {
    const reply = await call("POST", "/api/v1/nodes/enrollment-tokens", {
      max_uses: Number(data.get("max_uses")), ttl_seconds: Number(data.get("ttl_seconds")),
    });
    const settings = await gatewayConfig();
    const command = agentCommand(reply.token, settings.agent_controller || "127.0.0.1:50051", {
      region: data.get("region").trim(), nodeTypes: data.get("node_types").trim(), tlsCa: settings.agent_controller_tls_ca,
    });
    const uses = reply.max_uses === 1 ? "1 node" : `${reply.max_uses} nodes`;
    replace(result,
      h("p", { role: "status" }, `Enrollment token created: valid until ${when(reply.expires_at)} for ${uses}; it is shown only now. On the node, run:`),
      h("pre", { class: "command", tabindex: "0", "aria-label": "Agent command" }, h("code", { id: "agent-command" }, command)),
      h("p", {}, "Token: ", h("code", { id: "enroll-token" }, reply.token)),
      h("button", { type: "button", class: "secondary", onclick: (e) => copy(e.target, command) }, "Copy command"));
    result.querySelector("pre").focus();
  }, { max_uses: "max_uses", ttl_seconds: "ttl_seconds" });
  replace(section, h("h2", { id: "enroll-title" }, "Enroll a node"),
    h("p", {}, "Create a one-time token, then run the agent command on the new node. The token travels in A67_AGENT_TOKEN, never on the command line."),
    form, result);
}

async function copy(button, text) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select the command and copy it";
  }
}

export function nodePage(root, [id]) {
  const path = `/api/v1/nodes/${encodeURIComponent(id)}`;
  const details = h("div", {});
  const chart = h("section", { class: "card", "aria-labelledby": "chart-title" });
  const actions = h("div", { class: "actions" });
  const message = h("div", { "aria-live": "polite" });
  replace(root, h("p", {}, h("a", { href: "#/nodes" }, "← Nodes")), h("h1", {}, `Node ${id.slice(0, 8)}`),
    message, actions, details, chart);
  let node = null;

  const act = async (verb, confirmText) => {
    if (confirmText && !window.confirm(confirmText)) return;
    replace(message);
    try {
      if (verb === "remove") {
        await call("DELETE", path);
        location.hash = "#/nodes";
        return;
      }
      await call("POST", `${path}:${verb}`, {});
      replace(message, h("p", { class: "notice", role: "status" }, verb === "drain" ? "Draining: its replicas move to other nodes." : "Back in service."));
      await load();
    } catch (error) {
      replace(message, errorPanel(error));
    }
  };

  const load = async () => {
    try {
      node = (await call("GET", path)).node;
      const metrics = await call("GET", `${path}/metrics`).catch(() => ({}));
      const draining = node.status === "NODE_STATUS_DRAINING";
      replace(actions,
        draining ? h("button", { type: "button", onclick: () => act("undrain") }, "Undrain")
          : h("button", { type: "button", onclick: () => act("drain") }, "Drain"),
        h("button", { type: "button", class: "danger", onclick: () => act("remove", "Remove this node? Its replicas move elsewhere and the agent is told to stop.") }, "Remove"));
      const caps = node.capabilities || {};
      const m = node.metrics || {};
      replace(details, h("dl", { class: "fields card" }, [
        ["ID", node.id], ["Status", status(statusText(node))], ["Region", node.region || "-"],
        ["Provider", label(node.provider, "PROVIDER_")], ["Endpoint", node.endpoint || "-"],
        ["Node types", (caps.node_types || []).join(", ") || "-"],
        ["Capacity", `${caps.cpu_cores || 0} CPU, ${caps.memory_gb || 0} GB memory, ${caps.disk_gb || 0} GB disk`],
        ["CPU", percent(m.cpu_percent)], ["Memory", percent(m.memory_percent)], ["Disk", percent(m.disk_percent)],
        ["Requests", String(m.active_requests || 0)], ["Error rate", percent(m.error_rate)],
        ["Replicas", String(node.deployments || 0)], ["Last heartbeat", when(node.last_heartbeat)],
        ["Created", when(node.created_at)],
      ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
      replace(chart, h("h2", { id: "chart-title" }, "CPU and memory"), lineChart(metrics.history || [], [["cpu_percent", "CPU", "cpu"], ["memory_percent", "Memory", "memory"]]));
    } catch (error) {
      replace(details, errorPanel(error));
    }
  };
  return every(REFRESH_MS, load);
}
