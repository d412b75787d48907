"""REST API under /dreambooth/: models, configs, concept import, start/status/cancel of training.

Plain dict bodies (no pydantic models) so the same code runs on fastapi 0.94 + pydantic 1 (A1111 1.10)
and on the latest fastapi. Every name is checked by store.check_model_name and every folder a request
names is resolved (symlinks included) before use, so no request reads or writes outside the configured
folders: model folders stay under models/dreambooth, checkpoints come from the checkpoints folder, and
folders training writes into (class images) must lie under models/dreambooth or a configured data root.
"""

# No `from __future__ import annotations`: fastapi reads the endpoint annotations at runtime.
import logging
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..config import io as config_io
from ..config.schema import TrainingConfig
from ..errors import ConfigError, DreamboothError
from ..locks import ModelBusy
from ..service import RunInProgress, TrainingService
from ..store import ModelDir, ModelStore, check_model_name

log = logging.getLogger(__name__)

PREFIX = "/dreambooth"


def parse_api_auth(text: str | None) -> dict[str, str] | None:
    """A1111's --api-auth 'user:pass,user2:pass2' as {user: password}; None when auth is off."""
    if not text:
        return None
    credentials = {}
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user:
            raise ConfigError(f"--api-auth entry {pair.strip()!r} is not 'user:password'.")
        credentials[user] = password
    return credentials


