"""Convert ComfyUI UI-format workflows (what the frontend saves) to the API prompt format.

Standard library only, importable from anywhere (tests, CI, other scripts)::

    from bench.workflow_api import ui_to_api, validate

    problems = validate(workflow, object_info)           # list of human-readable strings
    prompt = ui_to_api(workflow, object_info,             # dict ready for POST /prompt
                       overrides={"KSampler": {"steps": 4}, "9": {"filename_prefix": "x"}})

From a shell: ``python bench/workflow_api.py WORKFLOW.json --server http://127.0.0.1:8188
[--set KSampler.steps=4 ...]`` prints the problems, or the API prompt when there are none.

``object_info`` is the JSON that a running ComfyUI returns from ``GET /object_info``. The
conversion follows what the ComfyUI frontend does in ``graphToPrompt``:

* ``widgets_values`` are matched positionally against the node's widget inputs, in the order
  of ``input_order`` (required, then optional). A widget input keeps its slot in
  ``widgets_values`` even when a link drives it (a widget converted to a socket); the link
  then wins. An INT input with ``control_after_generate`` (or, when the option is absent, an
  INT named ``seed``/``noise_seed``) is followed by one extra slot holding the control mode
  ("fixed", "randomize", ...), which is not sent. A COMBO with ``control_after_generate`` is
  followed by two (control mode and filter). A COMBO with ``image_upload``/``video_upload``/
  ``audio_upload`` may be followed by the upload widget's value.
* ``Note``, ``MarkdownNote`` are dropped, ``Reroute`` nodes are followed upstream,
  ``PrimitiveNode`` values are inlined into the inputs they feed.
* mode 4 (bypass): the node is dropped and each consumer is rewired to the bypassed node's
  input of the same type (the input at the same slot index first, then the first input of
  that type), recursively. mode 2 (muted): the node is dropped, and so is every input that
  referenced it.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["ui_to_api", "validate", "WorkflowError", "widget_slots", "VIRTUAL_NODE_TYPES"]

MODE_ALWAYS = 0
MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4

NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_NODE_TYPES = frozenset(NOTE_TYPES | {"Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node type, broken link, bad override)."""


# --------------------------------------------------------------------------- node definitions


def _input_defs(node_def: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) for every visible input, in declaration order."""
    inputs = node_def.get("input", {}) or {}
    order = node_def.get("input_order") or {}
    result = []
    for section in ("required", "optional"):
        specs = inputs.get(section, {}) or {}
        names = list(order.get(section) or specs.keys())
        names += [n for n in specs if n not in names]
        for name in names:
            if name not in specs:
                continue
            spec = specs[name]
            if not isinstance(spec, (list, tuple)) or not spec:
                spec = [spec]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, (list, tuple)):
                kind = "COMBO"
            result.append((name, str(kind), opts, section == "required"))
    return result


def _is_widget(kind: str, opts: dict) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput")


def _control_extra(name: str, kind: str, opts: dict) -> int:
    if kind == "INT":
        control = opts.get("control_after_generate")
        if control is None:
            control = name in SEED_NAMES
        return 1 if control else 0
    if kind == "COMBO" and opts.get("control_after_generate"):
        return 2  # control mode + filter list
    return 0


def widget_slots(node_def: dict, with_upload: bool = True) -> list[tuple[str, int]]:
    """[(input_name, number_of_widgets_values_slots)] for the widget inputs of a node."""
    slots = []
    for name, kind, opts, _ in _input_defs(node_def):
        if not _is_widget(kind, opts):
            continue
        n = 1 + _control_extra(name, kind, opts)
        if with_upload and kind == "COMBO" and any(opts.get(f) for f in UPLOAD_FLAGS):
            n += 1
        slots.append((name, n))
    return slots


def _widget_values(node: dict, node_def: dict) -> tuple[dict[str, Any], list[str]]:
    """Map a node's widgets_values to input names. Returns (values, problems)."""
    raw = node.get("widgets_values")
    if raw is None:
        raw = []
    slots = widget_slots(node_def)
    if isinstance(raw, dict):  # some packs save widgets by name
        names = {name for name, _ in slots}
        missing = [n for n in names if n not in raw]
        probs = [f"widgets_values has no value for {missing}"] if missing else []
        return {k: v for k, v in raw.items() if k in names}, probs
    expected = sum(n for _, n in slots)
    if len(raw) != expected:
        alt = widget_slots(node_def, with_upload=False)
        if sum(n for _, n in alt) == len(raw):
            slots, expected = alt, len(raw)
    values: dict[str, Any] = {}
    pos = 0
    for name, n in slots:
        if pos < len(raw):
            values[name] = raw[pos]
        pos += n
    problems = []
    if len(raw) != expected:
        problems.append(
            f"widgets_values has {len(raw)} entries, the node definition needs {expected} "
            f"({', '.join(f'{name}' + ('+control' * (n - 1)) for name, n in slots) or 'none'})"
        )
    return values, problems


