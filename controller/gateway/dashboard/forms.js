// Showing API errors: the message and what to do in an alert box at the top of the form,
// and each field violation under its own field (aria-invalid + aria-describedby).

import { ApiError } from "./api.js";
import { h, replace } from "./dom.js";

let nextId = 0;

export function clearErrors(form) {
  for (const el of form.querySelectorAll(".field-error")) el.remove();
  for (const el of form.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    el.removeAttribute("aria-describedby");
  }
  const box = form.querySelector(".error-box");
  if (box) replace(box).hidden = true;
}

// fields: API field name → the form control's name attribute
export function showError(form, error, fields = {}) {
  clearErrors(form);
  let box = form.querySelector(".error-box");
  if (!box) {
    box = errorBox();
    form.prepend(box);
  }
  const apiError = error instanceof ApiError ? error : new ApiError(0, { message: String(error && error.message || error) });
  const unplaced = [];
  for (const violation of apiError.violations) {
    // manifest.env["NAME"] is shown under the control of manifest.env
    const base = violation.field.replace(/\[.*\]$/, "");
    // else the longest mapped prefix: shards[0].primary_node_id → the control of "shards"
    const prefix = Object.keys(fields).filter((k) => violation.field.startsWith(k)).sort((a, b) => b.length - a.length)[0];
    const control = form.elements.namedItem(fields[violation.field] || fields[base] || fields[prefix] || violation.field);
    if (!control || !control.insertAdjacentElement) {
      unplaced.push(violation);
      continue;
    }
    const id = `field-error-${++nextId}`;
    control.setAttribute("aria-invalid", "true");
    control.setAttribute("aria-describedby", id);
    control.insertAdjacentElement("afterend", h("p", { class: "field-error", id }, violation.description));
  }
  replace(box,
    h("p", { class: "error-message" }, apiError.message),
    unplaced.length ? h("ul", {}, unplaced.map((v) => h("li", {}, `${v.field}: ${v.description}`))) : null,
    h("p", { class: "error-hint" }, apiError.hint));
  box.hidden = false;
  const first = form.querySelector("[aria-invalid]");
  (first || box).focus();
}

export function errorBox() {
  return h("div", { class: "error-box", role: "alert", tabindex: "-1", hidden: true });
}

// An error shown outside a form (a page that failed to load, an action button).
export function errorPanel(error) {
  const apiError = error instanceof ApiError ? error : new ApiError(0, { message: String(error && error.message || error) });
  return h("div", { class: "error-box", role: "alert" },
    h("p", { class: "error-message" }, apiError.message),
    h("p", { class: "error-hint" }, apiError.hint));
}

// Runs the form's action with the submit button disabled, showing any error.
export function onSubmit(form, action, fields) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    clearErrors(form);
    if (button) button.disabled = true;
    form.setAttribute("aria-busy", "true");
    try {
      await action(new FormData(form));
    } catch (error) {
      showError(form, error, fields);
    } finally {
      if (button) button.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });
  return form;
}

export function field(labelText, attrs, help) {
  const id = attrs.id || `f-${attrs.name}-${++nextId}`;
  const control = attrs.multiline
    ? h("textarea", { ...attrs, multiline: undefined, id })
    : h("input", { ...attrs, id });
  return h("div", { class: "field" },
    h("label", { for: id }, labelText),
    control,
    help ? h("p", { class: "help" }, help) : null);
}

// A labelled <select>: options [[value, text], …].
export function selectField(labelText, attrs, options, help) {
  const id = attrs.id || `f-${attrs.name}-${++nextId}`;
  return h("div", { class: "field" },
    h("label", { for: id }, labelText),
    h("select", { ...attrs, value: undefined, id }, options.map(([value, text]) =>
      h("option", { value, selected: value === attrs.value ? true : undefined }, text))),
    help ? h("p", { class: "help" }, help) : null);
}

// A labelled checkbox, the label after the box.
export function checkField(labelText, attrs, help) {
  const id = attrs.id || `f-${attrs.name}-${++nextId}`;
  return h("div", { class: "field check" },
    h("span", {}, h("input", { ...attrs, type: "checkbox", id }), " ", h("label", { for: id }, labelText)),
    help ? h("p", { class: "help" }, help) : null);
}

// A check made in the page, shown like the API's own field violations.
export function fieldViolations(message, violations) {
  return new ApiError(400, {
    message,
    details: [{ "@type": "type.googleapis.com/google.rpc.BadRequest",
      field_violations: violations.map(([field, description]) => ({ field, description })) }],
  });
}
