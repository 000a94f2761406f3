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
