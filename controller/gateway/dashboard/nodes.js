// Nodes: the live table, a node's page (details, metrics chart, drain/undrain/remove),
// and enrolling a node (the token and the agent command, as `a67 nodes enroll` prints them).
// Both pages follow GET /api/v1/nodes:watch: the nodes first (EXISTING … SNAPSHOT_END),
// then each registration, status change, metrics update (at most every 5 s per node) and
// removal as the controller pushes it. A reconnect starts again from a fresh snapshot.

import { call, stream } from "./api.js";
import { h, label, percent, refreshContent, replace, status, table, when } from "./dom.js";
import { errorBox, errorPanel, field, onSubmit } from "./forms.js";
import { follow } from "./live.js";
import { lineChart } from "./chart.js";

const KIND = "NODE_CHANGE_KIND_";
// A node's page: the stored history (one sample a minute) is read again at most this often;
// between reads, each pushed message adds a sample, so the chart moves live. At most
// MAX_SAMPLES are drawn.
const HISTORY_MS = 60000;
const MAX_SAMPLES = 500;
const SERIES = [["cpu_percent", "CPU", "cpu"], ["memory_percent", "Memory", "memory"]];

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

// What a stream state says, for the line under a page's heading.
function streamText(state, what) {
  return state === "live" ? `Live: ${what}`
    : state === "reconnecting" ? "The stream ended: reconnecting…" : "Connecting…";
}

// The nodes of a watch, kept as the controller pushes them: onChange(nodes, message) after the
// snapshot and after each change. A reconnect's snapshot replaces everything (a node removed
// while the stream was down disappears).
function watchNodes(path, onChange, onState) {
  let nodes = null;
  let incoming = new Map();
  return follow(stream, path, (message) => {
    const kind = label(message.kind || "", KIND);
    if (kind === "existing") incoming.set(message.node.id, message.node);
    else if (kind === "snapshot end") {
      nodes = incoming;
      incoming = new Map();
      onChange(nodes, message);
    } else if (nodes && message.node) {
      if (kind === "removed") nodes.delete(message.node.id);
      else nodes.set(message.node.id, message.node);
      onChange(nodes, message);
    }
  }, (state) => {
    if (state === "connecting") incoming = new Map();
    onState(state);
  });
}

