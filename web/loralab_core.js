// LoRA Lab live panel: pure logic (no DOM, no ComfyUI imports) so `node --test tests/web/` can test it.
// ComfyUI loads every .js file in web/ as an extension module; this one only defines exports (no side effects).
//
// Event payload (trainer/monitor/events.py, schema v1):
//   {v, node, run, phase, step, total, loss, loss_ema, lr, it_per_s, eta_s, eta_detail?,
//    mem: {device, allocated, reserved, peak, total}, message?, preview?}
//   eta_detail: {training_s, previews_left, preview_cost_s, saves_left, save_cost_s} (what eta_s is made of)
// History route (nodes/routes.py): {run, history: {steps, loss, lr, time, marks}, latest}

export const EVENT_TYPE = "loralab.progress";
export const NODE_TYPE = "LoraLab_TrainLoRA";
export const SCHEMA_VERSION = 1;
export const EMA_BETA = 0.98; // same bias-corrected EMA as trainer/monitor/events.py and trainer/monitor/plot.py
export const PHASES = ["caching", "encoding", "training", "preview", "saving", "done", "stopped", "error"];
export const TERMINAL_PHASES = new Set(["done", "stopped", "error"]);
export const MAX_PREVIEWS = 4;
export const MIN_FRAME_MS = 250; // at most 4 redraws per second

const isNum = (v) => typeof v === "number" && Number.isFinite(v);

// ------------------------------------------------------------------------------------------------ EMA
/** Bias-corrected EMA: m = b*m + (1-b)*x; ema = m / (1 - b^t), t = finite values seen. Non-finite values skipped. */
export class Ema {
  constructor(beta = EMA_BETA) {
    this.beta = beta;
    this.m = 0;
    this.count = 0;
  }
  update(x) {
    if (isNum(x)) {
      this.m = this.beta * this.m + (1 - this.beta) * x;
      this.count += 1;
    }
    return this.value;
  }
  get value() {
    return this.count === 0 ? null : this.m / (1 - Math.pow(this.beta, this.count));
  }
}

/** EMA after each value (null until the first finite value), identical to trainer.events.ema_series. */
export function emaSeries(values, beta = EMA_BETA) {
  const e = new Ema(beta);
  return values.map((v) => e.update(v));
}

// ------------------------------------------------------------------------------------------ downsampling
/**
 * Reduce a series to at most `width` columns, keeping each column's min and max so spikes stay visible.
 * xs ascending; ys may hold null (skipped). Returns [{col, x, first, min, max, last}] sorted by col,
 * col in [0, width-1]; x is the column's x value (x0 + col/(width-1) * (x1-x0)).
 */
export function downsampleMinMax(xs, ys, width, x0 = undefined, x1 = undefined) {
  width = Math.max(1, Math.floor(width));
  const n = Math.min(xs.length, ys.length);
  if (n === 0) return [];
  if (x0 === undefined) x0 = xs[0];
  if (x1 === undefined) x1 = xs[n - 1];
  const span = x1 - x0 || 1;
  const cols = new Map();
  for (let i = 0; i < n; i++) {
    const y = ys[i];
    if (!isNum(y)) continue;
    let c = width === 1 ? 0 : Math.round(((xs[i] - x0) / span) * (width - 1));
    c = Math.min(width - 1, Math.max(0, c));
    const e = cols.get(c);
    if (e === undefined) cols.set(c, { col: c, first: y, min: y, max: y, last: y });
    else {
      if (y < e.min) e.min = y;
      if (y > e.max) e.max = y;
      e.last = y;
    }
  }
  const out = [...cols.values()].sort((a, b) => a.col - b.col);
  for (const e of out) e.x = width === 1 ? x0 : x0 + (e.col / (width - 1)) * (x1 - x0);
  return out;
}

