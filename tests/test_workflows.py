"""Example workflows (workflows/*.json) and the UI -> API converter (bench/workflow_api.py).

* Converter unit tests: plain pytest, no ComfyUI needed (a small synthetic object_info).
* Offline checks of the shipped files: well-formed UI JSON, a template-browser thumbnail each; every
  workflow (the proxy ones too) carries the frontend's hints: ``properties.models`` (name, url,
  directory) on each node that names a model file, and the node pack's id (``cnr_id`` / ``aux_id``
  with ``ver``) on each node. tests/test_browser.py checks what the real frontend does with them.
* ``server`` tests: against a real headless ComfyUI with this pack and the tiny models
  (tests/support/comfy_server.py): every workflow validates against the live object_info, is
  listed by the template endpoint with its thumbnail served, and runs through POST /prompt to
  success with the pack's nodes active: a Dynamic Patch Schedule on a forced coarse schedule, an
  Elastic Token Router skipping image tokens (each checked by its own part of the run's log line).
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Not the repo root on sys.path: the pack's own `nodes/` would shadow ComfyUI's `nodes` module.
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "support"))
import workflow_api  # noqa: E402
from workflow_api import WorkflowError, ui_to_api, validate  # noqa: E402

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
PACK_NODE = "ElasticTokensDynamicPatchSchedule"
ROUTER_NODE = "ElasticTokensTokenRouter"
MERGE_NODE = "ElasticTokensTokenMerge"
PACK_NODES = (PACK_NODE, ROUTER_NODE, MERGE_NODE)  # the MODEL -> MODEL nodes an example workflow shows off
# what each example workflow holds: pack node type -> its mode as shipped (0 active, 4 bypassed)
EXPECTED_PACK_NODES = {
    "flux1_dev_dynamic_patch_t2i": {PACK_NODE: 0},
    "wan21_t2v_1.3b_dynamic_patch": {PACK_NODE: 0},
    # FLUX: the router routes the native steps the patch schedule leaves (both active)
    "flux1_dev_token_router_t2i": {PACK_NODE: 0, ROUTER_NODE: 0},
    # Wan: the schedule in the chain but bypassed (training-free coarse steps lose to fewer steps on
    # the video proxy, BENCHMARKS.md section 4): Ctrl+B turns the stack on
    "wan21_t2v_1.3b_token_router": {PACK_NODE: 4, ROUTER_NODE: 0},
    # Token Merge (ratio 0.5, default window) with the schedule in the chain, bypassed, on both: merging
    # training-free loses to fewer steps on the proxies (BENCHMARKS.md section 10), stacking is opt-in
    "flux1_dev_token_merge_t2i": {PACK_NODE: 4, MERGE_NODE: 0},
    "wan21_t2v_1.3b_token_merge": {PACK_NODE: 4, MERGE_NODE: 0},
}


# =========================================================================== converter unit tests

OI = {
    "Loader": {"input": {"required": {"ckpt": [["a.safetensors", "b.safetensors"]]}},
               "output": ["MODEL"]},
    "Patch": {"input": {"required": {"model": ["MODEL"], "strength": ["FLOAT", {"default": 1.0}]}},
              "output": ["MODEL"]},
    # output MODEL, but its MODEL input is at slot 1: bypass must search by type, not index
    "TwoIn": {"input": {"required": {"latent": ["LATENT"], "model": ["MODEL"]}},
              "output": ["MODEL"]},
    "Enc": {"input": {"required": {"text": ["STRING", {"multiline": True}]}},
            "output": ["CONDITIONING"]},
    "Empty": {"input": {"required": {"width": ["INT", {"default": 64}], "height": ["INT", {"default": 64}]}},
              "output": ["LATENT"]},
    "IntNode": {"input": {"required": {"value": ["INT", {"control_after_generate": True}]}},
                "output": ["INT"]},
    "Sampler": {"input": {"required": {
        "model": ["MODEL"],
        "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "steps": ["INT", {"default": 20}],
        "sampler_name": [["euler", "uni_pc"]],
        "positive": ["CONDITIONING"],
        "latent_image": ["LATENT"],
        "denoise": ["FLOAT", {"default": 1.0}]},
        "optional": {"noise_seed": ["INT", {"default": 0}]}},  # control by name, no option
        "input_order": {"required": ["model", "seed", "steps", "sampler_name", "positive",
                                     "latent_image", "denoise"], "optional": ["noise_seed"]},
        "output": ["LATENT"]},
    # V3-style combo, an INT seed whose control is explicitly off, a forceInput widget type
    "V3Node": {"input": {"required": {
        "mode": ["COMBO", {"options": ["x", "y"], "multiselect": False}],
        "seed": ["INT", {"control_after_generate": False}],
        "scale": ["FLOAT", {"forceInput": True}],
        "flag": ["BOOLEAN", {"default": True}]},
        "optional": {"offset": ["FLOAT", {"forceInput": True}]}},
        "output": ["FLOAT"]},
    "Save": {"input": {"required": {"samples": ["LATENT"], "prefix": ["STRING", {"default": "x"}]}},
             "output": [], "output_node": True},
}


class G:
    """Tiny builder for UI-format workflows (links keep both sides' bookkeeping in sync)."""

    def __init__(self):
        self.nodes, self.links = {}, []

    def add(self, nid, ntype, inputs=(), outputs=(), widgets=None, mode=0):
        self.nodes[nid] = {
            "id": nid, "type": ntype, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0,
            "mode": mode,
            "inputs": [dict({"name": n, "type": t, "link": None}, **({"widget": {"name": n}} if w else {}))
                       for n, t, *w in [(i if len(i) == 3 else (*i, False)) for i in inputs]],
            "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
            "properties": {}, "widgets_values": [] if widgets is None else widgets}
        return self

    def link(self, src, sslot, dst, dname):
        lid = len(self.links) + 1
        node = self.nodes[dst]
        dslot = next(i for i, e in enumerate(node["inputs"]) if e["name"] == dname)
        ltype = self.nodes[src]["outputs"][sslot]["type"]
        self.nodes[src]["outputs"][sslot]["links"].append(lid)
        node["inputs"][dslot]["link"] = lid
        self.links.append([lid, src, sslot, dst, dslot, ltype])
        return self

    def wf(self):
        return {"last_node_id": max(self.nodes), "last_link_id": len(self.links),
                "nodes": list(self.nodes.values()), "links": self.links, "groups": [],
                "config": {}, "extra": {}, "version": 0.4}


SAMPLER_SOCKETS = [("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT")]
SAMPLER_WIDGETS = [7, "randomize", 20, "uni_pc", 0.5, 11, "fixed"]


def base_graph(sampler_inputs=SAMPLER_SOCKETS, sampler_widgets=SAMPLER_WIDGETS):
    g = G()
    g.add(1, "Loader", outputs=["MODEL"], widgets=["b.safetensors"])
    g.add(2, "Enc", outputs=["CONDITIONING"], widgets=["a photo"])
    g.add(3, "Empty", outputs=["LATENT"], widgets=[64, 48])
    g.add(4, "Sampler", inputs=sampler_inputs, outputs=["LATENT"], widgets=list(sampler_widgets))
    g.add(5, "Save", inputs=[("samples", "LATENT")], widgets=["out"])
    g.link(2, 0, 4, "positive").link(3, 0, 4, "latent_image").link(4, 0, 5, "samples")
    return g


def test_clean_graph_converts_and_validates():
    g = base_graph().link(1, 0, 4, "model")
    assert validate(g.wf(), OI) == []
    prompt = ui_to_api(g.wf(), OI)
    assert set(prompt) == {"1", "2", "3", "4", "5"}
    assert prompt["1"] == {"class_type": "Loader", "inputs": {"ckpt": "b.safetensors"},
                           "_meta": {"title": "Loader"}}
    assert prompt["5"]["inputs"] == {"samples": ["4", 0], "prefix": "out"}
    assert prompt["3"]["inputs"] == {"width": 64, "height": 48}


def test_seed_control_value_is_not_an_input():
    g = base_graph().link(1, 0, 4, "model")
    inputs = ui_to_api(g.wf(), OI)["4"]["inputs"]
    # seed, control("randomize"), steps, sampler_name, denoise, noise_seed, control("fixed")
    assert inputs == {"model": ["1", 0], "seed": 7, "steps": 20, "sampler_name": "uni_pc",
                      "positive": ["2", 0], "latent_image": ["3", 0], "denoise": 0.5,
                      "noise_seed": 11}
    assert "randomize" not in json.dumps(inputs) and "fixed" not in json.dumps(inputs)


def test_control_false_force_input_and_v3_combo():
    g = G().add(1, "V3Node", inputs=[("scale", "FLOAT"), ("offset", "FLOAT")], outputs=["FLOAT"],
                widgets=["y", 3, False])
    g.add(2, "V3Node", inputs=[("scale", "FLOAT")], outputs=["FLOAT"], widgets=["x", 1, True])
    g.add(3, "V3Node", inputs=[("scale", "FLOAT")], outputs=["FLOAT"], widgets=["x", 2, True])
    g.link(2, 0, 1, "scale").link(3, 0, 2, "scale").link(3, 0, 1, "offset")
    problems = validate(g.wf(), OI)
    assert problems == ["node 3 (V3Node): required input 'scale' (FLOAT) is not linked "
                        "(or its source is muted/bypassed away)"], problems
    assert ui_to_api(g.wf(), OI)["1"]["inputs"] == {"mode": "y", "seed": 3, "flag": False,
                                                    "scale": ["2", 0], "offset": ["3", 0]}
    assert workflow_api.widget_slots(OI["V3Node"]) == [("mode", 1), ("seed", 1), ("flag", 1)]


def test_widget_converted_to_socket_keeps_its_slot():
    g = base_graph(SAMPLER_SOCKETS + [("steps", "INT", True)]).link(1, 0, 4, "model")
    g.add(6, "IntNode", outputs=["INT"], widgets=[9, "increment"]).link(6, 0, 4, "steps")
    assert validate(g.wf(), OI) == []
    inputs = ui_to_api(g.wf(), OI)["4"]["inputs"]
    assert inputs["steps"] == ["6", 0]           # the link wins over the widget value 20
    assert inputs["sampler_name"] == "uni_pc"    # later widgets did not shift
    assert inputs["denoise"] == 0.5 and inputs["seed"] == 7
    assert ui_to_api(g.wf(), OI)["6"]["inputs"] == {"value": 9}


def test_primitive_node_is_inlined():
    g = base_graph(SAMPLER_SOCKETS + [("seed", "INT", True)]).link(1, 0, 4, "model")
    g.add(6, "PrimitiveNode", outputs=["INT"], widgets=[123456, "fixed"]).link(6, 0, 4, "seed")
    g.nodes[6]["outputs"][0]["widget"] = {"name": "seed"}
    assert validate(g.wf(), OI) == []
    prompt = ui_to_api(g.wf(), OI)
    assert "6" not in prompt
    assert prompt["4"]["inputs"]["seed"] == 123456
    assert prompt["4"]["inputs"]["steps"] == 20


def test_reroutes_are_followed():
    g = base_graph()
    g.add(7, "Reroute", inputs=[("", "*")], outputs=["MODEL"])
    g.add(8, "Reroute", inputs=[("", "*")], outputs=["MODEL"])
    g.link(1, 0, 7, "").link(7, 0, 8, "").link(8, 0, 4, "model")
    assert validate(g.wf(), OI) == []
    prompt = ui_to_api(g.wf(), OI)
    assert "7" not in prompt and "8" not in prompt
    assert prompt["4"]["inputs"]["model"] == ["1", 0]


def test_notes_are_dropped():
    g = base_graph().link(1, 0, 4, "model")
    g.add(9, "Note", widgets=["hello"]).add(10, "MarkdownNote", widgets=["# hi"])
    assert validate(g.wf(), OI) == []
    assert set(ui_to_api(g.wf(), OI)) == {"1", "2", "3", "4", "5"}


def test_bypass_rewires_to_the_input_of_the_same_type():
    g = base_graph()
    g.add(6, "TwoIn", inputs=[("latent", "LATENT"), ("model", "MODEL")], outputs=["MODEL"], mode=4)
    g.link(3, 0, 6, "latent").link(1, 0, 6, "model").link(6, 0, 4, "model")
    prompt = ui_to_api(g.wf(), OI)
    assert "6" not in prompt
    assert prompt["4"]["inputs"]["model"] == ["1", 0]  # not the LATENT at the same slot index
    assert validate(g.wf(), OI) == []


def test_bypass_chain_and_active_node_in_between():
    g = base_graph()
    g.add(6, "Patch", inputs=[("model", "MODEL")], outputs=["MODEL"], widgets=[0.5], mode=4)
    g.add(7, "Patch", inputs=[("model", "MODEL")], outputs=["MODEL"], widgets=[0.7])
    g.add(8, "Patch", inputs=[("model", "MODEL")], outputs=["MODEL"], widgets=[0.9], mode=4)
    g.link(1, 0, 6, "model").link(6, 0, 7, "model").link(7, 0, 8, "model").link(8, 0, 4, "model")
    prompt = ui_to_api(g.wf(), OI)
    assert "6" not in prompt and "8" not in prompt
    assert prompt["7"]["inputs"] == {"strength": 0.7, "model": ["1", 0]}
    assert prompt["4"]["inputs"]["model"] == ["7", 0]


def test_bypass_without_matching_input_leaves_input_unset():
    g = base_graph().link(1, 0, 4, "model")
    # replace the positive prompt's source by a bypassed node that has no CONDITIONING input
    g.nodes[2]["mode"] = 4
    prompt = ui_to_api(g.wf(), OI)
    assert "2" not in prompt and "positive" not in prompt["4"]["inputs"]
    problems = validate(g.wf(), OI)
    assert any("'positive'" in p and "required" in p for p in problems), problems


def test_muted_node_is_dropped_with_its_consumers_inputs():
    g = base_graph().link(1, 0, 4, "model")
    g.nodes[3]["mode"] = 2   # muted latent source
    g.nodes[5]["mode"] = 2   # muted output node
    prompt = ui_to_api(g.wf(), OI)
    assert "3" not in prompt and "5" not in prompt
    assert "latent_image" not in prompt["4"]["inputs"]
    problems = validate(g.wf(), OI)
    assert any("'latent_image'" in p for p in problems), problems


def test_overrides_by_type_then_id():
    g = base_graph().link(1, 0, 4, "model")
    g.add(6, "Empty", outputs=["LATENT"], widgets=[512, 512])
    prompt = ui_to_api(g.wf(), OI, overrides={"Empty": {"width": 16}, "6": {"width": 32},
                                              "Sampler": {"steps": 4}})
    assert prompt["3"]["inputs"] == {"width": 16, "height": 48}
    assert prompt["6"]["inputs"] == {"width": 32, "height": 512}
    assert prompt["4"]["inputs"]["steps"] == 4
    with pytest.raises(WorkflowError, match="matches no node"):
        ui_to_api(g.wf(), OI, overrides={"NoSuchNode": {"x": 1}})
    with pytest.raises(WorkflowError, match="has no input 'stepz'"):
        ui_to_api(g.wf(), OI, overrides={"Sampler": {"stepz": 4}})
    # the workflow itself is not modified
    assert g.nodes[3]["widgets_values"] == [64, 48]


def test_validate_reports_problems():
    g = base_graph().link(1, 0, 4, "model")
    g.add(6, "Mystery", outputs=["MODEL"])
    assert any("unknown node type 'Mystery'" in p for p in validate(g.wf(), OI))

    g = base_graph().link(1, 0, 4, "model")
    g.nodes[4]["widgets_values"] = [7, 20, "uni_pc", 0.5]  # control value forgotten
    problems = validate(g.wf(), OI)
    assert any("widgets_values has 4 entries" in p and "needs 7" in p for p in problems), problems

    g = base_graph()
    g.add(6, "Empty", outputs=["LATENT"], widgets=[8, 8]).link(6, 0, 4, "model")  # LATENT -> MODEL
    problems = validate(g.wf(), OI)
    assert any("is 'LATENT'" in p and "wants 'MODEL'" in p for p in problems), problems

    g = base_graph()  # model never linked
    problems = validate(g.wf(), OI)
    assert problems == ["node 4 (Sampler): required input 'model' (MODEL) is not linked "
                        "(or its source is muted/bypassed away)"], problems

    g = base_graph().link(1, 0, 4, "model")
    g.nodes[3]["widgets_values"] = [64]  # height missing
    problems = validate(g.wf(), OI)
    assert any("widgets_values has 1 entries" in p for p in problems), problems
    assert any("required input 'height' (INT) has neither a link nor a widget value" in p
               for p in problems), problems

    g = base_graph().link(1, 0, 4, "model")
    g.links[0][5] = "IMAGE"  # the link's own type disagrees with its source
    assert any("typed 'IMAGE'" in p for p in validate(g.wf(), OI))

    g = base_graph().link(1, 0, 4, "model")
    g.nodes[4]["inputs"][0]["link"] = None  # stale bookkeeping
    assert any("does not point back" in p for p in validate(g.wf(), OI))


def test_api_format_is_rejected_clearly():
    with pytest.raises(WorkflowError):
        ui_to_api({"1": {"class_type": "Loader", "inputs": {}}}, OI)


# =========================================================================== shipped files, offline


def test_there_are_example_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert set(EXPECTED_PACK_NODES) <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_file_is_well_formed(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    assert wf["version"] == 0.4
    ids = [n["id"] for n in wf["nodes"]]
    assert len(set(ids)) == len(ids) and wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for node in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties",
                    "widgets_values"):
            assert key in node, (node["id"], key)
        if node["type"] not in workflow_api.VIRTUAL_NODE_TYPES:
            assert node["properties"].get("Node name for S&R") == node["type"]
    pack_nodes = [n for n in wf["nodes"] if n["type"] in PACK_NODES]
    assert {n["type"]: n["mode"] for n in pack_nodes} == EXPECTED_PACK_NODES[path.stem]
    assert len(pack_nodes) == len(EXPECTED_PACK_NODES[path.stem]), "one node of each type"
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes
    if ROUTER_NODE in EXPECTED_PACK_NODES[path.stem]:  # the note explains the slider and the stacking
        text = " ".join(str(v) for n in notes for v in n["widgets_values"])
        assert "**budget**" in text and "Dynamic Patch Schedule" in text and "stacks" in text
    if MERGE_NODE in EXPECTED_PACK_NODES[path.stem]:  # ... the ratio, the window, the stacking, honestly
        text = " ".join(str(v) for n in notes for v in n["widgets_values"])
        assert "**ratio**" in text and "start_percent / end_percent" in text and "stacks" in text
        assert "fewer steps" in text and "section 10" in text and "2.31x" in text
        merge = next(n for n in wf["nodes"] if n["type"] == MERGE_NODE)
        # ratio 0.5, order spread, within frames, the default window 0-0.8, proportional attention
        assert merge["widgets_values"] == [0.5, "spread", "within_frames", 0.0, 0.8, True]
    # the example runs the sampler on the MODEL output of the last pack node in the chain
    links = {link[0]: link for link in wf["links"]}
    sampler = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    model_in = next(i for i in sampler["inputs"] if i["name"] == "model")
    by_id = {n["id"]: n for n in wf["nodes"]}
    last = by_id[links[model_in["link"]][1]]
    expected_last = next((t for t in (ROUTER_NODE, MERGE_NODE) if t in EXPECTED_PACK_NODES[path.stem]), PACK_NODE)
    assert last["type"] == expected_last
    # ... and every pack node sits in that one MODEL chain (loader -> ... -> sampler)
    chain, node = [], last
    while node["type"] in PACK_NODES or node["type"] == "ModelSamplingSD3":
        chain.append(node["type"])
        node = by_id[links[next(i for i in node["inputs"] if i["name"] == "model")["link"]][1]]
    assert node["type"] == "UNETLoader" and set(EXPECTED_PACK_NODES[path.stem]) <= set(chain), chain


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_a_template_thumbnail(path):
    # ComfyUI's template browser (frontend 1.32.x, the one ComfyUI 0.3.75 pins) lists a custom
    # node pack's workflows as {mediaType: "image", mediaSubtype: "jpg"} and loads the thumbnail
    # from /api/workflow_templates/<pack folder>/<workflow name>.jpg: a same-name .jpg, nothing else.
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"missing thumbnail {thumb.name}"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff", "thumbnail must be a real JPEG"
    assert 5_000 < len(data) < 1_000_000
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and min(im.size) >= 256


PROXY_WORKFLOWS = sorted((REPO / "benchmarks" / "proxy" / "workflows").glob("*.json"))
MODEL_DIRS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders",
              "VAELoader": "vae", "ElasticTokensLoadPatchAdapter": "elastic_tokens"}


