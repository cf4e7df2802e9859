// LoRA Lab: live loss, speed and memory on the Train LoRA node.
//
// The backend sends `loralab.progress` events (trainer/monitor/events.py) at most 4 times per second; this extension
// registers the listener in setup() (the frontend drops event types nobody registered), keeps one state per node id
// (loralab_core.js) and draws a compact panel on every LoraLab_TrainLoRA node.
//
// Why a DOM widget (node.addDOMWidget) and not onDrawForeground: the current frontend also renders nodes as Vue
// components ("Vue nodes" mode), where litegraph's onDrawForeground is never called, while DOM widgets are mounted
// in both modes. The panel's text is real DOM (crisp at any zoom, themeable by CSS variables); only the curve is a
// <canvas>, redrawn through one requestAnimationFrame scheduler at most 4 times per second and only when dirty.
//
// The run id of the last run is stored in node.properties.loralab_run; on page load (or when a node joins a run
// mid-way) the panel fetches /loralab/runs/<run>/history and redraws the whole curve. Events go to every open page
// (a second tab, or one opened mid-run, follows the run too); a page shows an event on its node only when the node
// id and the run match (eventBelongsTo: the run folder is "<the node's run_name>-<key>", its resume_from, or the run
// it already shows).
//
// Layout: every row wraps instead of cutting text, so step, speed, ETA and memory stay whole from ComfyUI's
// minimum node width up; the status takes two rows (phase and step; speed and ETA with what the ETA includes).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  EVENT_TYPE,
  NODE_TYPE,
  ProgressStore,
  createFrameThrottle,
  describeEta,
  describeMemory,
  downsampleMinMax,
  eventBelongsTo,
  formatLr,
  formatNumber,
  formatRate,
  formatTick,
  historyPath,
  logTicks,
  niceTicks,
  nodeIdMatches,
  yRange,
} from "./loralab_core.js";
import { attachReport } from "./loralab_reports.js";

const EXTENSION = "loralab.livePanel";
const WIDGET_NAME = "loralab_live";
const PROP_RUN = "loralab_run";
const PROP_LOG = "loralab_log_scale";
const MIN_PANEL_HEIGHT = 300;
const MIN_NODE_WIDTH = 400;
const HISTORY_RETRY_MS = 5000;
// While training, the exact curve is re-read from disk now and then (events carry at most 4 points per second, so
// the live curve is a subsample at high it/s): every 10 s, up to every 60 s for very long runs.
const historyRefreshMs = (points) => Math.min(60000, Math.max(10000, points * 2));

const store = new ProgressStore();
const panels = new Set();
const inflight = new Set();
const lastAttempt = new Map();
const warned = new Set();

function warnOnce(what, err) {
  if (warned.has(what)) return;
  warned.add(what);
  console.warn(`[LoRA Lab] ${what}`, err);
}

const throttle = createFrameThrottle(
  (dirty) => {
    for (const panel of dirty) {
      if (!panels.has(panel)) continue;
      try {
        panel.render();
      } catch (err) {
        warnOnce("drawing the live panel failed", err);
      }
    }
  },
  {
    now: () => performance.now(),
    requestFrame: (cb) => requestAnimationFrame(cb),
  },
);

function isTrainNode(node) {
  return !!node && (node.comfyClass === NODE_TYPE || node.type === NODE_TYPE);
}

function resolveURL(path) {
  if (!path) return path;
  if (/^(https?:|data:|blob:)/.test(path)) return path;
  try {
    if (typeof api?.apiURL === "function") return api.apiURL(path);
  } catch (err) {
    warnOnce("api.apiURL failed", err);
  }
  return path;
}

// -------------------------------------------------------------------------------------------------- history
async function fetchHistory(key, run) {
  const id = `${key}|${run}`;
  if (!run || inflight.has(id)) return;
  inflight.add(id);
  lastAttempt.set(id, performance.now());
  try {
    const res = await api.fetchApi(historyPath(run), { cache: "no-store" });
    if (!res || !res.ok) return; // 404 until the run folder exists; retried by later events
    const data = await res.json();
    store.merge(key, data);
    requestRedrawFor(key);
  } catch (err) {
    warnOnce("loading the run history failed", err);
  } finally {
    inflight.delete(id);
  }
}

