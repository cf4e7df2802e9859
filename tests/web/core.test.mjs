// Unit tests of web/loralab_core.js (pure logic). Run: node --test tests/web/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  EMA_BETA,
  Ema,
  ProgressStore,
  applyPayload,
  createFrameThrottle,
  REPORT_NODES,
  describeEta,
  describeMemory,
  downsampleMinMax,
  eventBelongsTo,
  emaSeries,
  emptyState,
  formatBytes,
  formatDuration,
  formatLr,
  formatNumber,
  formatRate,
  formatTick,
  looksTabular,
  mergeHistory,
  nodeIdMatches,
  parsePayload,
  previewPath,
  reportText,
  sanitizeRunName,
  yRange,
} from "../../web/loralab_core.js";

const fixture = JSON.parse(readFileSync(new URL("./fixtures/events.json", import.meta.url), "utf8"));

function payload(over = {}) {
  return {
    v: 1, node: "5", run: "run_a", phase: "training", step: 1, total: 100, loss: 0.5, loss_ema: 0.5, lr: 1e-4,
    it_per_s: 2, eta_s: 49.5, mem: { device: "cuda:0", allocated: 1 << 30, reserved: 2 << 30, peak: 3 << 30, total: 24 << 30 },
    ...over,
  };
}

test("EMA is bias-corrected and matches the Python definition", () => {
  const e = new Ema(0.98);
  assert.equal(e.value, null);
  assert.equal(e.update(2), 2); // first value: the correction removes the pull towards 0
  const v2 = e.update(1);
  const m = 0.98 * (0.02 * 2) + 0.02 * 1;
  assert.ok(Math.abs(v2 - m / (1 - 0.98 ** 2)) < 1e-12);
  // constant input stays constant
  const c = emaSeries(new Array(50).fill(0.3));
  assert.ok(c.every((v) => Math.abs(v - 0.3) < 1e-12));
  // non-finite values are skipped, leading nulls stay null
  assert.deepEqual(emaSeries([null, NaN, 1]).slice(0, 2), [null, null]);
  assert.equal(emaSeries([null, NaN, 1])[2], 1);
  assert.equal(EMA_BETA, 0.98);
});

test("EMA smooths: a spike moves it by (1 - beta) of the jump, bias-corrected", () => {
  const s = emaSeries([...new Array(200).fill(0.1), 10.1]);
  const before = s[199];
  const after = s[200];
  assert.ok(Math.abs(before - 0.1) < 1e-9);
  assert.ok(after > 0.1 && after < 0.1 + 10 * 0.021, `after=${after}`);
});

test("downsampling keeps extremes and never exceeds the width", () => {
  const n = 10000;
  const xs = Array.from({ length: n }, (_, i) => i + 1);
  const ys = xs.map((x) => 1 / Math.sqrt(x));
  ys[4321] = 50; // a spike
  ys[7777] = -3; // a dip
  for (const width of [1, 7, 100, 333]) {
    const cols = downsampleMinMax(xs, ys, width);
    assert.ok(cols.length <= width, `width ${width}: ${cols.length} columns`);
    assert.equal(Math.max(...cols.map((c) => c.max)), 50);
    assert.equal(Math.min(...cols.map((c) => c.min)), -3);
    for (const c of cols) assert.ok(c.col >= 0 && c.col < width);
  }
  // short series: one column per point, values untouched
  const short = downsampleMinMax([1, 2, 3], [0.3, null, 0.1], 200);
  assert.equal(short.length, 2);
  assert.deepEqual(short.map((c) => c.first), [0.3, 0.1]);
  assert.deepEqual(downsampleMinMax([], [], 50), []);
});