def _pack_ids() -> dict:
    """What a node of each origin carries: core nodes, this pack's nodes (its registry id: the
    pyproject [project] name), the proxy nodes (only in this repository: its GitHub owner/name)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    repo = project["urls"]["Repository"].rstrip("/").split("github.com/")[1]
    return {"core": ("cnr_id", "comfy-core"), "pack": ("cnr_id", project["name"]), "proxy": ("aux_id", repo),
            "version": project["version"], "repo_url": project["urls"]["Repository"].rstrip("/")}


@pytest.mark.parametrize("path", WORKFLOWS + PROXY_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_carries_model_and_node_pack_hints(path):
    import re

    ids = _pack_ids()
    wf = json.loads(path.read_text(encoding="utf-8"))
    files = 0
    for node in wf["nodes"]:
        if node["type"] in workflow_api.VIRTUAL_NODE_TYPES:
            continue
        props = node["properties"]
        origin = ("proxy" if node["type"].startswith("ElasticTokensProxy") else
                  "pack" if node["type"].startswith("ElasticTokens") else "core")
        key, value = ids[origin]
        assert props.get(key) == value, (node["type"], props)
        assert not ({"cnr_id", "aux_id"} - {key}) & set(props), (node["type"], "one pack id, as the frontend writes it")
        assert re.fullmatch(r"\d+\.\d+\.\d+", props.get("ver", "")), (node["type"], props.get("ver"))
        if origin != "core":
            assert props["ver"] == ids["version"]
        # a model hint for every model file the node names, and only for those (the frontend
        # matches hints against the widget values)
        named = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.endswith(".safetensors")]
        hints = props.get("models", [])
        assert [h["name"] for h in hints] == named, (node["type"], named, hints)
        for hint in hints:
            files += 1
            assert set(hint) == {"name", "url", "directory"}, hint
            assert hint["directory"] == MODEL_DIRS[node["type"]], hint
            if origin == "core":  # the frontend offers downloads from Hugging Face (and Civitai) only
                assert hint["url"].startswith("https://huggingface.co/") and hint["url"].endswith("/" + hint["name"])
            else:  # the proxies' adapters ship in this repository
                rel = f"benchmarks/proxy/adapters/{hint['name']}"
                assert hint["url"] == f"{ids['repo_url']}/raw/main/{rel}" and (REPO / rel).is_file(), hint
    assert files > 0
    assert "ds" not in wf.get("extra", {}), "no saved view: the frontend fits the graph to the user's screen"


# =========================================================================== against a real server

TEST_OVERRIDES = {
    "flux1_dev_dynamic_patch_t2i": {"EmptySD3LatentImage": {"width": 64, "height": 64, "batch_size": 1}},
    "wan21_t2v_1.3b_dynamic_patch": {"EmptyHunyuanLatentVideo": {"width": 64, "height": 64, "length": 9,
                                                                 "batch_size": 1}},
}
TEST_OVERRIDES["flux1_dev_token_router_t2i"] = TEST_OVERRIDES["flux1_dev_dynamic_patch_t2i"]
TEST_OVERRIDES["wan21_t2v_1.3b_token_router"] = TEST_OVERRIDES["wan21_t2v_1.3b_dynamic_patch"]
TEST_OVERRIDES["flux1_dev_token_merge_t2i"] = TEST_OVERRIDES["flux1_dev_dynamic_patch_t2i"]
TEST_OVERRIDES["wan21_t2v_1.3b_token_merge"] = TEST_OVERRIDES["wan21_t2v_1.3b_dynamic_patch"]
FORCED_SCHEDULE = "2,2,1,1"
STEPS = 4


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session's shared server (tests/conftest.py: ComfyServer with the pack + tiny models)."""
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def _base_url(server) -> str:
    for attr in ("url", "base_url", "address"):
        value = getattr(server, attr, None)
        if isinstance(value, str) and value.startswith("http"):
            return value.rstrip("/")
    port = getattr(server, "port", None)
    if port is None:
        pytest.skip("ComfyServer exposes no url/port")
    return f"http://127.0.0.1:{port}"