function maybeFetchHistory(key) {
  const st = store.get(key);
  if (!st || !st.run) return;
  const id = `${key}|${st.run}`;
  const since = performance.now() - (lastAttempt.get(id) ?? -Infinity);
  const training = st.phase === "training";
  const missing = st.historyRun !== st.run && training && since > HISTORY_RETRY_MS;
  const refresh = st.historyRun === st.run && training && since > historyRefreshMs(st.series.steps.length);
  if (st.historyWanted || missing || refresh) {
    st.historyWanted = false;
    fetchHistory(key, st.run);
  }
}

function requestRedrawFor(key) {
  for (const panel of panels) {
    if (nodeIdMatches(key, panel.node.id)) throttle.request(panel);
  }
}

// What the page knows about a Train LoRA node to tell its runs from another page's (see eventBelongsTo).
function widgetText(node, name) {
  const linked = node.inputs?.find((i) => i.name === name)?.link;
  if (linked !== undefined && linked !== null) return null; // the value comes from a link: unknown here
  const w = node.widgets?.find((x) => x.name === name);
  return w && typeof w.value === "string" ? w.value : null;
}

function nodeRunInfo(node) {
  return { id: node.id, run: node.properties?.[PROP_RUN] ?? null, runName: widgetText(node, "run_name"),
    resumeFrom: widgetText(node, "resume_from") };
}

// ------------------------------------------------------------------------------------------------- events
function onProgress(event) {
  try {
    const key = store.apply(event?.detail);
    if (key === null) return;
    const st = store.get(key);
    let shown = false;
    let newRun = false;
    for (const panel of panels) {
      if (!panel.shows(st)) continue;
      shown = true;
      panel.node.properties = panel.node.properties || {};
      if (panel.node.properties[PROP_RUN] !== st.run) newRun = true;
      panel.node.properties[PROP_RUN] = st.run;
      throttle.request(panel);
    }
    if (newRun) persistWorkflow();
    if (shown) maybeFetchHistory(key);
  } catch (err) {
    warnOnce("handling a progress event failed", err);
  }
}

// The frontend saves the open workflow for a page reload (localStorage / sessionStorage) only when its change tracker
// notices a change, which it checks on user input (mouseup, keyup, queueing). A run id set from a websocket event
// would be lost on a reload before the next click: ask the tracker to check now (once per new run).
function persistWorkflow() {
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  } catch (err) {
    warnOnce("saving the run id with the workflow failed", err);
  }
}

function restoreFromProperties(node) {
  const run = node?.properties?.[PROP_RUN];
  if (typeof run !== "string" || !run || node.id === undefined || node.id === null || node.id === -1) return;
  const existing = store.findFor(node.id);
  if (existing && existing.run === run && (existing.historyRun === run || existing.phase !== null)) return;
  const st = store.ensure(node.id, run);
  if (st.run !== run && st.phase === null) st.run = run;
  st.historyWanted = false;
  fetchHistory(String(node.id), run);
}

