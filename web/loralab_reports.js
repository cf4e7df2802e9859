// LoRA Lab: the text report of the data nodes (Load Dataset, Dataset from Images, Combine Datasets, Bucket & Cache
// Latents), Configure LoRA and Train LoRA, on the node.
//
// The nodes send their report as ui text ({text: [report]}, ComfyUI's ui.PreviewText), which ComfyUI hands to
// node.onExecuted, also for a cached node. Like the core Preview Any node, the text goes into a read-only textarea
// DOM widget (scrollable; monospace without wrapping when it holds a table, so columns stay aligned). The widget is
// not a value (serialize: false: not in widgets_values nor in the prompt); the text is kept in
// node.properties.loralab_report, so it comes back when the workflow is reopened or the page reloads.
import { app } from "../../scripts/app.js";
import { NODE_TYPE as TRAIN_NODE, REPORT_NODES, looksTabular, reportText } from "./loralab_core.js";

const EXTENSION = "loralab.reports";
const WIDGET_NAME = "loralab_report";
const PROP_REPORT = "loralab_report";
const MIN_HEIGHT = 72;
const STYLE_ID = "loralab-report-style";
const CSS = `
.loralab-report{box-sizing:border-box;width:100%;height:100%;resize:none;margin:0;padding:4px 6px;
  border-radius:6px;border:1px solid var(--border-color,#4e4e4e);background:var(--comfy-input-bg,#222);
  color:var(--input-text,#ddd);font:11px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
  overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}
.loralab-report[data-table=true]{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;
  white-space:pre;overflow-wrap:normal}
.loralab-report:placeholder-shown{font-style:italic}
`;

const warned = new Set();
function warnOnce(what, err) {
  if (warned.has(what)) return;
  warned.add(what);
  console.warn(`[LoRA Lab] ${what}`, err);
}

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}

// The frontend saves the open workflow (for a reload) when its change tracker notices a change, which it checks on
// user input; a report that arrived over the websocket would be missing after a reload without this.
function persistWorkflow() {
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  } catch (err) {
    warnOnce("saving the report with the workflow failed", err);
  }
}

function show(widget, text) {
  const area = widget.element;
  area.value = text || "";
  area.dataset.table = String(looksTabular(text));
  area.wrap = looksTabular(text) ? "off" : "soft";
}

function attachReport(node) {
  if (node.__loralabReport) return node.__loralabReport;
  ensureStyle();
  const area = document.createElement("textarea");
  area.className = "loralab-report";
  area.readOnly = true;
  area.spellcheck = false;
  area.placeholder = `${REPORT_NODES[node.comfyClass || node.type]} appears here after a run`;
  area.dataset.loralab = "report";
  // The canvas zooms on the wheel; inside a report that can scroll, the wheel scrolls it instead.
  area.addEventListener("wheel", (e) => {
    const canScroll = area.scrollHeight > area.clientHeight || area.scrollWidth > area.clientWidth;
    if (canScroll && !e.ctrlKey) {
      e.stopPropagation();
      return;
    }
    e.preventDefault();
    app.canvas?.processMouseWheel?.(e);
  }, { passive: false });
  const widget = node.addDOMWidget(WIDGET_NAME, "loralab_report", area, {
    serialize: false,
    hideOnZoom: true,
    margin: 6,
    getValue: () => area.value,
    setValue: () => {}, // read-only: what the node reports, never what a workflow file says
    getMinHeight: () => MIN_HEIGHT,
  });
  widget.serialize = false;
  node.__loralabReport = widget;
  node.properties = node.properties || {};
  show(widget, node.properties[PROP_REPORT]);

  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    const r = onExecuted?.apply(this, arguments);
    try {
      const text = reportText(output);
      if (text !== null) {
        this.properties = this.properties || {};
        const changed = this.properties[PROP_REPORT] !== text;
        this.properties[PROP_REPORT] = text;
        show(widget, text);
        if (changed) persistWorkflow();
      }
    } catch (err) {
      warnOnce("showing the report failed", err);
    }
    return r;
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const r = onConfigure?.apply(this, arguments);
    try {
      show(widget, this.properties?.[PROP_REPORT]);
    } catch (err) {
      warnOnce("restoring the report failed", err);
    }
    return r;
  };
  return widget;
}

app.registerExtension({
  name: EXTENSION,
  async nodeCreated(node) {
    const type = node.comfyClass || node.type;
    // Train LoRA's report sits below its live panel: web/loralab.js attaches it right after the panel.
    if (!(type in REPORT_NODES) || type === TRAIN_NODE) return;
    try {
      attachReport(node);
    } catch (err) {
      warnOnce("creating the report widget failed", err);
    }
  },
});

export { attachReport };
export const __loralabReports = { attachReport, PROP_REPORT, WIDGET_NAME };