_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def _get(server, path: str) -> bytes:
    with _HTTP.open(_base_url(server) + path, timeout=60) as resp:
        return resp.read()


@pytest.mark.server
def test_pack_node_is_registered(object_info):
    assert PACK_NODE in object_info, "the pack's node did not load into the server"
    assert object_info[PACK_NODE]["display_name"] == "Dynamic Patch Schedule"
    assert object_info[PACK_NODE]["output"] == ["MODEL"]
    adapter = object_info["ElasticTokensLoadPatchAdapter"]
    assert adapter["display_name"] == "Load Patch Adapter" and adapter["output"] == ["MODEL"]
    required = adapter["input"]["required"]
    assert set(required) == {"model", "adapter_name", "strength"}
    assert required["strength"][1]["min"] == 0.0 and required["strength"][1]["default"] == 1.0
    assert object_info[ROUTER_NODE]["display_name"] == "Elastic Token Router"
    assert object_info[ROUTER_NODE]["output"] == ["MODEL"]
    assert object_info[MERGE_NODE]["display_name"] == "Token Merge"
    assert object_info[MERGE_NODE]["output"] == ["MODEL"]


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_against_server(path, object_info):
    wf = json.loads(path.read_text(encoding="utf-8"))
    assert validate(wf, object_info) == []


