// The dashboard's shell: header and navigation, a hash router (#/nodes, #/nodes/<id>, …),
// and the sign-in and register pages. Each page is render(main, params) → cleanup function.

import * as api from "./api.js";
import { h, replace } from "./dom.js";
import { errorBox, field, onSubmit } from "./forms.js";
import { alertsPage } from "./alerts.js";
import { databasePage, databasesPage } from "./databases.js";
import { deploymentLogsPage, deploymentPage, deploymentsPage, newDeploymentPage } from "./deployments.js";
import { filesPage } from "./files.js";
import { metricsPage } from "./metrics.js";
import { nodePage, nodesPage } from "./nodes.js";

const MIN_PASSWORD_CHARS = 8; // as a67 register (controller/client/kdf.py)

const ROUTES = [
  [/^#\/signin$/, signInPage, false],
  [/^#\/register$/, registerPage, false],
  [/^#\/nodes$/, nodesPage, true],
  [/^#\/nodes\/([^/]+)$/, nodePage, true],
  [/^#\/deployments$/, deploymentsPage, true],
  [/^#\/deployments\/new$/, newDeploymentPage, true],
  [/^#\/deployments\/([^/]+)$/, deploymentPage, true],
  [/^#\/deployments\/([^/]+)\/logs$/, deploymentLogsPage, true],
  [/^#\/databases$/, databasesPage, true],
  [/^#\/databases\/([^/]+)$/, databasePage, true],
  [/^#\/metrics$/, metricsPage, true],
  [/^#\/files$/, filesPage, true],
  [/^#\/alerts$/, alertsPage, true],
];
const NAV = [["#/nodes", "Nodes"], ["#/deployments", "Deployments"], ["#/databases", "Databases"],
  ["#/metrics", "Metrics"], ["#/files", "Files"], ["#/alerts", "Alerts"]];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const account = document.getElementById("account");
let cleanup = () => {};
let signedOutNotice = "";

function renderChrome() {
  const hash = location.hash;
  replace(nav, api.signedIn()
    ? h("ul", {}, NAV.map(([href, text]) =>
      h("li", {}, h("a", { href, "aria-current": hash.startsWith(href) ? "page" : undefined }, text))))
    : null);
  replace(account, api.signedIn()
    ? [h("span", { class: "who" }, api.currentEmail()),
      h("button", { type: "button", class: "secondary", onclick: signOut }, "Sign out")]
    : null);
}

async function signOut() {
  try {
    await api.logout();
  } finally {
    signedOutNotice = "You are signed out.";
    location.hash = "#/signin";
  }
}

function route() {
  cleanup();
  cleanup = () => {};
  const hash = location.hash || "#/nodes";
  for (const [pattern, page, needsSession] of ROUTES) {
    const match = pattern.exec(hash);
    if (!match) continue;
    if (needsSession && !api.signedIn()) {
      location.hash = "#/signin";
      return;
    }
    if (!needsSession && api.signedIn()) {
      location.hash = "#/nodes";
      return;
    }
    renderChrome();
    replace(main);
    cleanup = page(main, match.slice(1).map(decodeURIComponent)) || (() => {});
    const heading = main.querySelector("h1");
    if (heading) {
      heading.setAttribute("tabindex", "-1");
      heading.focus({ preventScroll: true });
    }
    return;
  }
  location.hash = api.signedIn() ? "#/nodes" : "#/signin";
}

// -- sign in, MFA, register -------------------------------------------------------------

function signInPage(root) {
  const notice = signedOutNotice;
  signedOutNotice = "";
  const form = h("form", { class: "card narrow", novalidate: true },
    errorBox(),
    field("Email", { name: "email", type: "email", autocomplete: "username", required: true }),
    field("Password", { name: "password", type: "password", autocomplete: "current-password", required: true }),
    h("button", { type: "submit" }, "Sign in"));
  onSubmit(form, async (data) => {
    const pending = await api.login(data.get("email"), data.get("password"));
    if (pending) replace(root, h("h1", {}, "Second step"), mfaForm(pending));
    else location.hash = "#/nodes";
  }, { email: "email", password_hash: "password" });
  replace(root,
    h("h1", {}, "Sign in"),
    notice ? h("p", { class: "notice", role: "status" }, notice) : null,
    form,
    h("p", { class: "aside" }, "No account yet? ", h("a", { href: "#/register" }, "Register")));
}

function mfaForm(pending) {
  const form = h("form", { class: "card narrow", novalidate: true },
    errorBox(),
    h("p", {}, "This account has two-step sign-in. Enter the 6-digit code from your authenticator app, or one of your recovery codes."),
    field("Code", { name: "code", inputmode: "numeric", autocomplete: "one-time-code", pattern: "[0-9]{6}" }),
    field("Or a recovery code", { name: "recovery_code", autocomplete: "off" }),
    h("button", { type: "submit" }, "Verify"));
  return onSubmit(form, async (data) => {
    await api.verifyMfa(pending.mfaChallenge, pending.email, data.get("code").trim(), data.get("recovery_code").trim());
    location.hash = "#/nodes";
  }, { code: "code", recovery_code: "recovery_code" });
}

function registerPage(root) {
  const form = h("form", { class: "card narrow", novalidate: true },
    errorBox(),
    field("Email", { name: "email", type: "email", autocomplete: "username", required: true }),
    field("Password", { name: "password", type: "password", autocomplete: "new-password", required: true,
      minlength: MIN_PASSWORD_CHARS }, `At least ${MIN_PASSWORD_CHARS} characters. It never leaves this browser: only a key derived from it is sent.`),
    h("button", { type: "submit" }, "Register"));
  onSubmit(form, async (data) => {
    const password = data.get("password");
    if (password.length < MIN_PASSWORD_CHARS) {
      throw new api.ApiError(400, {
        message: "The password is too short.",
        details: [{ "@type": "type.googleapis.com/google.rpc.BadRequest",
          field_violations: [{ field: "password_hash", description: `Use at least ${MIN_PASSWORD_CHARS} characters.` }] }],
      });
    }
    await api.register(data.get("email"), password);
    location.hash = "#/nodes";
  }, { email: "email", password_hash: "password" });
  replace(root,
    h("h1", {}, "Create an account"),
    form,
    h("p", { class: "aside" }, "Have an account? ", h("a", { href: "#/signin" }, "Sign in")));
}

api.sessionEvents.addEventListener("change", () => {
  renderChrome();
  if (!api.signedIn() && !location.hash.match(/^#\/(signin|register)$/)) {
    signedOutNotice = signedOutNotice || "Your session ended: sign in again.";
    location.hash = "#/signin";
  }
});
window.addEventListener("hashchange", route);
route();