# --------------------------------------------------------------------------- graph helpers


class _Graph:
    def __init__(self, workflow: dict):
        if not isinstance(workflow, dict) or "nodes" not in workflow:
            raise WorkflowError("not a UI-format workflow (no 'nodes'); API-format prompts need no conversion")
        self.nodes: dict[int, dict] = {}
        for node in workflow.get("nodes", []):
            self.nodes[_int_id(node["id"])] = node
        self.links: dict[int, tuple] = {}
        for link in workflow.get("links", []) or []:
            if isinstance(link, dict):  # newer serialisation (schema 1)
                lk = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                      link["target_slot"], link.get("type"))
            else:
                lk = tuple(link[:6])
            self.links[_int_id(lk[0])] = (_int_id(lk[0]), _int_id(lk[1]), int(lk[2]),
                                          _int_id(lk[3]), int(lk[4]), lk[5])
        if workflow.get("definitions", {}).get("subgraphs"):
            raise WorkflowError("workflows with subgraphs are not supported by this converter")

    def input_link(self, node: dict, slot: int):
        inputs = node.get("inputs") or []
        if slot < 0 or slot >= len(inputs):
            return None
        link_id = inputs[slot].get("link")
        if link_id is None:
            return None
        return self.links.get(_int_id(link_id))


