// Deployments: the list, and a deployment's page (replicas, placement explanations, URLs,
// scale, delete), kept live.

import { call } from "./api.js";
import { h, label, refreshContent, replace, status, table, when } from "./dom.js";
import { errorBox, errorPanel, field, onSubmit } from "./forms.js";
import { every, listAll, REFRESH_MS } from "./live.js";

const statusText = (d) => label(d.status, "DEPLOYMENT_STATUS_");

export function deploymentsPage(root) {
  const holder = h("div", {});
  replace(root, h("h1", {}, "Deployments"),
    h("p", { class: "help" }, "Deploy an app from its folder with: a67 deploy <folder>"), holder);
  return every(REFRESH_MS, async () => {
    try {
      const items = await listAll(call, "/api/v1/deployments", "deployments");
      refreshContent(holder, table("Your deployments", [
        { title: "Name", cell: (d) => h("a", { href: `#/deployments/${encodeURIComponent(d.id)}` }, d.name || d.id.slice(0, 8)) },
        { title: "Status", cell: (d) => status(statusText(d)) },
        { title: "Replicas", cell: (d) => `${d.current_replicas || 0} / ${d.desired_replicas || 0}` },
        { title: "Version", cell: (d) => String(d.version || 1) },
        { title: "Created", cell: (d) => when(d.created_at) },
      ], items, "No deployments yet."));
    } catch (error) {
      replace(holder, errorPanel(error));
    }
  });
}

export function deploymentPage(root, [id]) {
  const path = `/api/v1/deployments/${encodeURIComponent(id)}`;
  const heading = h("h1", {}, "Deployment");
  const details = h("div", {});
  const replicas = h("section", { "aria-labelledby": "replicas-title" });
  const placement = h("section", { "aria-labelledby": "placement-title" });
  const message = h("div", { "aria-live": "polite" });
  const scaleForm = h("form", { class: "inline", novalidate: true },
    errorBox(),
    field("Replicas", { name: "replicas", type: "number", min: 0, required: true }),
    h("button", { type: "submit" }, "Scale"));
  onSubmit(scaleForm, async (data) => {
    await call("POST", `${path}:scale`, { replicas: Number(data.get("replicas")) });
    replace(message, h("p", { class: "notice", role: "status" }, `Scaling to ${data.get("replicas")} replicas.`));
  }, { replicas: "replicas" });
  const remove = h("button", { type: "button", class: "danger", onclick: async () => {
    if (!window.confirm("Delete this deployment? Its replicas are stopped.")) return;
    try {
      await call("DELETE", path);
      location.hash = "#/deployments";
    } catch (error) {
      replace(message, errorPanel(error));
    }
  } }, "Delete");
  replace(root, h("p", {}, h("a", { href: "#/deployments" }, "← Deployments")), heading, message,
    h("div", { class: "actions" }, scaleForm, remove), details, replicas, placement);
  let scaleFilled = false;
  return every(REFRESH_MS, async () => {
    try {
      const d = (await call("GET", path)).deployment;
      heading.textContent = `Deployment ${d.name || d.id.slice(0, 8)}`;
      if (!scaleFilled) {
        scaleForm.elements.namedItem("replicas").value = d.desired_replicas || 0;
        scaleFilled = true;
      }
      replace(details, h("dl", { class: "fields card" }, [
        ["ID", d.id], ["Status", status(statusText(d))],
        ["Replicas", `${d.current_replicas || 0} running of ${d.desired_replicas || 0} wanted`],
        ["Type", label(d.app_type, "APP_TYPE_")], ["Version", String(d.version || 1)],
        ["URLs", (d.urls || []).length ? h("ul", {}, d.urls.map((u) => h("li", {}, h("a", { href: u, rel: "noreferrer" }, u)))) : "-"],
        ["Created", when(d.created_at)], ["Deployed", when(d.deployed_at)],
      ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
      refreshContent(replicas, h("h2", { id: "replicas-title" }, "Replicas"), table("Replicas", [
        { title: "Replica", cell: (a) => String(a.replica_index || 0) },
        { title: "Node", cell: (a) => h("a", { href: `#/nodes/${encodeURIComponent(a.node_id)}` }, a.node_id.slice(0, 8)) },
        { title: "Status", cell: (a) => status(a.status || "-") },
        { title: "Started", cell: (a) => when(a.started_at) },
        { title: "Error", cell: (a) => a.error_message || "" },
      ], d.node_assignments || [], "No replicas placed yet."));
      replace(placement, h("h2", { id: "placement-title" }, "Placement: why each node"), table("Placement", [
        { title: "Node", cell: (p) => p.node_id.slice(0, 8) },
        { title: "Decision", cell: (p) => status(p.selected ? "chosen" : "rejected") },
        { title: "Why", cell: (p) => p.selected ? factors(p) : (p.reason || "-") },
        { title: "Score", cell: (p) => p.selected || p.total_score ? Number(p.total_score || 0).toFixed(2) : "-" },
      ], d.placement || [], "No placement decision recorded."));
    } catch (error) {
      replace(details, errorPanel(error));
    }
  });
}

function factors(p) {
  const entries = Object.entries(p.factor_scores || {});
  return entries.length ? entries.map(([k, v]) => `${k} ${Number(v).toFixed(2)}`).join(", ") : "best score";
}
