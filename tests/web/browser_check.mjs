// Headless-browser check of the live panel (run by tests/test_web_browser.py, or directly:
//   node tests/web/browser_check.mjs
// ). Serves the real web/*.js unchanged plus stub /scripts/app.js and /scripts/api.js on 127.0.0.1, opens
// tests/web/harness.html in Debian's Chromium through playwright-core (no browser download), replays the recorded
// event stream and checks what the Train LoRA nodes show, in the dark and the light theme. Screenshots:
// test-artifacts/web_panel.png (dark) and test-artifacts/web_panel_light.png.
// Exit codes: 0 pass, 1 fail, 77 a requirement is missing (the pytest wrapper skips).
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

import { launch, requireChromium } from "./chromium.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..");
const ARTIFACTS = join(ROOT, "test-artifacts");
const PREV_RUN = "lora_prev_20251231-090000";

const chromium = await requireChromium();

// ------------------------------------------------------------------------------------------- static server
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json",
  ".png": "image/png", ".css": "text/css" };

function safeJoin(base, rel) {
  const p = normalize(join(base, rel));
  return p === base || p.startsWith(base + sep) ? p : null;
}

function route(url) {
  const path = decodeURIComponent(url.pathname);
  if (path === "/" || path === "/harness.html") return join(HERE, "harness.html");
  if (path.startsWith("/harness/")) return safeJoin(HERE, path.slice("/harness/".length));
  if (path === "/scripts/app.js") return join(HERE, "stubs", "app.js");
  if (path === "/scripts/api.js") return join(HERE, "stubs", "api.js");
  if (path.startsWith("/extensions/loralab/")) return safeJoin(join(ROOT, "web"), path.slice("/extensions/loralab/".length));
  if (path.startsWith("/fixtures/")) return safeJoin(join(HERE, "fixtures"), path.slice("/fixtures/".length));
  if (path === `/api/loralab/runs/${PREV_RUN}/history`) return join(HERE, "fixtures", "history_run.json");
  if (/^\/api\/loralab\/runs\/[^/]+\/previews\/[^/]+\.png$/.test(path)) return join(HERE, "fixtures", "preview.png");
  return null; // other runs: 404, like the real route before the run folder exists
}

