// The REST API of the gateway (same origin): JSON in and out, errors as ApiError, and the
// session — tokens held in memory only (never in storage or cookies), the access token
// refreshed before it expires, one refresh at a time (a spent refresh token ends the session).

import { passwordHash } from "./kdf.js";

const SESSION_OVER = new Set(["SESSION_REVOKED", "REFRESH_TOKEN_REUSED", "TOKEN_INVALID", "MISSING_TOKEN"]);

// What to do, by ErrorInfo reason, then by HTTP status.
const HINTS_BY_REASON = {
  INVALID_CREDENTIALS: "Check the email and password and try again.",
  EMAIL_TAKEN: "Sign in instead, or register with another email.",
  ALREADY_EXISTS: "Sign in instead, or register with another email.",
  LOGIN_THROTTLED: "Wait, then try again.",
  TOKEN_EXPIRED: "Sign in again.",
  SESSION_REVOKED: "Sign in again.",
  REFRESH_TOKEN_REUSED: "Your session ended for safety: sign in again.",
  TOKEN_INVALID: "Sign in again.",
  MISSING_TOKEN: "Sign in first.",
  INVALID_MFA_CODE: "Type the current code from your authenticator app, or a recovery code.",
  MFA_CHALLENGE_INVALID: "The sign-in took too long: enter your password again.",
  NO_FEASIBLE_NODE: "Add a node (Nodes → Enroll a node) or free capacity, then try again.",
};
const HINTS_BY_STATUS = {
  400: "Correct the fields marked below and send it again.",
  401: "Sign in again.",
  403: "You can only use your own resources.",
  404: "It may have been removed: go back to the list.",
  409: "It changed or already exists: reload and try again.",
  413: "Send something smaller.",
  429: "Wait a moment, then try again.",
  503: "The controller or the nodes are not available: try again in a moment.",
  504: "It took too long: try again, or with a smaller request.",
};

export class ApiError extends Error {
  constructor(status, body) {
    const message = (body && body.message) || `The request failed (HTTP ${status}).`;
    super(message);
    this.status = status;
    this.code = body && body.code;
    const details = (body && body.details) || [];
    const info = details.find((d) => d["@type"] === "type.googleapis.com/google.rpc.ErrorInfo");
    const bad = details.find((d) => d["@type"] === "type.googleapis.com/google.rpc.BadRequest");
    const retry = details.find((d) => d["@type"] === "type.googleapis.com/google.rpc.RetryInfo");
    this.reason = (info && info.reason) || "";
    this.violations = (bad && bad.field_violations) || [];
    this.retryAfter = retry && retry.retry_delay ? parseFloat(retry.retry_delay) : null;
    let hint = HINTS_BY_REASON[this.reason] || HINTS_BY_STATUS[status] || "Try again; if it keeps failing, check the controller's log.";
    if (this.retryAfter !== null) hint = `Try again in ${Math.ceil(this.retryAfter)} s.`;
    if (status === 0) hint = "Check that the gateway is running (a67 up) and reload the page.";
    this.hint = hint;
  }
}

const session = { access: "", refresh: "", email: "", timer: 0, refreshing: null };
export const sessionEvents = new EventTarget(); // "change": signed in or out

export function signedIn() {
  return Boolean(session.access);
}

export function currentEmail() {
  return session.email;
}

async function send(method, path, body, token) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  } catch {
    throw new ApiError(0, { message: "The gateway could not be reached." });
  }
  return readJson(response);
}

// A call with the session's access token; an expired token is refreshed and the call made once more.
export async function call(method, path, body) {
  try {
    return await send(method, path, body, session.access);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401 && error.reason === "TOKEN_EXPIRED" && session.refresh) {
      await refresh();
      return send(method, path, body, session.access);
    }
    if (error instanceof ApiError && error.status === 401 && SESSION_OVER.has(error.reason)) end();
    throw error;
  }
}

// A raw body (a file) sent as it is, not as JSON: the gateway passes it to the controller as a
// google.api.HttpBody. `headers` adds e.g. x-a67-path. The answer is JSON.
export async function upload(path, blob, headers = {}) {
  const attempt = async () => {
    let response;
    try {
      response = await fetch(path, {
        method: "POST", body: blob, cache: "no-store",
        headers: { "content-type": blob.type || "application/octet-stream", ...headers, authorization: `Bearer ${session.access}` },
      });
    } catch {
      throw new ApiError(0, { message: "The gateway could not be reached." });
    }
    return readJson(response);
  };
  return withSession(attempt);
}