@pytest.mark.server
def test_template_browser_lists_workflows_and_serves_thumbnails(server):
    listing = json.loads(_get(server, "/workflow_templates"))
    ours = [(module, names) for module, names in listing.items()
            if {p.stem for p in WORKFLOWS} <= set(names)]
    assert ours, f"our workflows are not listed by /workflow_templates: {listing}"
    module = ours[0][0]
    for path in WORKFLOWS:
        assert _get(server, f"/api/workflow_templates/{module}/{path.stem}.jpg")[:3] == b"\xff\xd8\xff"
        assert json.loads(_get(server, f"/api/workflow_templates/{module}/{path.name}"))["nodes"]


def _test_prompt(path: Path, object_info: dict) -> dict:
    wf = json.loads(path.read_text(encoding="utf-8"))
    overrides = copy.deepcopy(TEST_OVERRIDES.get(path.stem, {}))
    overrides.setdefault("KSampler", {})["steps"] = STEPS
    active = _active_pack_nodes(path)
    if PACK_NODE in active:
        pack_inputs = workflow_api._input_defs(object_info[PACK_NODE])
        names = {name for name, *_ in pack_inputs}
        pack = {}
        if "forced_schedule" in names:
            pack["forced_schedule"] = FORCED_SCHEDULE
        if "cuda_graphs" in names:
            pack["cuda_graphs"] = False
        if pack:
            overrides[PACK_NODE] = pack
    prompt = ui_to_api(wf, object_info, overrides=overrides)
    assert {e["class_type"] for e in prompt.values()} & set(PACK_NODES) == active
    return prompt


