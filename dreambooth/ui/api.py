"""REST API under /dreambooth/: models, configs, concept import, start/status/cancel of training, LoRA tools.

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
from ..config import legacy
from ..config.overrides import apply_overrides
from ..config.schema import TrainingConfig
from ..errors import ConfigError, DreamboothError
from ..locks import ModelBusy
from ..service import RunInProgress, TrainingService
from ..store import ModelDir, ModelStore, check_model_name

log = logging.getLogger(__name__)

PREFIX = "/dreambooth"
# Largest request body read: a config with a thousand concepts fits many times over, a runaway or
# hostile upload is refused before it is parsed.
MAX_BODY_BYTES = 1_000_000


class InvalidBody(ConfigError):
    """A request body whose values the schema refuses (answered 422)."""


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
    if isinstance(error, (InvalidBody, legacy.IdentityChange)):
        return 422
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

    def put_config(self, name: str, body: Any, replace: bool = False, set_identity: bool = False) -> dict[str, Any]:
        """Merge `body` onto the model's config (all settings with `replace`); identity only with `set_identity`."""
        model = self._model(name)
        current = model.load_config()
        if not isinstance(body, dict):
            raise InvalidBody(f"request body: expected a JSON object of settings, found {type(body).__name__}.")
        if not set_identity:
            legacy.check_identity_unchanged(current, body, "request body")
        try:
            result = legacy.merge_config(body, current, "request body", replace)
            config = result.config
            if set_identity:
                changes = {key: body[key] for key in legacy.CORRECTABLE_IDENTITY if key in body}
                config = legacy.apply_identity(config, changes, "request body")
        except legacy.IdentityChange:
            raise
        except ConfigError as error:
            raise InvalidBody(str(error)) from None
        check_concept_folders(config, self.write_roots, self.read_roots)
        model.save_config(config)
        return {"config": config_io.to_dict(config), "warnings": list(result.messages)}

    def import_concepts(self, name: str, body: Any) -> dict[str, Any]:
        from ..config.legacy import import_data

        model = self._model(name)
        try:
            result = import_data(body, "request body", None, model.load_config())
        except ConfigError as error:
            raise InvalidBody(str(error)) from None
        check_concept_folders(result.config, self.write_roots, self.read_roots)
        model.save_config(result.config)
        return {"concepts": len(result.config.concepts), "messages": list(result.messages)}

    def train(self, name: str, body: Any) -> dict[str, Any]:
        overrides = (body or {}).get("overrides") if isinstance(body, dict) else None
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError("'overrides' must be an object of setting names and values.")
        model = self._model(name)
        # Overrides can name concept folders too, so the folders are checked on the config the run will use.
        run_config = apply_overrides(model.load_config(), overrides or {})
        check_concept_folders(run_config, self.write_roots, self.read_roots)
        return self.service.start(model.name, overrides).to_dict()

    def status(self) -> dict[str, Any]:
        return self.service.status().to_dict()

    # --- LoRA tools (files inside the host's checkpoint and LoRA folders only) ---------------------------
    def lora_extract(self, body: dict[str, Any]) -> dict[str, Any]:
        from ..loratools import jobs

        rule = jobs.rule_from(body.get("rank_mode"), _rank_value(body), body.get("max_rank"))
        conv = jobs.conv_rule_for(rule, int(body.get("conv_rank") or 0))
        return self.service.run_tool("lora_extract", lambda: jobs.extract(
            self.store.layout, _text(body, "source"), body.get("base") or None, rule, conv,
            body.get("out") or None, body.get("precision") or "fp32")).to_dict()

    def lora_resize(self, body: dict[str, Any]) -> dict[str, Any]:
        from ..loratools import jobs

        rule = jobs.rule_from(body.get("rank_mode"), _rank_value(body), body.get("max_rank"))
        return self.service.run_tool("lora_resize", lambda: jobs.resize(
            self.store.layout, _text(body, "lora"), rule, body.get("out") or None, body.get("family") or None,
            body.get("precision") or "fp32")).to_dict()

    def lora_merge(self, body: dict[str, Any]) -> dict[str, Any]:
        from ..loratools import jobs

        loras = _weighted_loras(body.get("loras"))
        if body.get("into"):
            return self.service.run_tool("lora_merge", lambda: jobs.merge_to_checkpoint(
                self.store.layout, str(body["into"]), loras, body.get("out") or None,
                body.get("precision") or "fp16")).to_dict()
        rule = jobs.rule_from(body.get("rank_mode"), _rank_value(body), body.get("max_rank")) \
            if body.get("rank") or body.get("rank_value") else None
        return self.service.run_tool("lora_merge", lambda: jobs.merge_to_lora(
            self.store.layout, loras, rule, body.get("out") or None, body.get("family") or None,
            body.get("precision") or "fp32")).to_dict()

    def cancel(self, body: Any) -> dict[str, Any]:
        save = body.get("save", True) if isinstance(body, dict) else True
        return self.service.cancel(bool(save)).to_dict()


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"Body needs '{name}': a file name from the host's folders.")
    return value


