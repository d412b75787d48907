"""Extension installer, run by the web UI (as `python install.py`) before it starts.

Installs only what is missing, at versions that fit the host, and never installs, upgrades or
downgrades a package that is already there: each package is installed without its dependencies, and then
only those of its dependencies that are missing are installed the same way. (Letting pip resolve
dependencies re-resolves the installed packages too: SD.Next pins setuptools 69.5.1 while torch 2.13 asks
for setuptools >= 77, so a plain `pip install bitsandbytes` upgraded SD.Next's setuptools.) pip also gets a
constraints file pinning every host-owned package at its installed version. When everything is satisfied,
pip is not called at all.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata

# Packages the web UI installs and pins; we never ask pip for them and pin them for pip's resolver.
HOST_OWNED = ("torch", "torchvision", "torchaudio", "xformers", "gradio", "gradio_client", "transformers",
              "accelerate", "numpy", "pillow", "fastapi", "pydantic", "starlette", "httpx", "huggingface_hub",
              "tokenizers", "protobuf", "open_clip_torch")


@dataclass(frozen=True)
class Need:
    """One package we use: what an installed version must satisfy, and what pip gets when it is missing."""

    name: str
    accepts: str  # PEP 440 specifier an installed version must satisfy (else a warning, never a change)
    install: str  # requirement string passed to pip when the package is missing
    optional: bool = False  # a failed install only disables a feature (8-bit optimizers, prodigy, ...)
    feature: str = ""


def installed_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def major(version: str | None) -> int | None:
    if not version:
        return None
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


def host_is_forge() -> bool:
    """Forge (run with its root on PYTHONPATH) ships modules_forge; since its backend rewrite (Forge 2, Forge Neo,
    a `backend` package) it installs its own bitsandbytes pin. Forge Classic (gradio 3) has no such pin."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("modules_forge", "backend"))
    except (ImportError, ValueError):
        return False


def needs_for(versions: Mapping[str, str | None], platform: str = sys.platform,
              forge: bool = False) -> list[Need]:
    """Our packages, capped where the host's transformers needs it (A1111 1.10 pins transformers 4.30).

    Forge pins bitsandbytes itself (0.45.3, installed at start-up on CUDA machines), so under Forge we
    leave it to the host: installing our own version would only be replaced at the next start.
    """
    legacy = major(versions.get("transformers")) == 4
    found = [
        # diffusers > 0.31 and peft > 0.13.2 import APIs transformers 4.30 lacks.
        Need("diffusers", ">=0.31.0", "diffusers<=0.31.0" if legacy else "diffusers>=0.31.0"),
        Need("peft", ">=0.13.2", "peft<=0.13.2" if legacy else "peft>=0.13.2"),
        Need("safetensors", ">=0.4.0", "safetensors>=0.4.0"),
        Need("prodigyopt", ">=1.0", "prodigyopt>=1.0", optional=True, feature="the prodigy optimizer"),
        Need("schedulefree", ">=1.2", "schedulefree>=1.2", optional=True, feature="adamw_schedulefree"),
    ]
    if platform != "darwin" and not forge:  # no bitsandbytes wheels for macOS; Forge owns its pin
        found.append(Need("bitsandbytes", ">=0.43.0", "bitsandbytes>=0.43.0", optional=True,
                          feature="8-bit optimizers"))
    return found


