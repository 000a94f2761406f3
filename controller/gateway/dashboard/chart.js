// A small SVG line chart of percentages (0-100 %) over time, with a text summary for screen
// readers and a caption naming each line. No library: one <path> per series.

import { h, percent, when } from "./dom.js";

// samples: [{time, metrics: {key: percent}}]; series: [[key, name, cssClass]]
export function lineChart(samples, series) {
  if (samples.length < 2) return h("p", { class: "empty" }, "Not enough samples yet.");
  const W = 600, H = 160;
  const x = (i) => (i / (samples.length - 1)) * W;
  const y = (v) => H - (Math.max(0, Math.min(100, v || 0)) / 100) * H;
  const line = (key) => samples.map((s, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y((s.metrics || {})[key]).toFixed(1)}`).join(" ");
  const last = samples[samples.length - 1].metrics || {};
  const summary = series.map(([key, name]) => `${name} ${percent(last[key])}`).join(", ");
  return h("figure", {},
    h("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", class: "chart", role: "img", "aria-label": `${summary} in the last sample` },
      series.map(([key, , cls]) => h("svg:path", { d: line(key), class: cls }))),
    h("figcaption", {}, series.map(([, name, cls]) => [h("span", { class: `key ${cls}` }, name), " "]),
      `— ${samples.length} samples, ${when(samples[0].time)} to ${when(samples[samples.length - 1].time)}`));
}
