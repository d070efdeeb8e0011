// Talaria view: the per-op table (sort, filter, select), a graph of the model's blocks coloured by any metric and
// linked to the table, a Pareto plot of every plan priced, and what-if edits (bits for a selection, rules, auto for a
// target) priced by the server (api/simulate, api/auto); api/plan writes the plan for `pippin compress --plan`.
// The plan lives here as {op: bits}; the server prices it. The graph and Pareto plots are drawn by plots.js. No libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const TEXT_COLS = new Set(["name", "kind", "compute", "decode_bound", "prefill_bound", "shares"]);
// key -> [header, unit scale, digits]; columns a row carries that are not here are shown as they come.
const COLS = {
  name: ["op"], kind: ["kind"], layer: ["layer", 1, 0], bits: ["bits", 1, 0], params: ["params", 1, 0],
  stored_bytes: ["stored KB", 1e-3, 1], compute: ["compute"], decode_flops: ["decode MFLOP", 1e-6, 3],
  decode_bytes: ["decode KB moved", 1e-3, 1], prefill_flops: ["prefill GFLOP", 1e-9, 3], prefill_bytes: ["prefill MB moved", 1e-6, 2],
  weights_decoded: ["weights decoded", 1, 0], shares: ["shares"], decode_s: ["decode µs", 1e6, 2], decode_bound: ["decode bound"],
  decode_j: ["decode µJ", 1e6, 3], prefill_s: ["prefill ms", 1e3, 3], prefill_bound: ["prefill bound"], prefill_j: ["prefill mJ", 1e3, 3],
  measured_decode_s: ["measured decode µs", 1e6, 2], measured_decode_iqr_s: ["decode IQR µs", 1e6, 2],
  measured_prefill_s: ["measured prefill ms", 1e3, 3], measured_prefill_iqr_s: ["prefill IQR ms", 1e3, 3],
  measured_repeats: ["repeats", 1, 0], kl: ["ΔKL", 1, 5],
};
const TOTALS = {  // id -> [key, format, lower is better]
  size: ["size_bytes", (v) => `${(v / 1e6).toFixed(2)} MB`],
  bpw: ["bpw", (v) => v.toFixed(3)],
  decode: ["decode_s", (v) => `${(v * 1e3).toFixed(3)} ms/tok`],
  prefill: ["prefill_s", (v) => `${(v * 1e3).toFixed(1)} ms`],
  energy: ["decode_j", (v) => `${(v * 1e3).toFixed(3)} mJ/tok`],
  kl: ["predicted_kl", (v) => v.toFixed(4)],
};

const state = {
  info: null, bits: {}, rows: [], totals: null, baseTotals: null, point: null, undo: [], target: null,
  selected: new Set(), anchor: null, sort: { key: null, dir: -1 }, metric: "decode_s", history: null, record: null,
};

function edits() {
  const base = state.info.base.bits;
  const out = {};
  for (const [n, b] of Object.entries(state.bits)) if (base[n] !== b) out[n] = b;
  return out;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(`api/${path}`, init);
  const data = await r.json().catch(() => ({ error: { message: `HTTP ${r.status}` } }));
  if (!r.ok) throw new Error(data.error ? data.error.message : `HTTP ${r.status}`);
  return data;
}

// Run one request that prices a plan; on success adopt it, on failure restore the undo step and say why.
async function price(path, body, { pushUndo = true, target = null } = {}) {
  const before = { bits: state.bits, target: state.target };
  document.body.dataset.busy = "1";
  try {
    const res = await api(path, { device: $("device").value, ...body });
    if (pushUndo) state.undo.push(before);
    adopt(res);
    state.target = target;
    status(`${res.point.label}: ${res.plan.describe}`);
    await refreshHistory();
  } catch (e) {
    status(e.message, true);
  } finally {
    document.body.dataset.busy = "0";
    document.body.dataset.seq = String(Number(document.body.dataset.seq) + 1);
  }
}

