// Talaria view, the drawings: the graph of the model's blocks (coloured by any column, linked to the table) and the
// Pareto plots of the plans priced (predicted ΔKL against decode latency and against size). Hand-drawn SVG; loaded
// before talaria.js, whose state and helpers (state, $, header, format, visibleRows, api, price) these call.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const RAMP = ["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"]; // light to dark blue

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
    shape.dataset.label = p.label;
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