// ------------------------------------------------------------------------------------------ formatting
/** Loss-like values: 4 significant digits, scientific when tiny or huge. */
export function formatNumber(v, digits = 4) {
  if (!isNum(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) {
    const [m, e] = v.toExponential(digits - 3 > 0 ? digits - 3 : 1).split("e");
    return `${m.replace(/\.?0+$/, "")}e${Number(e)}`;
  }
  return String(Number(v.toPrecision(digits)));
}

/** Tick label for a value on an axis with tick spacing `step`. */
export function formatTick(v, step) {
  if (!isNum(v)) return "";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return formatNumber(v, 2 + 3);
  let decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  const frac = (step * Math.pow(10, decimals)) % 1;
  if (Math.min(frac, 1 - frac) > 1e-6 && decimals < 6) decimals += 1;
  return v.toFixed(decimals);
}

/** Learning rate: 1e-4 -> "1.0e-4", 0.5 -> "0.5". */
export function formatLr(v) {
  if (!isNum(v)) return "–";
  if (v === 0) return "0";
  if (Math.abs(v) >= 0.01 && Math.abs(v) < 1000) return String(Number(v.toPrecision(3)));
  const [m, e] = v.toExponential(1).split("e");
  return `${m}e${Number(e)}`;
}

/** Seconds -> "45s", "3m 05s", "1h 02m", "2d 3h". */
export function formatDuration(s) {
  if (!isNum(s) || s < 0) return "–";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

/** Bytes with binary units: "512 MiB", "7.25 GiB". */
export function formatBytes(b) {
  if (!isNum(b) || b < 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) {
    b /= 1024;
    i += 1;
  }
  const digits = i === 0 ? 0 : b >= 100 ? 0 : b >= 10 ? 1 : 2;
  return `${b.toFixed(digits)} ${units[i]}`;
}

/** Speed like tqdm: >= 1 it/s -> "3.21 it/s", slower -> "4.50 s/it". */
export function formatRate(itPerS) {
  if (!isNum(itPerS) || itPerS <= 0) return "–";
  if (itPerS >= 1) return `${itPerS >= 100 ? itPerS.toFixed(0) : itPerS.toFixed(2)} it/s`;
  const spi = 1 / itPerS;
  return `${spi >= 100 ? spi.toFixed(0) : spi.toFixed(2)} s/it`;
}

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** Bytes in a given unit index (2 = MiB, 3 = GiB) without the unit: 7.25 * 2**30, 3 -> "7.25". */
export function formatBytesIn(b, unit) {
  if (!isNum(b) || b < 0) return "–";
  const v = b / Math.pow(1024, unit);
  return v.toFixed(unit === 0 ? 0 : v >= 100 ? 0 : v >= 10 ? 1 : 2);
}

/**
 * Memory line: {kind: "gpu"|"cpu"|"none", label, main, detail, text, fractions}. Numbers share the unit of the total
 * ("7.48 / 24.0 GiB"); `detail` holds reserved and peak (GPU) or peak (CPU); `text` is main + detail.
 */
export function describeMemory(mem) {
  if (!mem || typeof mem !== "object" || !isNum(mem.total) || mem.total <= 0) {
    return { kind: "none", label: "Memory", main: "n/a", detail: "", text: "n/a", fractions: null };
  }
  const dev = String(mem.device || "");
  const cpu = dev === "cpu" || dev === "mps" || dev === "unknown" || dev === "";
  const f = (v) => (isNum(v) ? Math.max(0, Math.min(1, v / mem.total)) : 0);
  const fractions = { allocated: f(mem.allocated), reserved: f(mem.reserved), peak: f(mem.peak),
    estimate: isNum(mem.estimate) && mem.estimate > 0 ? f(mem.estimate) : 0 };
  let unit = 0;
  while (unit < BYTE_UNITS.length - 1 && mem.total >= Math.pow(1024, unit + 1)) unit += 1;
  const u = BYTE_UNITS[unit];
  const x = (v) => formatBytesIn(v, unit);
  const main = `${x(mem.allocated)} / ${x(mem.total)} ${u}`;
  // Most telling first (a narrow node cuts the end): the peak, the pre-flight estimate of it (same measure, once the
  // run has made it), then what the allocator reserves.
  const est = fractions.estimate > 0 ? ` · est ${x(mem.estimate)}` : "";
  const detail = `peak ${x(mem.peak)}${est}` + (cpu ? "" : ` · reserved ${x(mem.reserved)}`);
  const label = cpu ? (dev === "mps" ? "Memory (mps)" : "RAM (process)") : `VRAM ${dev}`;
  return { kind: cpu ? "cpu" : "gpu", label, main, detail, text: `${main} · ${detail}`, fractions };
}

// ------------------------------------------------------------------------------------------------- axes
export function niceStep(span, target) {
  if (!(span > 0) || !Number.isFinite(span)) return 1;
  const raw = span / Math.max(1, target);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

export function niceTicks(lo, hi, target = 4, minStep = 0) {
  const step = Math.max(niceStep(hi - lo, target), minStep);
  const out = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9 && out.length < 50; v += step) {
    out.push(Number(v.toPrecision(12)));
  }
  return { ticks: out, step };
}

/** Ticks for a log10 axis (lo, hi are log10 bounds): decades or 1-2-5 inside narrow ranges; values in log10. */
export function logTicks(lo, hi) {
  const d0 = Math.floor(lo);
  const d1 = Math.ceil(hi);
  const mults = d1 - d0 > 4 ? [1] : d1 - d0 > 1 ? [1, 2, 5] : [1, 1.5, 2, 3, 5, 7];
  const out = [];
  for (let d = d0; d <= d1; d++) {
    for (const m of mults) {
      const lv = d + Math.log10(m);
      if (lv >= lo - 1e-9 && lv <= hi + 1e-9) out.push(lv);
    }
  }
  if (out.length >= 2) return out;
  return niceTicks(Math.pow(10, lo), Math.pow(10, hi), 3).ticks.filter((v) => v > 0).map((v) => Math.log10(v));
}

function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))))];
}