function adopt(res) {
  state.bits = res.plan.bits;
  state.rows = res.rows;
  state.totals = res.totals;
  state.point = res.point;
  $("t-plan").textContent = res.plan.describe;
  renderTotals();
  renderTable();
  renderGraph();
}

function renderTotals() {
  for (const [id, [key, fmt]] of Object.entries(TOTALS)) {
    const v = state.totals[key];
    const el = $(`t-${id}`);
    el.textContent = fmt(v);
    el.dataset.value = String(v);
    const b = state.baseTotals ? state.baseTotals[key] : v;
    const d = $(`d-${id}`);
    // Relative change, or the plain difference where the stored plan's figure is 0 (ΔKL of full precision).
    const rel = b ? (v - b) / Math.abs(b) : v - b;
    const same = Math.abs(rel) < 5e-5;
    const text = b ? `${(100 * rel).toFixed(2)} %` : fmt(Math.abs(rel));
    d.textContent = same ? "as stored" : `${rel > 0 ? "+" : "−"}${text.replace("-", "")} vs stored`;
    d.className = `delta ${same ? "" : rel < 0 ? "better" : "worse"}`;
  }
  $("t-decode").title = `${state.totals.decode_tok_s.toFixed(1)} tok/s at context ${state.totals.context}`;
  $("t-prefill").title = `${state.totals.prefill_tok_s.toFixed(0)} tok/s for ${state.totals.prefill_tokens} tokens`;
}

// ---- table ----
function columns() {
  const keys = [];
  for (const row of state.rows) for (const k of Object.keys(row)) if (!keys.includes(k)) keys.push(k);
  const shown = keys.filter((k) => TEXT_COLS.has(k) || state.rows.some((r) => typeof r[k] === "number"));
  const order = Object.keys(COLS);
  const rank = (k) => (order.includes(k) ? order.indexOf(k) : order.length);
  return shown.sort((a, b) => rank(a) - rank(b));  // stable: unknown columns keep the rows' order, after the known ones
}

function header(k) {
  if (COLS[k]) return COLS[k][0];
  const m = /^kl_(\d+)bit$/.exec(k);
  return m ? `ΔKL @${m[1]}b` : k;
}

function format(k, v) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  const [, scale, digits] = COLS[k] || (k.startsWith("kl_") ? [k, 1, 5] : [k, null, null]);
  if (scale === null || scale === undefined) return Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(4);
  const x = v * scale;
  return digits === 0 ? Math.round(x).toLocaleString("en") : x.toFixed(digits);
}

function visibleRows() {
  const text = $("filter").value.trim().toLowerCase();
  const kind = $("kind").value;
  let rows = state.rows.filter((r) => (!text || r.name.toLowerCase().includes(text)) && (!kind || r.kind === kind));
  const { key, dir } = state.sort;
  if (key) {
    const val = (r) => r[key];
    rows = rows.slice().sort((a, b) => {
      const x = val(a), y = val(b);
      if (x === null || x === undefined) return 1;  // empty cells last either way
      if (y === null || y === undefined) return -1;
      return (typeof x === "number" ? x - y : String(x).localeCompare(String(y))) * dir;
    });
  }
  return rows;
}

function renderTable() {
  const cols = columns();
  const base = state.info.base.bits;
  const head = document.createElement("tr");
  for (const k of cols) {
    const th = document.createElement("th");
    th.textContent = header(k);
    th.dataset.key = k;
    if (TEXT_COLS.has(k)) th.className = "text";
    if (state.sort.key === k) th.classList.add(state.sort.dir < 0 ? "sorted-desc" : "sorted-asc");
    head.append(th);
  }
  $("ops").tHead.replaceChildren(head);
  const body = document.createDocumentFragment();
  for (const r of visibleRows()) {
    const tr = document.createElement("tr");
    tr.dataset.name = r.name;
    if (state.selected.has(r.name)) tr.className = "selected";
    for (const k of cols) {
      const td = document.createElement("td");
      td.textContent = format(k, r[k]);
      if (TEXT_COLS.has(k)) td.className = "text";
      if (k === "bits" && r.name in base && base[r.name] !== r.bits) td.classList.add("changed");
      tr.append(td);
    }
    body.append(tr);
  }
  $("ops").tBodies[0].replaceChildren(body);
  $("selcount").textContent = `${state.selected.size} selected`;
}

