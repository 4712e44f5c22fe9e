"""The guards of the layering: lint coverage, the import contracts, the package tree.

``make test`` runs ruff and ``lint-imports`` before pytest; these tests repeat the
checks so that a bare ``pytest`` fails on a broken contract too, and they check
what neither tool can: that ruff sees every tracked file, that the library
contract lists every library module, and that no build folder hides in the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "thrifty"
SYSTEMS = ("mergecomp", "bytecomp", "zen", "lazarus", "marconi")
BUILD_FOLDER_NAMES = {"dist", "build"}


def _tool(name: str) -> str | None:
    """The venv's own executable if there is one, else the one on PATH."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def _contract(name: str) -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for contract in config["tool"]["importlinter"]["contracts"]:
        if contract["name"] == name:
            return contract
    raise AssertionError(f"pyproject.toml has no import-linter contract named {name!r}")


def _package_modules() -> set[str]:
    """Every module of ``thrifty`` by dotted name, packages by their own name."""
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def _is_benchmark_side(module: str) -> bool:
    """The command line, the tour, the harness and each system's ``benchmark``."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("cli", "demo", "bench"):
        return True
    return len(parts) >= 3 and parts[1] in SYSTEMS and parts[2] == "benchmark"


def test_ruff_checks_every_tracked_python_file() -> None:
    ruff, git = _tool("ruff"), shutil.which("git")
    if ruff is None or git is None:
        pytest.skip(f"needs ruff and git (ruff: {ruff}, git: {git})")
    listed = subprocess.run(
        [git, "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    tracked = {ROOT / line for line in listed.stdout.splitlines()}
    shown = subprocess.run(
        [ruff, "check", "--show-files", "."], cwd=ROOT, capture_output=True, text=True, check=True
    )
    checked = {Path(line.strip()) for line in shown.stdout.splitlines() if line.strip()}
    unchecked = sorted(str(p.relative_to(ROOT)) for p in tracked - checked if p.exists())
    assert not unchecked, f"ruff does not check these tracked files: {unchecked}"


def test_import_contracts_hold() -> None:
    lint_imports = _tool("lint-imports")
    if lint_imports is None:
        pytest.skip("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"an import contract is broken:\n{result.stdout}{result.stderr}"


def test_library_contracts_list_every_library_module() -> None:
    """A new library module must be named in the no-benchmark contracts, or it goes unchecked."""
    library = _contract("Library code imports no benchmark code")
    packages = _contract("Importing thrifty or a system loads no benchmark code")
    assert library.get("as_packages", True) and not packages["as_packages"]
    as_packages = library["source_modules"]
    exact = set(packages["source_modules"])

    def listed(module: str) -> bool:
        return module in exact or any(
            module == source or module.startswith(source + ".") for source in as_packages
        )

    missing = sorted(m for m in _package_modules() if not _is_benchmark_side(m) and not listed(m))
    assert not missing, (
        f"library modules missing from the no-benchmark contracts in pyproject.toml: {missing}"
    )
    stale = sorted(
        s for s in [*as_packages, *exact] if s not in _package_modules() or _is_benchmark_side(s)
    )
    assert not stale, (
        f"no-benchmark contracts name modules that are gone or benchmark-side: {stale}"
    )


def test_no_build_folder_inside_the_package() -> None:
    """``thrifty/dist`` (the old name of comm and sync) or a build output must not ship."""
    found = sorted(
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*")
        if p.is_dir() and p.name in BUILD_FOLDER_NAMES
    )
    assert not found, f"build-like folders inside the package: {found}"


def test_every_package_folder_is_a_regular_package() -> None:
    """Nothing ships by accident: a stray folder (one left holding only ``__pycache__``,
    say) would otherwise be found as a namespace package."""
    bare = sorted(
        str(p.relative_to(ROOT))
        for p in [PACKAGE, *PACKAGE.rglob("*")]
        if p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").exists()
    )
    assert not bare, f"folders in thrifty/ that are not packages: {bare}"