def _rank_value(body: dict[str, Any]) -> Any:
    """'rank' (a fixed rank) or 'rank_value' (the ratio or fraction of a dynamic 'rank_mode')."""
    return body.get("rank_value", body.get("rank", 8))


def _weighted_loras(items: Any) -> list[tuple[str, float]]:
    """'loras': ["name", "name:0.5"] or [{"name": ..., "weight": ...}]."""
    if not isinstance(items, list) or not items:
        raise ConfigError("Body needs 'loras': a list of LoRA file names (or {name, weight} objects).")
    from ..loratools.jobs import parse_weighted

    try:
        return [(str(item["name"]), float(item.get("weight", 1.0))) if isinstance(item, dict)
                else parse_weighted([str(item)])[0] for item in items]
    except (KeyError, TypeError, ValueError):
        raise ConfigError("Each entry of 'loras' must be a name, 'name:weight' or {name, weight}.") from None


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


def too_large_answer(limit: int) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": f"Request body is larger than {limit:,} bytes; send the settings that change, "
                                   "or import large concept lists from a file with the CLI."}, status_code=413)


def body_limited_route(limit: int) -> type:
    """An APIRoute class that refuses bodies over `limit` bytes (413) before fastapi reads or parses them."""
    from fastapi.routing import APIRoute

    class BodyLimitedRoute(APIRoute):
        def get_route_handler(self) -> Callable[..., Any]:
            handler = super().get_route_handler()

            async def limited(request: Any) -> Any:
                if request.method in ("POST", "PUT", "PATCH") and not await _body_fits(request, limit):
                    return too_large_answer(limit)
                return await handler(request)

            return limited

    return BodyLimitedRoute


async def _body_fits(request: Any, limit: int) -> bool:
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        return int(declared) <= limit
    body = bytearray()  # no length given (chunked): read at most limit + 1 bytes
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            return False
    request._body = bytes(body)  # starlette's cache of the body, read again by fastapi
    return True


def register_api(app: Any, service: TrainingService, store: ModelStore, auth: dict[str, str] | None = None,
                 data_roots: list[Path] | None = None, prefix: str = PREFIX,
                 max_body_bytes: int = MAX_BODY_BYTES) -> DreamboothApi:
    """Add the /dreambooth/ routes to a FastAPI app; with `auth` ({user: password}) they need HTTP basic auth."""
    from fastapi import APIRouter, Depends

    api = DreamboothApi(service, store, data_roots)
    dependencies = [Depends(basic_auth_dependency(auth))] if auth else []
    router = APIRouter(prefix=prefix, dependencies=dependencies, tags=["dreambooth"],
                       route_class=body_limited_route(max_body_bytes))
    _add_model_routes(router, api)
    _add_lora_routes(router, api)
    _add_run_routes(router, api)
    app.include_router(router)
    return api


def _add_model_routes(router: Any, api: DreamboothApi) -> None:
    from fastapi import Body

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
    def put_config(name: str, body: dict = Body(...), replace: bool = False, set_identity: bool = False) -> Any:
        """Merge the body's settings onto the model's; ?replace=true replaces them all, ?set_identity=true
        allows correcting model_family, prediction_type and base_checkpoint."""
        return _answer(lambda: api.put_config(name, body, replace, set_identity))

    @router.post("/models/{name}/concepts")
    def import_concepts(name: str, body: Any = Body(...)) -> Any:
        return _answer(lambda: api.import_concepts(name, body))

    @router.post("/models/{name}/train", status_code=202)
    def train(name: str, body: Any = Body(None)) -> Any:
        return _answer(lambda: api.train(name, body))


def _add_lora_routes(router: Any, api: DreamboothApi) -> None:
    from fastapi import Body

    @router.post("/lora/extract", status_code=201)
    def lora_extract(body: dict = Body(...)) -> Any:
        return _answer(lambda: api.lora_extract(body))

    @router.post("/lora/resize", status_code=201)
    def lora_resize(body: dict = Body(...)) -> Any:
        return _answer(lambda: api.lora_resize(body))

    @router.post("/lora/merge", status_code=201)
    def lora_merge(body: dict = Body(...)) -> Any:
        return _answer(lambda: api.lora_merge(body))


def _add_run_routes(router: Any, api: DreamboothApi) -> None:
    from fastapi import Body

    @router.get("/status")
    def status() -> Any:
        return _answer(api.status)

    @router.post("/cancel")
    def cancel(body: Any = Body(None)) -> Any:
        return _answer(lambda: api.cancel(body))
