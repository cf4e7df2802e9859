"""Turn an API-format prompt into a UI-format (LiteGraph 0.4) workflow, using ComfyUI's /object_info for the order
of each node's widgets. The example workflows in example_workflows/ are generated from their API twins this way, and
a test keeps the two in sync.

Layout: two bands, each with one column per depth in the graph (as wide as its widest node): the training chain
on top (LoRA Lab's nodes, what feeds them, and what only they feed, like the loss plot), generation (prompts,
KSampler, decoding) below it, so the graph is about as tall as wide and fits a window. Nodes that show a report
(and Train LoRA, with its live panel and run report) get the room those need, at a width where the panel's status
and memory rows fit on their lines (tests/comfy/frontend_live.mjs checks it in the real page). The workflow
carries no saved view (``extra.ds``), so the frontend fits the whole graph into the window when it opens.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NODE_WIDTH, COLUMN_GAP, ROW_GAP, BAND_GAP = 320, 50, 40, 80
ROW_HEIGHT, HEADER = 24, 50  # per widget or slot row (the frontend's), title and padding
PACK_PREFIX = "LoraLab_"
# node type -> (width, height added for its DOM widgets): the report textarea; Train LoRA's panel and report
ROOM = {
    "LoraLab_LoadDataset": (400, 170),
    "LoraLab_CacheLatents": (400, 170),
    "LoraLab_ConfigureLoRA": (400, 240),
    "LoraLab_TrainLoRA": (440, 480),
}


def _is_widget(spec) -> bool:
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name], section == "optional"))
    return out


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            depth[node_id] = 1 + max((visit(p) for p in _parents(api[node_id])), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def _parents(node: dict) -> list[str]:
    return [v[0] for v in node["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]


def _training_band(api: dict) -> set[str]:
    """LoRA Lab's nodes, everything that feeds them, and end nodes fed only by them (the loss plot)."""
    ours = {n for n, node in api.items() if node["class_type"].startswith(PACK_PREFIX)}
    band, todo = set(ours), list(ours)
    while todo:
        for parent in _parents(api[todo.pop()]):
            if parent not in band:
                band.add(parent)
                todo.append(parent)
    consumed = {p for node in api.values() for p in _parents(node)}
    return band | {n for n, node in api.items() if n not in consumed and _parents(node) and set(_parents(node)) <= ours}


def _place(api: dict, depth: dict[str, int], sizes: dict[str, list[int]]) -> dict[str, list[int]]:
    training = _training_band(api)
    pos: dict[str, list[int]] = {}
    top = 0
    for band in (training, set(api) - training):
        columns = {d: i for i, d in enumerate(sorted({depth[n] for n in band}))}
        widths: dict[int, int] = {}
        for n in band:
            widths[columns[depth[n]]] = max(widths.get(columns[depth[n]], 0), sizes[n][0])
        x = {c: sum(widths[k] + COLUMN_GAP for k in range(c)) for c in widths}
        y: dict[int, int] = {}
        for n in sorted(band, key=lambda n: (depth[n], int(n))):
            c = columns[depth[n]]
            pos[n] = [x[c], top + y.get(c, 0)]
            y[c] = y.get(c, 0) + sizes[n][1] + ROW_GAP
        top += max(y.values(), default=0) + BAND_GAP
    return pos


def api_to_ui(api: dict, object_info: dict) -> dict:
    depth = _depths(api)
    nodes, links = [], []
    outputs: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(api, key=int):
        for name, value in api[node_id]["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                link_id = len(links) + 1
                source, slot = value
                kind = object_info[api[source]["class_type"]]["output"][slot]
                links.append([link_id, int(source), slot, int(node_id), name, kind])
                outputs.setdefault((source, slot), []).append(link_id)
    sizes: dict[str, list[int]] = {}
    for order, node_id in enumerate(sorted(api, key=lambda n: (depth[n], int(n)))):
        node = api[node_id]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec, optional in _ordered_inputs(info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if _is_widget(spec) and not linked:
                widgets.append(value if name in node["inputs"] else spec[1].get("default") if len(spec) > 1 else None)
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
            elif not _is_widget(spec) or linked:
                kind = spec[0] if isinstance(spec[0], str) else "COMBO"
                entry = {"name": name, "type": kind, "link": None}
                if linked:
                    entry["link"] = next(l[0] for l in links if l[3] == int(node_id) and l[4] == name)
                if optional and not linked and not _is_widget(spec):
                    entry["shape"] = 7
                inputs.append(entry)
        for link in links:  # UI links name the target slot by index
            if link[3] == int(node_id) and isinstance(link[4], str):
                link[4] = next(i for i, entry in enumerate(inputs) if entry["name"] == link[4])
        outs = [{"name": name, "type": kind, "links": outputs.get((node_id, slot), []), "slot_index": slot}
                for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        width, room = ROOM.get(node["class_type"], (NODE_WIDTH, 0))
        sizes[node_id] = [width, HEADER + ROW_HEIGHT * (len(widgets) + max(len(inputs), len(outs))) + room]
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": None,
            "size": sizes[node_id], "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outs,
            "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    positions = _place(api, depth, sizes)
    for entry in nodes:
        entry["pos"] = positions[str(entry["id"])]
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}
