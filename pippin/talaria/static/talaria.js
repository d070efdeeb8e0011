// Talaria view: the per-op table (sort, filter, select), a graph of the model's blocks coloured by any metric and
// linked to the table, a Pareto plot of every plan priced, and what-if edits (bits for a selection, rules, auto for a
// target) priced by the server (api/simulate, api/auto); api/plan writes the plan for `pippin compress --plan`.
// The plan lives here as {op: bits}; the server prices it. Vanilla JS and hand-drawn SVG, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const TEXT_COLS = new Set(["name", "kind", "compute", "decode_bound", "prefill_bound", "shares"]);
// key -> [header, unit scale, digits]; columns a row carries that are not here are shown as they come.
const COLS = {
  name: ["op"], kind: ["kind"], layer: ["layer", 1, 0], bits: ["bits", 1, 0], params: ["params", 1, 0],
  stored_bytes: ["stored KB", 1e-3, 1], compute: ["compute"], decode_flops: ["decode MFLOP", 1e-6, 3],
  decode_bytes: ["decode KB moved", 1e-3, 1], prefill_flops: ["prefill GFLOP", 1e-9, 3], prefill_bytes: ["prefill MB moved", 1e-6, 2],
  weights_decoded: ["weights decoded", 1, 0], shares: ["shares"], decode_s: ["decode µs", 1e6, 2], decode_bound: ["decode bound"],
  decode_j: ["decode µJ", 1e6, 3], prefill_s: ["prefill ms", 1e3, 3], prefill_bound: ["prefill bound"], prefill_j: ["prefill mJ", 1e3, 3],
  measured_decode_s: ["measured decode µs", 1e6, 2], measured_prefill_s: ["measured prefill ms", 1e3, 3], kl: ["ΔKL", 1, 5],
};
const TOTALS = {  // id -> [key, format, lower is better]
  size: ["size_bytes", (v) => `${(v / 1e6).toFixed(2)} MB`],
  bpw: ["bpw", (v) => v.toFixed(3)],
  decode: ["decode_s", (v) => `${(v * 1e3).toFixed(3)} ms/tok`],
  prefill: ["prefill_s", (v) => `${(v * 1e3).toFixed(1)} ms`],
  energy: ["decode_j", (v) => `${(v * 1e3).toFixed(3)} mJ/tok`],
  kl: ["predicted_kl", (v) => v.toFixed(4)],
};
const RAMP = ["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"]; // light to dark blue

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

// ---- graph of blocks: one row per layer (its ops in execution order), the embedding above, norm and head below ----
function metricValues() {
  const k = state.metric;
  return new Map(state.rows.map((r) => [r.name, typeof r[k] === "number" ? r[k] : null]));
}

// A scale from [lo, hi] to [0, 1]: logarithmic when the values span more than 30x (one large op, such as the head,
// would wash out the rest), linear otherwise; zero and missing values get no colour.
function scaleOf(values) {
  const pos = values.filter((v) => v !== null && v > 0);
  const lo = Math.min(...pos), hi = Math.max(...pos);
  if (!pos.length) return { f: () => null, lo: 0, hi: 0, log: false };
  if (hi / lo > 30) return { f: (v) => (v > 0 ? Math.log(v / lo) / Math.log(hi / lo) : null), lo, hi, log: true };
  return { f: (v) => (v > 0 ? (hi > 0 ? v / hi : 0) : null), lo: 0, hi, log: false };
}

function colour(t) {
  if (t === null) return "#e5e5ea";
  const x = Math.max(0, Math.min(1, t)) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2);
  const mix = (a, b, f) => Math.round(a + (b - a) * f);
  const [p, q] = [RAMP[i], RAMP[i + 1]].map((h) => [1, 3, 5].map((o) => parseInt(h.slice(o, o + 2), 16)));
  return `rgb(${p.map((c, j) => mix(c, q[j], x - i)).join(",")})`;
}

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.append(e);
  return e;
}

function shortName(key) {
  const last = key.split(".").pop();
  return { input_layernorm: "norm", post_attention_layernorm: "norm", attention: "attn", act: "swiglu" }[last] || last.replace("_proj", "");
}

