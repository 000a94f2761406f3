// Deployments: the list; a new deployment from an uploaded archive and a manifest form; a
// deployment's page (replicas, placement explanations, URLs, a live rollout view from the
// watch stream, scale, update, rollback, delete), kept live; and its logs.

import { call, stream, upload } from "./api.js";
import { h, label, refreshContent, replace, status, table, when } from "./dom.js";
import { checkField, errorBox, errorPanel, field, fieldViolations, onSubmit, selectField } from "./forms.js";
import { every, follow, listAll, REFRESH_MS } from "./live.js";

const statusText = (d) => label(d.status, "DEPLOYMENT_STATUS_");
const MAX_EVENTS = 100;
const MAX_LOG_LINES = 2000;

// API field → form control, for the manifest form (create and update).
const MANIFEST_FIELDS = {
  "manifest.name": "name", "manifest.app_type": "app_type", "manifest.runtime": "runtime",
  "manifest.entrypoint": "entrypoint", "manifest.replicas": "replicas",
  "manifest.resources": "memory", "manifest.resources.memory": "memory", "manifest.resources.cpu": "cpu",
  "manifest.resources.storage": "storage", "manifest.env": "env",
  "manifest.health_check": "health_path", "manifest.health_check.path": "health_path",
  "manifest.health_check.interval_seconds": "health_interval",
  "manifest.health_check.timeout_seconds": "health_timeout", "manifest.health_check.retries": "health_retries",
  "manifest.atomic": "atomic", source_tar_gz: "archive", source_sha256: "archive",
};