// Oldest first, as ListNodes.
const byAge = (a, b) => (Date.parse(a.created_at) || 0) - (Date.parse(b.created_at) || 0) || a.id.localeCompare(b.id);

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
  const streamState = h("p", { class: "help", id: "nodes-state" }, "Connecting…");
  replace(root,
    h("div", { class: "page-head" }, h("h1", {}, "Nodes"), toggle),
    enroll, summary, streamState, holder);
  const columns = [
    { title: "Node", cell: (n) => h("a", { href: `#/nodes/${encodeURIComponent(n.id)}` }, n.id.slice(0, 8)) },
    { title: "Status", cell: (n) => status(statusText(n)) },
    { title: "Region", cell: (n) => n.region || "-" },
    { title: "CPU", cell: (n) => percent(n.metrics && n.metrics.cpu_percent) },
    { title: "Memory", cell: (n) => percent(n.metrics && n.metrics.memory_percent) },
    { title: "Requests", cell: (n) => String((n.metrics && n.metrics.active_requests) || 0) },
    { title: "Replicas", cell: (n) => String(n.deployments || 0) },
    { title: "Last heartbeat", cell: (n) => when(n.last_heartbeat) },
  ];
  // Changes arrive one node at a time: the table is drawn once per burst, not per message.
  let latest = null;
  let drawing = 0;
  const draw = () => {
    drawing = 0;
    const nodes = [...latest.values()].sort(byAge);
    // busy nodes are up and schedulable too (CPU over 90 %): counted apart, not as down
    const ready = nodes.filter((n) => n.status === "NODE_STATUS_READY").length;
    const busy = nodes.filter((n) => n.status === "NODE_STATUS_BUSY").length;
    const text = nodes.length
      ? `${nodes.length} node${nodes.length === 1 ? "" : "s"}, ${ready} ready${busy ? `, ${busy} busy` : ""}`
      : "";
    if (summary.textContent !== text) summary.textContent = text;
    refreshContent(holder, table("Your nodes", columns, nodes,
      "No nodes yet. Enroll one: it appears here as soon as it registers."));
  };
  replace(holder, h("p", { class: "empty" }, "Loading…"));
  return watchNodes("/api/v1/nodes:watch", (nodes) => {
    latest = nodes;
    if (!drawing) drawing = setTimeout(draw, 50);
  }, (state) => {
    if (typeof state === "string") streamState.textContent = streamText(state, "status changes appear as they happen.");
    else replace(holder, errorPanel(state));
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
  const streamState = h("p", { class: "help", id: "node-state" }, "Connecting…");
  replace(root, h("p", {}, h("a", { href: "#/nodes" }, "← Nodes")), h("h1", {}, `Node ${id.slice(0, 8)}`),
    streamState, message, actions, details, chart);
  let historyAt = 0;
  let stored = []; // GET …/metrics: the history
  let pushed = []; // samples from the watch since then
  const drawChart = () => {
    const last = stored.length ? Date.parse(stored[stored.length - 1].time) : 0;
    const samples = [...stored, ...pushed.filter((p) => Date.parse(p.time) > last)].slice(-MAX_SAMPLES);
    chart.dataset.samples = String(samples.length);
    replace(chart, h("h2", { id: "chart-title" }, "CPU and memory"), lineChart(samples, SERIES));
  };

  const act = async (verb, confirmText) => {
    if (confirmText && !window.confirm(confirmText)) return;
    replace(message);
    try {
      if (verb === "remove") {
        await call("DELETE", path);
        location.hash = "#/nodes";
        return;
      }
      const reply = await call("POST", `${path}:${verb}`, {});
      replace(message, h("p", { class: "notice", role: "status" }, verb === "drain" ? "Draining: its replicas move to other nodes." : "Back in service."));
      render(reply.node, null);
    } catch (error) {
      replace(message, errorPanel(error));
    }
  };

  // time: when the controller sent what the node shows (a pushed sample's time)
  const render = (node, time) => {
    const draining = node.status === "NODE_STATUS_DRAINING";
    const removed = node.status === "NODE_STATUS_REMOVED";
    const focused = actions.contains(document.activeElement) ? document.activeElement.textContent : "";
    replace(actions, removed ? null
      : [draining ? h("button", { type: "button", onclick: () => act("undrain") }, "Undrain")
        : h("button", { type: "button", onclick: () => act("drain") }, "Drain"),
      h("button", { type: "button", class: "danger", onclick: () => act("remove", "Remove this node? Its replicas move elsewhere and the agent is told to stop.") }, "Remove")]);
    const again = [...actions.querySelectorAll("button")].find((b) => b.textContent === focused);
    if (again) again.focus();
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
    if (time && node.metrics && !pushed.some((p) => p.time === time)) {
      pushed.push({ time, metrics: node.metrics });
      pushed = pushed.slice(-MAX_SAMPLES);
    }
    if (Date.now() - historyAt >= HISTORY_MS) {
      historyAt = Date.now();
      call("GET", `${path}/metrics`).then((metrics) => {
        stored = metrics.history || [];
        drawChart();
      }, () => {});
    } else {
      drawChart();
    }
  };

  return watchNodes(`/api/v1/nodes:watch?node_id=${encodeURIComponent(id)}`, (nodes, change) => {
    const node = change.node || nodes.get(id); // a removal shows the node removed
    if (node) render(node, change.time);
  }, (state) => {
    if (typeof state === "string") streamState.textContent = streamText(state, "its status and metrics follow the node.");
    else replace(details, errorPanel(state));
  });
}
