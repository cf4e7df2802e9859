// Stand-in for ComfyUI's /scripts/api.js in the harness page. Mirrors what the real ComfyApi does with websocket
// messages of custom types: they are dispatched only when someone called addEventListener for the type first;
// otherwise "Unknown message type" is logged once (src/scripts/api.ts).
class FakeApi extends EventTarget {
  constructor() {
    super();
    this.registered = new Set();
    this.reported = new Set();
    this.api_base = "";
  }
  addEventListener(type, cb, opts) {
    super.addEventListener(type, cb, opts);
    this.registered.add(type);
  }
  /** What the socket's message handler does for a JSON frame {type, data}. */
  receive(type, data) {
    if (this.registered.has(type)) this.dispatchEvent(new CustomEvent(type, { detail: data }));
    else if (!this.reported.has(type)) {
      this.reported.add(type);
      console.error(`Unknown message type ${type}`);
    }
  }
  apiURL(route) {
    return route.startsWith("/api") ? this.api_base + route : this.api_base + "/api" + route;
  }
  fetchApi(route, options) {
    const faked = this.intercept?.(route);
    if (faked) return Promise.resolve(faked);
    return fetch(this.apiURL(route), options);
  }
}
export const api = new FakeApi();
