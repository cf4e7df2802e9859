"""Turn an API-format prompt into a UI-format (LiteGraph 0.4) workflow, using ComfyUI's /object_info for the order
of each node's widgets. The example workflows in example_workflows/ are generated from their API twins this way, and
a test keeps the two in sync."""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_GAP = 380, 40


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
            parents = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2
                       and isinstance(v[0], str)]
            depth[node_id] = 1 + max((visit(p) for p in parents), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api: dict, object_info: dict) -> dict:
    depth = _depths(api)
    rows: dict[int, int] = {}
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
        column = depth[node_id]
        height = 60 + 26 * (len(widgets) + max(len(inputs), len(outs)))
        y = rows.get(column, 0)
        rows[column] = y + height + ROW_GAP
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [column * COLUMN_WIDTH, y],
            "size": [340, height], "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outs,
            "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