/** y range for the chart (in plotted units: log10 when logScale). Spikes beyond the 1%/99% quantiles clip. */
export function yRange(raw, ema, logScale = false) {
  const t = (v) => (!isNum(v) ? null : logScale ? (v > 0 ? Math.log10(v) : null) : v);
  const r = raw.map(t).filter((v) => v !== null);
  const e = ema.map(t).filter((v) => v !== null);
  if (r.length === 0 && e.length === 0) return logScale ? [-2, 0] : [0, 1];
  const all = r.concat(e);
  let lo = Math.min(...all);
  let hi = Math.max(...all);
  if (r.length >= 50) {
    const s = [...r].sort((a, b) => a - b);
    const loAll = lo;
    const hiAll = hi;
    lo = Math.min(quantile(s, 0.01), e.length ? Math.min(...e) : Infinity);
    hi = Math.max(quantile(s, 0.99), e.length ? Math.max(...e) : -Infinity);
    const spread = hi - lo;
    lo = Math.max(loAll, lo - spread * 0.15);
    hi = Math.min(hiAll, hi + spread * 0.15);
  }
  if (hi - lo <= 1e-12) {
    const d = Math.abs(hi) * 0.1 || (logScale ? 0.05 : 0.1);
    lo -= d;
    hi += d;
  }
  const pad = (hi - lo) * 0.06;
  lo -= pad;
  hi += pad;
  if (!logScale && lo < 0 && Math.min(...r) >= 0) lo = 0;
  return [lo, hi];
}