function sortBy(key) {
  const s = state.sort;
  if (s.key === key) s.dir = -s.dir;
  else Object.assign(s, { key, dir: TEXT_COLS.has(key) ? 1 : -1 });  // numbers largest first, text A to Z
  renderTable();
}

// Click: select the row alone; shift-click: the range from the last clicked row; ctrl/cmd-click: toggle it.
function clickRow(name, ev) {
  const sel = state.selected;
  if (ev.shiftKey && state.anchor) {
    const names = visibleRows().map((r) => r.name);
    const [i, j] = [names.indexOf(state.anchor), names.indexOf(name)].sort((a, b) => a - b);
    if (i >= 0) for (const n of names.slice(i, j + 1)) sel.add(n);
    else sel.add(name);
  } else if (ev.ctrlKey || ev.metaKey) {
    if (sel.has(name)) sel.delete(name);
    else sel.add(name);
    state.anchor = name;
  } else {
    sel.clear();
    sel.add(name);
    state.anchor = name;
  }
  renderTable();
  renderGraph();
}

// ---- what-if actions ----
function setBits() {
  const b = Number($("bits").value);
  const allowed = state.info.allowed;
  const names = [...state.selected].filter((n) => n in allowed && allowed[n].includes(b));
  if (!names.length) {
    const why = `None of the ${state.selected.size} selected ops can take ${b} bits (norms: 16 or 32; attention and activations have no weights).`;
    status(state.selected.size ? why : "Select ops first (click, shift-click, a graph node, or Select filtered).", true);
    return;
  }
  const bits = { ...state.bits };
  for (const n of names) bits[n] = b;
  const skipped = state.selected.size - names.length;
  const label = `${names.length} ops at ${b} bits` + (skipped ? ` (${skipped} skipped)` : "");
  price("simulate", { edits: diff(bits), label });
}

function diff(bits) {
  const base = state.info.base.bits;
  return Object.fromEntries(Object.entries(bits).filter(([n, b]) => base[n] !== b));
}

function applyRule() {
  const rule = $("rule").value.trim();
  if (!rule) return status("A rule looks like PATTERN=BITS, e.g. *.down_proj=3", true);
  price("simulate", { edits: edits(), rules: [rule], label: `rule ${rule}` });
}

function runAuto() {
  const value = Number($("target-value").value);
  const kind = $("target-kind").value;
  const bits = $("auto-bits").value.split(",").map((s) => Number(s.trim())).filter((n) => Number.isInteger(n) && n > 0);
  if (!(value > 0)) return status("Give auto a positive target.", true);
  const target = { kind, value };
  price("auto", { edits: edits(), target, bits }, { target });
}

// A starting value for auto: 80 % of the current plan's figure in the target's unit.
function suggestTarget() {
  const now = { decode_ms: state.totals.decode_s * 1e3, size_mb: state.totals.size_bytes / 1e6, energy_mj: state.totals.decode_j * 1e3 };
  $("target-value").value = (0.8 * now[$("target-kind").value]).toPrecision(3);
}

function undo() {
  const prev = state.undo.pop();
  if (!prev) return status("Nothing to undo.");
  price("simulate", { edits: diff(prev.bits), label: "undo" }, { pushUndo: false, target: prev.target });
}

function reset() {
  price("simulate", { edits: {}, label: "as stored" });
}

