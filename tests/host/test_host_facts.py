"""The fakes and the adapter against what each real host has (tests/host/facts/<host>.json).

Each facts file records, from the host's source at the commit that was run for real, every function and
attribute of that host that dreambooth/host/webui.py uses (names the adapter uses only for other hosts are listed
as such). These tests fail when a fake (tests/host/fake_*) departs from its host's list, or when the adapter
starts using a name nobody checked in that host.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests_host_support import HERE, purge_fakes

from dreambooth.host.webui import WebuiHost

ADAPTER = Path(__file__).resolve().parents[2] / "dreambooth" / "host" / "webui.py"
# Local names in webui.py that hold a host object; attributes read or set on them are host names.
HOST_OBJECTS = {"sd_models", "model_data", "state", "main_entry", "memory", "processing", "shared", "opts",
                "options", "info", "processed", "p", "source", "current"}
# Module-level tables of webui.py whose strings are host module or attribute names.
HOST_TABLES = ("NETWORKS_MODULES", "SDNEXT_SLOTS")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def forge_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE / "fake_webui"))
    monkeypatch.syspath_prepend(str(HERE / "fake_forge"))
    importlib.import_module("modules_forge")  # turns the fake sd_models into Forge's shape
    importlib.import_module("modules.shared").models_path = "/models"  # the A1111 fake leaves it to each test


def neo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE / "fake_webui"))
    monkeypatch.syspath_prepend(str(HERE / "fake_forge"))
    monkeypatch.syspath_prepend(str(HERE / "fake_neo"))
    importlib.import_module("modules_forge")
    importlib.import_module("modules.shared").models_path = "/models"


def classic_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE / "fake_webui"))  # the built-in Lora extension's networks module
    monkeypatch.syspath_prepend(str(HERE / "fake_classic"))
    importlib.import_module("modules.shared").models_path = "/models"
    sd_models = importlib.import_module("modules.sd_models")
    sd_models.model_data.lock = threading.Lock()  # A1111's SdModelData has one
    sd_models.load_model(sd_models.CheckpointInfo("/models/a.safetensors"))  # Classic loads at start-up


def sdnext_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE / "fake_sdnext"))


HOSTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {"forge": forge_on_path, "neo": neo_on_path,
                                                         "classic": classic_on_path, "sdnext": sdnext_on_path}
FACTS = {host: json.loads((HERE / "facts" / f"{host}.json").read_text()) for host in HOSTS}


def cases(select: Callable[[dict[str, Any]], bool]) -> list[Any]:
    return [pytest.param(host, entry, id=f"{host}:{entry['module']}.{entry['name']}".rstrip("."))
            for host, facts in FACTS.items() for entry in facts["entries"] if select(entry)]


@pytest.fixture
def fake_host(request, monkeypatch):
    """Puts the fake of the test's host (its first parameter) on sys.path."""
    purge_fakes()
    HOSTS[request.node.callspec.params["host"]](monkeypatch)
    yield
    purge_fakes()


def rendered_parameters(function: Any) -> list[str]:
    """A signature as the facts files write it: name or name=default, '*' before keyword-only ones (unless a
    '*args' came first), '*args' and '**kwargs' for the catch-alls."""
    rendered: list[str] = []
    for parameter in (p for p in inspect.signature(function).parameters.values() if p.name != "self"):
        if parameter.kind == parameter.VAR_POSITIONAL:
            rendered.append(f"*{parameter.name}")
            continue
        if parameter.kind == parameter.VAR_KEYWORD:
            rendered.append(f"**{parameter.name}")
            continue
        if parameter.kind == parameter.KEYWORD_ONLY and not any(text.startswith("*") for text in rendered):
            rendered.append("*")
        default = "" if parameter.default is parameter.empty else f"={parameter.default!r}"
        rendered.append(parameter.name + default)
    return rendered


def fake_object(entry: dict[str, Any]) -> Any:
    module = importlib.import_module(entry["module"])
    return getattr(module, entry["name"]) if entry["name"] else module


def value_of(entry: dict[str, Any]) -> Any:
    """What the adapter reads the attributes of: checkpoint list entries, process_images' result, or the object."""
    if entry["name"] == "checkpoints_list":
        return importlib.import_module("modules.sd_models").CheckpointInfo("/models/a.safetensors")
    if entry["name"] == "Processed":
        processing = importlib.import_module("modules.processing")
        p = processing.StableDiffusionProcessingTxt2Img(width=8, height=8, seed=1, batch_size=1)
        return processing.process_images(p)
    return fake_object(entry)


@pytest.mark.parametrize("host, entry", cases(lambda e: e["kind"] in ("function", "class") and "parameters" in e))
def test_fake_signatures_match_the_host(fake_host, host, entry):
    assert rendered_parameters(fake_object(entry)) == entry["parameters"]


@pytest.mark.parametrize("host, entry", cases(lambda e: bool(e.get("attributes"))))
def test_fake_objects_have_the_attributes_the_host_has(fake_host, host, entry):
    owner = value_of(entry)
    missing = [name for name in entry["attributes"] if not hasattr(owner, name)]
    assert not missing, f"the fake {entry['module']}.{entry['name']} of {host} lacks {missing}"


