// Files (storage on the user's storage nodes): list by prefix, a page at a time; upload (the
// raw file as the body of POST /api/v1/files, its path and copies in x-a67-* headers);
// download (the raw body, saved by the browser); delete.

import { call, download, upload } from "./api.js";
import { h, label, refreshContent, replace, status, table, when } from "./dom.js";
import { errorBox, errorPanel, field, fieldViolations, onSubmit } from "./forms.js";

const PAGE_SIZE = 20;

export function bytes(n) {
  const size = Number(n) || 0;
  if (size < 1024) return `${size} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = size / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

export function filesPage(root) {
  const message = h("div", { "aria-live": "polite" });
  const holder = h("div", { id: "files" });
  const pager = h("div", { class: "actions", id: "files-pager" });
  const uploadForm = h("form", { class: "card", novalidate: true },
    h("h2", { id: "upload-title" }, "Upload a file"),
    errorBox(),
    field("File", { name: "file", type: "file", required: true }),
    h("div", { class: "row" },
      field("Path", { name: "path", autocomplete: "off", spellcheck: "false", placeholder: "photos/cat.png" },
        "Where it goes, folders separated by /. Empty: the file's own name."),
      field("Copies", { name: "replicas", type: "number", min: 1, max: 5, placeholder: "3" },
        "Copies of each chunk, on different storage nodes (1 to 5; default 3).")),
    h("button", { type: "submit" }, "Upload"));
  const filter = h("form", { class: "inline", role: "search", novalidate: true },
    field("Path starts with", { name: "prefix", autocomplete: "off", spellcheck: "false" }),
    field("Per page", { name: "page_size", type: "number", min: 1, max: 100, value: PAGE_SIZE }),
    h("button", { type: "submit", class: "secondary" }, "Filter"));
  replace(root, h("h1", {}, "Files"), message, uploadForm, h("h2", {}, "Your files"), filter, holder, pager);

  // page tokens of the pages before this one (a stack), and of this one
  let prefix = "";
  let pageSize = PAGE_SIZE;
  let tokens = [];
  let current = "";
  const load = async () => {
    try {
      const query = new URLSearchParams({ page_size: String(pageSize) });
      if (prefix) query.set("prefix", prefix);
      if (current) query.set("page_token", current);
      const reply = await call("GET", `/api/v1/files?${query}`);
      const next = reply.next_page_token || "";
      refreshContent(holder, table("Files", [
        { title: "Path", cell: (f) => h("span", { class: "file-path" }, f.path) },
        { title: "Size", cell: (f) => bytes(f.size) },
        { title: "Type", cell: (f) => f.mime_type || "-" },
        { title: "Copies", cell: (f) => `${f.replicas || 0}` },
        { title: "Replication", cell: (f) => status(label(f.replication_status, "REPLICATION_STATUS_")) },
        { title: "Modified", cell: (f) => when(f.modified_at || f.created_at) },
        { title: "Actions", cell: (f) => h("span", { class: "row-actions" },
          h("button", { type: "button", class: "secondary", "aria-label": `Download ${f.path}`, onclick: () => save(f) }, "Download"),
          h("button", { type: "button", class: "danger", "aria-label": `Delete ${f.path}`, onclick: () => remove(f) }, "Delete")) },
      ], reply.files || [], prefix ? `No files under ${prefix}.` : "No files yet."));
      refreshContent(pager,
        tokens.length ? h("button", { type: "button", class: "secondary", onclick: () => { current = tokens.pop(); load(); } }, "Previous page") : null,
        next ? h("button", { type: "button", class: "secondary", onclick: () => { tokens.push(current); current = next; load(); } }, "Next page") : null,
        tokens.length || next ? h("span", { class: "help" }, `Page ${tokens.length + 1}`) : null);
    } catch (error) {
      replace(holder, errorPanel(error));
    }
  };
  const save = async (f) => {
    replace(message);
    try {
      const blob = await download(`/api/v1/files/${encodeURIComponent(f.id)}:download`);
      const url = URL.createObjectURL(blob);
      const link = h("a", { href: url, download: f.path.split("/").pop() || "download" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      replace(message, h("p", { class: "notice", role: "status" }, `Downloaded ${f.path} (${bytes(blob.size)}).`));
    } catch (error) {
      replace(message, errorPanel(error));
    }
  };
  const remove = async (f) => {
    if (!window.confirm(`Delete ${f.path}? Every copy is removed.`)) return;
    replace(message);
    try {
      await call("DELETE", `/api/v1/files/${encodeURIComponent(f.id)}`);
      replace(message, h("p", { class: "notice", role: "status" }, `Deleted ${f.path}.`));
      await load();
    } catch (error) {
      replace(message, errorPanel(error));
    }
  };
  onSubmit(filter, async (data) => {
    prefix = data.get("prefix").trim();
    pageSize = Math.min(100, Math.max(1, Number(data.get("page_size")) || PAGE_SIZE));
    tokens = [];
    current = "";
    await load();
  });
  onSubmit(uploadForm, async (data) => {
    const file = data.get("file");
    if (!file || !file.name) throw fieldViolations("Choose a file to upload.", [["file", "Choose a file."]]);
    const path = data.get("path").trim() || file.name;
    const headers = { "x-a67-path": path };
    if (String(data.get("replicas")).trim()) headers["x-a67-replicas"] = String(data.get("replicas")).trim();
    const reply = await upload("/api/v1/files", file, headers);
    replace(message, h("p", { class: "notice", role: "status" },
      `Uploaded ${reply.file.path} (${bytes(reply.file.size)}, ${reply.file.replicas} copies).`));
    uploadForm.reset();
    await load();
  }, { "metadata.path": "path", path: "path", "metadata.replicas": "replicas", replicas: "replicas", "metadata.mime_type": "file" });
  load();
}