async function writePlan() {
  const name = $("plan-name").value.trim();
  document.body.dataset.busy = "1";
  try {
    const res = await api("plan", { edits: edits(), name, target: state.target, device: $("device").value });
    state.record = res.record;
    const a = $("download");
    if (a.href) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(new Blob([JSON.stringify(res.record, null, 2)], { type: "application/json" }));
    a.download = name.endsWith(".json") ? name : `${name}.json`;
    a.hidden = false;
    $("written").textContent = res.path ? `wrote ${res.path}` : "not written (no plans folder): download it";
    $("written").dataset.path = res.path || "";
    status(`plan: ${res.record.talaria.compress_flags}; pippin compress --plan ${res.path || a.download}`);
  } catch (e) {
    status(e.message, true);
  } finally {
    document.body.dataset.busy = "0";
    document.body.dataset.seq = String(Number(document.body.dataset.seq) + 1);
  }
}

async function init() {
  try {
    state.info = await api("model");
  } catch (e) {
    return status(`cannot load the model: ${e.message}`, true);
  }
  const info = state.info;
  $("model").textContent = `${info.model} · context ${info.context}, prefill ${info.prefill}`;
  const opt = (sel, value, text) => {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    sel.append(o);
  };
  for (const d of info.devices) opt($("device"), d, d);
  $("device").value = info.device;
  const widths = [...new Set(Object.values(info.allowed).flat())].sort((a, b) => a - b);
  for (const b of widths) opt($("bits"), b, `${b} bits`);
  $("bits").value = widths.includes(4) ? "4" : String(widths[0]);
  for (const t of info.targets) opt($("target-kind"), t.kind, `auto: ${t.unit} ≤`);
  $("footer").textContent = `Estimates: a roofline model of the device profile, not measurements. ΔKL: ${info.quality_source}. Plans folder: ${info.plans_dir || "none (download only)"}.`;
  state.bits = { ...info.base.bits };
  document.body.dataset.busy = "1";
  try {
    const res = await api("simulate", { device: info.device, label: "as stored" });
    state.rows = res.rows;
    for (const k of [...new Set(res.rows.map((r) => r.kind))]) opt($("kind"), k, k);
    for (const k of columns().filter((c) => !TEXT_COLS.has(c) && c !== "layer")) opt($("color-metric"), k, header(k));
    $("color-metric").value = state.metric;
    adopt(res);
    suggestTarget();
    status(`${info.model}: ${res.plan.describe}`);
    await refreshHistory();
  } catch (e) {
    status(e.message, true);
  } finally {
    document.body.dataset.busy = "0";
    document.body.dataset.seq = "1";
  }
}

$("ops").tHead.addEventListener("click", (ev) => ev.target.dataset.key && sortBy(ev.target.dataset.key));
$("ops").tBodies[0].addEventListener("click", (ev) => {
  const tr = ev.target.closest("tr");
  if (tr) clickRow(tr.dataset.name, ev);
});
$("graph").addEventListener("click", clickGraph);
$("filter").addEventListener("input", () => (renderTable(), renderGraph()));
$("kind").addEventListener("change", () => (renderTable(), renderGraph()));
$("select-all").addEventListener("click", () => {
  for (const r of visibleRows()) state.selected.add(r.name);
  renderTable();
  renderGraph();
});
$("select-none").addEventListener("click", () => (state.selected.clear(), renderTable(), renderGraph()));
$("color-metric").addEventListener("change", () => ((state.metric = $("color-metric").value), renderGraph()));
$("apply-bits").addEventListener("click", setBits);
$("apply-rule").addEventListener("click", applyRule);
$("rule").addEventListener("keydown", (ev) => ev.key === "Enter" && applyRule());
$("auto").addEventListener("click", runAuto);
$("target-kind").addEventListener("change", suggestTarget);
$("undo").addEventListener("click", undo);
$("reset").addEventListener("click", reset);
$("write").addEventListener("click", writePlan);
$("device").addEventListener("change", () => price("simulate", { edits: edits(), label: `on ${$("device").value}` }, { pushUndo: false, target: state.target }));
init();