@pytest.mark.parametrize("host, entry", cases(lambda e: e["kind"] in ("attribute", "package", "property", "dataclass")))
def test_fake_has_every_recorded_name(fake_host, host, entry):
    assert fake_object(entry) is not None


@pytest.mark.parametrize("host", ["forge", "neo"])
def test_fake_model_data_has_forge_shape_only(fake_host, host):
    sd_models = importlib.import_module("modules.sd_models")
    assert type(sd_models.model_data.sd_model).__name__ == "FakeInitialModel"
    assert not hasattr(sd_models.model_data, "loaded_sd_models")
    if host == "neo":  # Neo dropped A1111's stubs that Forge still has
        assert not any(hasattr(sd_models, name) for name in ("send_model_to_trash", "load_model", "checkpoints_loaded"))


@pytest.mark.parametrize("host", ["sdnext"])
def test_fake_sdnext_has_no_a1111_model_list_and_loads_lazily(fake_host, host):
    model_data = importlib.import_module("modules.sd_models").model_data
    assert model_data is importlib.import_module("modules.modeldata").model_data
    assert not hasattr(model_data, "loaded_sd_models") and model_data.sd_model is None
    assert importlib.import_module("modules.shared").sd_model is not None and model_data.lazy_loads == 1
    assert not hasattr(importlib.import_module("modules.shared").state, "stopping_generation")


def recorded_names(facts: dict[str, Any]) -> set[str]:
    names: set[str] = set(facts["adapter_names_for_other_hosts"])
    for entry in facts["entries"]:
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


def _names_in(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Call):
        name, args = _call_name(node), node.args
        if name in ("need", "getattr", "hasattr") and len(args) >= 2 and _string(args[1]) \
                and not _on_our_own_state(node):
            return {_string(args[1])}
        if name == "module" and args and _string(args[0]):
            return {f"modules.{_string(args[0])}"}
        if name in ("import_module", "find_spec") and args and _string(args[0]):
            return {_string(args[0])}
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in HOST_OBJECTS:
        return {node.attr}
    elif isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
        return set(filter(None, (_string(element) for element in node.iter.elts)))
    return set()


def host_names_used(tree: ast.Module) -> set[str]:
    """Names the adapter asks of the host: need/getattr/hasattr names, imported modules, the names it iterates
    over, and attributes read or set on its variables that hold host objects (in every class and function)."""
    roots = [node for node in tree.body if isinstance(node, ast.ClassDef)
             or (isinstance(node, ast.FunctionDef) and node.name != "call_tolerant")]
    return {name for root in roots for node in ast.walk(root) for name in _names_in(node)}


def host_tables(tree: ast.Module) -> set[str]:
    """Module and attribute names in the adapter's lookup tables and the version readers."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in HOST_TABLES for t in node.targets):
            names.update(s for s in map(_string, ast.walk(node.value)) if s and IDENTIFIER.match(s))
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "readers":
            names.update(s for s in map(_string, ast.walk(node.value)) if s and IDENTIFIER.match(s))
    return names


@pytest.mark.parametrize("host", list(HOSTS))
def test_adapter_uses_only_names_recorded_for_the_host_or_other_hosts(host):
    tree = ast.parse(ADAPTER.read_text())
    used = host_names_used(tree) | host_tables(tree)
    unrecorded = sorted(name for name in used - recorded_names(FACTS[host]) if not name.startswith("__"))
    assert not unrecorded, (f"dreambooth/host/webui.py uses {unrecorded}, which tests/host/facts/{host}.json does "
                            "not record; check them in the host's source and add them (or list them as other "
                            "hosts').")


@pytest.mark.parametrize("host", list(HOSTS))
def test_adapter_passes_txt2img_only_fields_the_host_has(fake_host, host):
    fields = next(e["fields"] for e in FACTS[host]["entries"] if e["name"] == "StableDiffusionProcessingTxt2Img")
    tree = ast.parse(ADAPTER.read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "txt2img"]
    assert calls, "the adapter no longer builds StableDiffusionProcessingTxt2Img through `txt2img(...)`"
    passed = {keyword.arg for call in calls for keyword in call.keywords if keyword.arg}
    assert passed <= set(fields), f"not fields of {host}'s txt2img: {sorted(passed - set(fields))}"
    # 'scheduler' is passed exactly where the host's txt2img has that field
    txt2img = importlib.import_module("modules.processing").StableDiffusionProcessingTxt2Img
    assert ("scheduler" in WebuiHost._scheduler_option(txt2img)) == ("scheduler" in fields)


@pytest.mark.parametrize("host", list(HOSTS))
def test_facts_name_the_commit_that_was_run(host):
    facts = FACTS[host]
    assert re.fullmatch(r"[0-9a-f]{40}", facts["commit"]) and re.fullmatch(r"[\w.-]+/[\w.-]+", facts["repository"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", facts["commit_date"]) and facts["entries"]