function renderGraph() {
  const svg = $("graph");
  svg.replaceChildren();
  const layers = new Map();
  const top = [], bottom = [];
  for (const r of state.rows) {
    if (r.layer === null) (layers.size ? bottom : top).push(r);
    else {
      if (!layers.has(r.layer)) layers.set(r.layer, []);
      layers.get(r.layer).push(r);
    }
  }
  const cols = [];
  for (const ops of layers.values()) for (const r of ops) {
    const key = r.name.split(".").slice(2).join(".");
    if (!cols.includes(key)) cols.push(key);
  }
  const W = 560, labelW = 34, gap = 8, rowH = layers.size > 16 ? 13 : 20, headH = 16;
  const gapAt = cols.indexOf("post_attention_layernorm");
  const cellW = (W - labelW - (gapAt > 0 ? gap : 0)) / Math.max(cols.length, 1);
  const colX = (c) => labelW + c * cellW + (gapAt > 0 && c >= gapAt ? gap : 0);
  const values = metricValues();
  const scale = scaleOf([...values.values()]);
  const shown = new Set(visibleRows().map((r) => r.name));
  const filtered = $("filter").value.trim() !== "" || $("kind").value !== "";
  let y = 0;
  const node = (r, x, w) => {
    const v = values.get(r.name);
    const rect = el("rect", { x, y, width: Math.max(w - 1.5, 1), height: rowH - 2, rx: 2, fill: colour(v === null ? null : scale.f(v)) }, svg);
    rect.classList.add("node");
    rect.dataset.name = r.name;
    if (state.selected.has(r.name)) rect.classList.add("selected");
    if (filtered && !shown.has(r.name)) rect.classList.add("dim");
    el("title", {}, rect).textContent = `${r.name}\n${header(state.metric)}: ${format(state.metric, v)}\nbits: ${r.bits ?? "–"}`;
  };
  const band = (ops) => {
    const w = (W - labelW) / ops.length;
    ops.forEach((r, i) => {
      node(r, labelW + i * w, w);
      const t = values.get(r.name) === null ? null : scale.f(values.get(r.name));
      const label = w > 40 ? el("text", { x: labelW + i * w + 4, y: y + rowH - 5, "pointer-events": "none" }, svg) : null;
      if (label) label.textContent = r.name;
      if (label && t !== null && t > 0.6) label.style.fill = "#fff";  // readable on the dark end of the ramp
    });
    y += rowH;
  };
  if (top.length) band(top);
  y += 2;
  cols.forEach((c, i) => (el("text", { x: colX(i) + 2, y: y + headH - 5 }, svg).textContent = shortName(c)));
  y += headH;
  for (const [i, ops] of layers) {
    const label = el("text", { x: 0, y: y + rowH - 4, class: "layer-label" }, svg);
    label.textContent = `L${i}`;
    label.dataset.layer = String(i);
    for (const r of ops) node(r, colX(cols.indexOf(r.name.split(".").slice(2).join("."))), cellW);
    y += rowH;
  }
  y += 4;
  if (bottom.length) band(bottom);
  svg.setAttribute("viewBox", `0 0 ${W} ${y}`);
  $("legend").innerHTML = "";
  const ramp = document.createElement("span");
  ramp.className = "ramp";
  ramp.style.background = `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map(colour).join(",")})`;
  const how = scale.log ? "log scale" : "linear scale";
  $("legend").append(`${header(state.metric)}: ${format(state.metric, scale.lo)}`, ramp, `${format(state.metric, scale.hi)} (${how}; grey: zero or none)`);
}

function clickGraph(ev) {
  const t = ev.target;
  let names = [];
  if (t.dataset.name) names = [t.dataset.name];
  else if (t.dataset.layer) names = state.rows.filter((r) => String(r.layer) === t.dataset.layer).map((r) => r.name);
  else return;
  if (!(ev.shiftKey || ev.ctrlKey || ev.metaKey)) state.selected.clear();
  for (const n of names) state.selected.add(n);
  state.anchor = names[0];
  renderTable();
  renderGraph();
  const row = document.querySelector(`#ops tr[data-name="${CSS.escape(names[0])}"]`);
  const panel = $("table-panel");  // scroll the table, not the page
  if (row) panel.scrollTop = Math.max(0, row.offsetTop - panel.clientHeight / 3);
}