test("number formatting", () => {
  assert.equal(formatNumber(0.123456), "0.1235");
  assert.equal(formatNumber(12.5), "12.5");
  assert.equal(formatNumber(0), "0");
  assert.equal(formatNumber(0.00012345), "1.2e-4");
  assert.equal(formatNumber(null), "–");
  assert.equal(formatNumber(NaN), "–");
  assert.equal(formatTick(0.25, 0.05), "0.25");
  assert.equal(formatTick(0.2, 0.04999999999999999), "0.20");
  assert.equal(formatTick(0.225, 0.025), "0.225");
  assert.equal(formatLr(1e-4), "1.0e-4");
  assert.equal(formatLr(0.05), "0.05");
  assert.equal(formatRate(3.2109), "3.21 it/s");
  assert.equal(formatRate(0.25), "4.00 s/it");
  assert.equal(formatRate(null), "–");
});

test("time formatting", () => {
  assert.equal(formatDuration(0), "0s");
  assert.equal(formatDuration(45.4), "45s");
  assert.equal(formatDuration(185), "3m 05s");
  assert.equal(formatDuration(3720), "1h 02m");
  assert.equal(formatDuration(3 * 86400 + 7200), "3d 2h");
  assert.equal(formatDuration(null), "–");
  assert.equal(formatDuration(-1), "–");
});

test("byte formatting and memory description", () => {
  assert.equal(formatBytes(512), "512 B");
  assert.equal(formatBytes(1536), "1.50 KiB");
  assert.equal(formatBytes(7.25 * 2 ** 30), "7.25 GiB");
  assert.equal(formatBytes(24 * 2 ** 30), "24.0 GiB");
  const gpu = describeMemory({ device: "cuda:0", allocated: 6 * 2 ** 30, reserved: 8 * 2 ** 30, peak: 12 * 2 ** 30, total: 24 * 2 ** 30 });
  assert.equal(gpu.kind, "gpu");
  assert.equal(gpu.label, "VRAM cuda:0");
  assert.equal(gpu.main, "6.00 / 24.0 GiB");
  assert.equal(gpu.detail, "peak 12.0 · reserved 8.00");
  assert.equal(gpu.fractions.allocated, 0.25);
  assert.equal(gpu.fractions.peak, 0.5);
  const cpu = describeMemory({ device: "cpu", allocated: 2 ** 30, reserved: 2 ** 30, peak: 2 ** 31, total: 2 ** 35 });
  assert.equal(cpu.kind, "cpu");
  assert.equal(cpu.label, "RAM (process)");
  assert.equal(cpu.text, "1.00 / 32.0 GiB · peak 2.00");
  assert.equal(describeMemory({ device: "cpu", allocated: 300 * 2 ** 20, peak: 400 * 2 ** 20, total: 512 * 2 ** 20 }).main, "300 / 512 MiB");
  assert.equal(describeMemory(null).kind, "none");
  // the pre-flight estimate, once sent, is marked and named; absent, nothing changes
  const withEst = describeMemory({ device: "cuda:0", allocated: 6 * 2 ** 30, reserved: 8 * 2 ** 30, peak: 12 * 2 ** 30, total: 24 * 2 ** 30, estimate: 18 * 2 ** 30 });
  assert.equal(withEst.fractions.estimate, 0.75);
  assert.equal(withEst.detail, "peak 12.0 · est 18.0 · reserved 8.00");
  assert.equal(gpu.fractions.estimate, 0);
});

test("payload validation rejects other versions and malformed events", () => {
  assert.equal(parsePayload(null), null);
  assert.equal(parsePayload(payload({ v: 2 })), null);
  assert.equal(parsePayload(payload({ phase: "bogus" })), null);
  assert.equal(parsePayload(payload({ run: 7 })), null);
  const p = parsePayload(payload({ node: 5, loss: null, message: "hi" }));
  assert.equal(p.node, "5");
  assert.equal(p.loss, null);
  assert.equal(p.message, "hi");
});

