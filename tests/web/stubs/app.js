// Stand-in for ComfyUI's /scripts/app.js in the harness page: records registered extensions.
export const app = {
  extensions: [],
  registerExtension(ext) {
    if (!ext || typeof ext.name !== "string") throw new Error("extension needs a name");
    if (this.extensions.some((e) => e.name === ext.name)) throw new Error(`extension ${ext.name} registered twice`);
    this.extensions.push(ext);
  },
  graph: null,
  canvas: { ds: { scale: 1 } },
};