// ---------------------------------------------------------------------------------------------------- styles
const STYLE_ID = "loralab-live-panel-style";
const CSS = `
.loralab-panel{box-sizing:border-box;display:flex;flex-direction:column;gap:3px;width:100%;height:100%;
  min-height:${MIN_PANEL_HEIGHT - 12}px;padding:5px 6px;overflow:hidden;border-radius:6px;
  font:11px/1.3 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg-color,#ddd);
  background:var(--comfy-input-bg,#222);border:1px solid var(--border-color,#4e4e4e);container-type:inline-size}
.loralab-row{display:flex;flex-wrap:wrap;align-items:center;column-gap:8px;row-gap:1px;min-height:16px;flex-shrink:0;
  line-height:1.45}
.loralab-row>span{white-space:nowrap}
.loralab-row>.loralab-eta-detail{white-space:normal;min-width:0}
.loralab-mem-label{font-weight:600}
.loralab-mem-text{font-variant-numeric:tabular-nums}
.loralab-phase{font-weight:600;padding:0 6px;border-radius:8px;font-size:10px;line-height:15px;
  text-transform:uppercase;letter-spacing:.03em;color:#fff;background:#777}
.loralab-phase[data-phase=training]{background:#2f7fd8}.loralab-phase[data-phase=caching],
.loralab-phase[data-phase=encoding]{background:#8a6d1f}.loralab-phase[data-phase=preview]{background:#8e4fb0}
.loralab-phase[data-phase=saving]{background:#23925a}.loralab-phase[data-phase=done]{background:#23925a}
.loralab-phase[data-phase=stopped]{background:#a8671b}.loralab-phase[data-phase=error]{background:#c0392b}
.loralab-step{font-weight:600;font-variant-numeric:tabular-nums}
.loralab-muted{color:var(--descrip-text,#999);font-variant-numeric:tabular-nums}
.loralab-rate,.loralab-eta{font-variant-numeric:tabular-nums}
.loralab-eta{font-weight:600}
.loralab-spacer{flex:1}
.loralab-btn{font:inherit;font-size:10px;padding:0 6px;line-height:15px;border-radius:4px;cursor:pointer;
  color:var(--fg-color,#ddd);background:transparent;border:1px solid var(--border-color,#4e4e4e)}
.loralab-btn[aria-pressed=true]{background:var(--comfy-menu-bg,#353535);font-weight:600}
.loralab-chart{flex:1 1 auto;min-height:60px;height:0;width:100%;display:block}
.loralab-swatch{display:inline-block;width:10px;height:3px;border-radius:2px;vertical-align:middle;margin-right:4px}
.loralab-mem{display:flex;flex-direction:column;gap:2px}
.loralab-bar{position:relative;height:7px;border-radius:4px;overflow:hidden;
  background:color-mix(in srgb,var(--fg-color,#ddd) 12%,transparent)}
.loralab-bar>div{position:absolute;top:0;bottom:0;left:0}
.loralab-bar-res{background:color-mix(in srgb,#3f9b6e 45%,transparent)}
.loralab-bar-alloc{background:#3f9b6e}
.loralab-bar-peak{width:2px;background:#e0a030}
.loralab-bar-est{width:2px;background:var(--fg-color,#ddd);opacity:.75}
.loralab-panel[data-mem-high=true] .loralab-bar-alloc{background:#d9534f}
.loralab-msg{color:var(--descrip-text,#999);overflow:hidden;line-height:1.4;flex-shrink:0;display:-webkit-box;
  -webkit-box-orient:vertical;-webkit-line-clamp:2;overflow-wrap:anywhere}
.loralab-msg[data-error=true]{color:var(--error-text,#ff6b6b);-webkit-line-clamp:6}
.loralab-thumbs{display:flex;gap:4px;overflow:hidden;flex-shrink:0}
.loralab-thumbs:empty{display:none}
.loralab-thumbs img{height:46px;width:46px;object-fit:cover;border-radius:4px;cursor:pointer;
  border:1px solid var(--border-color,#4e4e4e)}
@container (max-width:300px){.loralab-thumbs img{height:34px;width:34px}}
`;

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// ---------------------------------------------------------------------------------------------------- colors
function parseRGB(css) {
  const m = /rgba?\(([^)]+)\)/.exec(css || "");
  if (!m) return null;
  const p = m[1].split(/[ ,/]+/).filter(Boolean).map(Number);
  return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
}

function palette(elem) {
  const cs = getComputedStyle(elem);
  const fg = cs.color || "#ddd";
  let bg = parseRGB(cs.backgroundColor);
  if (!bg || bg.a === 0) bg = parseRGB(getComputedStyle(document.body).backgroundColor) || { r: 34, g: 34, b: 34 };
  const lum = (0.2126 * bg.r + 0.7152 * bg.g + 0.0722 * bg.b) / 255;
  const dark = lum < 0.5;
  return dark
    ? { dark, fg, muted: "rgba(255,255,255,0.55)", grid: "rgba(255,255,255,0.08)", axis: "rgba(255,255,255,0.25)",
        raw: "rgba(125,170,225,0.55)", ema: "#5aa9ff", preview: "#c48bff", save: "#4cc38a", resume: "#999" }
    : { dark, fg, muted: "rgba(0,0,0,0.55)", grid: "rgba(0,0,0,0.08)", axis: "rgba(0,0,0,0.3)",
        raw: "rgba(60,115,190,0.40)", ema: "#1a5cb2", preview: "#9c51b6", save: "#23925a", resume: "#777" };
}