test("routing by node id: an event for node 5 updates only node 5", () => {
  const store = new ProgressStore();
  store.apply(payload({ node: "7", run: "run_b", step: 3, loss: 0.9 }));
  const before7 = JSON.stringify(store.get("7"));
  assert.equal(store.apply(payload({ node: "5", step: 1, loss: 0.5 })), "5");
  assert.equal(store.apply(payload({ node: "5", step: 2, loss: 0.4 })), "5");
  assert.equal(store.get("5").step, 2);
  assert.deepEqual(store.get("5").series.steps, [1, 2]);
  assert.equal(JSON.stringify(store.get("7")), before7, "node 7 must not change");
  assert.equal(store.get("9"), null);
  assert.equal(store.findFor(5).run, "run_a");
  assert.equal(store.findFor(7).run, "run_b");
  assert.equal(store.apply({ nonsense: true }), null);
  // subgraph execution ids route to the inner node id
  assert.ok(nodeIdMatches("12:5", 5));
  assert.ok(!nodeIdMatches("12:55", 5));
  assert.ok(!nodeIdMatches("5", 55));
  store.apply(payload({ node: "12:8", run: "run_c", step: 1 }));
  assert.equal(store.findFor(8).run, "run_c");
});

test("reducer: new run resets, resume rewinds, marks and previews", () => {
  const st = emptyState("5");
  const apply = (over) => applyPayload(st, parsePayload(payload(over)));
  apply({ step: 1, loss: 1 });
  assert.equal(st.historyWanted, true, "first event of a run asks for its history");
  st.historyWanted = false;
  for (let s = 2; s <= 10; s++) apply({ step: s, loss: 1 / s });
  apply({ phase: "preview", step: 10, preview: "/loralab/runs/run_a/previews/step_000010.png" });
  assert.deepEqual(st.previews, ["/loralab/runs/run_a/previews/step_000010.png"]);
  assert.ok(st.marks.some((m) => m.step === 10 && m.mark === "preview"));
  apply({ step: 11, loss: 0.09 });
  assert.equal(st.historyWanted, true, "leaving the preview phase refreshes from disk");
  apply({ phase: "saving", step: 11 });
  assert.ok(st.marks.some((m) => m.step === 11 && m.mark === "save"));
  assert.equal(st.series.steps.length, 11);
  apply({ step: 6, loss: 0.2 }); // resumed from step 5
  assert.deepEqual(st.series.steps, [1, 2, 3, 4, 5, 6]);
  apply({ run: "run_z", step: 1, loss: 3 });
  assert.deepEqual(st.series.steps, [1]);
  assert.equal(st.previews.length, 0);
  assert.equal(st.run, "run_z");
});

test("history merge: exact curve from disk, then the newer live points", () => {
  const st = emptyState("5");
  const apply = (over) => applyPayload(st, parsePayload(payload(over)));
  apply({ step: 48, loss: 0.2, loss_ema: 0.25 });
  apply({ step: 52, loss: 0.19, loss_ema: 0.24 });
  const steps = Array.from({ length: 50 }, (_, i) => i + 1);
  const loss = steps.map((s) => 1 / s);
  mergeHistory(st, {
    run: "run_a",
    history: { steps, loss, lr: steps.map(() => 1e-4), marks: [{ step: 25, mark: "preview", file: "previews/step_000025.png" }, { step: 40, mark: "save", file: "state/step_40" }] },
    latest: null,
    estimate: "Memory estimate (cuda:0): 9.1 GiB of 24.0 GiB available -> FITS",
  });
  assert.deepEqual(st.series.steps, [...steps, 52]);
  assert.ok(st.estimate.startsWith("Memory estimate (cuda:0)"));
  assert.deepEqual(st.series.ema.slice(0, 50), emaSeries(loss));
  assert.equal(st.series.loss[50], 0.19);
  assert.deepEqual(st.previews, [previewPath("run_a", "step_000025.png")]);
  assert.equal(st.historyRun, "run_a");
  assert.deepEqual(st.marks.map((m) => m.mark), ["preview", "save"]);
  // a response for another run does not replace a newer live run
  mergeHistory(st, { run: "old", history: { steps: [1], loss: [9], marks: [] } });
  assert.equal(st.run, "run_a");
});

