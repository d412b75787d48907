"""The fake Forge and the adapter against what the real Forge has (tests/host/facts/forge.json).

The facts file records, from Forge's source at the commit that was run for real, every function and attribute
of Forge that dreambooth/host/webui.py uses. These tests fail when the fake (tests/host/fake_webui plus
tests/host/fake_forge) departs from it, or when the adapter starts using a Forge name nobody checked.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
from tests_host_support import HERE, purge_fakes

FACTS = json.loads((HERE / "facts" / "forge.json").read_text())
ADAPTER = Path(__file__).resolve().parents[2] / "dreambooth" / "host" / "webui.py"
ENTRIES = FACTS["entries"]
# Local names in webui.py that hold a host object; attributes read or set on them are host names.
HOST_OBJECTS = {"sd_models", "model_data", "state", "main_entry", "memory", "processing", "shared", "opts",
                "options", "info", "processed", "p", "source", "current"}
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@pytest.fixture
def fake_forge(tmp_path: Path, monkeypatch):
    purge_fakes()
    monkeypatch.syspath_prepend(str(HERE / "fake_webui"))
    monkeypatch.syspath_prepend(str(HERE / "fake_forge"))
    importlib.import_module("modules_forge")  # turns the fake sd_models into Forge's shape
    yield
    purge_fakes()


def rendered_parameters(function: Any) -> list[str]:
    """A signature as the facts file writes it: name or name=default, '*' before keyword-only ones."""
    parameters = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
    rendered: list[str] = []
    for parameter in parameters:
        if parameter.kind == parameter.KEYWORD_ONLY and "*" not in rendered:
            rendered.append("*")
        text = parameter.name
        if parameter.default is not parameter.empty:
            text += f"={parameter.default!r}"
        rendered.append(text)
    return rendered


def fake_object(entry: dict[str, Any]) -> Any:
    module = importlib.import_module(entry["module"])
    return getattr(module, entry["name"]) if entry["name"] else module


def entries_of(*kinds: str) -> list[dict[str, Any]]:
    return [entry for entry in ENTRIES if entry["kind"] in kinds]


def entry_id(entry: dict[str, Any]) -> str:
    return f"{entry['module']}.{entry['name']}".rstrip(".")


@pytest.mark.parametrize("entry", [e for e in entries_of("function", "class") if "parameters" in e], ids=entry_id)
def test_fake_signatures_match_forge(fake_forge, entry):
    assert rendered_parameters(fake_object(entry)) == entry["parameters"]


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.get("attributes")], ids=entry_id)
def test_fake_objects_have_the_attributes_forge_has(fake_forge, entry):
    owner = fake_object(entry)
    if entry["name"] == "checkpoints_list":  # the attributes are those of its values
        owner = importlib.import_module("modules.sd_models").CheckpointInfo("/models/a.safetensors")
    elif entry["name"] == "Processed":  # the adapter only reads what process_images returns
        processing = importlib.import_module("modules.processing")
        owner = processing.process_images(processing.StableDiffusionProcessingTxt2Img(width=8, height=8, seed=1))
    missing = [name for name in entry["attributes"] if not hasattr(owner, name)]
    assert not missing, f"the fake {entry_id(entry)} lacks {missing}"


@pytest.mark.parametrize("entry", entries_of("attribute", "package", "property", "dataclass"), ids=entry_id)
def test_fake_has_every_recorded_name(fake_forge, entry):
    if entry["module"] == "modules.shared" and entry["name"] == "models_path":
        importlib.import_module("modules.shared").models_path = "/models"  # the tests set it per test
    assert fake_object(entry) is not None


def test_fake_model_data_has_forge_shape_only(fake_forge):
    model_data = importlib.import_module("modules.sd_models").model_data
    assert type(model_data.sd_model).__name__ == "FakeInitialModel"
    assert not hasattr(model_data, "loaded_sd_models")


def recorded_names() -> set[str]:
    names: set[str] = set(FACTS["adapter_names_for_other_hosts"])
    for entry in ENTRIES:
        names.update({entry["module"], entry["name"], *entry["module"].split(".")})
        names.update(entry.get("attributes", ()), entry.get("fields", ()))
    return names - {""}


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _call_name(call: ast.Call) -> str:
    function = call.func
    return function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")


def _on_our_own_state(node: ast.Call) -> bool:
    """getattr(self._local, ...) and the like read the adapter's own objects, not the host's."""
    return bool(node.args) and isinstance(node.args[0], ast.Attribute) and \
        getattr(node.args[0].value, "id", "") == "self"


def host_names_used(tree: ast.Module) -> set[str]:
    """Names WebuiHost asks of the host: need/getattr/hasattr names, imported modules, the names it
    iterates over, and attributes read or set on its variables that hold host objects."""
    used: set[str] = set()
    host_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "WebuiHost")
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name != "call_tolerant"]
    for node in [n for root in (host_class, *functions) for n in ast.walk(root)]:
        if isinstance(node, ast.Call):
            name, args = _call_name(node), node.args
            if name in ("need", "getattr", "hasattr") and len(args) >= 2 and _string(args[1]) \
                    and not _on_our_own_state(node):
                used.add(_string(args[1]))
            elif name == "module" and args and _string(args[0]):
                used.add(f"modules.{_string(args[0])}")
            elif name in ("import_module", "find_spec") and args and _string(args[0]):
                used.add(_string(args[0]))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in HOST_OBJECTS:
            used.add(node.attr)
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            used.update(filter(None, (_string(element) for element in node.iter.elts)))
    return used


def host_tables(tree: ast.Module) -> set[str]:
    """Module and attribute names in the adapter's lookup tables (NETWORKS_MODULES and the version readers)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("NETWORKS_MODULES",) for t in node.targets):
            names.update(s for s in map(_string, ast.walk(node.value)) if s and IDENTIFIER.match(s))
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "readers":
            names.update(s for s in map(_string, ast.walk(node.value)) if s and IDENTIFIER.match(s))
    return names


def test_adapter_uses_only_names_recorded_for_forge_or_other_hosts():
    tree = ast.parse(ADAPTER.read_text())
    used = host_names_used(tree) | host_tables(tree)
    unrecorded = sorted(name for name in used - recorded_names() if not name.startswith("__"))  # dunders: Python's
    assert not unrecorded, (f"dreambooth/host/webui.py uses {unrecorded}, which tests/host/facts/forge.json does "
                            "not record; check them in Forge's source and add them (or list them as other hosts').")


def test_adapter_passes_txt2img_only_fields_forge_has():
    fields = next(e["fields"] for e in ENTRIES if e["name"] == "StableDiffusionProcessingTxt2Img")
    tree = ast.parse(ADAPTER.read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "txt2img"]
    assert calls, "the adapter no longer builds StableDiffusionProcessingTxt2Img through `txt2img(...)`"
    passed = {keyword.arg for call in calls for keyword in call.keywords if keyword.arg}
    assert passed <= set(fields), f"not fields of Forge's dataclass: {sorted(passed - set(fields))}"
    source = ADAPTER.read_text()
    assert '"scheduler"' in source and "scheduler" in fields  # passed through _scheduler_option


def test_facts_name_the_commit_that_was_run():
    assert re.fullmatch(r"[0-9a-f]{40}", FACTS["commit"]) and FACTS["repository"].endswith("webui-forge")
