"""pyproject.toml's extras and every documented install command: exactly one ONNX Runtime, no pycuda.

``onnxruntime`` and ``onnxruntime-gpu`` install the same ``onnxruntime`` package directory, so a set
holding both ends up with whichever pip wrote last; pycuda has no Linux wheels and fails to build on
a driver-only host. An install set is the base dependencies plus the extras a command names
(``pip install -e '.[cpu,dev]'``, ``pip install 'resdeploy[gpu]'``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from backends.cuda_binding import INSTALL_HINT
from predict.ray_engine import INSTALL as RAY_INSTALL

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = ["README.md", "Makefile", ".ci/run", "bench/gpu.sh", "docs/*.md"]
ONNXRUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
TARGET = re.compile(r"^(\.|resdeploy)(?:\[([^\]]*)\])?$")  # `.`, `.[a,b]`, `resdeploy`, `resdeploy[a]`


def _name(requirement: str) -> str:
    """The canonical project name of a requirement string (PEP 503: lower case, runs of -_. as -)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a project name from requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def install_set(project: dict, extras: list[str]) -> set[str]:
    """Names installed by the base dependencies plus ``extras`` (an extra naming resdeploy[...] expands)."""
    optional = project.get("optional-dependencies", {})
    names, todo, seen = set(), list(project.get("dependencies", [])), set()
    for extra in extras:
        assert extra in optional, f"extra {extra!r} is not defined in pyproject.toml ({sorted(optional)})"
        todo += optional[extra]
    while todo:
        requirement = todo.pop()
        name = _name(requirement)
        if name == _name(project["name"]):  # a self-reference, e.g. "resdeploy[cpu]"
            named = re.search(r"\[([^\]]*)\]", requirement)
            for extra in {e.strip() for e in named.group(1).split(",")} - seen if named else ():
                seen.add(extra)
                todo += optional[extra]
        else:
            names.add(name)
    return names


def problems(names: set[str]) -> list[str]:
    """What is wrong with an install set: pycuda in it, or not exactly one ONNX Runtime."""
    found = []
    if "pycuda" in names:
        found.append("pycuda (no Linux wheels; cuda-python is the binding, pycuda stays the user's choice)")
    runtimes = sorted(names & ONNXRUNTIMES)
    if len(runtimes) != 1:
        found.append(f"ONNX Runtime packages {runtimes}, not exactly one of {sorted(ONNXRUNTIMES)}")
    return found


def install_commands(text: str) -> list[tuple[int, str, list[str]]]:
    """``(line, command, extras)`` for each `pip install` in ``text`` that installs this project."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in re.finditer(r"pip3? install\b([^`\n]*)", line):
            command = match.group(0).strip()
            try:
                tokens = shlex.split(match.group(1))
            except ValueError:  # an unbalanced quote in prose
                tokens = match.group(1).split()
            for token in tokens:
                target = TARGET.match(token.strip("'\""))
                if target:
                    extras = [e.strip() for e in (target.group(2) or "").split(",") if e.strip()]
                    found.append((lineno, command, extras))
    return found


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _documented() -> list[tuple[str, str, list[str]]]:
    files = sorted({p for pattern in DOCUMENTED for p in ROOT.glob(pattern) if p.is_file()})
    commands = [(f"{p.relative_to(ROOT)}:{line}", command, extras)
                for p in files for line, command, extras in install_commands(p.read_text())]
    commands += [("backends/cuda_binding.py:INSTALL_HINT", c, e) for _, c, e in install_commands(INSTALL_HINT)]
    commands += [("predict/ray_engine.py:INSTALL", c, e) for _, c, e in install_commands(RAY_INSTALL)]
    return commands


DOCUMENTED_COMMANDS = _documented()


def test_the_scan_finds_the_setup_and_gpu_commands():
    where = {w.split(":")[0] for w, _, _ in DOCUMENTED_COMMANDS}
    assert {"Makefile", "backends/cuda_binding.py", "predict/ray_engine.py"} <= where, DOCUMENTED_COMMANDS
    assert ["cpu", "dev", "ray"] in [e for _, _, e in DOCUMENTED_COMMANDS]  # make setup and the README


@pytest.mark.parametrize("where, command, extras", DOCUMENTED_COMMANDS, ids=[w for w, _, _ in DOCUMENTED_COMMANDS])
def test_every_documented_install_gets_one_onnxruntime_and_no_pycuda(where, command, extras):
    assert not problems(install_set(_pyproject(), extras)), f"{where}: `{command}`"


def test_extras_cpu_and_gpu_each_bring_one_runtime_and_gpu_brings_the_cuda_binding():
    project = _pyproject()
    assert not (set(map(_name, project["dependencies"])) & (ONNXRUNTIMES | {"pycuda"}))
    assert install_set(project, ["cpu"]) & ONNXRUNTIMES == {"onnxruntime"}
    gpu = install_set(project, ["gpu"])
    assert gpu & ONNXRUNTIMES == {"onnxruntime-gpu"} and {"tensorrt", "cuda-python"} <= gpu
    assert not install_set(project, ["dev"]) & (ONNXRUNTIMES | {"pycuda"})  # test tools only
    for extra in project["optional-dependencies"]:
        assert "pycuda" not in install_set(project, [extra]), extra


@pytest.mark.parametrize("plant, want", [
    (lambda p: p["dependencies"].append("onnxruntime>=1.18"), "not exactly one"),  # base + gpu: both
    (lambda p: p["optional-dependencies"]["gpu"].append("pycuda>=2024.1"), "pycuda"),
    (lambda p: p["optional-dependencies"]["gpu"].remove("onnxruntime-gpu>=1.18"), r"\[\], not exactly one"),
    (lambda p: p["optional-dependencies"]["gpu"].append("resdeploy[cpu]"), "not exactly one"),
])
def test_the_check_catches_a_planted_mistake(plant, want):
    project = _pyproject()
    plant(project)
    assert re.search(want, " ".join(problems(install_set(project, ["gpu", "dev"]))))


def test_the_scanner_reads_the_forms_of_an_install_command():
    text = ("Run `pip install -e '.[cpu,dev]'`, or `pip install \"resdeploy[gpu]\"` or pip install .\n"
            "not this one: pip install nncf onnxruntime==1.32.0\n")
    assert [(line, extras) for line, _, extras in install_commands(text)] == [(1, ["cpu", "dev"]), (1, ["gpu"]),
                                                                             (1, [])]
