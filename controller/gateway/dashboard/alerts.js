// Alerts: what an operator should know about (mass failures, failed rollouts), kept live.

import { call } from "./api.js";
import { h, label, refreshContent, replace, status, table, when } from "./dom.js";
import { errorPanel } from "./forms.js";
import { every, listAll, REFRESH_MS } from "./live.js";

export function alertsPage(root) {
  const holder = h("div", {});
  replace(root, h("h1", {}, "Alerts"), holder);
  return every(REFRESH_MS * 2, async () => {
    try {
      const alerts = await listAll(call, "/api/v1/alerts", "alerts");
      refreshContent(holder, table("Alerts", [
        { title: "State", cell: (a) => status(a.active ? "active" : "resolved") },
        { title: "Kind", cell: (a) => label(a.kind, "").replaceAll("_", " ") },
        { title: "Message", cell: (a) => a.message },
        { title: "Deployment", cell: (a) => a.deployment_id ? h("a", { href: `#/deployments/${encodeURIComponent(a.deployment_id)}` }, a.deployment_id.slice(0, 8)) : "-" },
        { title: "Raised", cell: (a) => when(a.created_at) },
      ], alerts, "No alerts."));
    } catch (error) {
      replace(holder, errorPanel(error));
    }
  });
}