// --------------------------------------------------------------------------------------------- payloads
/** A validated copy of a progress payload, or null when it is not one we understand. */
export function parsePayload(p) {
  if (!p || typeof p !== "object" || p.v !== SCHEMA_VERSION) return null;
  if (p.node === undefined || p.node === null || typeof p.run !== "string" || !PHASES.includes(p.phase)) return null;
  const num = (v) => (isNum(v) ? v : null);
  return {
    node: String(p.node),
    run: p.run,
    phase: p.phase,
    step: isNum(p.step) ? Math.max(0, Math.floor(p.step)) : 0,
    total: isNum(p.total) ? Math.max(0, Math.floor(p.total)) : 0,
    loss: num(p.loss),
    loss_ema: num(p.loss_ema),
    lr: num(p.lr),
    it_per_s: num(p.it_per_s),
    eta_s: num(p.eta_s),
    eta_detail: parseEtaDetail(p.eta_detail),
    mem: p.mem && typeof p.mem === "object" ? { ...p.mem } : null,
    message: typeof p.message === "string" ? p.message : null,
    preview: typeof p.preview === "string" ? p.preview : null,
  };
}

function parseEtaDetail(d) {
  if (!d || typeof d !== "object") return null;
  const num = (v) => (isNum(v) && v >= 0 ? v : null);
  const count = (v) => (isNum(v) && v >= 0 ? Math.floor(v) : 0);
  return { trainingS: num(d.training_s), previewsLeft: count(d.previews_left), previewCostS: num(d.preview_cost_s),
    savesLeft: count(d.saves_left), saveCostS: num(d.save_cost_s) };
}

/**
 * The ETA as the panel shows it: `main` ("ETA 6m 12s", "ETA ≥ 23s" while a preview's cost is not known yet) and
 * `detail`, what it includes ("incl. 3 previews × 1m 50s", "+ 3 previews, time unknown until the first"), or "".
 * `etaS` already counts the previews and saves whose cost is measured (trainer/monitor/events.py).
 */
export function describeEta(etaS, detail) {
  if (!isNum(etaS)) return { main: "", detail: "" };
  const d = detail || null;
  const unknown = [];
  const included = [];
  const part = (n, cost, one, many) => {
    if (!d || n <= 0) return;
    const what = `${n} ${n === 1 ? one : many}`;
    if (cost === null) unknown.push(what);
    else included.push(`${what} × ${formatDuration(cost)}`);
  };
  if (d) {
    part(d.previewsLeft, d.previewCostS, "preview", "previews");
    part(d.savesLeft, d.saveCostS, "save", "saves");
  }
  const main = `ETA ${unknown.length ? "≥ " : ""}${formatDuration(etaS)}`;
  const bits = [];
  if (included.length) bits.push(`incl. ${included.join(", ")}`);
  if (unknown.length) bits.push(`+ ${unknown.join(", ")}, time unknown until the first`);
  return { main, detail: bits.join("; ") };
}

/** nodes/paths.py sanitize_name: the run name as it starts the run folder's name ("my lora!" -> "my lora_"). */
export function sanitizeRunName(name, fallback = "lora") {
  const cleaned = String(name ?? "").replace(/[^A-Za-z0-9._ -]+/g, "_").replace(/^[ .]+|[ .]+$/g, "");
  return cleaned.slice(0, 120) || fallback;
}

/**
 * Does a (broadcast) event of run `run` from node `eventNode` belong to this page's node? Every open page gets every
 * event, so the node id alone is not enough (another workflow can have a Train LoRA with the same id): the run
 * folder must also be the node's: the run it already shows, or "<its run_name>-<key>", or its resume_from folder.
 * `node` = {id, run (stored run id or null), runName (widget value, null when unknown), resumeFrom}.
 */
export function eventBelongsTo(eventNode, run, node) {
  if (!node || !nodeIdMatches(eventNode, node.id) || typeof run !== "string") return false;
  if (node.run && node.run === run) return true;
  const resume = typeof node.resumeFrom === "string" ? node.resumeFrom.trim() : "";
  if (resume && resume.replace(/[\/]+$/, "").split(/[\/]/).pop() === run) return true;
  if (typeof node.runName !== "string") return true; // run_name comes from a link: nothing to compare with
  return run.startsWith(sanitizeRunName(node.runName) + "-");
}

