"""Layout rules: the packages import each other only as docs/ARCHITECTURE.md's table allows, only the host
adapter touches the web UI, the core imports without gradio, and the extension works whatever folder it is
cloned into."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dreambooth"
SCRIPTS = ROOT / "scripts"
# The web UI's own top-level modules (A1111/SD.Next: modules, launch; Forge adds modules_forge, backend).
HOST_MODULES = {"modules", "launch", "modules_forge", "backend"}
HOST_ADAPTER = PACKAGE / "host" / "webui"
IMPORT_CALLS = {"import_module", "__import__", "find_spec"}


def python_files() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *SCRIPTS.glob("**/*.py")])


def is_host_adapter(path: Path) -> bool:
    return path == HOST_ADAPTER.with_suffix(".py") or HOST_ADAPTER in path.parents


def _string_start(node: ast.expr) -> str | None:
    """The literal text (or literal prefix of an f-string) passed to an import call."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def imported_names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every absolute import, at any depth, including importlib calls with literals."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            text = _string_start(node.args[0])
            if name in IMPORT_CALLS and text:
                yield node.lineno, text


def host_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in imported_names(tree)
            if name.split(".")[0] in HOST_MODULES]


def test_the_scanner_finds_all_import_forms() -> None:
    source = textwrap.dedent("""
        import os, modules.shared
        from launch import args
        def later():
            from modules import script_callbacks
            importlib.import_module(f"modules.{name}")
            __import__("modules_forge.main_entry")
        from .modules import fine
        from modulesx import fine_too
    """)
    tree = ast.parse(source)
    found = [name for _, name in imported_names(tree) if name.split(".")[0] in HOST_MODULES]
    assert found == ["modules.shared", "launch", "modules", "modules.", "modules_forge.main_entry"]


def test_only_the_host_adapter_imports_the_web_ui() -> None:
    offenders = [line for path in python_files() if not is_host_adapter(path) for line in host_imports(path)]
    assert offenders == [], "only dreambooth/host/webui(.py|/) may import the web UI's modules:\n" + \
        "\n".join(offenders)


# --- the allowed-imports table (docs/ARCHITECTURE.md) ------------------------------------------------

ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
TABLE_BEGIN, TABLE_END = "<!-- allowed-imports: begin -->", "<!-- allowed-imports: end -->"
# Imports the table forbids that exist until the code they sit in moves; each entry must still be found
# (so it is deleted as soon as the import goes). (file, unit imported) -> why it is tolerated for now.
PENDING_EXCEPTIONS: dict[tuple[str, str], str] = {}


def allowed_imports() -> dict[str, set[str]]:
    """unit -> the units it may import, from the table in docs/ARCHITECTURE.md."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    rows = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN):text.index(TABLE_END)].strip().splitlines()[2:]
    table: dict[str, set[str]] = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        unit = cells[0].strip("`")
        table[unit] = {name.strip().strip("`") for name in cells[-1].split(",") if name.strip() not in ("", "—")}
    return table


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str, units: set[str]) -> str | None:
    """The table's unit of a dotted module name under `dreambooth` (longest matching prefix)."""
    if module == "dreambooth":
        return "__init__"
    parts = module.split(".")[1:]
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in units:
            return ".".join(parts[:end])
    return None


def package_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module) of every import of `dreambooth` in `path`: relative, absolute, in functions too.

    `from . import x` counts as importing the submodule `x` when it is one, else the package."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for line, name in imported_names(tree):
        if name == "dreambooth" or name.startswith("dreambooth."):
            yield line, name
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield node.lineno, submodule if _is_module(submodule) else target


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_violations() -> dict[tuple[str, str], list[str]]:
    """(file, unit imported) -> 'file:line imports module' for every import the table does not allow."""
    table = allowed_imports()
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = unit_of(module_name(path), set(table))
        for line, name in package_imports(path):
            target = unit_of(name, set(table))
            if target in (source, *table.get(source or "", ())):
                continue
            where = str(path.relative_to(ROOT))
            found.setdefault((where, str(target)), []).append(f"{where}:{line} ({source}) imports {name} ({target})")
    return found


def test_the_table_names_every_unit_and_only_units_that_exist() -> None:
    table = allowed_imports()
    assert {"config", "train", "train.data", "host", "host.base", "ui", "cli"} <= set(table)
    unlisted = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if unit_of(module_name(p), set(table)) is None]
    assert unlisted == [], f"add these to the table in {ARCHITECTURE.name}: {unlisted}"
    named = set(table) | {unit for allowed in table.values() for unit in allowed}
    # families/ is announced in the table before its package lands; every other name must exist.
    missing = [unit for unit in named - {"__init__", "families"}
               if not _is_module("dreambooth." + unit)]
    assert missing == [], f"the table names units that do not exist: {missing}"


def test_the_import_scanner_resolves_relative_imports() -> None:
    lines = [name for _, name in package_imports(PACKAGE / "train" / "trainer.py")]
    assert "dreambooth.atomic" in lines and "dreambooth.train.data" in lines   # from .. import / from . import
    table = set(allowed_imports())
    assert unit_of("dreambooth.train.data.scan", table) == "train.data"
    assert unit_of("dreambooth.train.trainer", table) == "train"
    assert unit_of("dreambooth.host.base", table) == "host.base" and unit_of("dreambooth.host.webui", table) == "host"
    assert unit_of("dreambooth", table) == "__init__"


