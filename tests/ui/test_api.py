"""The REST API through fastapi's TestClient: routes, errors, 409 on a second start, auth, hostile paths."""

from __future__ import annotations

import base64
import sys
import threading
import types
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dreambooth.config.schema import Concept, TrainingConfig  # noqa: E402
from dreambooth.host.webui import parse_api_auth  # noqa: E402
from dreambooth.service import TrainingService  # noqa: E402
from dreambooth.store import Layout, ModelStore  # noqa: E402
from dreambooth.ui.api import register_api  # noqa: E402

from fake_host import FakeHost  # noqa: E402


class GatedTrainer:
    gate = threading.Event()

    def __init__(self, config, host, callbacks, commands):
        self.callbacks, self.commands = callbacks, commands

    def run(self) -> None:
        GatedTrainer.gate.wait(5)
        self.callbacks.on_status("done")


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    data = tmp_path / "data" / "dog"
    data.mkdir(parents=True)
    store.model("dog").save_config(TrainingConfig(concepts=[Concept(instance_data_dir=str(data))]))
    (store.layout.checkpoints_dir / "base.safetensors").write_bytes(b"x")

    def create_model(store_arg, name, source, family=None, prediction_type=None):
        store_arg.model(name).save_config(TrainingConfig(base_checkpoint=Path(source).name))

    monkeypatch.setitem(sys.modules, "dreambooth.models.loading", types.SimpleNamespace(create_model=create_model))
    host = FakeHost(store.layout)
    service = TrainingService(host, store, trainer_factory=GatedTrainer)
    GatedTrainer.gate = threading.Event()
    yield types.SimpleNamespace(store=store, service=service, tmp=tmp_path, data=data)
    GatedTrainer.gate.set()
    service.wait(5)


def client_for(world, **options) -> TestClient:
    app = fastapi.FastAPI()
    register_api(app, world.service, world.store, **options)
    return TestClient(app)


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_models_and_config_round_trip(world):
    client = client_for(world)
    models = client.get("/dreambooth/models").json()["models"]
    assert [m["name"] for m in models] == ["dog"] and models[0]["concepts"] == 1
    config = client.get("/dreambooth/models/dog/config").json()
    assert config["version"] >= 1 and config["concepts"][0]["instance_data_dir"] == str(world.data)
    config["learning_rate"] = 4e-6
    answer = client.put("/dreambooth/models/dog/config", json={**config, "bogus": 1})
    assert answer.status_code == 200 and "bogus" in answer.json()["warnings"][0]
    assert world.store.existing("dog").load_config().learning_rate == pytest.approx(4e-6)


def test_bad_config_is_a_422_naming_the_setting(world):
    client = client_for(world)
    answer = client.put("/dreambooth/models/dog/config", json={"optimizer": "sgd"})
    assert answer.status_code == 422 and "optimizer" in answer.json()["detail"]
    assert client.get("/dreambooth/models/nobody/config").status_code == 404


def test_create_model_from_a_host_checkpoint(world):
    client = client_for(world)
    answer = client.post("/dreambooth/models", json={"name": "cat", "checkpoint": "base.safetensors"})
    assert answer.status_code == 201 and answer.json()["config"]["base_checkpoint"] == "base.safetensors"
    assert "cat" in world.store.names()
    again = client.post("/dreambooth/models", json={"name": "cat", "checkpoint": "base.safetensors"})
    assert again.status_code == 400 and "already exists" in again.json()["detail"]


def test_create_refuses_checkpoints_outside_the_folder(world):
    client = client_for(world)
    secret = world.tmp / "secret.safetensors"
    secret.write_bytes(b"x")
    (world.store.layout.checkpoints_dir / "link.safetensors").symlink_to(secret)
    before = snapshot(world.tmp)
    for checkpoint in ("../../secret.safetensors", str(secret), "link.safetensors", "..%2F..%2Fsecret.safetensors",
                       "/etc/passwd", "", "missing.safetensors"):
        answer = client.post("/dreambooth/models", json={"name": "evil", "checkpoint": checkpoint})
        assert answer.status_code == 400, checkpoint
    for name in ("../evil", "/abs", "a/b", "..", "con", ".hidden", "x" * 200):
        answer = client.post("/dreambooth/models", json={"name": name, "checkpoint": "base.safetensors"})
        assert answer.status_code == 400, name
    assert snapshot(world.tmp) == before


@pytest.mark.parametrize("path", ["..", "%2E%2E", "..%2F..%2Fetc", "a%2Fb", "%2Fetc%2Fpasswd", "..%5C..%5Cx",
                                  "dog%2F..%2F..%2Fdog", "%252E%252E", "con"])
def test_hostile_model_names_in_urls_never_reach_the_disk(world, path):
    client = client_for(world)
    before = snapshot(world.tmp)
    for method, suffix, body in (("get", "config", None), ("put", "config", {}), ("post", "concepts", []),
                                 ("post", "train", {})):
        answer = getattr(client, method)(f"/dreambooth/models/{path}/{suffix}",
                                         **({"json": body} if body is not None else {}))
        assert answer.status_code in (400, 404, 405), (method, suffix, answer.status_code)
    assert snapshot(world.tmp) == before and not world.service.is_busy()


