// Harness page logic: loads the real extension (served unchanged from web/) against the stub app/api modules,
// builds fake LiteGraph-like nodes, replays the recorded event stream and exposes the result on window.__harness.
import { app } from "/scripts/app.js";
import { api } from "/scripts/api.js";

const params = new URLSearchParams(location.search);
const theme = params.get("theme") || "dark";
const eventGapMs = Number(params.get("gap") || 8);
document.documentElement.className = theme;

const H = (window.__harness = { done: false, errors: [], draws: new Map(), phase: "loading" });
window.addEventListener("error", (e) => H.errors.push(String(e.message || e)));
window.addEventListener("unhandledrejection", (e) => H.errors.push(String(e.reason)));
const origError = console.error;
console.error = (...a) => {
  H.errors.push(a.map(String).join(" "));
  origError.apply(console, a);
};

// Count renders per canvas (the panel calls getContext once per redraw).
const origGetContext = HTMLCanvasElement.prototype.getContext;
HTMLCanvasElement.prototype.getContext = function (...args) {
  const id = this.closest("[data-node-id]")?.dataset.nodeId ?? "?";
  H.draws.set(id, (H.draws.get(id) || 0) + 1);
  return origGetContext.apply(this, args);
};

const TITLE_H = 26;
const WIDGET_ROW = 26;

class FakeNode {
  constructor(type, title, widgets = []) {
    this.id = -1; // like LiteGraph before configure()
    this.type = type;
    this.comfyClass = type;
    this.title = title;
    this.properties = {};
    this.size = [300, 120];
    this.widgets = [];
    this.rows = widgets;
    this.el = document.createElement("div");
    this.el.className = "fake-node";
    const t = document.createElement("div");
    t.className = "fake-title";
    t.textContent = title;
    this.idTag = document.createElement("small");
    t.append(this.idTag);
    this.el.append(t);
    for (const [k, v] of widgets) {
      const w = document.createElement("div");
      w.className = "fake-widget";
      const a = document.createElement("span");
      a.textContent = k;
      const b = document.createElement("span");
      b.textContent = v;
      w.append(a, b);
      this.el.append(w);
    }
    document.getElementById("graph").append(this.el);
    this.layout();
  }
  addDOMWidget(name, type, element, options = {}) {
    const holder = document.createElement("div");
    holder.className = "fake-dom";
    holder.append(element);
    this.el.append(holder);
    const widget = { name, type, element, options, holder, y: 0 };
    this.widgets.push(widget);
    this.layout();
    return widget;
  }
  computeSize() {
    let h = TITLE_H + this.rows.length * WIDGET_ROW + 8;
    for (const w of this.widgets) h += (w.options.getMinHeight?.() ?? 50) + 2 * (w.options.margin ?? 10);
    return [240, h];
  }
  setSize(size) {
    this.size = [size[0], size[1]];
    this.layout();
    this.onResize?.(this.size);
  }
  configure(info) {
    this.id = info.id;
    Object.assign(this.properties, info.properties || {});
    if (info.size) this.size = info.size;
    this.layout();
    this.onConfigure?.(info);
  }
  layout() {
    this.el.dataset.nodeId = String(this.id);
    this.idTag.textContent = `#${this.id}`;
    this.el.style.width = `${this.size[0]}px`;
    this.el.style.height = `${this.size[1]}px`;
    // Like LiteGraph: DOM widgets stack below the others, each gets its minimum height plus an equal share of the
    // free space.
    let top = TITLE_H + this.rows.length * WIDGET_ROW + 4;
    const mins = this.widgets.map((w) => (w.options.getMinHeight?.() ?? 50) + 2 * (w.options.margin ?? 10));
    const free = Math.max(0, this.size[1] - top - mins.reduce((a, b) => a + b, 0));
    this.widgets.forEach((w, i) => {
      const m = w.options.margin ?? 10;
      const h = mins[i] + free / this.widgets.length;
      w.holder.style.top = `${top + m}px`;
      w.holder.style.left = `${m}px`;
      w.holder.style.right = `${m}px`;
      w.holder.style.height = `${Math.max(0, h - 2 * m)}px`;
      w.holder.style.position = "absolute";
      top += h;
    });
  }
}

const TRAIN_WIDGETS = [["steps", "300"], ["learning_rate", "0.0001"], ["preview_every", "150"]];

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

