// The example workflows as ComfyUI's template browser serves them (run by tests/comfy/test_frontend_live.py).
//
// In the real page (Debian's Chromium through playwright-core): opens Workflow → Browse Templates, picks the
// "LoRA Lab" category (its title comes from locales/en/main.json, keyed by the pack's folder name), checks that every
// card's thumbnail (example_workflows/<name>.jpg, served under /api/workflow_templates/<folder>/) loads, clicks the
// SD1.5 card and checks that the graph opens framed: every node, title bar included, inside the canvas. Then loads
// each template the way the browser does and checks the same for both.
//
// With LORALAB_THUMBNAIL_DIR set it only renders each template for its thumbnail: the graph as the template opens
// (the frontend's own fit-to-view, no minimap), in a window large enough that the nodes draw at full detail, cut to
// the nodes' bounding box; <dir>/<name>.png becomes example_workflows/<name>.jpg on the Python side (Pillow).
//
// Input (environment): LORALAB_COMFY_URL, LORALAB_PACK_FOLDER (default comfyui-lora-lab), LORALAB_ARTIFACTS,
// LORALAB_THUMBNAIL_DIR (optional). Output: test-artifacts/templates_dialog.png, template_opened_<name>.png, a
// "SUMMARY {...}" line. Exit codes: 0 pass, 1 fail, 77 a requirement is missing.
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { launch, requireChromium } from "../web/chromium.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..");
const ARTIFACTS = process.env.LORALAB_ARTIFACTS || join(ROOT, "test-artifacts");
const BASE = (process.env.LORALAB_COMFY_URL || "").replace(/\/$/, "");
const FOLDER = process.env.LORALAB_PACK_FOLDER || "comfyui-lora-lab";
const THUMBS = process.env.LORALAB_THUMBNAIL_DIR || "";
// every example workflow (the Python side lists example_workflows/*.json)
const TEMPLATES = (process.env.LORALAB_TEMPLATES || "train_then_generate_sd15,train_then_generate_sdxl").split(",");
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);

class Done extends Error {} // the thumbnails-only pass ends here
const chromium = await requireChromium();
const failures = [];
function check(cond, msg) {
  if (!cond) {
    failures.push(msg);
    log(`CHECK FAILED: ${msg}`);
  }
  return !!cond;
}

async function setting(id, value) {
  const res = await fetch(`${BASE}/api/settings/${id}`, { method: "POST", body: JSON.stringify(value) });
  if (!res.ok) log(`warning: could not store ${id} (${res.status})`);
}

