"""`pip install .`: the wheel holds the library and the embedded tiny model, and an installed copy answers from its own
files, away from the clone it was built from."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "There is a large red star on the left. What colour is the star?"  # the README's example


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_names_every_package_of_the_library():
    listed = set(_setuptools_table()["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "adapter").rglob("__init__.py")}
    assert listed == on_disk | {"adapter.tiny.shipped"}
    assert (ROOT / _setuptools_table()["package-dir"]["adapter.tiny.shipped"] / "base" / "params.json").is_file()


def _requirements(lines: list[str]) -> dict[str, SpecifierSet]:
    return {(r := Requirement(line)).name: r.specifier for line in lines}


def _wheel(tmp_path: Path) -> Path:
    """A wheel built, offline, from a copy of the files pyproject.toml names (the build writes into its source)."""
    source = tmp_path / "source"
    for folder in ("adapter", "assets/tiny"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheel"), str(source)], env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("llama_adapter-*.whl")
    return wheel


def test_an_installed_package_answers_from_its_own_copy_of_the_tiny_model(tmp_path):
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {f"adapter/tiny/shipped/{path.relative_to(ROOT / 'assets/tiny').as_posix()}"
               for path in (ROOT / "assets/tiny").rglob("*") if path.is_file()}
    assert shipped <= names and "adapter/tiny/shipped/base/consolidated.00.pth" in shipped
    assert {"adapter/model.py", "adapter/formats/peft.py", "adapter/finetune/trainer.py"} <= names
    assert not any(name.startswith(("tests/", "bench/", "app.py", "assets/")) for name in names)
    required = [line.split(":", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    wanted = [line.split(" #")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert _requirements(required) == _requirements(wanted) and len(wanted) > 10

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                                str(site), str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    script = ("import importlib, pkgutil, adapter, adapter.tiny.assets as a; print(adapter.__file__); print(a.ASSETS); "
              "print(','.join(info.name for info in pkgutil.walk_packages(adapter.__path__, 'adapter.') "
              "if not info.name.endswith('__main__') and importlib.import_module(info.name))); "  # none needs the clone
              f"m = adapter.load('tiny'); print(m.generate(adapter.alpaca({QUESTION!r}), temperature=0.0))")
    run = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    module, assets, imported, answer = run.stdout.splitlines()
    modules = {name.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for name in names
               if name.endswith(".py") and not name.endswith("__main__.py")}
    assert set(imported.split(",")) == modules - {"adapter"} and "adapter.tiny.report" in modules
    assert Path(module) == site / "adapter" / "__init__.py"
    assert Path(assets) == site / "adapter" / "tiny" / "shipped"
    assert answer == "red"
    command = subprocess.run([sys.executable, "-m", "adapter.generate", "--base", "tiny", "--prompt", QUESTION,
                              "--temperature", "0", "--gate-sweep", "0,1", "--max-new-tokens", "4"], cwd=elsewhere,
                             env=env, capture_output=True, text=True)
    assert command.returncode == 0, command.stderr
    assert "--- gate scale 1\nred\n" in command.stdout