async function main() {
  // ComfyUI loads every .js file of WEB_DIRECTORY; the core module must be harmless on its own.
  await import("/extensions/loralab/loralab_core.js");
  await import("/extensions/loralab/loralab.js");
  const ext = app.extensions.find((e) => e.name === "loralab.livePanel");
  if (!ext) throw new Error("extension not registered");
  // init registers the listener (before ComfyUI opens its websocket): the stub api, like ComfyUI's, drops
  // unregistered types
  await ext.init?.(app);
  await ext.setup?.(app);

  H.registered = [...api.registered];

  const mk = async (type, title, id, widgets, properties) => {
    const node = new FakeNode(type, title, widgets);
    await ext.nodeCreated?.(node, app);
    node.configure({ id, properties });
    ext.loadedGraphNode?.(node, app);
    return node;
  };
  const n5 = await mk("LoraLab_TrainLoRA", "Train LoRA", 5, TRAIN_WIDGETS);
  const n7 = await mk("LoraLab_TrainLoRA", "Train LoRA", 7, TRAIN_WIDGETS);
  const n3 = await mk("KSampler", "KSampler", 3, [["seed", "42"], ["steps", "20"]]);
  // Reload case: a node whose workflow remembers an earlier run -> the panel fetches the run's history.
  const n9 = await mk("LoraLab_TrainLoRA", "Train LoRA (reloaded)", 9, TRAIN_WIDGETS,
    { loralab_run: "lora_prev_20251231-090000" });
  H.nodes = { 5: n5, 7: n7, 3: n3, 9: n9 };

  const fixture = await (await fetch("/fixtures/events.json")).json();
  // The live run's history route answers with what the run folder holds at the current point of the stream:
  // every step sent so far (the real log has every optimizer step), preview marks with their files, saves.
  let sentSoFar = 0;
  api.intercept = (route) => {
    if (route !== `/loralab/runs/${encodeURIComponent(fixture.run)}/history`) return null;
    const evs = fixture.events.slice(0, sentSoFar);
    const steps = [];
    const loss = [];
    const marks = [];
    for (const e of evs) {
      if (e.phase === "training" && e.loss !== null && (!steps.length || e.step > steps[steps.length - 1])) {
        steps.push(e.step);
        loss.push(e.loss);
      }
      if (e.phase === "preview" && e.preview) marks.push({ step: e.step, mark: "preview", file: e.preview.split("/").pop() });
      if (e.phase === "saving" && !marks.some((m) => m.mark === "save" && m.step === e.step)) marks.push({ step: e.step, mark: "save" });
    }
    H.historyServed = (H.historyServed || 0) + 1;
    const body = { run: fixture.run, history: { steps, loss, lr: steps.map(() => null), time: [], marks }, latest: evs.at(-1) || null };
    return new Response(JSON.stringify(body), { status: 200, headers: { "content-type": "application/json" } });
  };
  H.phase = "streaming";
  H.streamStart = performance.now();
  api.receive("loralab.progress", { ...fixture.events[0], node: "42" }); // a node that is not in the graph
  api.receive("loralab.progress", { v: 99, node: "5" }); // a future schema version: ignored
  for (const ev of fixture.events) {
    sentSoFar += 1;
    H.sent = sentSoFar;
    api.receive("loralab.progress", ev);
    await sleep(eventGapMs);
  }
  H.streamEnd = performance.now();
  H.drawsAtStreamEnd = Object.fromEntries(H.draws);
  await sleep(700); // the last throttled redraw + the history fetch after "done"
  // ComfyUI hands the node's ui output to onExecuted when the prompt finishes: the run report goes on the node
  H.report = "run: /runs/lora_demo\ntrained: 300 steps\nMemory estimate (cuda:0): 11.0 GiB of 24.0 GiB available -> FITS\n" +
    "  model weights          3.20 GiB\n  activations             612 MiB";
  n5.onExecuted?.({ text: [H.report], loralab_run: [fixture.run] });
  H.lastEvent = fixture.events[fixture.events.length - 1];
  H.lossEvents = fixture.events.filter((e) => e.loss !== null);
  H.phase = "done";
  H.historyServedCount = H.historyServed || 0;
  H.done = true;
}

main().catch((err) => {
  H.errors.push("harness: " + (err && err.stack ? err.stack : String(err)));
  H.done = true;
});