// ------------------------------------------------------------------------------------------------ reports
/** Nodes whose text report is shown on the node (web/loralab_reports.js) -> the report widget's label. */
export const REPORT_NODES = {
  LoraLab_LoadDataset: "report",
  LoraLab_DatasetFromImages: "report",
  LoraLab_CombineDatasets: "report",
  LoraLab_CacheLatents: "bucket report",
  LoraLab_ConfigureLoRA: "summary",
  LoraLab_TrainLoRA: "run report",
};

/** The report text in an `executed` message's output ({text: [...]}, what ui.PreviewText sends), or null. */
export function reportText(output) {
  const t = output?.text;
  if (typeof t === "string") return t;
  if (Array.isArray(t) && t.length && t.every((x) => typeof x === "string")) return t.join("\n");
  return null;
}

/** Does the text hold a table (columns aligned by runs of spaces on two or more lines)? Then it is shown monospace. */
export function looksTabular(text) {
  if (typeof text !== "string") return false;
  let aligned = 0;
  for (const line of text.split("\n")) if (/\S {2,}\S/.test(line.trim()) || /^\s*\|.*\|\s*$/.test(line)) aligned++;
  return aligned >= 2;
}

/** URL path of a preview file of a run (the routes in nodes/routes.py); `file` may carry folders. */
export function previewPath(run, file) {
  const name = String(file).split(/[\\/]/).pop();
  return `/loralab/runs/${encodeURIComponent(run)}/previews/${encodeURIComponent(name)}`;
}

export function historyPath(run) {
  return `/loralab/runs/${encodeURIComponent(run)}/history`;
}

// ------------------------------------------------------------------------------------------------ state
export function emptyState(node, run = null) {
  return {
    node: node === undefined || node === null ? null : String(node),
    run,
    phase: null,
    step: 0,
    total: 0,
    loss: null,
    lossEma: null,
    lr: null,
    itPerS: null,
    etaS: null,
    etaDetail: null,
    mem: null,
    estimate: null, // the run's pre-flight memory estimate (text of estimate.txt, from the history route)
    message: null,
    series: { steps: [], loss: [], ema: [] },
    marks: [],
    previews: [],
    historyRun: null, // run whose history has been merged
    historyWanted: false, // the view should (re)fetch the run's history
    version: 0, // bumps on every change (views redraw when it moved)
  };
}

function addMark(state, step, mark, file = undefined) {
  if (state.marks.some((m) => m.step === step && m.mark === mark)) return;
  const m = { step, mark };
  if (file !== undefined && file !== null) m.file = file;
  state.marks.push(m);
  state.marks.sort((a, b) => a.step - b.step);
}

function addPreview(state, url) {
  if (!url) return;
  state.previews = state.previews.filter((u) => u !== url);
  state.previews.push(url);
  if (state.previews.length > MAX_PREVIEWS) state.previews = state.previews.slice(-MAX_PREVIEWS);
}

function pushPoint(series, step, loss, ema) {
  const s = series.steps;
  if (s.length && step <= s[s.length - 1]) {
    // same step again or a resume: drop the old timeline from `step` on
    let i = s.length;
    while (i > 0 && s[i - 1] >= step) i--;
    series.steps.length = i;
    series.loss.length = i;
    series.ema.length = i;
  }
  series.steps.push(step);
  series.loss.push(loss);
  series.ema.push(ema);
}

/**
 * Reducer: apply one parsed payload to a node's state (mutates and returns it).
 * A new run resets the curve; the first event of a run and the end of preview/saving/terminal phases ask for the
 * run's history (exact curve, marks with preview files).
 */
