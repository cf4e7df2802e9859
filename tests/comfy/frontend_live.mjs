// The live panel and the node reports in the REAL ComfyUI page (run by tests/comfy/test_frontend_live.py against
// its comfy_server).
//
// Opens the running ComfyUI server's own frontend in Debian's Chromium through playwright-core (no browser download),
// loads the shipped UI example example_workflows/train_then_generate_sd15.json with app.loadGraphData(), shrinks it
// to tiny settings by setting widget values by name, queues it with app.queuePrompt(0, 1) (what the Run button
// calls), then checks: the report of Load Dataset, Bucket & Cache Latents and Configure LoRA on each node; what the
// Train LoRA node's panel shows while it trains, with step, it/s, ETA and memory uncut at the template's node width
// and at the node's minimum width; a second page in another browser profile (another device) opened mid-run: its
// node stays idle while its run_name is another run's, then follows this run live and draws the curve from step 1
// (the history route); reloads the page mid-run and checks that the whole curve (every step up to the one seen
// before the reload) and the reports come back; stops the run with POST /interrupt and checks "stopped".
//
// Input (environment): LORALAB_COMFY_URL, LORALAB_DATASET (absolute folder), LORALAB_CKPT (checkpoint file name in
// models/checkpoints), LORALAB_RUN_NAME, LORALAB_STEPS (default 2000; the run is stopped), LORALAB_CHROMIUM (default /usr/bin/chromium),
// LORALAB_ARTIFACTS (default <repo>/test-artifacts).
// Output: screenshots frontend_live_running.png, frontend_live_reloaded.png, frontend_live_stopped.png,
// frontend_live_second_page.png, panel_template_width.png, panel_min_width.png, node_load_dataset.png,
// node_cache_latents.png, node_configure_lora.png; a JSON summary line "SUMMARY {...}". Exit codes: 0 pass, 1 fail,
// 77 a requirement is missing (the pytest wrapper skips).
import { mkdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { launch, requireChromium } from "../web/chromium.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..");
const ARTIFACTS = process.env.LORALAB_ARTIFACTS || join(ROOT, "test-artifacts");
const BASE = (process.env.LORALAB_COMFY_URL || "").replace(/\/$/, "");
const DATASET = process.env.LORALAB_DATASET || "";
const CKPT = process.env.LORALAB_CKPT || "";
const RUN_NAME = process.env.LORALAB_RUN_NAME || "frontend_live";
// Far more steps than the test waits for: the run is stopped with POST /interrupt once the checks are done. (A tiny
// SD1.5 trains at 1-10 it/s on a 2-core CPU, so ~60 steps can finish before the reloaded page is back.)
const STEPS = Number(process.env.LORALAB_STEPS || 2000);
const TRAIN_NODE = 5; // Train LoRA's id in the example workflow
const REPORT_NODES = { 2: "node_load_dataset.png", 3: "node_cache_latents.png", 4: "node_configure_lora.png" };
const VIEWPORT = { width: 1400, height: 1100 }; // the tallest node (Configure LoRA) fits at scale 1
let EXT_URL = null; // our extension's module URL as the frontend imports it (same URL = same module instance)
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);

const chromium = await requireChromium();
if (!BASE || !DATASET || !CKPT) {
  console.log("FAIL: LORALAB_COMFY_URL, LORALAB_DATASET and LORALAB_CKPT are required");
  process.exit(1);
}

const failures = [];
function check(cond, msg) {
  if (!cond) {
    failures.push(msg);
    log(`CHECK FAILED: ${msg}`);
  }
  return !!cond;
}