async function openApp(page) {
  await page.goto(BASE + "/");
  await page.waitForFunction(
    () => !!(window.app && window.app.graph && window.app.canvas && window.app.extensionManager?.workflow),
    null, { timeout: 120000, polling: 250 });
  await page.waitForTimeout(500);
  for (let i = 0; i < 3; i++) {
    const open = await page.evaluate(() => document.querySelectorAll(".p-dialog-mask").length);
    if (!open) break;
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

// Every node's on-screen box (title bar included) against the canvas element: "framed" = all inside.
async function framing(page) {
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  await page.waitForTimeout(400); // fitView runs on the frame after configure
  return page.evaluate(() => {
    const ds = app.canvas.ds;
    const box = app.canvas.canvas.getBoundingClientRect();
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    const outside = [];
    for (const n of app.graph.nodes) {
      const x0 = (n.pos[0] + ds.offset[0]) * ds.scale;
      const y0 = (n.pos[1] - title + ds.offset[1]) * ds.scale;
      const x1 = (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale;
      const y1 = (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale;
      if (x0 < 0 || y0 < 0 || x1 > box.width || y1 > box.height) {
        outside.push({ id: n.id, title: n.title, box: [x0, y0, x1, y1].map(Math.round) });
      }
    }
    return { nodes: app.graph.nodes.length, outside, scale: ds.scale, canvas: [box.width, box.height],
      types: app.graph.nodes.map((n) => n.type) };
  });
}

// What the template browser does when a card is clicked (useTemplateWorkflows.loadWorkflowTemplate).
async function loadTemplate(page, name) {
  return page.evaluate(async ({ folder, name }) => {
    const res = await fetch(`/api/workflow_templates/${folder}/${name}.json`); // api.apiURL(...) in the frontend
    if (!res.ok) return { status: res.status };
    await app.loadGraphData(await res.json(), true, true, name);
    return { status: res.status };
  }, { folder: FOLDER, name });
}

let closeBrowser = async () => {};
const summary = { folder: FOLDER, templates: {} };
try {
  await setting("Comfy.TutorialCompleted", true);
  await setting("Comfy.Minimap.Visible", false); // the minimap would cover part of the thumbnail
  mkdirSync(ARTIFACTS, { recursive: true });

  // ---- thumbnails: each template as it opens, in a window large enough for full-detail nodes
  if (THUMBS) {
    mkdirSync(THUMBS, { recursive: true });
    const big = await launch(chromium, { width: 2400, height: 1600 });
    try {
      const page = await big.context.newPage();
      await openApp(page);
      for (const name of TEMPLATES) {
        check((await loadTemplate(page, name)).status === 200, `${name}: template route`);
        const f = await framing(page);
        check(f.outside.length === 0, `${name} (thumbnail): nodes outside the view: ${JSON.stringify(f.outside)}`);
        const clip = await page.evaluate(() => { // the nodes' bounding box on screen, with a margin
          const ds = app.canvas.ds;
          const box = app.canvas.canvas.getBoundingClientRect();
          const b = [Infinity, Infinity, -Infinity, -Infinity];
          for (const n of app.graph.nodes) {
            b[0] = Math.min(b[0], n.pos[0]);
            b[1] = Math.min(b[1], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT - 24); // the node-source badges
            b[2] = Math.max(b[2], n.pos[0] + n.size[0]);
            b[3] = Math.max(b[3], n.pos[1] + n.size[1]);
          }
          const m = 24;
          const x = Math.max(box.x, box.x + (b[0] + ds.offset[0]) * ds.scale - m);
          const y = Math.max(box.y, box.y + (b[1] + ds.offset[1]) * ds.scale - m);
          return { x, y, width: Math.min(box.right, box.x + (b[2] + ds.offset[0]) * ds.scale + m) - x,
            height: Math.min(box.bottom, box.y + (b[3] + ds.offset[1]) * ds.scale + m) - y };
        });
        await page.screenshot({ path: join(THUMBS, `${name}.png`), clip });
        log(`thumbnail source ${name}: scale ${f.scale.toFixed(2)}`);
      }
    } finally {
      await big.close();
    }
    summary.thumbnails = TEMPLATES;
    throw new Done();
  }

  const { context, close } = await launch(chromium, { width: 1280, height: 800 });
  closeBrowser = close;
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e && e.stack ? e.stack : e)));
  const responses = [];
  page.on("response", (r) => {
    if (r.url().includes("/workflow_templates/")) responses.push({ url: r.url(), status: r.status() });
  });
  await openApp(page);

  // ---- the template browser: our category, its cards, their thumbnails
  await page.evaluate(() => app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  const category = page.locator(".p-dialog li", { hasText: "LoRA Lab" }).first();
  await category.waitFor({ timeout: 30000 });
  await category.click();
  const cards = () => page.evaluate(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map((c) => ({
    name: c.dataset.testid.replace("template-workflow-", ""),
    images: [...c.querySelectorAll("img")].map((i) => ({ src: i.currentSrc || i.getAttribute("src"), width: i.naturalWidth })),
  })));
  let shown = [];
  const seen = new Map(); // name -> the card as seen with its image loaded (cards out of view may drop theirs)
  const end = Date.now() + 20000;
  while (Date.now() < end) { // thumbnails load lazily, when the card scrolls into view
    shown = await cards();
    for (const c of shown) if (!seen.has(c.name) || c.images.some((i) => i.width > 0)) seen.set(c.name, c);
    const ours = TEMPLATES.map((n) => seen.get(n)).filter(Boolean);
    if (ours.length === TEMPLATES.length && ours.every((c) => c.images.some((i) => i.width > 0))) break;
    for (const c of ours.filter((c) => !c.images.some((i) => i.width > 0))) { // as a user scrolls to it
      await page.locator(`[data-testid="template-workflow-${c.name}"]`).scrollIntoViewIfNeeded().catch(() => {});
    }
    await page.waitForTimeout(250);
  }
  summary.cards = [...seen.values()];
  for (const name of TEMPLATES) {
    const card = seen.get(name);
    check(!!card, `no card for ${name} under "LoRA Lab": ${JSON.stringify(shown.map((c) => c.name))}`);
    // the card shows the image (the frontend fetches it and shows a blob: URL) and it is our file
    const fetched = responses.find((r) => r.url.endsWith(`/workflow_templates/${FOLDER}/${name}.jpg`));
    check(card && card.images.some((i) => i.width > 0) && fetched?.status === 200,
      `${name}: the thumbnail did not load: ${JSON.stringify(card?.images)} ${JSON.stringify(fetched)}`);
  }
  await page.screenshot({ path: join(ARTIFACTS, "templates_dialog.png") });

  // ---- open one from its card, as a user does: it opens framed
  await page.locator(`[data-testid="template-workflow-${TEMPLATES[0]}"]`).click();
  await page.waitForFunction(() => app.graph.nodes.some((n) => n.type === "LoraLab_TrainLoRA"), null, { timeout: 30000 });
  let f = await framing(page);
  summary.templates[`${TEMPLATES[0]} (card)`] = f;
  check(f.outside.length === 0, `${TEMPLATES[0]} opened from its card: nodes outside the view: ${JSON.stringify(f.outside)}`);
  await page.screenshot({ path: join(ARTIFACTS, `template_opened_${TEMPLATES[0]}.png`) });

  // ---- and every template through the same route
  for (const name of TEMPLATES) {
    check((await loadTemplate(page, name)).status === 200, `${name}: template route`);
    f = await framing(page);
    summary.templates[name] = f;
    check(f.outside.length === 0, `${name}: nodes outside the view: ${JSON.stringify(f.outside)}`);
    check(f.types.includes("LoraLab_TrainLoRA") && f.nodes >= 10, `${name}: loaded ${JSON.stringify(f.types)}`);
    if (name !== TEMPLATES[0]) await page.screenshot({ path: join(ARTIFACTS, `template_opened_${name}.png`) });
  }
  const missing = responses.filter((r) => r.status >= 400);
  check(missing.length === 0, `template files not found: ${JSON.stringify(missing)}`);
  const ours = pageErrors.filter((e) => /loralab|lora lab/i.test(e));
  check(ours.length === 0, `errors from the extension: ${ours.join(" | ")}`);
} catch (err) {
  if (!(err instanceof Done)) failures.push(`crash: ${err && err.stack ? err.stack : err}`);
} finally {
  await closeBrowser();
}

summary.seconds = Math.round((Date.now() - t0) / 1000);
console.log("SUMMARY " + JSON.stringify(summary));
if (failures.length) {
  console.log("FAIL\n" + failures.map((f) => " - " + f).join("\n"));
  process.exit(1);
}
console.log("PASS");
process.exit(0);