export function applyPayload(state, p) {
  if (state.run !== p.run) {
    const fresh = emptyState(p.node, p.run);
    fresh.version = state.version;
    Object.assign(state, fresh);
    state.historyWanted = true;
  }
  const prevPhase = state.phase;
  state.node = p.node;
  state.phase = p.phase;
  state.step = p.step;
  state.total = p.total;
  if (p.loss !== null) state.loss = p.loss;
  if (p.loss_ema !== null) state.lossEma = p.loss_ema;
  if (p.lr !== null) state.lr = p.lr;
  state.itPerS = p.it_per_s;
  state.etaS = p.eta_s;
  state.etaDetail = p.eta_detail;
  if (p.mem) state.mem = p.mem;
  state.message = p.message;
  if (p.loss !== null && p.step > 0) {
    const s = state.series.steps;
    const last = s.length ? s[s.length - 1] : -Infinity;
    if (p.step !== last || p.phase === "training") pushPoint(state.series, p.step, p.loss, p.loss_ema);
  }
  if (p.phase === "preview") addMark(state, p.step, "preview");
  if (p.phase === "saving") addMark(state, p.step, "save");
  if (p.preview) {
    addPreview(state, p.preview);
    const m = state.marks.find((x) => x.step === p.step && x.mark === "preview");
    if (m && !m.file) m.url = p.preview;
  }
  const leftSlowPhase = (prevPhase === "preview" || prevPhase === "saving") && p.phase !== prevPhase;
  if (leftSlowPhase || (TERMINAL_PHASES.has(p.phase) && prevPhase !== p.phase)) state.historyWanted = true;
  state.version += 1;
  return state;
}

/**
 * Merge the history route's answer: the exact curve from disk, then the live points that came after it, and the
 * run's memory estimate. Adopts the run when the state has none (page load). Returns the state (mutated).
 */
export function mergeHistory(state, resp, beta = EMA_BETA) {
  if (!resp || typeof resp !== "object" || !resp.history) return state;
  const run = typeof resp.run === "string" ? resp.run : state.run;
  if (state.run && run !== state.run) return state; // a newer run started meanwhile
  const h = resp.history;
  const steps = Array.isArray(h.steps) ? h.steps : [];
  const loss = (Array.isArray(h.loss) ? h.loss : []).slice(0, steps.length).map((v) => (isNum(v) ? v : null));
  const ema = emaSeries(loss, beta);
  const adopting = state.phase === null; // nothing live yet (page load): take the last status from latest.json
  state.run = run;
  if (adopting) {
    const latest = parsePayload(resp.latest);
    if (latest && latest.run === run) {
      const keepNode = state.node;
      const wanted = state.historyWanted;
      applyPayload(state, latest);
      state.node = keepNode !== null ? keepNode : latest.node;
      state.historyWanted = wanted;
      state.series = { steps: [], loss: [], ema: [] };
      state.marks = [];
    }
  }
  const lastHist = steps.length ? steps[steps.length - 1] : -Infinity;
  const live = state.series;
  const series = { steps: steps.slice(), loss, ema };
  for (let i = 0; i < live.steps.length; i++) {
    if (live.steps[i] > lastHist) {
      series.steps.push(live.steps[i]);
      series.loss.push(live.loss[i]);
      series.ema.push(live.ema[i]);
    }
  }
  state.series = series;
  const marks = [];
  for (const m of Array.isArray(h.marks) ? h.marks : []) {
    if (!m || !isNum(m.step) || typeof m.mark !== "string") continue;
    const mm = { step: m.step, mark: m.mark };
    if (typeof m.file === "string") mm.file = m.file;
    marks.push(mm);
  }
  for (const m of state.marks) {
    if (m.step > lastHist && !marks.some((x) => x.step === m.step && x.mark === m.mark)) marks.push(m);
  }
  marks.sort((a, b) => a.step - b.step);
  state.marks = marks;
  const fromDisk = marks.filter((m) => m.mark === "preview" && m.file).map((m) => previewPath(run, m.file));
  const previews = [];
  for (const u of fromDisk.concat(state.previews)) if (!previews.includes(u)) previews.push(u);
  state.previews = previews.slice(-MAX_PREVIEWS);
  if (isNum(lastHist) && state.step < lastHist) state.step = lastHist;
  if (isNum(lastHist) && state.total < state.step) state.total = 0; // unknown (no latest.json): "step N" only
  if (state.loss === null && loss.length) state.loss = loss[loss.length - 1];
  if (state.lossEma === null && ema.length) state.lossEma = ema[ema.length - 1];
  if (typeof resp.estimate === "string" && resp.estimate) state.estimate = resp.estimate;
  state.historyRun = run;
  state.version += 1;
  return state;
}