// ---------------------------------------------------------------------------------------------------- chart
function drawChart(canvas, st, logScale, pal) {
  const dpr = Math.max(1, Math.min(3, window.devicePixelRatio || 1));
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (w < 20 || h < 20) return;
  const W = Math.round(w * dpr);
  const H = Math.round(h * dpr);
  if (canvas.width !== W) canvas.width = W;
  if (canvas.height !== H) canvas.height = H;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const fontPx = w < 260 ? 9 : 10;
  ctx.font = `${fontPx}px system-ui,-apple-system,"Segoe UI",Roboto,sans-serif`;
  ctx.textBaseline = "middle";

  const s = st ? st.series : { steps: [], loss: [], ema: [] };
  const hasData = s.loss.some((v) => typeof v === "number" && Number.isFinite(v));
  if (!hasData) {
    ctx.fillStyle = pal.muted;
    ctx.textAlign = "center";
    const text = st && st.phase ? (st.message || `${st.phase}…`) : "no training yet";
    ctx.fillText(text.length > 60 ? text.slice(0, 59) + "…" : text, w / 2, h / 2);
    return;
  }
  const tr = (v) =>
    typeof v !== "number" || !Number.isFinite(v) ? null : logScale ? (v > 0 ? Math.log10(v) : null) : v;
  const [lo, hi] = yRange(s.loss, s.ema, logScale);
  let yt;
  let ystep = 1;
  if (logScale) yt = logTicks(lo, hi);
  else {
    const t = niceTicks(lo, hi, h < 60 ? 2 : h < 90 ? 3 : 4);
    yt = t.ticks;
    ystep = t.step;
  }
  const labels = yt.map((v) => (logScale ? formatNumber(Math.pow(10, v), 2) : formatTick(v, ystep)));
  const labelW = Math.max(16, ...labels.map((l) => ctx.measureText(l).width));
  const left = Math.ceil(labelW + 6);
  const right = w - 4;
  const top = 4;
  const bottom = h - fontPx - 6;
  const pw = Math.max(1, right - left);
  const ph = Math.max(1, bottom - top);
  const x0 = s.steps[0];
  let x1 = s.steps[s.steps.length - 1];
  if (x1 <= x0) x1 = x0 + 1;
  const px = (x) => left + ((x - x0) / (x1 - x0)) * pw;
  const py = (y) => bottom - ((Math.min(Math.max(y, lo), hi) - lo) / (hi - lo)) * ph;

  // grid + labels
  ctx.lineWidth = 1;
  ctx.strokeStyle = pal.grid;
  ctx.fillStyle = pal.muted;
  ctx.textAlign = "right";
  yt.forEach((v, i) => {
    const y = Math.round(py(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(right, y);
    ctx.stroke();
    ctx.fillText(labels[i], left - 4, y);
  });
  const { ticks: xt } = niceTicks(x0, x1, Math.max(2, Math.min(6, Math.floor(pw / 70))), 1);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const v of xt) {
    if (v < x0 || v > x1) continue;
    const x = Math.round(px(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, bottom);
    ctx.stroke();
    const label = String(Math.round(v));
    const lw = ctx.measureText(label).width;
    ctx.fillText(label, Math.min(Math.max(x, left + lw / 2), right - lw / 2), bottom + 3);
  }
  ctx.strokeStyle = pal.axis;
  ctx.beginPath();
  ctx.moveTo(left + 0.5, top);
  ctx.lineTo(left + 0.5, bottom + 0.5);
  ctx.lineTo(right, bottom + 0.5);
  ctx.stroke();

  // marks: previews (violet), saves (green), resumes (grey)
  for (const m of st.marks) {
    if (m.step < x0 || m.step > x1) continue;
    const color = m.mark === "save" ? pal.save : m.mark === "preview" ? pal.preview : pal.resume;
    const x = Math.round(px(m.step)) + 0.5;
    ctx.strokeStyle = color;
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(x, top + 4);
    ctx.lineTo(x, bottom);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = color;
    ctx.beginPath();
    if (m.mark === "save") ctx.rect(x - 3, top, 6, 6);
    else {
      ctx.moveTo(x - 3.5, top);
      ctx.lineTo(x + 3.5, top);
      ctx.lineTo(x, top + 6);
      ctx.closePath();
    }
    ctx.fill();
  }

  // raw loss: min/max per device-pixel column keeps spikes
  const cols = Math.max(2, Math.floor(pw * dpr));
  ctx.save();
  ctx.beginPath();
  ctx.rect(left, top - 1, pw + 1, ph + 2);
  ctx.clip();
  const raw = downsampleMinMax(s.steps, s.loss.map(tr), cols, x0, x1);
  ctx.strokeStyle = pal.raw;
  ctx.lineWidth = 1.2;
  ctx.lineJoin = "round";
  ctx.beginPath();
  raw.forEach((c, i) => {
    const x = px(c.x);
    if (i === 0) ctx.moveTo(x, py(c.first));
    else ctx.lineTo(x, py(c.first));
    if (c.max > c.min) {
      ctx.lineTo(x, py(c.min));
      ctx.lineTo(x, py(c.max));
    }
    ctx.lineTo(x, py(c.last));
  });
  ctx.stroke();
  if (raw.length === 1) {
    ctx.fillStyle = pal.raw;
    ctx.beginPath();
    ctx.arc(px(raw[0].x), py(raw[0].last), 2.5, 0, Math.PI * 2);
    ctx.fill();
  }
  // EMA: bold
  const ema = downsampleMinMax(s.steps, s.ema.map(tr), cols, x0, x1);
  ctx.strokeStyle = pal.ema;
  ctx.lineWidth = 2.2;
  ctx.beginPath();
  ema.forEach((c, i) => (i === 0 ? ctx.moveTo(px(c.x), py(c.last)) : ctx.lineTo(px(c.x), py(c.last))));
  ctx.stroke();
  if (ema.length) {
    const c = ema[ema.length - 1];
    ctx.fillStyle = pal.ema;
    ctx.beginPath();
    ctx.arc(px(c.x), py(c.last), 2.5, 0, Math.PI * 2);
    ctx.fill();
  }
  ctx.restore();
}

// ---------------------------------------------------------------------------------------------------- panel
class Panel {
  constructor(node) {
    this.node = node;
    node.properties = node.properties || {};
    ensureStyle();
    const root = el("div", "loralab-panel");
    root.dataset.loralab = "panel";

    const head = el("div", "loralab-row loralab-status");
    this.phaseEl = el("span", "loralab-phase", "idle");
    this.stepEl = el("span", "loralab-step", "–");
    this.pctEl = el("span", "loralab-muted loralab-pct", "");
    const speed = el("div", "loralab-row loralab-speed");
    this.rateEl = el("span", "loralab-rate", "");
    this.etaEl = el("span", "loralab-eta", "");
    this.etaDetailEl = el("span", "loralab-muted loralab-eta-detail", "");
    speed.append(this.rateEl, this.etaEl, this.etaDetailEl);
    this.speedEl = speed;
    this.logBtn = el("button", "loralab-btn", "log");
    this.logBtn.type = "button";
    this.logBtn.title = "Toggle a logarithmic loss axis";
    this.logBtn.addEventListener("click", (e) => {
      e.stopPropagation();
      node.properties[PROP_LOG] = !node.properties[PROP_LOG];
      throttle.request(this);
    });
    this.logBtn.addEventListener("pointerdown", (e) => e.stopPropagation());
    head.append(this.phaseEl, this.stepEl, this.pctEl, el("span", "loralab-spacer"), this.logBtn);

    this.canvas = el("canvas", "loralab-chart");

    const stats = el("div", "loralab-row");
    const lossWrap = el("span");
    this.rawSwatch = el("span", "loralab-swatch");
    this.lossEl = el("span", "loralab-loss", "loss –");
    lossWrap.append(this.rawSwatch, this.lossEl);
    const emaWrap = el("span");
    this.emaSwatch = el("span", "loralab-swatch");
    this.emaEl = el("span", "loralab-ema", "EMA –");
    emaWrap.append(this.emaSwatch, this.emaEl);
    this.lrEl = el("span", "loralab-muted loralab-lr", "LR –");
    stats.append(lossWrap, emaWrap, el("span", "loralab-spacer"), this.lrEl);

    const mem = el("div", "loralab-mem");
    const memRow = el("div", "loralab-row");
    this.memLabel = el("span", "loralab-mem-label", "Memory");
    this.memText = el("span", "loralab-mem-text", "n/a");
    this.memDetail = el("span", "loralab-muted loralab-mem-detail", "");
    memRow.append(this.memLabel, this.memText, el("span", "loralab-spacer"), this.memDetail);
    const bar = el("div", "loralab-bar");
    this.barRes = el("div", "loralab-bar-res");
    this.barAlloc = el("div", "loralab-bar-alloc");
    this.barPeak = el("div", "loralab-bar-peak");
    this.barEst = el("div", "loralab-bar-est");
    this.barEst.title = "pre-flight estimate of the peak";
    bar.append(this.barRes, this.barAlloc, this.barPeak, this.barEst);
    mem.append(memRow, bar);
    this.memEl = mem;

    this.msgEl = el("div", "loralab-msg");
    this.thumbs = el("div", "loralab-thumbs");
    this.thumbURLs = [];

    root.append(head, speed, this.canvas, stats, mem, this.msgEl, this.thumbs);
    this.root = root;

    const widget = node.addDOMWidget(WIDGET_NAME, "loralab_panel", root, {
      serialize: false, // not a value: keep it out of widgets_values and out of the prompt
      hideOnZoom: true,
      margin: 6,
      getMinHeight: () => MIN_PANEL_HEIGHT,
    });
    if (widget) widget.serialize = false;
    this.widget = widget;

    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => throttle.request(this));
      this.resizeObserver.observe(this.canvas);
    }
  }

  /** Is `st` (a store state) a run of this node? See eventBelongsTo. */
  shows(st) {
    return !!st && eventBelongsTo(st.node ?? this.node.id, st.run, nodeRunInfo(this.node));
  }

  state() {
    const st = store.findFor(this.node.id);
    return st && (st.run === null || this.shows(st)) ? st : null;
  }

  render() {
    const st = this.state();
    const logScale = !!this.node.properties?.[PROP_LOG];
    this.logBtn.setAttribute("aria-pressed", String(logScale));
    const pal = palette(this.root);
    this.rawSwatch.style.background = pal.raw;
    this.emaSwatch.style.background = pal.ema;

    // no live status and no latest.json: a curve from disk only
    const phase = st?.phase || (st?.series.steps.length ? "history" : "idle");
    this.phaseEl.textContent = phase;
    this.phaseEl.dataset.phase = phase;
    if (st && (st.total || st.step)) {
      this.stepEl.textContent = st.total ? `step ${st.step} / ${st.total}` : `step ${st.step}`;
      this.pctEl.textContent = st.total ? `${Math.floor((100 * st.step) / st.total)}%` : "";
    } else {
      this.stepEl.textContent = st?.run ? "step –" : "waiting for a run";
      this.pctEl.textContent = "";
    }
    this.rateEl.textContent = st && st.itPerS ? formatRate(st.itPerS) : "";
    const running = st && (st.phase === "training" || st.phase === "preview" || st.phase === "saving");
    const eta = running ? describeEta(st.etaS, st.etaDetail) : { main: "", detail: "" };
    this.etaEl.textContent = eta.main;
    this.etaDetailEl.textContent = eta.detail;
    this.speedEl.title = eta.detail ? `${eta.main} (${eta.detail})` : "";
    this.speedEl.style.display = this.rateEl.textContent || eta.main ? "" : "none";
    this.lossEl.textContent = `loss ${formatNumber(st?.loss)}`;
    this.emaEl.textContent = `EMA ${formatNumber(st?.lossEma)}`;
    this.lrEl.textContent = `LR ${formatLr(st?.lr)}`;

    const mem = describeMemory(st?.mem);
    this.memLabel.textContent = mem.label;
    this.memText.textContent = mem.main;
    this.memDetail.textContent = mem.detail;
    const f = mem.fractions || { allocated: 0, reserved: 0, peak: 0, estimate: 0 };
    this.barRes.style.width = `${(f.reserved * 100).toFixed(2)}%`;
    this.barAlloc.style.width = `${(f.allocated * 100).toFixed(2)}%`;
    this.barPeak.style.left = `calc(${(f.peak * 100).toFixed(2)}% - 1px)`;
    this.barPeak.style.display = mem.fractions && f.peak > 0 ? "" : "none";
    this.barEst.style.left = `calc(${(f.estimate * 100).toFixed(2)}% - 1px)`;
    this.barEst.style.display = mem.fractions && f.estimate > 0 ? "" : "none";
    this.root.dataset.memHigh = String(f.reserved > 0.92 || f.allocated > 0.9);
    this.root.title = mem.kind === "none" ? "" : `${mem.label}: ${mem.text}`;
    // hovering the memory rows shows the run's whole pre-flight estimate (breakdown, verdict, what to change)
    this.memEl.title = st?.estimate || "";

    const msg = st?.message || "";
    this.msgEl.textContent = msg;
    this.msgEl.title = msg;
    this.msgEl.dataset.error = String(phase === "error");
    this.msgEl.style.display = msg ? "" : "none";

    const urls = (st?.previews || []).map(resolveURL);
    if (urls.join("\n") !== this.thumbURLs.join("\n")) {
      this.thumbURLs = urls;
      this.thumbs.replaceChildren(
        ...urls.map((u) => {
          const img = el("img");
          img.src = u;
          img.alt = "preview";
          img.title = "Open the preview";
          img.addEventListener("click", (e) => {
            e.stopPropagation();
            window.open(u, "_blank", "noopener");
          });
          img.addEventListener("error", () => (img.style.display = "none"));
          return img;
        }),
      );
    }
    drawChart(this.canvas, st, logScale, pal);
  }

  dispose() {
    panels.delete(this);
    this.resizeObserver?.disconnect();
  }
}

