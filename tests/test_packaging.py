"""What a user who installs unicom from a wheel gets: the recipes, the web page, and commands
that find them without a checkout of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from unicom.engine.recipe import RECIPE_FOLDER, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built by the project's own build backend from a copy of the project."""
    work = tmp_path_factory.mktemp("wheel")
    project = work / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    out = work / "dist"
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_wheel(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_wheel_holds_every_recipe_and_the_web_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"unicom/configs/{path.name}" for path in RECIPE_FOLDER.glob("*.yaml")}
    assert len(recipes) == len(shipped_recipes()) >= 15
    assert recipes <= names
    pages = {f"unicom/search/static/{path.name}" for path in (ROOT / "src/unicom/search/static").iterdir()}
    assert pages and pages <= names


def test_installed_from_the_wheel_the_commands_find_the_recipes_without_a_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    away = tmp_path / "elsewhere"  # no configs/ folder, no source tree around
    away.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import sys, unicom; from unicom.cli import main; from unicom.demo import demo_recipe; "
            "print(unicom.__file__); print(demo_recipe()); sys.exit(main(sys.argv[1:]))")
    listed = subprocess.run([sys.executable, "-c", code, "train", "--list-configs"], cwd=away, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    lines = listed.stdout.splitlines()
    assert Path(lines[0]).is_relative_to(target) and Path(lines[1]) == target / "unicom" / "configs" / "demo.yaml"
    assert [line.split()[0] for line in lines[2:]] == [name for name in shipped_recipes() if not name.startswith("unifex_")]
    printed = subprocess.run([sys.executable, "-c", code, "train", "--config", "finetune_sop", "--print-config"],
                             cwd=away, env=environment, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    from unicom.train.config import load_config, to_yaml

    assert printed.stdout.splitlines()[2:] == to_yaml(load_config("finetune_sop", validate=False)).splitlines()