test("history merge on page load adopts the run and its last status", () => {
  const store = new ProgressStore();
  store.ensure(5, "run_q");
  const latest = payload({ run: "run_q", phase: "done", step: 3, total: 3, loss: 0.1 });
  store.merge("5", { run: "run_q", history: { steps: [1, 2, 3], loss: [0.3, 0.2, 0.1], marks: [] }, latest });
  const st = store.findFor(5);
  assert.equal(st.phase, "done");
  assert.equal(st.step, 3);
  assert.deepEqual(st.series.steps, [1, 2, 3]);
  assert.equal(st.node, "5");
});

test("history merge without latest.json: the curve only, total unknown", () => {
  const store = new ProgressStore();
  store.ensure("9", "old_run");
  store.merge("9", { run: "old_run", history: { steps: [1, 2], loss: [0.5, 0.4], marks: [] }, latest: null, estimate: null });
  const st = store.findFor(9);
  assert.equal(st.estimate, null); // no estimate.txt (an older run): no tooltip
  assert.equal(st.phase, null);
  assert.equal(st.step, 2);
  assert.equal(st.total, 0);
  assert.equal(st.loss, 0.4);
  assert.deepEqual(st.series.steps, [1, 2]);
});

test("y range ignores single spikes for long series and handles log scale", () => {
  const raw = Array.from({ length: 200 }, (_, i) => 0.1 + (i % 7) * 0.001);
  raw[100] = 1.5; // 15x spike: clipped at the top edge; the EMA (bumped by ~0.03) stays in range
  const ema = emaSeries(raw);
  const [lo, hi] = yRange(raw, ema);
  assert.ok(hi < 0.5, `hi=${hi}`);
  assert.ok(hi >= Math.max(...ema), "the whole EMA stays visible");
  assert.ok(lo >= 0);
  const [llo, lhi] = yRange([0.1, 0.01, 1], [0.1, 0.05, 0.3], true);
  assert.ok(llo < -2 + 0.01 && lhi > 0 - 0.01);
  assert.deepEqual(yRange([], []), [0, 1]);
});

test("frame throttle: at most 4 draws per second, coalescing requests", () => {
  let t = 0;
  const timers = [];
  const draws = [];
  const th = createFrameThrottle((keys) => draws.push([t, [...keys]]), {
    now: () => t,
    requestFrame: (cb) => timers.push([t + 16, cb]),
    setTimer: (cb, ms) => timers.push([t + ms, cb]),
  });
  const run = (until) => {
    for (;;) {
      timers.sort((a, b) => a[0] - b[0]);
      if (!timers.length || timers[0][0] > until) break;
      const [at, cb] = timers.shift();
      t = at;
      cb();
    }
    t = until;
  };
  for (let ms = 0; ms < 1000; ms += 10) {
    run(ms);
    th.request(ms % 20 === 0 ? "a" : "b");
  }
  run(2000);
  const inFirstSecond = draws.filter(([at]) => at < 1000).length;
  assert.ok(inFirstSecond <= 4, `${inFirstSecond} draws in the first second`);
  assert.ok(draws.length >= 4);
  assert.equal(th.pending, 0, "the last request is drawn eventually");
  for (let i = 1; i < draws.length; i++) assert.ok(draws[i][0] - draws[i - 1][0] >= 250);
});

test("the recorded event fixture is valid and follows the phase order", () => {
  const phases = [];
  for (const e of fixture.events) {
    const p = parsePayload(e);
    assert.ok(p, `invalid fixture event ${JSON.stringify(e).slice(0, 80)}`);
    if (phases[phases.length - 1] !== p.phase) phases.push(p.phase);
  }
  assert.equal(phases[0], "caching");
  assert.equal(phases[phases.length - 1], "done");
  for (const ph of ["training", "preview", "saving"]) assert.ok(phases.includes(ph), ph);
});

