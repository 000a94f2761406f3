// Metrics: the fleet at a glance (GET /api/v1/metrics/system) and a live chart of CPU and
// memory fed by the metrics/system:watch stream.

import { call, stream } from "./api.js";
import { h, percent, replace, when } from "./dom.js";
import { lineChart } from "./chart.js";
import { errorPanel } from "./forms.js";
import { follow } from "./live.js";

const MAX_SAMPLES = 120;
const SERIES = [["cpu_percent", "CPU", "cpu"], ["memory_percent", "Memory", "memory"]];

export function metricsPage(root) {
  const summary = h("div", { id: "system-metrics" });
  const chart = h("section", { class: "card", "aria-labelledby": "metrics-chart-title" });
  const state = h("p", { class: "help", id: "metrics-state" }, "Connecting…");
  replace(root, h("h1", {}, "Metrics"), summary,
    h("h2", { id: "metrics-chart-title" }, "CPU and memory, live"), state, chart);
  const samples = [];
  const show = (m) => {
    replace(summary, h("dl", { class: "fields card" }, [
      ["Nodes", h("span", { id: "metric-nodes" }, `${m.healthy_nodes || 0} healthy of ${m.total_nodes || 0}`)],
      ["CPU", `${percent(m.cpu_percent)} of ${Number(m.total_cpu_cores || 0).toFixed(1)} cores`],
      ["Memory", `${percent(m.memory_percent)} of ${Number(m.total_memory_gb || 0).toFixed(1)} GB`],
      ["Error rate", percent(m.error_rate)],
      ["Response time", `${Number(m.avg_response_time_ms || 0).toFixed(0)} ms`],
      ["As of", when(m.time)],
    ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  };
  call("GET", "/api/v1/metrics/system").then(({ metrics }) => {
    if (!samples.length) show(metrics);
  }, (error) => replace(summary, errorPanel(error)));
  replace(chart, lineChart(samples, SERIES));
  return follow(stream, "/api/v1/metrics/system:watch", ({ metrics }) => {
    show(metrics);
    samples.push({ time: metrics.time, metrics });
    if (samples.length > MAX_SAMPLES) samples.shift();
    chart.dataset.samples = String(samples.length);
    replace(chart, lineChart(samples, SERIES));
  }, (s) => {
    if (typeof s !== "string") replace(state, errorPanel(s));
    else state.textContent = s === "live" ? "Live: a sample arrives when the numbers change, and at least every 15 s." : s === "reconnecting" ? "The stream ended: reconnecting…" : "Connecting…";
  });
}
