// LM-Lexicon page: a small client of the JSON API (POST v1/definitions, GET v1/model). No framework, no network
// access beyond this server. Errors go to the role="alert" regions; results to aria-live regions.
"use strict";

const TOKEN_KEY = "lm-lexicon-token";
const BATCH_CHUNK = 16;  // items per request in batch mode (capped by the server's max_items)
const state = { limits: null, batchRows: [] };

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------------------ API
class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || [];
  }
  toString() {
    return this.status ? `${this.message} (${this.status} ${this.code})` : this.message;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(method, path, body) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, "connection_error", `Cannot reach the server (${e.message}).`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    if (response.ok) throw new ApiError(response.status, "bad_response", "The server's answer is not JSON.");
  }
  if (!response.ok) {
    const err = (data && data.error) || {};
    if (response.status === 401) showTokenPanel();
    throw new ApiError(response.status, err.code || "http_error", err.message || response.statusText, err.details);
  }
  return data;
}

// ------------------------------------------------------------------------------------------------ messages
function showError(regionId, error) {
  $(regionId).textContent = typeof error === "string" ? error : String(error);
}

function clearError(regionId) {
  $(regionId).textContent = "";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function formatScore(score) {
  return typeof score === "number" ? score.toFixed(3) : "–";
}

// ------------------------------------------------------------------------------------------------ token + model
function showTokenPanel() {
  $("token-panel").hidden = false;
  $("token-status").hidden = true;
}

async function loadModel() {
  try {
    const card = await api("GET", "v1/model");
    state.limits = card.limits;
    $("token-panel").hidden = true;
    $("token-status").hidden = !(card.auth === "bearer token" && token());
    clearError("token-error");
    applyLimits(card.limits);
    const experts = (card.experts || []).length;
    $("model-info").textContent = `${card.name}${card.recipe ? ` (recipe ${card.recipe})` : ""}: ${experts} ` +
      `domain expert${experts === 1 ? "" : "s"}, routed by ${card.routing?.method || "?"} domains; ` +
      `reward model ${card.reward_model?.available ? "on" : "off"}.`;
    return true;
  } catch (e) {
    if (e.status === 401) {
      $("model-info").textContent = "This server needs an API token.";
      if (token()) showError("token-error", `The server refused this token: ${e}`);
      $("token").focus();
    } else {
      $("model-info").textContent = "The server did not answer.";
      showError("define-error", e);
    }
    return false;
  }
}

function applyLimits(limits) {
  if (!limits) return;
  const select = $("lang");
  const current = select.value || "en";
  select.replaceChildren(...limits.languages.map((code) => el("option", { value: code }, code)));
  select.value = limits.languages.includes(current) ? current : limits.languages[0];
  $("n").max = String(limits.max_n);
  $("n-hint").textContent = `1: one greedy definition. 2 to ${limits.max_n}: samples ranked by the reward model.`;
  $("term").maxLength = limits.max_term_chars;
  $("context").maxLength = limits.max_context_chars;
}

async function onToken(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) {
    showError("token-error", "Enter the token.");
    $("token").focus();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  if (await loadModel()) $("term").focus();
}

function onForgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  loadModel();
}

// ------------------------------------------------------------------------------------------------ one term
async function onDefine(event) {
  event.preventDefault();
  clearError("define-error");
  const term = $("term").value.trim();
  const n = Number($("n").value || "1");
  const max = state.limits ? state.limits.max_n : 8;
  if (!term) {
    showError("define-error", "Enter a term to define.");
    $("term").focus();
    return;
  }
  if (!Number.isInteger(n) || n < 1 || n > max) {
    showError("define-error", `Alternatives must be a whole number from 1 to ${max}.`);
    $("n").focus();
    return;
  }
  const item = { term, context: $("context").value.trim(), lang: $("lang").value };
  const button = $("define-button");
  button.disabled = true;
  $("define-result").setAttribute("aria-busy", "true");
  $("define-result").replaceChildren(el("p", { class: "meta" }, "Defining…"));
  try {
    const body = await api("POST", "v1/definitions", { items: [item], n, return_scores: $("scores").checked });
    renderDefinition(body.definitions[0], body);
  } catch (e) {
    $("define-result").replaceChildren();
    showError("define-error", e);
  } finally {
    button.disabled = false;
    $("define-result").removeAttribute("aria-busy");
  }
}