def satisfies(version: str, specifier: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # no packaging: an installed package is taken as good enough
        return True
    try:
        return Version(version) in SpecifierSet(specifier)
    except InvalidVersion:
        return True  # a local build with an odd version string: trust it rather than touch it


def plan(needs: list[Need], versions: Mapping[str, str | None]) -> tuple[list[Need], list[str]]:
    """(missing packages to install, warnings about installed ones outside our range)."""
    missing, warnings = [], []
    for need in needs:
        version = versions.get(need.name)
        if version is None:
            missing.append(need)
        elif not satisfies(version, need.accepts):
            warnings.append(f"[dreambooth] {need.name} {version} is installed but {need.name}{need.accepts} is "
                            "expected; it is left as it is (the web UI or another extension may need it).")
    return missing, warnings


def host_constraints(versions: Mapping[str, str | None], forge: bool = False) -> str:
    """pip constraints pinning every installed host-owned package, so pip cannot replace one."""
    owned = HOST_OWNED + (("bitsandbytes",) if forge else ())
    return "".join(f"{name}=={version}\n" for name, version in versions.items() if name in owned and version)


PipRunner = Callable[[list[str]], int]
RequirementsReader = Callable[[str], list[str]]
VersionReader = Callable[[str], "str | None"]
MAX_DEPENDENCY_ROUNDS = 5  # dependencies of dependencies ...; our packages need at most two levels


def run_pip(args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "pip", *args])


def declared_requirements(name: str) -> list[str]:
    """The Requires-Dist lines of an installed distribution (empty when it is not installed)."""
    try:
        return list(metadata.requires(name) or [])
    except metadata.PackageNotFoundError:
        return []


def installed_version(name: str) -> str | None:
    return installed_versions((name,))[name]


def missing_dependencies(names: list[str], requires: RequirementsReader, version_of: VersionReader) -> list[str]:
    """Requirements of the named distributions that nothing installed provides (installed ones are never
    changed, even when their version is outside the range asked for)."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # no packaging: trust that the host has what our packages need
        return []
    owned = {canonical(owner) for owner in HOST_OWNED}
    missing: dict[str, str] = {}
    for name in names:
        for line in requires(name):
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an optional extra or another platform's dependency
            if version_of(requirement.name) is None and canonical(requirement.name) not in owned:
                missing.setdefault(canonical(requirement.name), f"{requirement.name}{requirement.specifier}")
    return list(missing.values())


def pip_install(requirements: list[str], constraints: str, runner: PipRunner) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(constraints)
    try:
        return runner(["install", "--no-deps", "--constraint", handle.name, *requirements])
    finally:
        os.unlink(handle.name)


def requirement_name(requirement: str) -> str:
    """'diffusers<=0.31.0' -> 'diffusers' (the distribution name at the start of a requirement)."""
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return found.group(1) if found else requirement


def canonical(name: str) -> str:
    """PEP 503 normalised name: 'Huggingface_Hub' and 'huggingface-hub' are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def install(needs: list[Need], constraints: str, runner: PipRunner,
            requires: RequirementsReader = declared_requirements,
            version_of: VersionReader = installed_version) -> int:
    """Install the needs without their dependencies, then each missing dependency the same way."""
    batch = [need.install for need in needs]
    for _ in range(MAX_DEPENDENCY_ROUNDS):
        status = pip_install(batch, constraints, runner)
        if status != 0:
            return status
        batch = missing_dependencies([requirement_name(item) for item in batch], requires, version_of)
        if not batch:
            return 0
    return 0


def main(runner: PipRunner = run_pip, versions: Mapping[str, str | None] | None = None,
         platform: str = sys.platform, forge: bool | None = None,
         requires: RequirementsReader = declared_requirements, version_of: VersionReader = installed_version) -> int:
    if versions is None:
        versions = installed_versions(HOST_OWNED + ("diffusers", "peft", "safetensors", "prodigyopt",
                                                    "schedulefree", "bitsandbytes"))
    forge = host_is_forge() if forge is None else forge
    needs = needs_for(versions, platform, forge)
    missing, warnings = plan(needs, versions)
    for warning in warnings:
        print(warning)
    constraints = host_constraints(versions, forge)
    required = [need for need in missing if not need.optional]
    optional = [need for need in missing if need.optional]
    status = 0
    if required:
        print(f"[dreambooth] installing {', '.join(need.install for need in required)}")
        status = install(required, constraints, runner, requires, version_of)
    for need in optional:  # one by one: a missing wheel only costs its own feature
        if install([need], constraints, runner, requires, version_of) != 0:
            print(f"[dreambooth] could not install {need.install}; {need.feature} will be unavailable.")
    return status


if __name__ == "__main__":
    sys.exit(main())