const requests = [];
const missing = [];
const server = createServer((req, res) => {
  const url = new URL(req.url, "http://127.0.0.1");
  requests.push(url.pathname);
  const file = route(url);
  if (url.pathname === "/favicon.ico") {
    res.writeHead(204);
    res.end();
    return;
  }
  if (!file || !existsSync(file)) {
    missing.push(url.pathname);
    res.writeHead(404, { "content-type": "application/json" });
    res.end('{"error":"not found"}');
    return;
  }
  res.writeHead(200, { "content-type": TYPES[extname(file)] || "application/octet-stream", "cache-control": "no-store" });
  res.end(readFileSync(file));
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const base = `http://127.0.0.1:${server.address().port}`;

// --------------------------------------------------------------------------------------------------- checks
const failures = [];
function check(cond, msg) {
  if (!cond) failures.push(msg);
}

async function panelInfo(page, id) {
  return page.evaluate((id) => {
    const node = document.querySelector(`.fake-node[data-node-id="${id}"]`);
    const panel = node?.querySelector(".loralab-panel");
    if (!panel) return { exists: !!node, panel: false };
    const q = (c) => panel.querySelector(c)?.textContent ?? null;
    const canvas = panel.querySelector("canvas");
    let colors = 0;
    let inked = 0;
    if (canvas && canvas.width && canvas.height) {
      const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      const seen = new Set();
      for (let i = 0; i < d.length; i += 4) {
        if (d[i + 3] > 0) {
          inked++;
          seen.add(((d[i] >> 4) << 8) | ((d[i + 1] >> 4) << 4) | (d[i + 2] >> 4));
        }
      }
      colors = seen.size;
    }
    return {
      exists: true, panel: true,
      phase: q(".loralab-phase"), step: q(".loralab-step"), pct: q(".loralab-pct"), loss: q(".loralab-loss"), ema: q(".loralab-ema"),
      lr: q(".loralab-lr"), memLabel: q(".loralab-mem-label"), memText: q(".loralab-mem-text"), memDetail: q(".loralab-mem-detail"), msg: q(".loralab-msg"),
      rate: q(".loralab-rate"), eta: q(".loralab-eta"),
      thumbs: [...panel.querySelectorAll(".loralab-thumbs img")].map((i) => i.getAttribute("src")),
      thumbsLoaded: [...panel.querySelectorAll(".loralab-thumbs img")].filter((i) => i.complete && i.naturalWidth > 0).length,
      allocWidth: panel.querySelector(".loralab-bar-alloc")?.style.width,
      estLeft: panel.querySelector(".loralab-bar-est")?.style.left || "",
      memTitle: panel.querySelector(".loralab-mem")?.title || "",
      estShown: panel.querySelector(".loralab-bar-est")?.style.display !== "none",
      canvas: canvas ? { w: canvas.width, h: canvas.height, cssW: canvas.clientWidth, cssH: canvas.clientHeight, inked, colors } : null,
      logPressed: panel.querySelector(".loralab-btn")?.getAttribute("aria-pressed"),
      logVisible: (() => {
        const b = panel.querySelector(".loralab-btn")?.getBoundingClientRect();
        const r = panel.getBoundingClientRect();
        return !!b && b.width > 0 && b.right <= r.right + 0.5;
      })(),
      runProp: window.__harness.nodes[id]?.properties?.loralab_run ?? null,
      panelH: panel.getBoundingClientRect().height,
      overflowing: [...panel.querySelectorAll(".loralab-row")].some((r) => r.scrollWidth > r.clientWidth + 1),
      etaDetail: q(".loralab-eta-detail"),
      // step, speed, ETA and memory must never be cut: each whole (no overflow) and inside the panel
      cut: [".loralab-step", ".loralab-pct", ".loralab-rate", ".loralab-eta", ".loralab-eta-detail", ".loralab-mem-label",
        ".loralab-mem-text", ".loralab-mem-detail"].filter((c) => {
        const e = panel.querySelector(c);
        if (!e || !e.textContent) return false;
        const a = e.getBoundingClientRect();
        const r = panel.getBoundingClientRect();
        return e.scrollWidth > e.clientWidth + 1 || a.left < r.left - 0.5 || a.right > r.right + 0.5 ||
          a.bottom > r.bottom + 0.5 || a.width === 0;
      }),
      report: (() => {
        const t = node.querySelector("textarea.loralab-report");
        return t ? { value: t.value, table: t.dataset.table, font: getComputedStyle(t).fontFamily,
          readOnly: t.readOnly, h: t.getBoundingClientRect().height } : null;
      })(),
    };
  }, id);
}

const t0 = (theme) => `[${theme}]`;

function formatNumberLikeCore(v) {
  return String(Number(v.toPrecision(4)));
}

let context;
let closeBrowser = async () => {};
const summary = {};
try {
  ({ context, close: closeBrowser } = await launch(chromium, { width: 1240, height: 560 }));
  mkdirSync(ARTIFACTS, { recursive: true });
  mkdirSync(ARTIFACTS, { recursive: true });
  for (const theme of ["dark", "light"]) {
    const page = await context.newPage();
    const consoleErrors = [];
    page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
    await page.goto(`${base}/harness.html?theme=${theme}&gap=${theme === "dark" ? 15 : 8}`);
    if (theme === "dark") {
      // mid-run: training phase with speed and an ETA that includes the preview still to come at its measured cost
      await page.waitForFunction(() => (window.__harness.sent || 0) >= 120 &&
        /incl\. 1 preview × 3s/.test(document.querySelector('[data-node-id="5"] .loralab-eta-detail')?.textContent || ""),
      null, { timeout: 60000 });
      const mid = await panelInfo(page, 5);
      check(mid.phase === "training" && mid.rate.endsWith("it/s") && /^ETA (≥ )?\d/.test(mid.eta),
        `${t0(theme)} mid-run: ${mid.phase} ${mid.rate} ${mid.eta} (${mid.etaDetail})`);
      check(mid.cut.length === 0, `${t0(theme)} mid-run: cut off: ${mid.cut.join(", ")}`);
      await page.locator('[data-node-id="5"]').screenshot({ path: join(ARTIFACTS, "web_panel_training.png") });
    }
    await page.waitForFunction(() => window.__harness && window.__harness.done, null, { timeout: 60000 });
    const H = await page.evaluate(() => ({
      errors: window.__harness.errors, registered: window.__harness.registered,
      streamMs: window.__harness.streamEnd - window.__harness.streamStart,
      drawsAtStreamEnd: window.__harness.drawsAtStreamEnd, last: window.__harness.lastEvent,
      lastLoss: window.__harness.lossEvents.at(-1), historyServed: window.__harness.historyServedCount,
    }));
    const p5 = await panelInfo(page, 5);
    const p7 = await panelInfo(page, 7);
    const p3 = await panelInfo(page, 3);
    const p9 = await panelInfo(page, 9);
    const t = `[${theme}]`;

    check(H.errors.length === 0, `${t} page errors: ${H.errors.join(" | ")}`);
    check(consoleErrors.length === 0, `${t} console errors: ${consoleErrors.join(" | ")} (404s: ${missing.join(", ")})`);
    check(H.registered?.includes("loralab.progress"), `${t} listener not registered in init()`);
    check(H.historyServed >= 2, `${t} live run history fetched ${H.historyServed} times (first event, after previews/saves, done)`);
    // node 5: the streamed run
    check(p5.panel, `${t} node 5 has no panel`);
    check(p5.phase === "done", `${t} node 5 phase: ${p5.phase}`);
    check(p5.step === `step ${H.last.step} / ${H.last.total}` && p5.pct === "100%", `${t} node 5 step text: ${p5.step} ${p5.pct}`);
    check(p5.loss === `loss ${formatNumberLikeCore(H.lastLoss.loss)}`, `${t} node 5 loss text: ${p5.loss} vs ${H.lastLoss.loss}`);
    check(/^EMA 0\.\d+/.test(p5.ema), `${t} node 5 EMA text: ${p5.ema}`);
    check(/^LR \d/.test(p5.lr), `${t} node 5 LR text: ${p5.lr}`);
    check(p5.memLabel === "VRAM cuda:0", `${t} node 5 memory label: ${p5.memLabel}`);
    check(/^\d+\.\d+ \/ 24\.0 GiB$/.test(p5.memText), `${t} node 5 memory text: ${p5.memText}`);
    check(/^peak 10\.\d · est 11\.0 · reserved 9\.00$/.test(p5.memDetail), `${t} node 5 memory detail: ${p5.memDetail}`);
    check(p5.estLeft.startsWith("calc(45.83%") && p5.estShown, `${t} node 5 estimate mark: ${p5.estLeft} ${p5.estShown}`);
    check(parseFloat(p5.allocWidth) > 20 && parseFloat(p5.allocWidth) < 40, `${t} node 5 memory bar: ${p5.allocWidth}`);
    check(p5.thumbs.length === 2 && p5.thumbs.every((s) => s.startsWith("/api/loralab/runs/")) &&
      p5.thumbs[1].endsWith("step_000250.png"), `${t} node 5 thumbnails: ${JSON.stringify(p5.thumbs)}`);
    check(p5.thumbsLoaded === 2, `${t} node 5 thumbnails loaded: ${p5.thumbsLoaded}`);
    check(p5.canvas && p5.canvas.inked > 2000 && p5.canvas.colors > 8, `${t} node 5 canvas looks blank: ${JSON.stringify(p5.canvas)}`);
    check(p5.runProp === H.last.run, `${t} node 5 run id not stored in properties: ${p5.runProp}`);
    check(!p5.overflowing, `${t} node 5 text rows overflow`);
    check(p5.cut.length === 0, `${t} node 5: cut off: ${p5.cut.join(", ")}`);
    check(p5.report && p5.report.value === (await page.evaluate(() => window.__harness.report)) && p5.report.readOnly &&
      p5.report.table === "true" && /mono/i.test(p5.report.font) && p5.report.h > 40,
      `${t} node 5 run report on the node: ${JSON.stringify(p5.report)}`);
    const kept = await page.evaluate(() => window.__harness.nodes[5].properties.loralab_report);
    check(kept === (await page.evaluate(() => window.__harness.report)), `${t} the report is not kept in node.properties`);
    // throttling: at most 4 redraws per second while streaming (+2 for the first frame and resize)
    const draws5 = H.drawsAtStreamEnd["5"] || 0;
    const allowed = Math.ceil((H.streamMs / 1000) * 4) + 2;
    check(draws5 > 3 && draws5 <= allowed, `${t} node 5 redraws ${draws5} in ${H.streamMs.toFixed(0)} ms (max ${allowed})`);
    // node 7: same type, no events -> untouched
    check(p7.panel && p7.phase === "idle" && p7.step === "waiting for a run", `${t} node 7 changed: ${JSON.stringify(p7)}`);
    check((H.drawsAtStreamEnd["7"] || 0) <= 3, `${t} node 7 redrawn ${(H.drawsAtStreamEnd["7"] || 0)} times`);
    // node 3: not ours
    check(p3.exists && !p3.panel, `${t} KSampler got a panel`);
    // node 9: reloaded workflow -> whole curve from the history route
    check(p9.panel && p9.phase === "done" && p9.step === "step 120 / 120", `${t} node 9 (history) ${p9.phase} ${p9.step}`);
    check(p9.memLabel === "RAM (process)", `${t} node 9 memory label: ${p9.memLabel}`);
    check(p9.memTitle.startsWith("Memory estimate (cpu): 4.0 GiB") && p9.memTitle.includes("To use less memory"),
      `${t} node 9 memory tooltip (the run's estimate.txt): ${p9.memTitle}`);
    check(p9.thumbs.length === 2, `${t} node 9 thumbnails from history marks: ${JSON.stringify(p9.thumbs)}`);
    check(p9.canvas && p9.canvas.inked > 2000, `${t} node 9 canvas looks blank: ${JSON.stringify(p9.canvas)}`);

    const shot = theme === "dark" ? "web_panel.png" : `web_panel_${theme}.png`;
    await page.locator("#graph").screenshot({ path: join(ARTIFACTS, shot) });

    // log-scale toggle redraws the curve differently and is remembered on the node
    const before = await page.evaluate(() => document.querySelector('[data-node-id="5"] canvas').toDataURL());
    await page.click('[data-node-id="5"] .loralab-btn');
    await page.waitForTimeout(450);
    const after = await page.evaluate(() => document.querySelector('[data-node-id="5"] canvas').toDataURL());
    const p5log = await panelInfo(page, 5);
    check(p5log.logPressed === "true", `${t} log toggle not pressed`);
    check(before !== after, `${t} log toggle did not change the chart`);
    const prop = await page.evaluate(() => window.__harness.nodes[5].properties.loralab_log_scale);
    check(prop === true, `${t} log toggle not stored in node.properties`);
    if (theme === "dark") await page.locator('[data-node-id="5"]').screenshot({ path: join(ARTIFACTS, "web_panel_log.png") });

    // small node: still readable, nothing throws
    await page.evaluate(() => window.__harness.nodes[9].setSize([250, 470]));
    await page.waitForTimeout(450);
    const small = await panelInfo(page, 9);
    check(small.canvas && small.canvas.inked > 500, `${t} small node 9 canvas blank`);
    check(small.logVisible, `${t} small node 9: the log button is cut off`);
    check(small.cut.length === 0, `${t} small node 9: cut off: ${small.cut.join(", ")}`);
    if (theme === "dark") await page.locator('[data-node-id="9"]').screenshot({ path: join(ARTIFACTS, "web_panel_small.png") });
    const late = await page.evaluate(() => window.__harness.errors);
    check(late.length === 0, `${t} errors after interaction: ${late.join(" | ")}`);
    summary[theme] = { node5: p5, node9: { phase: p9.phase, step: p9.step, thumbs: p9.thumbs.length }, draws5, allowed };
    await page.close();
  }
  check(requests.includes(`/api/loralab/runs/${PREV_RUN}/history`), "history route never requested");
} catch (err) {
  failures.push(`crash: ${err && err.stack ? err.stack : err}`);
} finally {
  await closeBrowser();
  server.close();
}

console.log(JSON.stringify(summary, null, 1));
if (failures.length) {
  console.log("FAIL\n" + failures.map((f) => " - " + f).join("\n"));
  process.exit(1);
}
console.log(`PASS: screenshots in ${ARTIFACTS}`);
process.exit(0);