function renderDefinition(result, body) {
  const parts = [
    el("p", { class: "definition", id: "definition" }, result.definition || "(empty definition)"),
    el("p", { class: "meta" },
      "Routed to domain ", el("strong", { id: "domain" }, result.domain), " · ",
      result.selection === "reward_model" ? "picked by the reward model" :
        result.selection === "first_sample" ? "first sample (no reward model)" : "greedy decoding",
      result.score !== null && result.score !== undefined ? ` · reward score ${formatScore(result.score)}` : "",
      ` · ${Math.round(result.timing_ms.total)} ms`),
  ];
  if (result.score_reason && (body.n > 1 || $("scores").checked)) {
    parts.push(el("p", { class: "meta" }, `No scores: ${result.score_reason}`));
  }
  if (result.candidates) {
    const rows = result.candidates.map((c, i) => el("tr", { class: c.definition === result.definition ? "picked" : null },
      el("td", { class: "num" }, i + 1), el("td", {}, c.definition),
      el("td", { class: "num" }, formatScore(c.score)),
      el("td", {}, c.definition === result.definition ? "chosen" : "")));
    parts.push(el("table", { id: "alternatives" },
      el("caption", {}, `${result.candidates.length} alternatives with their reward-model scores`),
      el("thead", {}, el("tr", {}, ...["#", "definition", "score", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows)));
  }
  $("define-result").replaceChildren(...parts);
}

// ------------------------------------------------------------------------------------------------ batch input
function parseCsv(text) {
  // RFC 4180: quoted fields may hold commas, quotes ("") and newlines.
  const rows = [];
  let row = [], field = "", quoted = false, line = 1, rowLine = 1;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (ch === '"') quoted = false;
      else { if (ch === "\n") line++; field += ch; }
    } else if (ch === '"') quoted = true;
    else if (ch === ",") { row.push(field); field = ""; }
    else if (ch === "\n" || ch === "\r") {
      if (ch === "\r" && text[i + 1] === "\n") i++;
      row.push(field); rows.push({ line: rowLine, cells: row }); row = []; field = ""; line++; rowLine = line;
    } else field += ch;
  }
  if (field !== "" || row.length) { row.push(field); rows.push({ line: rowLine, cells: row }); }
  return rows.filter((r) => r.cells.some((c) => c.trim() !== ""));
}

function fromCsv(text) {
  const rows = parseCsv(text.replace(/^\ufeff/, ""));
  if (!rows.length) return { items: [], rejected: [] };
  const header = rows[0].cells.map((h) => h.trim().toLowerCase());
  const col = (name) => header.indexOf(name);
  if (col("term") < 0) {
    throw new Error(`The CSV needs a header row with a "term" column (found: ${header.join(", ") || "nothing"}).`);
  }
  return fromObjects(rows.slice(1).map((r) => ({
    line: r.line,
    row: { term: r.cells[col("term")], context: col("context") >= 0 ? r.cells[col("context")] : "",
           lang: col("lang") >= 0 ? r.cells[col("lang")] : "" },
  })));
}

function fromJsonl(text) {
  const parsed = [], rejected = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    if (!raw.trim()) return;
    try {
      const row = JSON.parse(raw);
      if (row === null || typeof row !== "object" || Array.isArray(row)) rejected.push({ line: i + 1, reason: "not a JSON object" });
      else parsed.push({ line: i + 1, row });
    } catch (e) {
      rejected.push({ line: i + 1, reason: "not valid JSON" });
    }
  });
  const out = fromObjects(parsed);
  return { items: out.items, rejected: rejected.concat(out.rejected) };
}

function fromLines(text) {
  const parsed = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    if (!raw.trim()) return;
    const sep = raw.includes("\t") ? "\t" : raw.includes(" | ") ? " | " : null;
    const [term, context] = sep ? [raw.slice(0, raw.indexOf(sep)), raw.slice(raw.indexOf(sep) + sep.length)] : [raw, ""];
    parsed.push({ line: i + 1, row: { term, context } });
  });
  return fromObjects(parsed);
}

function fromObjects(parsed) {
  const items = [], rejected = [];
  for (const { line, row } of parsed) {
    const bad = ["term", "context", "lang"].find((k) => row[k] !== undefined && row[k] !== null && typeof row[k] !== "string");
    if (bad) rejected.push({ line, reason: `'${bad}' must be text`, term: String(row.term ?? "") });
    else if (!row.term || !row.term.trim()) rejected.push({ line, reason: "missing or empty term", term: "" });
    else items.push({ line, term: row.term.trim(), context: (row.context || "").trim(), lang: (row.lang || "").trim() });
  }
  return { items, rejected };
}

async function readBatchInput() {
  const file = $("batch-file").files[0];
  if (file) {
    const text = await file.text();
    const name = file.name.toLowerCase();
    if (name.endsWith(".csv")) return { source: file.name, ...fromCsv(text) };
    if (name.endsWith(".jsonl") || name.endsWith(".json")) return { source: file.name, ...fromJsonl(text) };
    return { source: file.name, ...fromLines(text) };
  }
  return { source: "the pasted lines", ...fromLines($("batch-text").value) };
}

// ------------------------------------------------------------------------------------------------ batch run
function itemErrors(error, count) {
  // validation messages per item index, from loc = ["items", i, field]
  const out = new Map();
  for (const d of error.details || []) {
    const loc = d.loc || [];
    if (loc[0] === "items" && Number.isInteger(loc[1]) && loc[1] < count && !out.has(loc[1])) {
      out.set(loc[1], `${loc.slice(2).join(".") || "item"}: ${d.msg}`);
    }
  }
  return out;
}

