// Alerts: what an operator should know about (mass failures, failed rollouts), kept live.
// While a mass failure holds recovery frozen, a button lifts the freeze (UnfreezeRecovery).

import { call } from "./api.js";
import { h, label, refreshContent, replace, status, table, when } from "./dom.js";
import { errorPanel } from "./forms.js";
import { every, listAll, REFRESH_MS } from "./live.js";

export function alertsPage(root) {
  const holder = h("div", {});
  const actions = h("div", { class: "actions" });
  const message = h("div", { "aria-live": "polite" });
  replace(root, h("h1", {}, "Alerts"), message, actions, holder);
  let frozen = false;
  const unfreeze = async (button) => {
    button.disabled = true;
    try {
      const reply = await call("POST", "/api/v1/nodes:unfreezeRecovery", {});
      const nodes = (reply.recovering_node_ids || []).length;
      replace(message, h("p", { class: "notice", role: "status" }, reply.was_frozen
        ? `Recovery resumed: the replicas of ${nodes} failed node${nodes === 1 ? "" : "s"} are being placed elsewhere.`
        : "Recovery was not frozen."));
      await refresh();
    } catch (error) {
      replace(message, errorPanel(error));
    } finally {
      button.disabled = false;
    }
  };
  const refresh = async () => {
    try {
      const alerts = await listAll(call, "/api/v1/alerts", "alerts");
      const nowFrozen = alerts.some((a) => a.active && a.kind === "mass_failure");
      if (nowFrozen !== frozen) {
        frozen = nowFrozen;
        replace(actions, frozen ? [
          h("p", { class: "help" }, "Recovery is frozen: the failed nodes' replicas stay where they are until the nodes come back. If the nodes are really gone, resume it."),
          h("button", { type: "button", onclick: (e) => unfreeze(e.currentTarget) }, "Resume recovery"),
        ] : null);
      }
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
  };
  return every(REFRESH_MS * 2, refresh);
}