test("the ETA says what it includes: previews and saves at their measured cost, or that a cost is unknown", () => {
  const detail = (over) => parsePayload(payload({ eta_detail: { training_s: 23, previews_left: 3, preview_cost_s: 330,
    saves_left: 1, save_cost_s: 2, ...over } })).eta_detail;
  assert.deepEqual(describeEta(23 + 990 + 2, detail({})),
    { main: "ETA 16m 55s", detail: "incl. 3 previews × 5m 30s, 1 save × 2s" });
  // before the first preview is measured the ETA is a lower bound and says so
  assert.deepEqual(describeEta(25, detail({ preview_cost_s: null })),
    { main: "ETA ≥ 25s", detail: "incl. 1 save × 2s; + 3 previews, time unknown until the first" });
  assert.deepEqual(describeEta(23, detail({ previews_left: 0, saves_left: 0 })), { main: "ETA 23s", detail: "" });
  assert.deepEqual(describeEta(23, null), { main: "ETA 23s", detail: "" }); // an older engine: no detail
  assert.deepEqual(describeEta(null, detail({})), { main: "", detail: "" });
  // the fixture stream (the real reporter): once a preview and a save are measured, the rest is counted at their cost
  const at = (step) => fixture.events.find((e) => e.phase === "training" && e.step >= step);
  let e = at(130);
  assert.deepEqual(describeEta(e.eta_s, parsePayload(e).eta_detail).detail,
    "incl. 1 preview × 3s; + 1 save, time unknown until the first");
  e = at(210);
  const shown = describeEta(e.eta_s, parsePayload(e).eta_detail);
  assert.match(shown.main, /^ETA \d+s$/);
  assert.equal(shown.detail, "incl. 1 preview × 3s");
});

test("a broadcast event belongs to a node by id and run: its run, <run_name>-<key>, or its resume_from folder", () => {
  // the same rule as nodes/paths.py sanitize_name (checked against it in tests/comfy/test_page_matching.py)
  assert.equal(sanitizeRunName("my lora!/v2"), "my lora_v2");
  assert.equal(sanitizeRunName("  .hidden. "), "hidden");
  assert.equal(sanitizeRunName("???"), "_");
  assert.equal(sanitizeRunName(""), "lora");
  assert.equal(sanitizeRunName("x".repeat(200)).length, 120);
  const node = { id: 5, run: null, runName: "my lora!", resumeFrom: "" };
  assert.ok(eventBelongsTo("5", "my lora_-abc123", node));
  assert.ok(!eventBelongsTo("5", "other-abc123", node)); // another page's workflow, same node id
  assert.ok(!eventBelongsTo("7", "my lora_-abc123", node)); // another node
  assert.ok(eventBelongsTo("12:5", "my lora_-abc123", node)); // inside a subgraph
  assert.ok(eventBelongsTo("5", "old-run-1", { ...node, run: "old-run-1" })); // the run it already shows
  assert.ok(eventBelongsTo("5", "kept-xyz", { ...node, resumeFrom: "/data/runs/kept-xyz/" }));
  assert.ok(eventBelongsTo("5", "anything-1", { ...node, runName: null })); // run_name from a link: by id
  assert.ok(!eventBelongsTo("5", undefined, node));
});

test("reports: the text of ui.PreviewText, which nodes show one, and when it is a table", () => {
  assert.equal(reportText({ text: ["a", "b"] }), "a\nb");
  assert.equal(reportText({ text: "x" }), "x");
  assert.equal(reportText({ images: [] }), null);
  assert.equal(reportText(undefined), null);
  assert.deepEqual(Object.keys(REPORT_NODES).sort(),
    ["LoraLab_CacheLatents", "LoraLab_CombineDatasets", "LoraLab_ConfigureLoRA", "LoraLab_DatasetFromImages",
      "LoraLab_LoadDataset", "LoraLab_TrainLoRA"]);
  const estimate = "Memory estimate (cpu): 1 GiB\n  model weights    3.20 GiB\n  activations       612 MiB";
  assert.ok(looksTabular(estimate));
  assert.ok(!looksTabular("Dataset: /x\n  4 usable image(s), 4 with a caption file\nNo problems found."));
  assert.ok(!looksTabular(null));
});