async function defineChunk(chunk, n, results, rejected) {
  // rows the server rejects are set aside with its message and the rest re-sent
  let pending = chunk.slice();
  while (pending.length) {
    try {
      const body = await api("POST", "v1/definitions", {
        items: pending.map((it) => ({ term: it.term, context: it.context, lang: it.lang || $("lang").value })), n,
      });
      body.definitions.forEach((d, i) => results.push({ ...pending[i], lang: pending[i].lang || $("lang").value,
                                                        definition: d.definition, domain: d.domain, score: d.score }));
      return;
    } catch (e) {
      const bad = e.status === 422 ? itemErrors(e, pending.length) : new Map();
      if (!bad.size) throw e;
      for (const [i, reason] of bad) rejected.push({ line: pending[i].line, term: pending[i].term, reason: `server: ${reason}` });
      pending = pending.filter((_, i) => !bad.has(i));
    }
  }
}

async function onBatch(event) {
  event.preventDefault();
  clearError("batch-error");
  $("batch-result").replaceChildren();
  $("batch-download").disabled = true;
  let input;
  try {
    input = await readBatchInput();
  } catch (e) {
    showError("batch-error", e.message);
    return;
  }
  if (!input.items.length && !input.rejected.length) {
    showError("batch-error", "Paste some terms (one per line) or choose a CSV or JSONL file.");
    $("batch-text").focus();
    return;
  }
  const results = [], rejected = input.rejected.slice();
  const size = Math.min(BATCH_CHUNK, state.limits ? state.limits.max_items : BATCH_CHUNK);
  const total = input.items.length + input.rejected.length;
  const progress = $("batch-progress");
  progress.hidden = false;
  progress.max = Math.max(1, total);
  progress.value = input.rejected.length;
  $("batch-button").disabled = true;
  $("batch-status").textContent = `Defining ${input.items.length} rows from ${input.source}…`;
  try {
    for (let start = 0; start < input.items.length; start += size) {
      await defineChunk(input.items.slice(start, start + size), 1, results, rejected);
      progress.value = input.rejected.length + Math.min(start + size, input.items.length);
    }
  } catch (e) {
    const left = input.items.length - results.length - (rejected.length - input.rejected.length);
    showError("batch-error", `Stopped after ${results.length} rows: ${e}. ${left} rows were not sent.`);
  } finally {
    $("batch-button").disabled = false;
    progress.hidden = true;
  }
  results.sort((a, b) => a.line - b.line);
  rejected.sort((a, b) => a.line - b.line);
  state.batchRows = results.map((r) => ({ ...r, status: "ok", reason: "" }))
    .concat(rejected.map((r) => ({ line: r.line, term: r.term, context: "", lang: "", definition: "", domain: "",
                                   score: "", status: "rejected", reason: r.reason })))
    .sort((a, b) => a.line - b.line);
  $("batch-status").textContent = `${results.length} of ${total} rows defined` +
    (rejected.length ? `, ${rejected.length} rejected (reasons in the table and the CSV).` : ".");
  renderBatch(results, rejected);
  $("batch-download").disabled = state.batchRows.length === 0;
}

function renderBatch(results, rejected) {
  const parts = [];
  if (results.length) {
    parts.push(el("table", { id: "batch-table" },
      el("caption", {}, `Definitions (${results.length})`),
      el("thead", {}, el("tr", {}, ...["line", "term", "context", "definition", "domain"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...results.map((r) => el("tr", {}, el("td", { class: "num" }, r.line), el("td", {}, r.term),
        el("td", {}, r.context), el("td", {}, r.definition), el("td", { class: "num" }, r.domain))))));
  }
  if (rejected.length) {
    parts.push(el("table", { id: "batch-rejected" },
      el("caption", {}, `Rejected rows (${rejected.length})`),
      el("thead", {}, el("tr", {}, ...["line", "term", "reason"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rejected.map((r) => el("tr", {}, el("td", { class: "num" }, r.line), el("td", {}, r.term || ""),
        el("td", {}, r.reason))))));
  }
  $("batch-result").replaceChildren(...parts);
}

function csvCell(value) {
  const text = String(value ?? "");
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function onDownload() {
  const columns = ["line", "term", "context", "lang", "definition", "domain", "score", "status", "reason"];
  const lines = [columns.join(",")].concat(state.batchRows.map((r) => columns.map((c) => csvCell(r[c])).join(",")));
  const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv;charset=utf-8" });
  const link = el("a", { href: URL.createObjectURL(blob), download: "definitions.csv" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ------------------------------------------------------------------------------------------------ start
document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", onToken);
  $("token-forget").addEventListener("click", onForgetToken);
  $("define-form").addEventListener("submit", onDefine);
  $("batch-form").addEventListener("submit", onBatch);
  $("batch-download").addEventListener("click", onDownload);
  loadModel();
});