// ---------------------------------------------------------------------------------------- routing/store
/** Does an event's node id belong to a graph node? Exact id, or the last part of a subgraph path "12:5". */
export function nodeIdMatches(eventNode, nodeId) {
  if (eventNode === null || eventNode === undefined || nodeId === null || nodeId === undefined) return false;
  const e = String(eventNode);
  const n = String(nodeId);
  return e === n || e.endsWith(":" + n);
}

/** Per-node states keyed by the event's node id. */
export class ProgressStore {
  constructor() {
    this.states = new Map();
    this.clock = 0; // touch order: the most recently updated match wins in findFor
  }
  /** Apply a raw payload; returns the node key it updated, or null when the payload was rejected. */
  apply(raw) {
    const p = parsePayload(raw);
    if (!p) return null;
    let st = this.states.get(p.node);
    if (!st) {
      st = emptyState(p.node);
      this.states.set(p.node, st);
    }
    applyPayload(st, p);
    st.touched = ++this.clock;
    return p.node;
  }
  /** Merge a history response into the state under `key` (see mergeHistory). */
  merge(key, resp) {
    const st = this.states.get(String(key));
    if (!st) return null;
    mergeHistory(st, resp);
    st.touched = ++this.clock;
    return st;
  }
  get(key) {
    return this.states.get(String(key)) || null;
  }
  /** The state shown by graph node `nodeId`: the most recently updated of its exact id and subgraph paths. */
  findFor(nodeId) {
    const exact = this.states.get(String(nodeId));
    let best = exact || null;
    for (const [k, st] of this.states) {
      if (nodeIdMatches(k, nodeId) && (!best || (st.touched || 0) > (best.touched || 0))) best = st;
    }
    return best;
  }
  /** State for a node known only by a stored run id (page load); created when missing. */
  ensure(nodeId, run = null) {
    const key = String(nodeId);
    let st = this.states.get(key);
    if (!st) {
      st = emptyState(key, run);
      if (run) st.historyWanted = true;
      st.touched = 0;
      this.states.set(key, st);
    }
    return st;
  }
  delete(key) {
    this.states.delete(String(key));
  }
}

// ---------------------------------------------------------------------------------------- frame throttle
/**
 * Coalesces redraw requests: at most one draw per `minInterval` ms, always on an animation frame.
 * `draw(keys)` gets the set of keys requested since the last draw. Timing functions are injectable for tests.
 */
export function createFrameThrottle(draw, {
  minInterval = MIN_FRAME_MS,
  now = () => Date.now(),
  requestFrame = (cb) => setTimeout(cb, 16),
  setTimer = (cb, ms) => setTimeout(cb, ms),
} = {}) {
  let dirty = new Set();
  let last = -Infinity;
  let scheduled = false;
  const frame = () => {
    scheduled = false;
    const t = now();
    if (t - last < minInterval) {
      schedule();
      return;
    }
    last = t;
    const keys = dirty;
    dirty = new Set();
    if (keys.size) draw(keys);
  };
  const schedule = () => {
    if (scheduled || dirty.size === 0) return;
    scheduled = true;
    const wait = Math.max(0, minInterval - (now() - last));
    if (wait > 0) setTimer(() => requestFrame(frame), wait);
    else requestFrame(frame);
  };
  return {
    request(key) {
      dirty.add(key);
      schedule();
    },
    get pending() {
      return dirty.size;
    },
  };
}