export function deploymentsPage(root) {
  const holder = h("div", {});
  replace(root,
    h("div", { class: "page-head" }, h("h1", {}, "Deployments"),
      h("a", { class: "button", href: "#/deployments/new" }, "New deployment")),
    h("p", { class: "help" }, "Or from a terminal: a67 deploy <folder>"), holder);
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

// -- the manifest form ---------------------------------------------------------------------

function archiveField(help) {
  return field("App archive", { name: "archive", type: "file", accept: ".tar.gz,.tgz,application/gzip" }, help);
}

function resourceFields(m = {}) {
  const r = m.resources || {};
  return h("div", { class: "row" },
    field("Memory", { name: "memory", value: r.memory || "256MB", autocomplete: "off" }, "Like 256MB or 1GB."),
    field("CPU cores", { name: "cpu", value: r.cpu || "0.5", autocomplete: "off" }, "Like 0.5, or 500m."),
    field("Disk (optional)", { name: "storage", value: r.storage || "", autocomplete: "off", placeholder: "1GB" }));
}

function healthFields(m = {}) {
  const c = m.health_check || {};
  return h("fieldset", {}, h("legend", {}, "Health check"),
    h("div", { class: "row" },
      field("Path", { name: "health_path", value: c.path || "", placeholder: "/health", autocomplete: "off" },
        "A backend answers GET on it with 2xx. Empty: /health for a backend; none for a worker."),
      field("Every (seconds)", { name: "health_interval", type: "number", min: 2, max: 300, value: c.interval_seconds || "", placeholder: "10" }),
      field("Timeout (seconds)", { name: "health_timeout", type: "number", min: 1, max: 60, value: c.timeout_seconds || "", placeholder: "2" }),
      field("Failures before unhealthy", { name: "health_retries", type: "number", min: 1, max: 10, value: c.retries || "", placeholder: "3" })));
}

function runtimeFields(m = {}) {
  return h("div", { class: "row" },
    selectField("Runtime", { name: "runtime", value: m.runtime || "python" }, [["python", "Python"], ["command", "A command"]]),
    field("Entrypoint", { name: "entrypoint", value: m.entrypoint || "", placeholder: "app.py", autocomplete: "off", spellcheck: "false" },
      "Python: a .py file in the archive (app.py) or -m module. Command: ./run.sh or a program, with arguments."));
}

function envField(help) {
  return field("Environment variables", { name: "env", multiline: true, rows: 3, spellcheck: "false", autocomplete: "off",
    placeholder: "GREETING=hello" }, help);
}

// "NAME=value" lines → {NAME: value}; a line without "=" is a field violation.
function parseEnv(text) {
  const env = {};
  const bad = [];
  text.split("\n").forEach((line, i) => {
    if (!line.trim()) return;
    const at = line.indexOf("=");
    if (at <= 0) bad.push(`line ${i + 1} is not NAME=value`);
    else env[line.slice(0, at).trim()] = line.slice(at + 1);
  });
  if (bad.length) throw fieldViolations("The environment variables are not in NAME=value form.", [["env", bad.join("; ")]]);
  return env;
}

function healthCheck(data) {
  return {
    path: data.get("health_path").trim(),
    interval_seconds: Number(data.get("health_interval")) || 0,
    timeout_seconds: Number(data.get("health_timeout")) || 0,
    retries: Number(data.get("health_retries")) || 0,
  };
}

function resources(data) {
  return { memory: data.get("memory").trim(), cpu: data.get("cpu").trim(), storage: data.get("storage").trim() };
}

// Uploads the chosen archive (raw, POST /api/v1/sources) → its SHA-256, or "" when none is chosen.
async function uploadArchive(data, progress) {
  const file = data.get("archive");
  if (!file || !file.size) return "";
  progress(`Uploading ${file.name} (${file.size} bytes)…`);
  try {
    return (await upload("/api/v1/sources", file.slice(0, file.size, "application/gzip"))).sha256;
  } catch (error) {
    if (error.violations && error.violations.length) throw error;
    throw fieldViolations(error.message, [["archive", error.hint]]);
  }
}

export function newDeploymentPage(root) {
  const progress = h("p", { class: "help", role: "status" });
  const form = h("form", { class: "card", novalidate: true },
    errorBox(),
    archiveField("A .tar.gz of the app's folder, e.g. tar czf app.tar.gz -C my-app ."),
    h("div", { class: "row" },
      field("Name", { name: "name", autocomplete: "off", spellcheck: "false", required: true },
        "Lower-case letters, digits and dashes, like hello-api."),
      selectField("Type", { name: "app_type", value: "APP_TYPE_BACKEND" },
        [["APP_TYPE_BACKEND", "Backend (answers HTTP on $PORT)"], ["APP_TYPE_WORKER", "Worker (no HTTP)"]]),
      field("Replicas", { name: "replicas", type: "number", min: 1, max: 20, value: 1, required: true })),
    runtimeFields(),
    resourceFields(),
    envField("One NAME=value a line. Stored encrypted; never shown again."),
    healthFields(),
    checkField("All or nothing: roll back if any replica fails to start", { name: "atomic" }),
    h("button", { type: "submit" }, "Deploy"),
    progress);
  onSubmit(form, async (data) => {
    try {
      const env = parseEnv(data.get("env"));
      const sha = await uploadArchive(data, (text) => { progress.textContent = text; });
      progress.textContent = "Placing the replicas…";
      const reply = await call("POST", "/api/v1/deployments", {
        manifest: {
          name: data.get("name").trim(), app_type: data.get("app_type"), runtime: data.get("runtime"),
          entrypoint: data.get("entrypoint").trim(), replicas: Number(data.get("replicas")) || 0,
          resources: resources(data), env, health_check: healthCheck(data), atomic: data.get("atomic") === "on",
        },
        source_sha256: sha,
        request_id: crypto.randomUUID(),
      });
      location.hash = `#/deployments/${encodeURIComponent(reply.deployment_id)}`;
    } finally {
      progress.textContent = "";
    }
  }, MANIFEST_FIELDS);
  replace(root, h("p", {}, h("a", { href: "#/deployments" }, "← Deployments")), h("h1", {}, "New deployment"), form);
}

// -- a deployment -----------------------------------------------------------------------

export function deploymentPage(root, [id]) {
  const path = `/api/v1/deployments/${encodeURIComponent(id)}`;
  const heading = h("h1", {}, "Deployment");
  const details = h("div", {});
  const replicas = h("section", { "aria-labelledby": "replicas-title" });
  const placement = h("section", { "aria-labelledby": "placement-title" });
  const message = h("div", { "aria-live": "polite" });
  const say = (text) => replace(message, h("p", { class: "notice", role: "status" }, text));
  const scaleForm = h("form", { class: "inline", novalidate: true },
    errorBox(),
    field("Replicas", { name: "replicas", type: "number", min: 0, required: true }),
    h("button", { type: "submit" }, "Scale"));
  onSubmit(scaleForm, async (data) => {
    await call("POST", `${path}:scale`, { replicas: Number(data.get("replicas")) });
    say(`Scaling to ${data.get("replicas")} replicas.`);
    load();
  }, { replicas: "replicas" });
  const rollback = h("button", { type: "button", class: "secondary", onclick: async () => {
    rollback.disabled = true;
    try {
      const d = (await call("POST", `${path}:rollback`, { version: 0 })).deployment;
      say(`Rolling back: version ${d.version} is rolling out.`);
      load();
    } catch (error) {
      replace(message, errorPanel(error));
    } finally {
      rollback.disabled = false;
    }
  } }, "Roll back");
  const remove = h("button", { type: "button", class: "danger", onclick: async () => {
    if (!window.confirm("Delete this deployment? Its replicas are stopped.")) return;
    try {
      await call("DELETE", path);
      location.hash = "#/deployments";
    } catch (error) {
      replace(message, errorPanel(error));
    }
  } }, "Delete");

  // The live rollout: the watch stream's events, newest first.
  const rolloutState = h("p", { class: "help", id: "rollout-state" }, "Connecting…");
  const events = h("ol", { class: "events", id: "rollout-events", role: "log", "aria-label": "Rollout events" });
  const rollout = h("section", { class: "card", "aria-labelledby": "rollout-title" },
    h("h2", { id: "rollout-title" }, "Rollout, live"), rolloutState, events);

  const update = h("section", { class: "card", "aria-labelledby": "update-title" });
  replace(root, h("p", {}, h("a", { href: "#/deployments" }, "← Deployments")), heading, message,
    h("div", { class: "actions" }, scaleForm, rollback,
      h("a", { class: "button secondary", href: `#/deployments/${encodeURIComponent(id)}/logs` }, "Logs"), remove),
    details, rollout, replicas, placement, update);

  // One GET at a time; a reload asked for during one runs once more after it.
  let loaded = null;
  let reloading = null;
  let again = false;
  const load = () => {
    if (reloading) {
      again = true;
      return reloading;
    }
    reloading = (async () => {
      do {
        again = false;
        try {
          render((await call("GET", path)).deployment);
        } catch (error) {
          replace(details, errorPanel(error));
        }
      } while (again);
      reloading = null;
    })();
    return reloading;
  };
  const render = (d) => {
    heading.textContent = `Deployment ${d.name || d.id.slice(0, 8)}`;
    if (!loaded) {
      scaleForm.elements.namedItem("replicas").value = d.desired_replicas || 0;
      renderUpdate(update, path, d, say, load);
    }
    loaded = d;
    replace(details, h("dl", { class: "fields card" }, [
      ["ID", d.id], ["Status", status(statusText(d))],
      ["Replicas", `${d.current_replicas || 0} running of ${d.desired_replicas || 0} wanted`],
      ["Type", label(d.app_type, "APP_TYPE_")], ["Version", h("span", { id: "deployment-version" }, String(d.version || 1))],
      ["Runtime", d.manifest ? `${d.manifest.runtime} ${d.manifest.entrypoint}` : "-"],
      ["URLs", (d.urls || []).length ? h("ul", {}, d.urls.map((u) => h("li", {}, h("a", { href: u, rel: "noreferrer" }, u)))) : "-"],
      ["Created", when(d.created_at)], ["Deployed", when(d.deployed_at)],
    ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
    refreshContent(replicas, h("h2", { id: "replicas-title" }, "Replicas"), table("Replicas", [
      { title: "Replica", cell: (a) => String(a.replica_index || 0) },
      { title: "Node", cell: (a) => h("a", { href: `#/nodes/${encodeURIComponent(a.node_id)}` }, a.node_id.slice(0, 8)) },
      { title: "Status", cell: (a) => status(a.status || "-") },
      { title: "Generation", cell: (a) => String(a.generation || 0) },
      { title: "Started", cell: (a) => when(a.started_at) },
      { title: "Error", cell: (a) => a.error_message || "" },
    ], d.node_assignments || [], "No replicas placed yet."));
    replace(placement, h("h2", { id: "placement-title" }, "Placement: why each node"), table("Placement", [
      { title: "Node", cell: (p) => p.node_id.slice(0, 8) },
      { title: "Decision", cell: (p) => status(p.selected ? "chosen" : "rejected") },
      { title: "Why", cell: (p) => p.selected ? factors(p) : (p.reason || "-") },
      { title: "Score", cell: (p) => p.selected || p.total_score ? Number(p.total_score || 0).toFixed(2) : "-" },
    ], d.placement || [], "No placement decision recorded."));
  };

  const stopWatch = follow(stream, `${path}:watch`, (event) => {
    events.prepend(eventItem(event));
    while (events.children.length > MAX_EVENTS) events.lastChild.remove();
    load(); // the tables follow the events at once, not at the next poll
  }, (state) => {
    rolloutState.textContent = state === "live" ? "Live: events appear as the controller sends them."
      : state === "connecting" ? "Connecting…"
        : state === "reconnecting" ? "The stream ended: reconnecting…"
          : `${state.message} ${state.hint}`;
  });
  const stopPolling = every(REFRESH_MS * 2, load);
  return () => {
    stopWatch();
    stopPolling();
  };
}

function eventItem(event) {
  const a = event.assignment;
  return h("li", {},
    h("time", { datetime: event.time }, when(event.time)), " ",
    status(label(event.status, "DEPLOYMENT_STATUS_")), " ",
    h("span", { class: "event-message" }, event.message || ""),
    a ? h("span", { class: "event-replica" },
      ` — replica ${a.replica_index || 0} on ${(a.node_id || "?").slice(0, 8)}: `, status(a.status || "-"),
      a.error_message ? ` (${a.error_message})` : "") : null);
}

function factors(p) {
  const entries = Object.entries(p.factor_scores || {});
  return entries.length ? entries.map(([k, v]) => `${k} ${Number(v).toFixed(2)}`).join(", ") : "best score";
}

// The update form: a new archive, and/or manifest fields. Only what changed is sent, named by
// the update mask, so the rest (and the env, which is never shown) stays as it is.
function renderUpdate(section, path, d, say, load) {
  const m = d.manifest || {};
  const form = h("form", { novalidate: true },
    errorBox(),
    archiveField("A new .tar.gz of the app's folder; leave empty to keep the current one."),
    runtimeFields(m),
    resourceFields(m),
    envField("Leave empty to keep the current variables (they are never shown). Anything typed here replaces them all."),
    healthFields(m),
    h("button", { type: "submit" }, "Update"));
  const initial = new FormData(form);
  onSubmit(form, async (data) => {
    const changed = (names) => names.some((n) => String(data.get(n)).trim() !== String(initial.get(n)).trim());
    const mask = [];
    const manifest = { name: d.name };
    if (changed(["runtime"])) { mask.push("manifest.runtime"); manifest.runtime = data.get("runtime"); }
    if (changed(["entrypoint"])) { mask.push("manifest.entrypoint"); manifest.entrypoint = data.get("entrypoint").trim(); }
    if (changed(["memory", "cpu", "storage"])) { mask.push("manifest.resources"); manifest.resources = resources(data); }
    if (data.get("env").trim()) { mask.push("manifest.env"); manifest.env = parseEnv(data.get("env")); }
    if (changed(["health_path", "health_interval", "health_timeout", "health_retries"])) {
      mask.push("manifest.health_check");
      manifest.health_check = healthCheck(data);
    }
    const file = data.get("archive");
    if (!mask.length && !(file && file.size)) {
      throw fieldViolations("Nothing to update.", [["archive", "Choose a new archive, or change a field below."]]);
    }
    const sha = await uploadArchive(data, say);
    if (sha) mask.push("source_sha256");
    const reply = await call("PATCH", path, { manifest, source_sha256: sha, update_mask: mask.join(",") });
    say(`Updating (${mask.join(", ")}): version ${reply.deployment.version} is rolling out.`);
    form.elements.namedItem("archive").value = "";
    form.elements.namedItem("env").value = "";
    load();
  }, MANIFEST_FIELDS);
  replace(section, h("h2", { id: "update-title" }, "Update"),
    h("p", { class: "help" }, "A rolling update: new replicas start and pass their health check before old ones stop."),
    form);
}

// -- logs ---------------------------------------------------------------------------------

export function deploymentLogsPage(root, [id]) {
  const path = `/api/v1/deployments/${encodeURIComponent(id)}`;
  const heading = h("h1", {}, "Logs");
  const state = h("p", { class: "help", role: "status", id: "logs-state" });
  const output = h("ol", { class: "logs", id: "log-lines", role: "log", "aria-label": "Log lines", tabindex: "0" });
  const form = h("form", { class: "inline", novalidate: true },
    errorBox(),
    field("Replica", { name: "replica", type: "number", min: 0, placeholder: "all" }),
    field("Last lines", { name: "tail_lines", type: "number", min: 1, max: 10000, value: 200 }),
    field("Since", { name: "since", placeholder: "10m", autocomplete: "off" }),
    checkField("Follow", { name: "follow", checked: true }),
    h("button", { type: "submit" }, "Show"));
  replace(root, h("p", {}, h("a", { href: `#/deployments/${encodeURIComponent(id)}` }, "← The deployment")),
    heading, form, state, output);
  call("GET", path).then(({ deployment: d }) => { heading.textContent = `Logs of ${d.name}`; }, () => {});

  let stop = () => {};
  const show = (data) => {
    stop();
    replace(output);
    const query = new URLSearchParams({ tail_lines: String(Number(data.get("tail_lines")) || 200) });
    if (String(data.get("replica")).trim()) query.set("replica_index", String(Number(data.get("replica"))));
    if (data.get("since").trim()) query.set("since", data.get("since").trim());
    const add = (batch) => {
      const who = `replica ${batch.replica_index || 0}`;
      if (batch.error_message) output.append(h("li", { class: "log-error" }, `${who}: ${batch.error_message}`));
      for (const line of batch.lines || []) {
        output.append(h("li", {}, h("time", { datetime: line.time }, when(line.time)), " ",
          h("span", { class: "log-replica" }, who), " ", h("code", {}, line.text)));
      }
      while (output.children.length > MAX_LOG_LINES) output.firstChild.remove();
    };
    const failed = (error) => replace(state, errorPanel(error));
    if (data.get("follow") === "on") {
      query.set("follow", "true");
      stop = follow(stream, `${path}/logs?${query}`, add, (s) => {
        if (s === "connecting") replace(output); // the tail comes again with each connection
        if (typeof s === "string") state.textContent = s === "live" ? "Following: new lines appear as they are written." : s === "reconnecting" ? "The stream ended: reconnecting…" : "Connecting…";
        else failed(s);
      });
    } else {
      const controller = new AbortController();
      stop = () => controller.abort();
      state.textContent = "Loading…";
      stream(`${path}/logs?${query}`, add, controller.signal).then(
        () => { state.textContent = `${output.children.length} lines.`; }, failed);
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    show(new FormData(form));
  });
  show(new FormData(form));
  return () => stop();
}