def test_concepts_import_and_folder_rules(world):
    client = client_for(world, data_roots=[world.tmp / "data"])
    concepts = [{"instance_data_dir": str(world.data), "instance_prompt": "sks dog", "class_prompt": "a dog"}]
    answer = client.post("/dreambooth/models/dog/concepts", json=concepts)
    assert answer.status_code == 200 and answer.json()["concepts"] == 1
    assert world.store.existing("dog").load_config().concepts[0].instance_prompt == "sks dog"
    outside = world.tmp / "elsewhere"
    outside.mkdir()
    (world.tmp / "data" / "sneaky").symlink_to(outside)
    hostile = [{"instance_data_dir": "relative/dir"},
               {"instance_data_dir": str(world.data / ".." / ".." / "elsewhere")},
               {"instance_data_dir": str(world.tmp / "data" / "sneaky")},
               {"instance_data_dir": str(world.data), "class_data_dir": "/tmp/owned"},
               {"instance_data_dir": str(world.data), "class_data_dir": str(world.data / ".." / ".." / "x")}]
    for concept in hostile:
        answer = client.post("/dreambooth/models/dog/concepts", json=[concept])
        assert answer.status_code == 400, concept
    assert world.store.existing("dog").load_config().concepts[0].instance_prompt == "sks dog"
    bad_json = client.post("/dreambooth/models/dog/concepts", content=b"[{", headers={"content-type": "application/json"})
    assert bad_json.status_code in (400, 422)


def test_class_folder_under_the_model_store_is_allowed(world):
    client = client_for(world)
    classes = world.store.layout.dreambooth_dir / "dog" / "classifiers" / "mine"
    answer = client.post("/dreambooth/models/dog/concepts",
                         json=[{"instance_data_dir": str(world.data), "class_data_dir": str(classes)}])
    assert answer.status_code == 200


def test_train_status_cancel_and_409(world):
    client = client_for(world)
    started = client.post("/dreambooth/models/dog/train", json={"overrides": {"max_train_steps": 3}})
    assert started.status_code == 202 and started.json()["state"] == "running"
    second = client.post("/dreambooth/models/dog/train")
    assert second.status_code == 409 and "still running" in second.json()["detail"]
    assert client.get("/dreambooth/status").json()["model"] == "dog"
    cancelled = client.post("/dreambooth/cancel", json={"save": False})
    assert cancelled.json()["state"] == "stopping"
    GatedTrainer.gate.set()
    world.service.wait(5)
    assert client.get("/dreambooth/status").json()["state"] == "finished"
    bad = client.post("/dreambooth/models/dog/train", json={"overrides": {"learning_rate": "fast"}})
    assert bad.status_code == 400 and "learning_rate" in bad.json()["detail"]


def test_train_overrides_follow_the_same_rules_and_folder_checks(world):
    """Overrides use the one applier (concepts.N.field included) and cannot point a run outside the roots."""
    client = client_for(world, data_roots=[world.tmp / "data"])
    typo = client.post("/dreambooth/models/dog/train", json={"overrides": {"learnin_rate": 1e-6}})
    assert typo.status_code == 400 and "did you mean learning_rate" in typo.json()["detail"]
    missing = client.post("/dreambooth/models/dog/train", json={"overrides": {"concepts.3.instance_prompt": "x"}})
    assert missing.status_code == 400 and "has 1 concept(s)" in missing.json()["detail"]
    outside = client.post("/dreambooth/models/dog/train",
                          json={"overrides": {"concepts.0.instance_data_dir": str(world.tmp)}})
    assert outside.status_code == 400 and "outside the folders" in outside.json()["detail"]
    assert not world.service.is_busy()
    started = client.post("/dreambooth/models/dog/train", json={"overrides": {"concepts.0.instance_prompt": "sks"}})
    assert started.status_code == 202


def test_simultaneous_api_starts_leave_one_run(world):
    client = client_for(world)
    barrier = threading.Barrier(6)
    codes: list[int] = []

    def start() -> None:
        barrier.wait()
        codes.append(client.post("/dreambooth/models/dog/train").status_code)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(codes) == [202] + [409] * 5


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_auth_is_enforced_when_configured(world):
    client = client_for(world, auth=parse_api_auth("alice:wonder,bob:builder"))
    assert client.get("/dreambooth/status").status_code == 401
    assert client.get("/dreambooth/status", headers=basic("alice", "wrong")).status_code == 401
    assert client.get("/dreambooth/status", headers=basic("mallory", "wonder")).status_code == 401
    assert client.post("/dreambooth/models/dog/train", headers=basic("eve", "x")).status_code == 401
    assert not world.service.is_busy()
    assert client.get("/dreambooth/status", headers=basic("alice", "wonder")).status_code == 200
    assert client.get("/dreambooth/models", headers=basic("bob", "builder")).status_code == 200