// A raw response body (a download) as a Blob, with its file name and type.
export async function download(path) {
  return withSession(async () => {
    let response;
    try {
      response = await fetch(path, { headers: { authorization: `Bearer ${session.access}` }, cache: "no-store" });
    } catch {
      throw new ApiError(0, { message: "The gateway could not be reached." });
    }
    if (!response.ok) return readJson(response);
    return response.blob();
  });
}

// A server stream (NDJSON: one JSON object per line), each message passed to onMessage as it
// arrives. Resolves when the stream ends; rejects with ApiError when it is refused (before the
// first message) or cannot be reached. `signal` (an AbortSignal) cancels it.
export async function stream(path, onMessage, signal) {
  const response = await withSession(async () => {
    let res;
    try {
      res = await fetch(path, { headers: { authorization: `Bearer ${session.access}` }, cache: "no-store", signal });
    } catch (error) {
      if (signal && signal.aborted) throw error;
      throw new ApiError(0, { message: "The gateway could not be reached." });
    }
    if (!res.ok) await readJson(res);
    return res;
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let i;
      while ((i = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, i).trim();
        buffer = buffer.slice(i + 1);
        if (line) onMessage(JSON.parse(line));
      }
    }
  } catch (error) {
    if (signal && signal.aborted) return;
    throw error;
  }
  if (buffer.trim()) onMessage(JSON.parse(buffer));
}

async function readJson(response) {
  const text = await response.text();
  let data = {};
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text.trim() };
    }
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Runs attempt() with the session's token; an expired token is refreshed and it runs once more.
async function withSession(attempt) {
  try {
    return await attempt();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401 && error.reason === "TOKEN_EXPIRED" && session.refresh) {
      await refresh();
      return attempt();
    }
    if (error instanceof ApiError && error.status === 401 && SESSION_OVER.has(error.reason)) end();
    throw error;
  }
}

function start(email, tokens) {
  session.access = tokens.access_token;
  session.refresh = tokens.refresh_token;
  session.email = email;
  schedule(Number(tokens.expires_in) || 3600);
  sessionEvents.dispatchEvent(new Event("change"));
}

// Refresh a little before the access token expires: 30 s before, or a fifth of its life if shorter.
function schedule(expiresIn) {
  clearTimeout(session.timer);
  const margin = Math.min(30, expiresIn / 5);
  session.timer = setTimeout(() => refresh().catch(() => {}), Math.max(1, expiresIn - margin) * 1000);
}

export function refresh() {
  if (!session.refreshing) {
    session.refreshing = (async () => {
      try {
        const tokens = await send("POST", "/api/v1/auth/refresh", {}, session.refresh);
        session.access = tokens.access_token;
        session.refresh = tokens.refresh_token;
        schedule(Number(tokens.expires_in) || 3600);
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) end();
        throw error;
      } finally {
        session.refreshing = null;
      }
    })();
  }
  return session.refreshing;
}

function end() {
  clearTimeout(session.timer);
  const had = Boolean(session.access);
  Object.assign(session, { access: "", refresh: "", email: "", timer: 0 });
  if (had) sessionEvents.dispatchEvent(new Event("change"));
}

export async function register(email, password) {
  const hash = await passwordHash(email, password);
  start(email.trim(), await send("POST", "/api/v1/auth/register", { email, password_hash: hash }));
}

// Signs in, or returns {mfa_challenge} when the account asks for a second factor.
export async function login(email, password) {
  const hash = await passwordHash(email, password);
  const reply = await send("POST", "/api/v1/auth/login", { email, password_hash: hash });
  if (reply.mfa_required) return { mfaChallenge: reply.mfa_challenge, email: email.trim() };
  start(email.trim(), reply);
  return null;
}

export async function verifyMfa(challenge, email, code, recoveryCode) {
  const body = { mfa_challenge: challenge, code: recoveryCode ? "" : code, recovery_code: recoveryCode || "" };
  start(email, await send("POST", "/api/v1/auth/mfa:verify", body));
}

export async function logout() {
  try {
    if (session.access) await send("POST", "/api/v1/auth/logout", {}, session.access);
  } finally {
    end();
  }
}
