"""A script copied alone next to common.py into another repository: it runs there, and its PEP 723 header
(`uv run script.py`) names every package it and common.py import."""
import ast
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["vit_scratch", "cnn_baseline", "clip_zeroshot", "lora_caption"]
# import name -> the distribution that provides it
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}
STDLIB = set(sys.stdlib_module_names)
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the scripts themselves run on 3.10


def header(path):
    """The `# /// script` block of a file, as PEP 723 defines it, parsed as TOML."""
    match = re.search(r"(?m)^# /// script$\s(?P<content>(^#(| .*)$\s)+)^# ///$", path.read_text())
    assert match, f"{path.name} has no PEP 723 header"
    return tomllib.loads("".join(line[2:] + "\n" for line in match["content"].splitlines()))


def imported_packages(path):
    """Top-level package names of every import in the file, including those inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in STDLIB and n != "common"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_header_names_every_package_the_script_and_common_import(name):
    meta = header(ROOT / f"{name}.py")
    declared = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in meta["dependencies"]}
    needed = imported_packages(ROOT / f"{name}.py") | imported_packages(ROOT / "common.py")
    missing = {DISTRIBUTIONS.get(n, n).lower() for n in needed} - declared
    assert not missing, f"{name}.py's header lacks {sorted(missing)}"
    assert meta["requires-python"].startswith(">=")


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_script_copied_alone_with_common_runs(name, tmp_path):
    for file in (f"{name}.py", "common.py"):
        shutil.copy(ROOT / file, tmp_path / file)
    proc = subprocess.run([sys.executable, f"{name}.py", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "examples:" in proc.stdout
