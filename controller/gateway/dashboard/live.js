// Keeping a view live: run `refresh` now and then every `everyMs` after each run ends,
// until the returned stop function is called (when the page is left).

export const REFRESH_MS = 2000;

export function every(everyMs, refresh) {
  let stopped = false;
  let timer = 0;
  const tick = async () => {
    if (stopped) return;
    try {
      await refresh();
    } finally {
      if (!stopped) timer = setTimeout(tick, everyMs);
    }
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// All pages of a List call: GET path?page_size=100&page_token=… → the concatenated `key` arrays.
export async function listAll(call, path, key) {
  const items = [];
  let token = "";
  do {
    const sep = path.includes("?") ? "&" : "?";
    const reply = await call("GET", `${path}${sep}page_size=100${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
    items.push(...(reply[key] || []));
    token = reply.next_page_token || "";
  } while (token);
  return items;
}

// Following a server stream (…:watch, logs?follow=true): every message to onMessage; when the
// stream ends or fails it is opened again after a pause (1 s, doubling to 15 s; reset by a
// message), until the returned stop function is called. onState("live" | "reconnecting" |
// error) says how it is going; an error that retrying cannot fix (400, 401, 403, 404) stops it.
export function follow(stream, path, onMessage, onState = () => {}) {
  const controller = new AbortController();
  let stopped = false;
  let timer = 0;
  let pause = 1000;
  const open = async () => {
    if (stopped) return;
    onState("connecting");
    try {
      await stream(path, (message) => {
        pause = 1000;
        onState("live");
        onMessage(message);
      }, controller.signal);
      if (stopped) return;
      onState("reconnecting");
    } catch (error) {
      if (stopped) return;
      if ([400, 401, 403, 404].includes(error.status)) {
        onState(error);
        return;
      }
      onState("reconnecting");
    }
    timer = setTimeout(open, pause);
    pause = Math.min(pause * 2, 15000);
  };
  open();
  return () => {
    stopped = true;
    clearTimeout(timer);
    controller.abort();
  };
}