def _active_pack_nodes(path: Path) -> set:
    return {t for t, mode in EXPECTED_PACK_NODES[path.stem].items() if mode == 0}


# the run's log line starts with the stacked nodes' names ("A + B: 4/4 steps (...)")
_LOG_LINE = re.compile(r"^(Dynamic Patch Schedule|Elastic Token Router|Token Merge)( \+ [A-Za-z ]+)?: \d+/\d+ steps")


def _schedule_lines(server) -> list[str]:
    text = server.log_text() if hasattr(server, "log_text") else ""
    return [line for line in text.splitlines() if _LOG_LINE.match(line)]


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_on_tiny_models(path, server, object_info):
    prompt = _test_prompt(path, object_info)
    before = len(_schedule_lines(server))
    history = _run(server, prompt)
    _assert_outputs(server, history)
    _assert_nodes_ran(server, before, _active_pack_nodes(path))


SCHEDULE_BYPASSED_WORKFLOWS = [p for p in WORKFLOWS if EXPECTED_PACK_NODES.get(p.stem, {}).get(PACK_NODE) == 4]


@pytest.mark.server
@pytest.mark.parametrize("path", SCHEDULE_BYPASSED_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_stacks_when_the_schedule_is_turned_on(path, server, object_info):
    """The note's promise: Ctrl+B on the bypassed Dynamic Patch Schedule (mode 0) stacks it with
    the router or Token Merge: both run in one sampling (one log line naming both), the schedule's
    coarse steps and the router's skipped (or Token Merge's merged) tokens each in it."""
    assert SCHEDULE_BYPASSED_WORKFLOWS, "the Wan router and the merge workflows ship the schedule bypassed"
    wf = json.loads(path.read_text(encoding="utf-8"))
    for node in wf["nodes"]:
        if node["type"] == PACK_NODE:
            node["mode"] = 0
    overrides = copy.deepcopy(TEST_OVERRIDES.get(path.stem, {}))
    overrides["KSampler"] = {"steps": STEPS}
    overrides[PACK_NODE] = {"forced_schedule": FORCED_SCHEDULE}
    prompt = ui_to_api(wf, object_info, overrides=overrides)
    before = len(_schedule_lines(server))
    _assert_outputs(server, _run(server, prompt))
    _assert_nodes_ran(server, before, {PACK_NODE} | {t for t in (ROUTER_NODE, MERGE_NODE)
                                                      if t in EXPECTED_PACK_NODES[path.stem]})


def _assert_nodes_ran(server, before: int, active: set) -> None:
    """The run's log line names exactly the ``active`` pack nodes, and each did its part: the
    schedule followed the forced schedule (2 coarse steps at 2p), the router skipped image tokens
    on routed steps."""
    if not hasattr(server, "log_text"):
        return
    deadline = time.monotonic() + 5  # the log line may trail the history entry a moment
    while not (lines := _schedule_lines(server)[before:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines, server.log_text()[-3000:]
    line = lines[-1]
    names = line.split(":", 1)[0].split(" + ")
    assert set(names) == {{PACK_NODE: "Dynamic Patch Schedule", ROUTER_NODE: "Elastic Token Router",
                           MERGE_NODE: "Token Merge"}[t] for t in active}, line
    if PACK_NODE in active:  # it followed the forced schedule (2 coarse steps at 2p)
        assert "2 at 2p" in line, line
    if ROUTER_NODE in active:  # it routed: some image tokens of the native steps skipped
        m = re.search(r"Elastic Token Router: (\d+)% of image tokens skipped, ~[\d.]+x \(budget 0\.5, "
                      r"(\d+) routed", line)
        assert m and int(m[1]) > 0 and int(m[2]) > 0, line
    if MERGE_NODE in active:  # it merged: half the image tokens merged away on some (not all) native steps
        m = re.search(r"; (\d+)% of image tokens merged away on (\d+)/(\d+) steps", line)
        assert m and int(m[1]) == 50 and 0 < int(m[2]) <= int(m[3]), line


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_with_pack_node_bypassed(path, server, object_info):
    """Ctrl+B on the pack's nodes (mode 4) must leave a runnable graph: loader -> sampler."""
    wf = json.loads(path.read_text(encoding="utf-8"))
    for node in wf["nodes"]:
        if node["type"] in PACK_NODES:
            node["mode"] = 4
    assert validate(wf, object_info) == []
    overrides = copy.deepcopy(TEST_OVERRIDES.get(path.stem, {}))
    overrides["KSampler"] = {"steps": 2}
    prompt = ui_to_api(wf, object_info, overrides=overrides)
    assert not any(e["class_type"] in PACK_NODES for e in prompt.values())
    sampler = next(e for e in prompt.values() if e["class_type"] == "KSampler")
    assert prompt[sampler["inputs"]["model"][0]]["class_type"] in ("UNETLoader", "ModelSamplingSD3")
    _assert_outputs(server, _run(server, prompt))


def _run(server, prompt: dict) -> dict:
    prompt_id = server.queue(prompt)
    history = server.wait(prompt_id)
    if isinstance(history, dict) and prompt_id in history:
        history = history[prompt_id]
    return history


def _assert_outputs(server, history: dict) -> None:
    status = history.get("status", {})
    assert status.get("status_str", "success") == "success", status
    outputs = history.get("outputs") or {}
    assert outputs, f"no outputs written: {history}"
    saved = [item for out in outputs.values() for key in ("images", "gifs", "videos")
             for item in out.get(key, [])]
    assert saved and all(item.get("filename") for item in saved), outputs
    if hasattr(server, "output_files"):
        files = server.output_files(history)
        assert files and all(f.is_file() and f.stat().st_size > 0 for f in files), files
