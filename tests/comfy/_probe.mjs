import { chromium } from "playwright-core";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
const url = process.argv[2];
await fetch(url + "/api/settings/Comfy.TutorialCompleted", { method: "POST", body: "true" });
const ctx = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "probe-")), {
  executablePath: "/usr/bin/chromium", headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"],
  viewport: { width: 1400, height: 900 },
});
const page = await ctx.newPage();
page.on("console", (m) => console.log("console", m.type(), m.text().slice(0, 300)));
page.on("pageerror", (e) => console.log("pageerror", e.stack));
page.on("response", (r) => r.status() >= 400 && console.log("HTTP", r.status(), r.url()));
const t0 = Date.now();
await page.goto(url);
await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null, { timeout: 120000 });
console.log("app after", Date.now() - t0);
await page.waitForTimeout(2000);
const wf = JSON.parse(readFileSync("example_workflows/train_then_generate_sd15.json", "utf8"));
const info = await page.evaluate(async (wf) => {
  await app.loadGraphData(wf);
  const n = app.graph.getNodeById(5);
  return { nodes: app.graph.nodes.map((n) => [n.id, n.type, n.widgets?.map((w) => [w.name, w.type, w.value])]),
    dialogs: [...document.querySelectorAll(".p-dialog")].map((d) => d.textContent.slice(0, 200)),
    panel: !!document.querySelector(".loralab-panel"), size: n.size, pos: n.pos, ds: [app.canvas.ds.scale, app.canvas.ds.offset] };
}, wf);
console.log(JSON.stringify(info));
await page.waitForTimeout(1000);
await page.screenshot({ path: "/tmp/explore/probe2.png" });
await ctx.close();