def test_parse_api_auth():
    assert parse_api_auth(None) is None and parse_api_auth("") is None
    assert parse_api_auth("u:p:q, v:w") == {"u": "p:q", "v": "w"}
    with pytest.raises(Exception, match="user:password"):
        parse_api_auth("nopassword")


ROUTES = {"/dreambooth/models", "/dreambooth/models/{name}/config", "/dreambooth/models/{name}/concepts",
          "/dreambooth/models/{name}/train", "/dreambooth/status", "/dreambooth/cancel"}


def test_routes_keep_the_hosts_api_docs_working(world):
    """The host's /docs is built from every route on its app; ours must not break its schema (pydantic 1 and 2)."""
    answer = client_for(world, auth={"u": "p"}).get("/openapi.json")
    assert answer.status_code == 200 and ROUTES <= set(answer.json()["paths"])


def test_routes_added_after_the_gradio_app_answer(world):
    """on_app_started adds our routes to the host's gradio app after gradio's own; none of those may shadow them."""
    gr = pytest.importorskip("gradio")
    with gr.Blocks() as blocks:
        gr.Markdown("host page")
    app = gr.routes.App.create_app(blocks)
    register_api(app, world.service, world.store)
    client = TestClient(app)
    assert [m["name"] for m in client.get("/dreambooth/models").json()["models"]] == ["dog"]
    assert client.post("/dreambooth/models/nope/train").status_code == 404


# --- edits merge, identity is explicit, inputs are bounded ----------------------------------------

def test_partial_put_merges_and_keeps_identity(world):
    model = world.store.model("dog")
    config = model.load_config()
    config.seed, config.model_family, config.prediction_type = 77, "sd2v", "v_prediction"
    model.save_config(config)
    client = client_for(world)
    answer = client.put("/dreambooth/models/dog/config", json={"learning_rate": 1e-5})
    assert answer.status_code == 200
    saved = model.load_config()
    assert (saved.learning_rate, saved.seed, saved.model_family, len(saved.concepts)) == (1e-5, 77, "sd2v", 1)
    for field, value in (("model_family", "sd1"), ("prediction_type", "epsilon"), ("base_checkpoint", "x.ckpt")):
        refused = client.put("/dreambooth/models/dog/config", json={"learning_rate": 2e-5, field: value})
        assert refused.status_code == 422 and field in refused.json()["detail"], field
    assert model.load_config().learning_rate == 1e-5
    same = client.put("/dreambooth/models/dog/config", json={**client.get("/dreambooth/models/dog/config").json()})
    assert same.status_code == 200  # a GET-PUT round trip names the identity unchanged


def test_identity_and_replace_are_explicit_flags(world):
    client = client_for(world)
    fixed = client.put("/dreambooth/models/dog/config?set_identity=true", json={"prediction_type": "v_prediction"})
    assert fixed.status_code == 200 and world.store.model("dog").load_config().prediction_type == "v_prediction"
    bad = client.put("/dreambooth/models/dog/config?set_identity=true", json={"model_family": "sd9"})
    assert bad.status_code == 422 and "model_family" in bad.json()["detail"]
    client.put("/dreambooth/models/dog/config", json={"seed": 5})
    replaced = client.put("/dreambooth/models/dog/config?replace=true", json={"learning_rate": 1e-5})
    saved = world.store.model("dog").load_config()
    assert replaced.status_code == 200 and saved.seed == TrainingConfig().seed and saved.concepts == []
    assert saved.prediction_type == "v_prediction"  # identity survives a replace
    assert any("removed" in w for w in replaced.json()["warnings"])


def test_empty_concepts_in_a_put_keep_the_models(world):
    answer = client_for(world).put("/dreambooth/models/dog/config", json={"concepts": []})
    assert answer.status_code == 200 and any("kept" in w for w in answer.json()["warnings"])
    assert len(world.store.model("dog").load_config().concepts) == 1


def test_out_of_range_and_oversized_values_are_422(world):
    client = client_for(world)
    for body, field in (({"seed": 1e30}, "seed"), ({"max_train_steps": 10**12}, "max_train_steps"),
                        ({"concepts": [{"instance_prompt": "x" * 20_000}]}, "instance_prompt")):
        answer = client.put("/dreambooth/models/dog/config", json=body)
        assert answer.status_code == 422 and field in answer.json()["detail"], body
        assert len(answer.json()["detail"]) < 300


def test_huge_bodies_are_refused_before_parsing(world):
    import time

    client = client_for(world)
    started = time.monotonic()
    huge = client.put("/dreambooth/models/dog/config", content=b'{"sample_prompts": "' + b"x" * 60_000_000 + b'"}',
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "larger than" in huge.json()["detail"]
    many = client.put("/dreambooth/models/dog/config", json={"concepts": [{}] * 200_000})
    assert many.status_code in (413, 422)
    listed = client.post("/dreambooth/models/dog/concepts", json=[{"instance_prompt": "p"}] * 5_000)
    assert listed.status_code == 422 and "1000" in listed.json()["detail"].replace(",", "")
    assert time.monotonic() - started < 20
    assert len(world.store.model("dog").load_config().concepts) == 1
