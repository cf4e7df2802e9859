// Debian's Chromium driven through playwright-core (no browser download), started the same way by both browser
// tests: headless, no sandbox/GPU/network extras, a fresh profile. A missing requirement exits 77 (pytest skips).
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const CHROMIUM = process.env.LORALAB_CHROMIUM || "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--no-first-run", "--disable-sync"];

export function skip(reason) {
  console.log(`SKIP: ${reason}`);
  process.exit(77);
}

/** playwright-core's `chromium`, after checking that it and the Chromium binary are installed (else skip). */
export async function requireChromium() {
  let chromium;
  try {
    ({ chromium } = await import("playwright-core"));
  } catch {
    skip("playwright-core is not installed (run `npm ci` in the repository root)");
  }
  if (!existsSync(CHROMIUM)) skip(`no Chromium at ${CHROMIUM} (apt-get install -y chromium, or set LORALAB_CHROMIUM)`);
  return chromium;
}

/** A browser context with a fresh profile; `close()` also removes the profile. */
export async function launch(chromium, viewport) {
  const userDataDir = mkdtempSync(join(tmpdir(), "loralab-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM, headless: true, args: FLAGS, viewport, deviceScaleFactor: 1,
  });
  const close = async () => {
    await context.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
  };
  return { context, close };
}
