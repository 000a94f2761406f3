// Building the page: h("tag", {attributes, onclick: fn}, ...children). Text is always
// set as text (never parsed as HTML), so nothing from the API can inject markup.

export function h(tag, attrs = {}, ...children) {
  const el = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// "NODE_STATUS_READY" → "ready"
export function label(value, prefix) {
  if (!value) return "-";
  return value.startsWith(prefix) ? value.slice(prefix.length).toLowerCase().replaceAll("_", " ") : value;
}

export function percent(value) {
  return value === undefined || value === null ? "-" : `${Number(value).toFixed(0)}%`;
}

export function when(timestamp) {
  if (!timestamp) return "-";
  const date = new Date(timestamp);
  if (Number.isNaN(date.getTime()) || date.getTime() <= 0) return "-";
  return date.toLocaleString();
}

// A table: columns [{title, cell: row => node|string}], with a caption for screen readers.
export function table(caption, columns, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c.title)))),
      h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => h("td", { "data-label": c.title }, c.cell(row))))))));
}

export function status(text) {
  const cls = /ready|running|ok|active|complete/.test(text) ? "good"
    : /fail|suspect|removed|timeout|error/.test(text) ? "bad"
      : /drain|degraded|busy|pending|deploying|scaling|initializing/.test(text) ? "warn" : "";
  return h("span", { class: `badge ${cls}` }, text);
}

// Replace a live region's content, keeping keyboard focus on the same link or button
// (matched by href or text) so that a refresh does not throw the reader back to the top.
export function refreshContent(el, ...children) {
  const focused = el.contains(document.activeElement) ? document.activeElement : null;
  const key = focused && (focused.getAttribute("href") || focused.textContent);
  replace(el, ...children);
  if (key) {
    const again = [...el.querySelectorAll("a, button")].find((c) => (c.getAttribute("href") || c.textContent) === key);
    if (again) again.focus();
  }
  return el;
}