// A fresh user gets the "Get Started with a Template" dialog over the canvas; mark the tutorial as done (the same
// setting the dialog writes) before the page loads. The Escape below is a fallback.
async function prepareUserSettings() {
  const res = await fetch(`${BASE}/api/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
  if (!res.ok) log(`warning: could not store Comfy.TutorialCompleted (${res.status})`);
}

async function waitForApp(page) {
  await page.waitForFunction(
    () => !!(window.app && window.app.graph && window.app.canvas && window.app.extensionManager?.workflow),
    null, { timeout: 120000, polling: 250 });
  // our extension module, as the frontend loaded it: importing the same URL gives the same module instance
  if (!EXT_URL) {
    const exts = await page.evaluate(async () => (await fetch("/api/extensions")).json());
    EXT_URL = exts.find((e) => e.endsWith("/loralab.js")) || null;
    if (!EXT_URL) throw new Error(`loralab.js is not among the frontend's extensions: ${JSON.stringify(exts)}`);
  }
  const end = Date.now() + 60000;
  for (;;) {
    const ok = await page.evaluate(async (url) => {
      try {
        return !!(await import(url)).__loralab;
      } catch {
        return false;
      }
    }, EXT_URL);
    if (ok) break;
    if (Date.now() > end) throw new Error(`${EXT_URL} did not load`);
    await page.waitForTimeout(500);
  }
  for (let i = 0; i < 3; i++) {
    const open = await page.evaluate(() => document.querySelectorAll(".p-dialog-mask").length);
    if (!open) break;
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

// A node near the top-left corner at scale 1 (less if it is taller than the window, so all of it shows): its DOM
// widgets are mounted (visible) and screenshots are legible.
async function showNode(page, id) {
  await page.evaluate((id) => {
    const node = app.graph.getNodeById(id);
    const ds = app.canvas.ds;
    const height = app.canvas.canvas.getBoundingClientRect().height;
    ds.scale = Math.min(1, (height - 90) / (node.size[1] + LiteGraph.NODE_TITLE_HEIGHT));
    ds.offset[0] = -node.pos[0] + 60 / ds.scale;
    ds.offset[1] = -node.pos[1] + 60 / ds.scale;
    app.canvas.setDirty(true, true);
  }, id);
  await page.waitForTimeout(400);
}
const showTrainNode = (page) => showNode(page, TRAIN_NODE);

// The node's box on the page (title bar included), for a screenshot of just that node.
async function nodeClip(page, id) {
  return page.evaluate((id) => {
    const n = app.graph.getNodeById(id);
    const ds = app.canvas.ds;
    const box = app.canvas.canvas.getBoundingClientRect();
    const x = box.x + (n.pos[0] + ds.offset[0]) * ds.scale - 4;
    const y = box.y + (n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT + ds.offset[1]) * ds.scale - 4;
    const w = n.size[0] * ds.scale + 8;
    const h = (n.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * ds.scale + 8;
    return { x: Math.max(0, x), y: Math.max(0, y), width: Math.min(w, window.innerWidth - x),
      height: Math.min(h, window.innerHeight - y) };
  }, id);
}

// The report on a data node: its textarea, whether it is on screen, and the text.
async function reportInfo(page, id) {
  return page.evaluate((id) => {
    const node = app.graph.getNodeById(id);
    const area = node?.widgets?.find((w) => w.name === "loralab_report")?.element;
    if (!area) return { widget: false };
    const r = area.getBoundingClientRect();
    const cs = getComputedStyle(area);
    let hidden = false;
    for (let e = area; e; e = e.parentElement) {
      const st = getComputedStyle(e);
      if (st.display === "none" || st.visibility === "hidden" || Number(st.opacity) === 0) hidden = true;
    }
    return { widget: true, value: area.value, table: area.dataset.table, readOnly: area.readOnly,
      font: cs.fontFamily, scrollable: cs.overflowY === "auto" || cs.overflowY === "scroll",
      visible: area.isConnected && !hidden && r.width > 100 && r.height > 40 && r.top >= 0 && r.bottom <= innerHeight,
      prop: node.properties?.loralab_report ?? null };
  }, id);
}

// What the Train LoRA node shows, read from its panel's DOM and the extension's state for the node.
async function panelInfo(page) {
  return page.evaluate(async ({ id, url }) => {
    const { __loralab } = await import(url);
    const node = app.graph.getNodeById(id);
    const panel = node?.__loralabPanel;
    const root = panel?.root;
    if (!root) return { node: !!node, panel: false };
    const q = (c) => root.querySelector(c)?.textContent ?? null;
    const canvas = root.querySelector("canvas");
    let inked = 0;
    if (canvas && canvas.width && canvas.height) {
      const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 3; i < d.length; i += 4) if (d[i] > 0) inked++;
    }
    const r = root.getBoundingClientRect();
    const stepEl = root.querySelector(".loralab-step");
    const st = __loralab.store.findFor(id);
    return {
      panel: true,
      connected: root.isConnected,
      visible: r.width > 50 && r.height > 50 && getComputedStyle(root).visibility !== "hidden",
      phase: q(".loralab-phase"), step: q(".loralab-step"), loss: q(".loralab-loss"), ema: q(".loralab-ema"),
      memLabel: q(".loralab-mem-label"), memText: q(".loralab-mem-text"), memDetail: q(".loralab-mem-detail"),
      allocWidth: parseFloat(root.querySelector(".loralab-bar-alloc")?.style.width || "0"),
      msg: q(".loralab-msg"),
      stepClipped: !!stepEl && stepEl.scrollWidth > stepEl.clientWidth + 1,
      rate: q(".loralab-rate"), eta: q(".loralab-eta"), etaDetail: q(".loralab-eta-detail"), pct: q(".loralab-pct"),
      width: node.size[0],
      // what must never be cut: each element whole (no overflow), drawn, and inside the panel
      cut: [".loralab-phase", ".loralab-step", ".loralab-pct", ".loralab-rate", ".loralab-eta", ".loralab-eta-detail",
        ".loralab-mem-label", ".loralab-mem-text", ".loralab-mem-detail"].filter((c) => {
        const e = root.querySelector(c);
        if (!e || !e.textContent) return false;
        const a = e.getBoundingClientRect();
        return e.scrollWidth > e.clientWidth + 1 || a.width === 0 || a.left < r.left - 0.5 || a.right > r.right + 0.5 ||
          a.top < r.top - 0.5 || a.bottom > r.bottom + 0.5 || getComputedStyle(e).display === "none";
      }),
      memTitle: root.querySelector(".loralab-mem")?.title || "",
      inked,
      runProp: node.properties?.loralab_run ?? null,
      state: st ? { run: st.run, phase: st.phase, step: st.step, total: st.total, historyRun: st.historyRun,
        steps: st.series.steps.slice(), loss: st.series.loss.slice() } : null,
    };
  }, { id: TRAIN_NODE, url: EXT_URL });
}

const stepOf = (text) => {
  const m = /^step (\d+)(?: \/ (\d+))?$/.exec(text || "");
  return m ? { step: Number(m[1]), total: m[2] ? Number(m[2]) : null } : null;
};
const LOSS_RE = /^loss -?\d+(\.\d+)?(e-?\d+)?$/;
const MEM_RE = /^\d+(\.\d+)? \/ \d+(\.\d+)? (B|KiB|MiB|GiB|TiB)$/;

// Poll the panel until `pred(info)` holds (the DOM is redrawn at most 4 times per second).
async function waitPanel(page, what, pred, timeoutMs) {
  const end = Date.now() + timeoutMs;
  let info = null;
  while (Date.now() < end) {
    info = await panelInfo(page);
    if (info.panel && pred(info)) return info;
    if (process.env.LORALAB_DEBUG) log("poll", info.phase, info.step, JSON.stringify(info.state && { run: info.state.run, historyRun: info.state.historyRun, n: info.state.steps.length, first: info.state.steps.slice(0, 3), last: info.state.steps.slice(-2) }));
    await page.waitForTimeout(250);
  }
  const { state, ...shown } = info || {};
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; panel: ${JSON.stringify(shown)}; ` +
    `state: ${JSON.stringify(state && { ...state, steps: state.steps.length, loss: undefined })}`);
}

function shrinkWorkflow(wf) {
  return {
    1: { ckpt_name: CKPT },
    2: { folder: DATASET, caption_dropout: 0 },
    3: { resolution: 64, min_bucket: 64, max_bucket: 128, bucket_step: 64 },
    4: { mixed_precision: "no", rank: 4, alpha: 4, warmup_steps: 0 },
    [TRAIN_NODE]: { steps: STEPS, save_every: 0, preview_every: 0, run_name: RUN_NAME },
    6: { filename: `loralab/${RUN_NAME}`, dtype: "fp32" },
    9: { width: 64, height: 64 },
    10: { steps: 2 },
  };
}

let context;
let closeBrowser = async () => {};
const summary = { steps: STEPS };
const pageErrors = [];
try {
  await prepareUserSettings();
  ({ context, close: closeBrowser } = await launch(chromium, VIEWPORT));
  mkdirSync(ARTIFACTS, { recursive: true });
  const page = await context.newPage();
  // The frontend logs its own unrelated errors (404s for optional user files, a settings hook on a fresh user);
  // only errors that come from our extension fail the test.
  page.on("pageerror", (e) => pageErrors.push(String(e && e.stack ? e.stack : e)));
  page.on("console", (m) => {
    if ((m.type() === "error" || m.type() === "warning") && /lora ?lab|loralab/i.test(m.text())) pageErrors.push(m.text());
  });
  const historyRequests = [];
  page.on("request", (r) => {
    if (r.url().includes("/api/loralab/runs/")) historyRequests.push({ t: Date.now(), url: r.url() });
  });

  await page.goto(BASE + "/");
  await waitForApp(page);
  log("app ready");

  // ---- load the shipped UI example and shrink it through its widgets
  const wf = JSON.parse(readFileSync(join(ROOT, "example_workflows", "train_then_generate_sd15.json"), "utf8"));
  const setResult = await page.evaluate(async ({ wf, values }) => {
    await app.loadGraphData(wf);
    const missing = [];
    for (const [id, widgets] of Object.entries(values)) {
      const node = app.graph.getNodeById(Number(id));
      if (!node) {
        missing.push(`node ${id}`);
        continue;
      }
      for (const [name, value] of Object.entries(widgets)) {
        const w = node.widgets?.find((x) => x.name === name);
        if (!w) {
          missing.push(`${id}.${name}`);
          continue;
        }
        w.value = value;
        w.callback?.(value, app.canvas, node);
      }
    }
    app.graph.setDirtyCanvas(true, true);
    const train = app.graph.getNodeById(5);
    return { missing, types: app.graph.nodes.map((n) => n.type), hasPanel: !!train?.__loralabPanel,
      ckptOptions: app.graph.getNodeById(1)?.widgets?.[0]?.options?.values ?? null };
  }, { wf, values: shrinkWorkflow(wf) });
  check(setResult.missing.length === 0, `widgets not found: ${setResult.missing.join(", ")}`);
  // the width the template gives Train LoRA is the width the panel is checked at
  summary.templateTrainWidth = wf.nodes.find((n) => n.id === TRAIN_NODE).size[0];
  const loadedWidth = await page.evaluate((id) => app.graph.getNodeById(id).size[0], TRAIN_NODE);
  check(loadedWidth === summary.templateTrainWidth, `Train LoRA opened ${loadedWidth} px wide, the template says ${summary.templateTrainWidth}`);
  const noReportYet = await reportInfo(page, 2);
  check(noReportYet.widget && noReportYet.value === "", `Load Dataset has a report before any run: ${JSON.stringify(noReportYet)}`);
  check(setResult.hasPanel, "the Train LoRA node has no live panel after loadGraphData");
  check(Array.isArray(setResult.ckptOptions) && setResult.ckptOptions.includes(CKPT),
    `checkpoint ${CKPT} not offered by the real combo: ${JSON.stringify(setResult.ckptOptions)}`);
  await showTrainNode(page);
  const idle = await panelInfo(page);
  check(idle.phase === "idle" && idle.step === "waiting for a run", `panel before the run: ${idle.phase} / ${idle.step}`);

  // ---- queue it the way the Run button does
  // (its boolean result is not usable in frontend 1.27: `!lastNodeErrors` is false for an empty {})
  const queued = await page.evaluate(async () => {
    await app.queuePrompt(0, 1);
    const res = await (await fetch("/api/queue")).json();
    return { nodeErrors: app.lastNodeErrors ?? null, queued: res.queue_running.length + res.queue_pending.length,
      dialogs: [...document.querySelectorAll(".p-dialog")].map((d) => d.textContent.slice(0, 300)) };
  });
  log("queued", JSON.stringify(queued));
  check(queued.queued === 1 && Object.keys(queued.nodeErrors || {}).length === 0 && queued.dialogs.length === 0,
    `queueing failed: ${JSON.stringify(queued)}`);

  // ---- live: a step > 0, a loss number and a memory line
  const first = await waitPanel(page, "the first training step with loss and memory", (i) =>
    i.phase === "training" && (stepOf(i.step)?.step ?? 0) > 0 && LOSS_RE.test(i.loss) && MEM_RE.test(i.memText || ""),
  180000);
  const s1 = stepOf(first.step);
  log("live", first.phase, first.step, first.loss, first.memLabel, first.memText, first.memDetail);
  check(s1.total === STEPS, `step text total: ${first.step}`);
  check(/^(RAM \(process\)|VRAM .+|Memory.*)$/.test(first.memLabel || ""), `memory label: ${first.memLabel}`);
  check(first.allocWidth > 0, `memory bar empty: ${first.allocWidth}%`);
  check(/· est \d/.test(first.memDetail || ""), `the pre-flight estimate is not marked: ${first.memDetail}`);
  check(first.visible && first.connected, "the panel is not visible on the canvas");
  check(!first.stepClipped, `the step text is cut off: ${first.step}`);
  check(typeof first.runProp === "string" && first.runProp.startsWith(RUN_NAME), `run id in node.properties: ${first.runProp}`);
  const run = first.state.run;

  // ---- it updates: a later step, a curve with more points
  const later = await waitPanel(page, `a step after ${s1.step}`, (i) =>
    i.phase === "training" && (stepOf(i.step)?.step ?? 0) >= s1.step + 3 && i.state.steps.length >= 3 && i.inked > 500,
  120000);
  const s2 = stepOf(later.step);
  log("later", later.step, later.loss, later.memText, `points=${later.state.steps.length}`, `inked=${later.inked}`);
  check(LOSS_RE.test(later.loss) && MEM_RE.test(later.memText || ""), `later loss/memory: ${later.loss} / ${later.memText}`);
  check(s2.step < STEPS, `the run got to ${s2.step}/${STEPS} before the reload: too short to reload mid-run`);
  await page.screenshot({ path: join(ARTIFACTS, "frontend_live_running.png") });
  summary.before = { firstStep: s1.step, laterStep: s2.step, loss: later.loss, mem: `${later.memLabel} ${later.memText}`,
    points: later.state.steps.length, run };

  // ---- the status line at the template's width and at the node's minimum width: nothing cut
  const statusAt = async (name) => {
    const i = await waitPanel(page, `speed and ETA (${name})`, (x) => x.phase === "training" && !!x.rate && !!x.eta, 30000);
    await page.screenshot({ path: join(ARTIFACTS, `panel_${name}.png`), clip: await nodeClip(page, TRAIN_NODE) });
    return { width: i.width, cut: i.cut, step: i.step, rate: i.rate, eta: i.eta, etaDetail: i.etaDetail, memText: i.memText,
      memDetail: i.memDetail };
  };
  summary.status = { template: await statusAt("template_width") };
  const minWidth = await page.evaluate((id) => {
    const n = app.graph.getNodeById(id);
    const min = Math.ceil(n.computeSize()[0]); // what ComfyUI lets the user shrink the node to
    n.setSize([min, n.size[1]]);
    app.canvas.setDirty(true, true);
    return min;
  }, TRAIN_NODE);
  await page.waitForTimeout(600);
  summary.status.minimum = await statusAt("min_width");
  log("status line", JSON.stringify(summary.status));
  for (const [at, st] of Object.entries(summary.status)) {
    check(st.cut.length === 0, `status at the ${at} width (${st.width} px): cut off: ${st.cut.join(", ")}`);
  }
  check(summary.status.minimum.width === minWidth, `the node did not shrink to ${minWidth}: ${summary.status.minimum.width}`);
  await page.evaluate(({ id, w }) => {
    const n = app.graph.getNodeById(id);
    n.setSize([w, n.size[1]]);
  }, { id: TRAIN_NODE, w: summary.templateTrainWidth });

  // ---- the data nodes show their reports on the node (they ran before training started)
  summary.reports = {};
  for (const [id, shot] of Object.entries(REPORT_NODES)) {
    await showNode(page, Number(id));
    const rep = await reportInfo(page, Number(id));
    summary.reports[id] = rep;
    check(rep.widget && rep.value.length > 20 && rep.readOnly && rep.scrollable && rep.prop === rep.value,
      `node ${id}: no report on the node: ${JSON.stringify(rep).slice(0, 400)}`);
    check(rep.visible, `node ${id}: the report is not visible: ${JSON.stringify(rep).slice(0, 200)}`);
    check(rep.table !== "true" || /mono/i.test(rep.font), `node ${id}: a table not in monospace: ${rep.font}`);
    await page.screenshot({ path: join(ARTIFACTS, shot), clip: await nodeClip(page, Number(id)) });
  }
  await showTrainNode(page);

  // ---- a second page, in another profile (another device), opened mid-run
  const second = await launch(chromium, VIEWPORT);
  try {
    const page2 = await second.context.newPage();
    const history2 = [];
    page2.on("request", (r) => {
      if (r.url().includes("/history")) history2.push(r.url());
    });
    page2.on("pageerror", (e) => pageErrors.push(String(e && e.stack ? e.stack : e)));
    await page2.goto(BASE + "/");
    await waitForApp(page2);
    const values = shrinkWorkflow(wf);
    values[TRAIN_NODE] = { ...values[TRAIN_NODE], run_name: `${RUN_NAME}_elsewhere` }; // another run's node
    await page2.evaluate(async ({ wf, values }) => {
      await app.loadGraphData(wf);
      for (const [id, widgets] of Object.entries(values)) {
        const node = app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(widgets)) {
          const w = node?.widgets?.find((x) => x.name === name);
          if (w) w.value = value;
        }
      }
    }, { wf, values });
    await showTrainNode(page2);
    await page2.waitForTimeout(2500); // about ten events of the running run arrive meanwhile
    const other = await panelInfo(page2);
    check(other.phase === "idle", `a node of another run shows this run: ${other.phase} ${other.step}`);
    await page2.evaluate(({ id, name }) => {
      app.graph.getNodeById(id).widgets.find((w) => w.name === "run_name").value = name;
      app.canvas.setDirty(true, true);
    }, { id: TRAIN_NODE, name: RUN_NAME });
    const live2 = await waitPanel(page2, "the run on the second page, with its curve from step 1", (i) =>
      i.phase === "training" && i.state?.historyRun === run && i.state.steps.includes(1) &&
      (stepOf(i.step)?.step ?? 0) >= s2.step && LOSS_RE.test(i.loss) && i.inked > 500, 60000);
    await page2.screenshot({ path: join(ARTIFACTS, "frontend_live_second_page.png") });
    summary.secondPage = { otherRunStayedIdle: other.phase === "idle", phase: live2.phase, step: live2.step,
      historyRun: live2.state.historyRun, hasStepOne: live2.state.steps.includes(1), points: live2.state.steps.length,
      historyRequests: history2.filter((u) => u.includes(`/runs/${encodeURIComponent(run)}/history`)).length };
    log("second page", JSON.stringify(summary.secondPage));
  } finally {
    await second.close();
  }

  // What the frontend persisted for the reload (sessionStorage per client id, localStorage as fallback).
  const persisted = await page.evaluate((id) => {
    const cid = window.comfyAPI?.api?.api?.clientId;
    const raw = (cid && sessionStorage.getItem(`workflow:${cid}`)) || localStorage.getItem("workflow");
    const node = raw ? JSON.parse(raw).nodes?.find((n) => n.id === id) : null;
    return { clientId: cid, runProp: node?.properties?.loralab_run ?? null };
  }, TRAIN_NODE);
  summary.persistedBeforeReload = persisted;
  log("persisted before reload", JSON.stringify(persisted));

  // ---- reload mid-run
  const beforeReload = Date.now();
  await page.reload();
  await waitForApp(page);
  log("reloaded");
  const restored = await page.evaluate((id) => {
    const node = app.graph.getNodeById(id);
    return { type: node?.type ?? null, nodes: app.graph.nodes.length, ckpt: app.graph.getNodeById(1)?.widgets?.[0]?.value };
  }, TRAIN_NODE);
  if (restored.type !== "LoraLab_TrainLoRA") {
    // the frontend did not restore the workflow: load the same graph again (the run id then comes with the events)
    log("workflow not restored after the reload; loading it again", JSON.stringify(restored));
    await page.evaluate(async ({ wf, values }) => {
      await app.loadGraphData(wf);
      for (const [id, widgets] of Object.entries(values)) {
        const node = app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(widgets)) {
          const w = node?.widgets?.find((x) => x.name === name);
          if (w) w.value = value;
        }
      }
    }, { wf, values: shrinkWorkflow(wf) });
  }
  summary.restoredWorkflow = restored.type === "LoraLab_TrainLoRA" && restored.ckpt === CKPT;
  check(summary.restoredWorkflow, `the frontend did not restore the shrunk workflow after the reload: ${JSON.stringify(restored)}`);
  await showTrainNode(page);

  // the whole curve is back: every step from 1 to the step seen before the reload (only the history route has those:
  // the page's state started empty), the live step keeps moving, loss and memory are shown again
  const back = await waitPanel(page, `the curve up to step ${s2.step} after the reload`, (i) => {
    const st = i.state;
    if (!st || st.historyRun !== run || st.run !== run) return false;
    const have = new Set(st.steps);
    for (let k = 1; k <= s2.step; k++) if (!have.has(k)) return false;
    return (stepOf(i.step)?.step ?? 0) >= s2.step && LOSS_RE.test(i.loss) && MEM_RE.test(i.memText || "") && i.inked > 500;
  }, 90000);
  const s3 = stepOf(back.step);
  log("after reload", back.phase, back.step, back.loss, back.memText, `points=${back.state.steps.length}`, `inked=${back.inked}`);
  check(back.memTitle.startsWith("Memory estimate ("), `no estimate tooltip after the reload: ${back.memTitle.slice(0, 80)}`);
  check(back.runProp === run, `node.properties.loralab_run after the reload: ${back.runProp} (expected ${run})`);
  check(back.visible, "the panel is not visible after the reload");
  // the points match the run's history on disk
  const disk = await (await fetch(`${BASE}/api/loralab/runs/${encodeURIComponent(run)}/history`)).json();
  const diskLoss = new Map(disk.history.steps.map((s, k) => [s, disk.history.loss[k]]));
  let compared = 0;
  const mismatched = [];
  back.state.steps.forEach((s, k) => {
    if (s > s2.step || !diskLoss.has(s)) return;
    compared++;
    if (Math.abs(diskLoss.get(s) - back.state.loss[k]) > 1e-6 * Math.max(1, Math.abs(diskLoss.get(s)))) mismatched.push(s);
  });
  check(compared === s2.step && mismatched.length === 0,
    `curve vs history on disk: compared ${compared}/${s2.step}, mismatched steps ${mismatched.slice(0, 10)}`);
  const historyAfterReload = historyRequests.filter((r) => r.t > beforeReload && r.url.includes(`/runs/${encodeURIComponent(run)}/history`));
  check(historyAfterReload.length >= 1, "the history route was not requested after the reload");
  await page.screenshot({ path: join(ARTIFACTS, "frontend_live_reloaded.png") });
  for (const id of Object.keys(REPORT_NODES)) { // the reports come back with the workflow (node.properties)
    const rep = await reportInfo(page, Number(id));
    summary.reports[id].afterReload = rep.value ?? null;
    check(rep.value === summary.reports[id].value, `node ${id}: the report did not come back after the reload`);
  }
  summary.after = { step: s3.step, phase: back.phase, points: back.state.steps.length, comparedWithDisk: compared,
    historyRequests: historyAfterReload.length, runProp: back.runProp };

  // ---- and it keeps updating after the reload
  const moving = await waitPanel(page, `a step after ${s3.step} (after the reload)`, (i) =>
    (stepOf(i.step)?.step ?? 0) > s3.step || i.phase === "done", 60000);
  log("still live", moving.phase, moving.step);

  // ---- stop the run: POST /interrupt (the UI's Cancel), the panel says "stopped"
  if (moving.phase === "training") {
    await fetch(`${BASE}/api/interrupt`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
    const stopped = await waitPanel(page, "phase stopped", (i) => i.phase === "stopped", 120000);
    log("stopped", stopped.phase, stopped.step, stopped.msg, `points=${stopped.state?.steps.length}`);
    // Live events are throttled (<= 4/s), so the complete curve comes from the history the panel re-reads when the
    // run ends: every step up to the stopped one, drawn.
    const stopStep = stepOf(stopped.step)?.step ?? 0;
    const whole = await waitPanel(page, `the whole curve (${stopStep} points) after Stop`, (i) =>
      i.phase === "stopped" && (i.state?.steps.length ?? 0) >= stopStep && i.inked > 500, 30000);
    check(whole.state.steps.length >= s3.step, `the curve is gone after Stop: points=${whole.state.steps.length}`);
    summary.stopped = { step: stopped.step, msg: stopped.msg };
  } else {
    check(false, `the run finished before it could be stopped (steps=${STEPS} too few for this machine)`);
  }
  await page.screenshot({ path: join(ARTIFACTS, "frontend_live_stopped.png") });
  const ours = pageErrors.filter((e) => /loralab|lora lab|extensions\/comfyui-lora-lab/i.test(e));
  check(ours.length === 0, `errors from the extension: ${ours.join(" | ")}`);
  summary.otherPageErrors = pageErrors.filter((e) => !ours.includes(e)).map((e) => e.split("\n").slice(0, 4).join(" / "));
} catch (err) {
  failures.push(`crash: ${err && err.stack ? err.stack : err}`);
  try {
    const pages = context?.pages() || [];
    if (pages[0]) await pages[0].screenshot({ path: join(ARTIFACTS, "frontend_live_failure.png") });
  } catch {}
} finally {
  await closeBrowser();
}

summary.seconds = Math.round((Date.now() - t0) / 1000);
console.log("SUMMARY " + JSON.stringify(summary));
if (failures.length) {
  console.log("FAIL\n" + failures.map((f) => " - " + f).join("\n"));
  process.exit(1);
}
console.log(`PASS: screenshots in ${ARTIFACTS}`);
process.exit(0);