function attachPanel(node) {
  if (node.__loralabPanel) return node.__loralabPanel;
  const panel = new Panel(node);
  node.__loralabPanel = panel;
  panels.add(panel);
  attachReport(node); // the run's text report, below the panel

  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    panel.dispose();
    return onRemoved?.apply(this, arguments);
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const r = onConfigure?.apply(this, arguments);
    try {
      restoreFromProperties(this);
      throttle.request(panel);
    } catch (err) {
      warnOnce("restoring the panel failed", err);
    }
    return r;
  };
  try {
    const size = node.computeSize?.() || node.size || [MIN_NODE_WIDTH, MIN_PANEL_HEIGHT];
    const cur = node.size || size;
    node.setSize?.([Math.max(cur[0], size[0], MIN_NODE_WIDTH), Math.max(cur[1], size[1])]);
  } catch (err) {
    warnOnce("sizing the node failed", err);
  }
  throttle.request(panel);
  return panel;
}

app.registerExtension({
  name: EXTENSION,
  // `init` runs before the frontend opens its websocket; `setup` runs after it (and after the saved workflow loads),
  // and progress sent in between would be dropped as an unknown message type.
  async init() {
    api.addEventListener(EVENT_TYPE, onProgress);
  },
  async nodeCreated(node) {
    if (!isTrainNode(node)) return;
    try {
      attachPanel(node);
    } catch (err) {
      warnOnce("creating the live panel failed", err);
    }
  },
  loadedGraphNode(node) {
    if (!isTrainNode(node)) return;
    try {
      const panel = attachPanel(node);
      restoreFromProperties(node);
      throttle.request(panel);
    } catch (err) {
      warnOnce("restoring the live panel failed", err);
    }
  },
});

// For the harness page and debugging in the browser console.
export const __loralab = { store, panels, onProgress, fetchHistory };