def test_every_import_follows_the_allowed_imports_table() -> None:
    found = import_violations()
    offenders = [line for key, lines in found.items() if key not in PENDING_EXCEPTIONS for line in lines]
    assert offenders == [], f"imports that {ARCHITECTURE.name}'s table does not allow:\n" + "\n".join(offenders)
    stale = [key for key in PENDING_EXCEPTIONS if key not in found]
    assert stale == [], f"these imports are gone; delete their PENDING_EXCEPTIONS entries: {stale}"


def _imports_in_fresh_process(code: str, cwd: Path, pythonpath: Path) -> set[str]:
    probe = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("code", [
    "import dreambooth",
    "import dreambooth.config, dreambooth.store, dreambooth.train.events",
    "import dreambooth.config.legacy, dreambooth.cli; dreambooth.cli.build_parser()",
])
def test_core_imports_without_gradio_or_web_ui(code: str, tmp_path: Path) -> None:
    modules = _imports_in_fresh_process(code, tmp_path, ROOT)
    assert "gradio" not in modules
    assert not {m for m in modules if m.split(".")[0] in HOST_MODULES}


def test_core_imports_without_torch() -> None:
    modules = _imports_in_fresh_process("import dreambooth.config, dreambooth.store, dreambooth.cli", ROOT, ROOT)
    assert "torch" not in modules


# Top-level names that would tie an import to where or under which name the extension is installed.
FOLDER_BOUND_NAMES = {"extensions", "extensions_builtin", "scripts", "sd_dreambooth_extension",
                      "sd_dreambooth_trainer", ROOT.name.replace("-", "_")}


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_depends_on_the_install_folder(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bound = [f"line {line}: {name}" for line, name in imported_names(tree)
             if name.split(".")[0] in FOLDER_BOUND_NAMES]
    assert bound == []


def test_scripts_find_the_package_relative_to_their_own_file() -> None:
    for script in sorted(SCRIPTS.glob("*.py")):
        text = script.read_text(encoding="utf-8")
        tree = ast.parse(text)
        if any(name.split(".")[0] == "dreambooth" for _, name in imported_names(tree)):
            assert "__file__" in text, f"{script.name} imports dreambooth without locating it from __file__"
        assert "/extensions/" not in text and "\\\\extensions\\\\" not in text, script.name


def test_package_works_from_a_renamed_folder(tmp_path: Path) -> None:
    clone = tmp_path / "Renamed extension (copy) ü"
    shutil.copytree(PACKAGE, clone / "dreambooth", ignore=shutil.ignore_patterns("__pycache__"))
    if SCRIPTS.is_dir():
        shutil.copytree(SCRIPTS, clone / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import dreambooth, dreambooth.cli, dreambooth.config.legacy, pathlib\n"
            f"assert pathlib.Path(dreambooth.__file__).is_relative_to({str(clone)!r}), dreambooth.__file__\n"
            "assert dreambooth.cli.main(['--data-dir', 'd', 'list']) == 0\n")
    _imports_in_fresh_process(code, tmp_path, clone)


def test_scripts_load_from_a_renamed_folder_with_a_stub_web_ui(tmp_path: Path) -> None:
    """Each scripts/*.py runs from a renamed copy, with a permissive stand-in for the web UI's modules."""
    scripts = sorted(SCRIPTS.glob("*.py"))
    clone = tmp_path / "another name"
    shutil.copytree(ROOT / "dreambooth", clone / "dreambooth", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(SCRIPTS, clone / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    stub = tmp_path / "stub"
    (stub / "modules").mkdir(parents=True)
    (stub / "modules" / "__init__.py").write_text(STUB_MODULES)
    for script in scripts:
        copied = clone / "scripts" / script.name
        code = (f"import runpy, sys, pathlib\nsys.path.insert(0, {str(stub)!r})\n"
                f"runpy.run_path({str(copied)!r}, run_name='{script.stem}')\n"
                "import dreambooth\n"
                f"assert pathlib.Path(dreambooth.__file__).is_relative_to({str(clone)!r}), dreambooth.__file__\n")
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=300)
        assert done.returncode == 0, f"{script.name}:\n{done.stderr[-3000:]}"


# A stand-in `modules` package: every submodule and attribute exists and accepts any call.
STUB_MODULES = '''
import importlib.abc, importlib.machinery, sys, types
from unittest import mock


class _Stub(types.ModuleType):
    __path__ = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = mock.MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("modules."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
__path__ = []
def __getattr__(name):
    return importlib.import_module(f"modules.{name}")
'''


# --- dead code ---------------------------------------------------------------------------------------------

VULTURE_WHITELIST = ROOT / "tools" / "vulture_whitelist.py"


def test_vulture_finds_no_dead_code() -> None:
    """Every unused name is removed or listed in tools/vulture_whitelist.py with its reason."""
    pytest.importorskip("vulture", reason="vulture is in the test extra and tools/requirements-*.txt")
    done = subprocess.run([sys.executable, "-m", "vulture", "dreambooth", "scripts", str(VULTURE_WHITELIST)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, "dead code (remove it, or whitelist it with a reason):\n" + done.stdout + done.stderr


def test_every_whitelisted_name_has_a_reason() -> None:
    entries = [line for line in VULTURE_WHITELIST.read_text(encoding="utf-8").splitlines() if line.startswith("_.")]
    assert entries, "the whitelist holds no names"
    unjustified = [line for line in entries if len(line.partition("#")[2].split()) < 4]
    assert unjustified == [], f"whitelisted without a reason: {unjustified}"