def _int_id(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _sort_key(node_id):
    return (0, node_id, "") if isinstance(node_id, int) else (1, 0, str(node_id))


def _input_name(entry: dict) -> str:
    widget = entry.get("widget")
    if isinstance(widget, dict) and widget.get("name"):
        return widget["name"]
    return entry.get("name")


def _primitive_value(node: dict):
    values = node.get("widgets_values")
    if isinstance(values, list) and values:
        return values[0]
    if isinstance(values, dict) and values:
        return next(iter(values.values()))
    return None


def _resolve(graph: _Graph, link, want_type: str | None):
    """Follow a link upstream through reroutes and bypassed nodes.

    Returns ("link", [node_id_str, slot]), ("value", v) for a PrimitiveNode, or None when the
    chain ends in nothing (an unconnected reroute, a bypassed node with no matching input).
    """
    seen = set()
    while link is not None:
        if link[0] in seen:
            raise WorkflowError(f"link cycle through link {link[0]}")
        seen.add(link[0])
        src = graph.nodes.get(link[1])
        if src is None:
            raise WorkflowError(f"link {link[0]} comes from missing node {link[1]}")
        src_type = src.get("type")
        if src_type == "Reroute":
            link = graph.input_link(src, 0)
            continue
        if src_type == "PrimitiveNode":
            if src.get("mode", 0) in (MODE_NEVER,):
                return None
            return ("value", _primitive_value(src))
        if src.get("mode", 0) == MODE_BYPASS:
            inputs = src.get("inputs") or []
            want = want_type if want_type not in (None, "*") else link[5]
            candidates = [link[2]] + list(range(len(inputs)))
            for idx in candidates:
                if 0 <= idx < len(inputs) and _same_type(inputs[idx].get("type"), want):
                    link = graph.input_link(src, idx)
                    break
            else:
                return None
            continue
        return ("link", [str(link[1]), link[2]])
    return None


def _same_type(a, b) -> bool:
    return a is not None and b is not None and str(a) == str(b)


def _types_compatible(out_type, in_type) -> bool:
    if out_type is None or in_type is None:
        return True
    out_type, in_type = str(out_type), str(in_type)
    if "*" in (out_type, in_type) or out_type == in_type:
        return True
    outs = {t.strip() for t in out_type.split(",")}
    ins = {t.strip() for t in in_type.split(",")}
    return bool(outs & ins)


# --------------------------------------------------------------------------- conversion


def ui_to_api(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """Return the API prompt ({node_id: {"class_type", "inputs", "_meta"}}) for a UI workflow.

    ``overrides`` maps a node type (e.g. "KSampler") or a node id as a string (e.g. "3") to
    {input_name: value}; type overrides apply to every node of that type, id overrides are
    applied after them. An override key that matches no node, or names an input the node type
    does not have, raises WorkflowError (so schema drift fails loudly in tests).
    """
    graph = _Graph(workflow)
    prompt: dict[str, dict] = {}
    for node_id, node in sorted(graph.nodes.items(), key=lambda kv: _sort_key(kv[0])):
        ntype = node.get("type")
        if ntype in VIRTUAL_NODE_TYPES:
            continue
        if node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        node_def = object_info.get(ntype)
        if node_def is None:
            raise WorkflowError(f"node {node_id}: unknown node type {ntype!r}")
        inputs, _ = _widget_values(node, node_def)
        widget_names = {name for name, _ in widget_slots(node_def)}
        defs = {name: kind for name, kind, _, _ in _input_defs(node_def)}
        for slot, entry in enumerate(node.get("inputs") or []):
            name = _input_name(entry)
            if name not in defs:
                continue
            link = graph.input_link(node, slot)
            if link is None:
                continue
            resolved = _resolve(graph, link, entry.get("type") or defs[name])
            if resolved is None:
                if name not in widget_names:
                    inputs.pop(name, None)
                continue
            kind, value = resolved
            inputs[name] = value
        title = node.get("title") or node_def.get("display_name") or ntype
        prompt[str(node_id)] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}

    # Inputs that point at dropped (muted, unknown) nodes are removed, as the frontend does.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if _is_link_value(value) and value[0] not in prompt:
                del entry["inputs"][name]

    if overrides:
        _apply_overrides(prompt, object_info, overrides)
    return prompt


def _is_link_value(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _apply_overrides(prompt: dict, object_info: dict, overrides: dict) -> None:
    by_type = {k: v for k, v in overrides.items() if str(k) not in prompt}
    by_id = {str(k): v for k, v in overrides.items() if str(k) in prompt}
    for key in by_type:
        if not any(e["class_type"] == key for e in prompt.values()):
            raise WorkflowError(f"override {key!r} matches no node type or node id in the prompt")
    for key, values in list(by_type.items()) + list(by_id.items()):
        targets = [nid for nid, e in prompt.items() if e["class_type"] == key or nid == str(key)]
        for nid in targets:
            entry = prompt[nid]
            known = {name for name, _, _, _ in _input_defs(object_info[entry["class_type"]])}
            for name, value in values.items():
                if name not in known:
                    raise WorkflowError(
                        f"override for {key!r}: {entry['class_type']} has no input {name!r} "
                        f"(inputs: {sorted(known)})")
                entry["inputs"][name] = copy.deepcopy(value)


# --------------------------------------------------------------------------- validation


def validate(workflow: dict, object_info: dict) -> list[str]:
    """Human-readable problems with a UI workflow against a server's object_info ([] if none)."""
    problems: list[str] = []
    try:
        graph = _Graph(workflow)
    except (WorkflowError, KeyError, TypeError, ValueError) as exc:
        return [f"workflow: {exc}"]

    def label(nid):
        node = graph.nodes.get(nid)
        return f"node {nid} ({node.get('type')})" if node else f"node {nid}"

    # node types and widget counts
    for nid, node in graph.nodes.items():
        ntype = node.get("type")
        if ntype in VIRTUAL_NODE_TYPES:
            continue
        node_def = object_info.get(ntype)
        if node_def is None:
            problems.append(f"{label(nid)}: unknown node type {ntype!r} (not in object_info; "
                            "is the custom node pack installed and did it import?)")
            continue
        _, wprobs = _widget_values(node, node_def)
        problems += [f"{label(nid)}: {p}" for p in wprobs]
        defs = {name for name, _, _, _ in _input_defs(node_def)}
        for entry in node.get("inputs") or []:
            name = _input_name(entry)
            if name not in defs:
                problems.append(f"{label(nid)}: has an input socket {name!r} that the node "
                                f"definition does not declare")

    # links: endpoints, slot ranges, bookkeeping, types
    for lid, (_, src_id, src_slot, dst_id, dst_slot, ltype) in graph.links.items():
        src, dst = graph.nodes.get(src_id), graph.nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {lid}: references missing node {src_id if src is None else dst_id}")
            continue
        outputs = src.get("outputs") or []
        dst_inputs = dst.get("inputs") or []
        if src_slot >= len(outputs):
            problems.append(f"link {lid}: {label(src_id)} has no output slot {src_slot}")
            continue
        if dst_slot >= len(dst_inputs):
            problems.append(f"link {lid}: {label(dst_id)} has no input slot {dst_slot}")
            continue
        if _int_id(dst_inputs[dst_slot].get("link")) != lid:
            problems.append(f"link {lid}: {label(dst_id)} input {dst_slot} does not point back at it")
        if lid not in [_int_id(x) for x in (outputs[src_slot].get("links") or [])]:
            problems.append(f"link {lid}: {label(src_id)} output {src_slot} does not list it")
        out_type = _declared_output_type(src, src_slot, object_info)
        in_type = _declared_input_type(dst, dst_slot, object_info)
        if ltype not in (None, "*") and out_type is not None and not _types_compatible(out_type, ltype):
            problems.append(f"link {lid}: typed {ltype!r} but {label(src_id)} output {src_slot} "
                            f"is {out_type!r}")
        if not _types_compatible(out_type, in_type):
            problems.append(f"link {lid}: {label(src_id)} output {src_slot} is {out_type!r} but "
                            f"{label(dst_id)} input {_input_name(dst_inputs[dst_slot])!r} wants "
                            f"{in_type!r}")

    # required inputs, judged on the graph as it will run (after bypass/mute/reroute handling)
    if not any(p for p in problems if "unknown node type" in p):
        try:
            prompt = ui_to_api(workflow, object_info)
        except WorkflowError as exc:
            problems.append(f"conversion: {exc}")
        else:
            for nid, entry in prompt.items():
                for name, kind, opts, required in _input_defs(object_info[entry["class_type"]]):
                    if required and name not in entry["inputs"]:
                        what = ("has neither a link nor a widget value" if _is_widget(kind, opts)
                                else "is not linked (or its source is muted/bypassed away)")
                        problems.append(f"{label(_int_id(nid))}: required input {name!r} ({kind}) {what}")
    return problems


def _declared_output_type(node: dict, slot: int, object_info: dict):
    ntype = node.get("type")
    if ntype in ("Reroute", "PrimitiveNode"):
        outputs = node.get("outputs") or []
        return outputs[slot].get("type") if slot < len(outputs) else None
    node_def = object_info.get(ntype)
    if node_def is None:
        return None
    outs = node_def.get("output") or []
    if slot >= len(outs):
        return None
    out = outs[slot]
    return "COMBO" if isinstance(out, list) else out


def _declared_input_type(node: dict, slot: int, object_info: dict):
    ntype = node.get("type")
    entry = (node.get("inputs") or [])[slot]
    if ntype in VIRTUAL_NODE_TYPES:
        return entry.get("type")
    node_def = object_info.get(ntype)
    if node_def is None:
        return None
    name = _input_name(entry)
    for iname, kind, _, _ in _input_defs(node_def):
        if iname == name:
            return kind
    return None


# --------------------------------------------------------------------------- command line


def _main(argv=None) -> int:
    import argparse
    import json
    import sys
    import urllib.request

    parser = argparse.ArgumentParser(
        description="Validate a UI-format ComfyUI workflow and print its API prompt.")
    parser.add_argument("workflow", help="UI-format workflow JSON file")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="ComfyUI URL to read /object_info from, e.g. http://127.0.0.1:8188")
    src.add_argument("--object-info", help="a saved /object_info JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.INPUT=JSON",
                        help="override, e.g. --set KSampler.steps=4 --set 9.filename_prefix='\"x\"'")
    args = parser.parse_args(argv)

    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    if args.server:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(args.server.rstrip("/") + "/object_info", timeout=60) as resp:
            object_info = json.load(resp)
    else:
        with open(args.object_info, encoding="utf-8") as f:
            object_info = json.load(f)
    overrides: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        node, _, name = key.rpartition(".")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        overrides.setdefault(node, {})[name] = parsed

    problems = validate(workflow, object_info)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        return 1
    json.dump(ui_to_api(workflow, object_info, overrides or None), sys.stdout, indent=2,
              ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