// ---- Pareto plot: predicted ΔKL against decode latency and against size, every plan priced in this session ----
async function refreshHistory() {
  state.history = await api(`history?device=${encodeURIComponent($("device").value)}`);
  state.baseTotals = state.history.references.find((p) => p.label === "as stored") || null;  // deltas on this device
  if (state.totals) renderTotals();
  renderPareto("pareto-latency", (p) => p.decode_s * 1e3, "decode ms/token");
  renderPareto("pareto-size", (p) => p.size_bytes / 1e6, "size MB");
}

function ticks(lo, hi, n = 4) {
  const step0 = (hi - lo) / n || 1;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(Number(v.toPrecision(6)));
  return out;
}

function renderPareto(id, fx, xlabel) {
  const svg = $(id);
  svg.replaceChildren();
  const W = 360, H = 250, L = 48, R = 10, T = 10, B = 34;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pts = [...state.history.references.map((p) => ({ ...p, cls: "ref" })), ...state.history.tried.map((p) => ({ ...p, cls: "tried" }))];
  if (!pts.length) return;
  const xs = pts.map(fx), ys = pts.map((p) => p.predicted_kl);
  const pad = (lo, hi) => [lo - 0.05 * (hi - lo || 1), hi + 0.05 * (hi - lo || 1)];
  const [x0, x1] = pad(Math.min(...xs), Math.max(...xs));
  const [y0, y1] = pad(Math.min(0, ...ys), Math.max(...ys));
  const sx = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const sy = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - T - B);
  const axis = el("g", { class: "axis" }, svg);
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }, axis);
  el("line", { x1: L, y1: T, x2: L, y2: H - B }, axis);
  for (const v of ticks(x0, x1)) {
    el("line", { x1: sx(v), y1: H - B, x2: sx(v), y2: H - B + 3 }, axis);
    el("text", { x: sx(v), y: H - B + 13, "text-anchor": "middle" }, axis).textContent = String(v);
  }
  for (const v of ticks(y0, y1)) {
    el("line", { x1: L - 3, y1: sy(v), x2: L, y2: sy(v) }, axis);
    el("text", { x: L - 5, y: sy(v) + 3, "text-anchor": "end" }, axis).textContent = String(v);
  }
  el("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, svg).textContent = xlabel;
  el("text", { x: 10, y: (T + H - B) / 2, transform: `rotate(-90 10 ${(T + H - B) / 2})`, "text-anchor": "middle" }, svg).textContent = "predicted ΔKL";
  // The front: plans no other plan beats on both axes (lowest ΔKL so far, scanning from the fastest or smallest).
  const order = pts.map((p, i) => i).sort((a, b) => xs[a] - xs[b] || ys[a] - ys[b]);
  const front = [];
  let best = Infinity;
  for (const i of order) if (ys[i] < best - 1e-12) { best = ys[i]; front.push(i); }
  const d = front.map((i, k) => (k ? `H${sx(xs[i])}V${sy(ys[i])}` : `M${sx(xs[i])},${sy(ys[i])}`)).join("");
  el("path", { d, class: "front" }, svg);
  pts.forEach((p, i) => {
    const shape = p.cls === "ref"
      ? el("rect", { x: sx(xs[i]) - 3.5, y: sy(ys[i]) - 3.5, width: 7, height: 7 }, svg)
      : el("circle", { cx: sx(xs[i]), cy: sy(ys[i]), r: 4 }, svg);
    shape.setAttribute("class", `pt ${p.cls}`);
    shape.dataset.index = String(i);
    el("title", {}, shape).textContent = `${p.label}\n${xlabel}: ${xs[i].toPrecision(4)}\nΔKL: ${ys[i].toFixed(4)}, ${p.bpw.toFixed(3)} bpw`;
    shape.addEventListener("click", () => loadPoint(p));
  });
  if (state.point) {
    el("circle", { cx: sx(fx(state.point)), cy: sy(state.point.predicted_kl), r: 8, class: "pt current", "pointer-events": "none" }, svg);
  }
}

function loadPoint(p) {
  price("simulate", { edits: p.edits, label: p.label });
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
    $("target-value").value = (res.totals.size_bytes / 1e6 / 2).toPrecision(3);
    adopt(res);
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
$("undo").addEventListener("click", undo);
$("reset").addEventListener("click", reset);
$("write").addEventListener("click", writePlan);
$("device").addEventListener("change", () => price("simulate", { edits: edits(), label: `on ${$("device").value}` }, { pushUndo: false, target: state.target }));
init();
