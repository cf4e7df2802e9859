import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
const url = process.argv[2];
const ctx = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "probe-")), {
  executablePath: "/usr/bin/chromium", headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"],
  viewport: { width: 1400, height: 900 },
});
const page = await ctx.newPage();
page.on("console", (m) => console.log("console", m.type(), m.text().slice(0, 300)));
page.on("pageerror", (e) => console.log("pageerror", String(e)));
const t0 = Date.now();
await page.goto(url);
await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null, { timeout: 120000 });
console.log("app after", Date.now() - t0);
await page.waitForTimeout(3000);
const info = await page.evaluate(async () => {
  const exts = await (await fetch("/api/extensions")).json();
  return { exts: exts.filter((e) => e.includes("lora")), nodes: app.graph.nodes.map((n) => [n.id, n.type]), ver: window.__COMFYUI_FRONTEND_VERSION__,
    dialogs: [...document.querySelectorAll(".p-dialog")].map((d) => d.textContent.slice(0, 200)) };
});
console.log(JSON.stringify(info, null, 1));
await page.screenshot({ path: "/tmp/explore/probe1.png" });
await ctx.close();