def is_inside(path: Path, roots: Iterable[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def check_concept_folders(config: TrainingConfig, write_roots: list[Path], read_roots: list[Path] | None) -> None:
    """Refuse relative folders, class folders outside `write_roots` and, when set, data outside `read_roots`."""
    for index, concept in enumerate(config.concepts):
        for name in ("instance_data_dir", "class_data_dir"):
            raw = getattr(concept, name).strip()
            if not raw:
                continue
            path = Path(raw)
            if not path.is_absolute():
                raise ConfigError(f"Concept {index + 1}: '{name}' {raw!r} must be an absolute folder path.")
            allowed = write_roots if name == "class_data_dir" else read_roots
            if allowed is not None and not is_inside(path, allowed):
                where = ", ".join(str(Path(root).resolve()) for root in allowed)
                raise ConfigError(f"Concept {index + 1}: '{name}' {raw!r} is outside the folders this API may "
                                  f"use ({where}); move the folder there or use the tab.")


def status_code_for(error: DreamboothError) -> int:
    if isinstance(error, (RunInProgress, ModelBusy)):
        return 409
    if isinstance(error, ConfigError) and str(error).startswith("No model named"):
        return 404
    return 400


class DreamboothApi:
    """The endpoint functions, kept free of fastapi so they read as plain code."""

    def __init__(self, service: TrainingService, store: ModelStore, data_roots: list[Path] | None = None):
        self.service = service
        self.store = store
        self.read_roots = [Path(root) for root in data_roots] if data_roots is not None else None
        self.write_roots = [store.layout.dreambooth_dir, *(self.read_roots or [])]

    def _model(self, name: str) -> ModelDir:
        return self.store.existing(check_model_name(name))

    def list_models(self) -> dict[str, Any]:
        models = []
        for name in self.store.names():
            entry: dict[str, Any] = {"name": name}
            try:
                config = self.store.model(name).load_config()
                entry.update(method=config.method, model_family=config.model_family,
                             base_checkpoint=config.base_checkpoint, concepts=len(config.concepts))
            except DreamboothError as error:
                entry["error"] = str(error)
            models.append(entry)
        return {"models": models}

    def create_model(self, body: dict[str, Any]) -> dict[str, Any]:
        name = check_model_name(str(body.get("name", "")))
        checkpoint = body.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint:
            raise ConfigError("Body needs 'checkpoint': a file name from the checkpoints folder.")
        model = self.service.create_model(name, Path(checkpoint), family=body.get("family"),
                                          prediction_type=body.get("prediction_type"))
        return {"name": model.name, "config": config_io.to_dict(model.load_config())}

    def get_config(self, name: str) -> dict[str, Any]:
        return config_io.to_dict(self._model(name).load_config())

    def put_config(self, name: str, body: Any) -> dict[str, Any]:
        model = self._model(name)
        warnings: list[str] = []
        config = config_io.from_dict(body, "request body", warn=warnings.append)
        check_concept_folders(config, self.write_roots, self.read_roots)
        model.save_config(config)
        return {"config": config_io.to_dict(config), "warnings": warnings}

    def import_concepts(self, name: str, body: Any) -> dict[str, Any]:
        from ..config.legacy import import_data

        model = self._model(name)
        result = import_data(body, "request body", None, model.load_config())
        check_concept_folders(result.config, self.write_roots, self.read_roots)
        model.save_config(result.config)
        return {"concepts": len(result.config.concepts), "messages": list(result.messages)}

    def train(self, name: str, body: Any) -> dict[str, Any]:
        overrides = (body or {}).get("overrides") if isinstance(body, dict) else None
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError("'overrides' must be an object of setting names and values.")
        model = self._model(name)
        check_concept_folders(model.load_config(), self.write_roots, self.read_roots)
        return self.service.start(model.name, overrides).to_dict()

    def status(self) -> dict[str, Any]:
        return self.service.status().to_dict()

    def cancel(self, body: Any) -> dict[str, Any]:
        save = body.get("save", True) if isinstance(body, dict) else True
        return self.service.cancel(bool(save)).to_dict()


def _answer(call: Callable[[], Any]) -> Any:
    """Run an endpoint, turning user errors into JSON answers with the right status code."""
    from fastapi import HTTPException

    try:
        return call()
    except DreamboothError as error:
        raise HTTPException(status_code=status_code_for(error), detail=str(error)) from None


def basic_auth_dependency(credentials: dict[str, str]) -> Callable[..., None]:
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> None:
        expected = credentials.get(given.username)
        # compare_digest on both branches keeps the timing the same for unknown users
        if not secrets.compare_digest((expected or "").encode(), given.password.encode()) or expected is None:
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return check


def register_api(app: Any, service: TrainingService, store: ModelStore, auth: dict[str, str] | None = None,
                 data_roots: list[Path] | None = None, prefix: str = PREFIX) -> DreamboothApi:
    """Add the /dreambooth/ routes to a FastAPI app; with `auth` ({user: password}) they need HTTP basic auth."""
    from fastapi import APIRouter, Body, Depends

    api = DreamboothApi(service, store, data_roots)
    dependencies = [Depends(basic_auth_dependency(auth))] if auth else []
    router = APIRouter(prefix=prefix, dependencies=dependencies, tags=["dreambooth"])

    @router.get("/models")
    def list_models() -> Any:
        return _answer(api.list_models)

    @router.post("/models", status_code=201)
    def create_model(body: dict = Body(...)) -> Any:
        return _answer(lambda: api.create_model(body))

    @router.get("/models/{name}/config")
    def get_config(name: str) -> Any:
        return _answer(lambda: api.get_config(name))

    @router.put("/models/{name}/config")
    def put_config(name: str, body: dict = Body(...)) -> Any:
        return _answer(lambda: api.put_config(name, body))

    @router.post("/models/{name}/concepts")
    def import_concepts(name: str, body: Any = Body(...)) -> Any:
        return _answer(lambda: api.import_concepts(name, body))

    @router.post("/models/{name}/train", status_code=202)
    def train(name: str, body: Any = Body(None)) -> Any:
        return _answer(lambda: api.train(name, body))

    @router.get("/status")
    def status() -> Any:
        return _answer(api.status)

    @router.post("/cancel")
    def cancel(body: Any = Body(None)) -> Any:
        return _answer(lambda: api.cancel(body))

    app.include_router(router)
    return api
