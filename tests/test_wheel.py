"""The built wheel works on its own: it carries the data manifests (issue 11).

Before, the manifests lived in ``data_manifests/`` at the repository root, outside the
package, so ``interptool data check`` found none after ``pip install interptool``. This test
builds a wheel from a copy of the sources, installs it into a fresh virtual environment that
borrows the already installed dependencies (torch etc. are not reinstalled), and runs the CLI
there from a folder outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted(p.name for p in (REPO / "interptool" / "manifests").glob("*.toml"))


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_ships_manifests_and_data_check_works(tmp_path):
    assert len(MANIFESTS) >= 6  # broden1_224/227, cifar10/100, concept_world, imagenet1k_val
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")

    # 1. build from a copy, so that build/ and *.egg-info never land in the shared checkout
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO / "interptool", src / "interptool",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          str(src), "-w", str(dist)], tmp_path, env)
    wheels = list(dist.glob("interptool-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as z:
        shipped = sorted(Path(n).name for n in z.namelist()
                         if n.startswith("interptool/manifests/") and n.endswith(".toml"))
    assert shipped == MANIFESTS

    # 2. a fresh venv; the project's site-packages are appended (a plain path line in a .pth
    # file: its own .pth files, e.g. the editable install's, are not processed), so the
    # wheel's copy of interptool is the only one importable.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
         tmp_path, env)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp_path, env).stdout.strip()
    Path(purelib, "zz_interptool_test_deps.pth").write_text(sysconfig.get_paths()["purelib"]
                                                             + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheels[0])], tmp_path, env)

    # 3. the installed package, run from outside the checkout
    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(py), "-c", "import interptool; print(interptool.__file__)"], work, env)
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve())
    listed = _run([str(py), "-m", "interptool", "data", "manifests"], work, env).stdout
    for name in MANIFESTS:
        assert name[:-5] in listed, listed
    assert str(Path(purelib, "interptool", "manifests")) in listed
    assert str(REPO) not in listed
    cw = work / "cw"
    _run([str(py), "-m", "interptool", "data", "make", "concept-world", "--out", str(cw),
          "--n", "4", "--size", "16", "--quiet"], work, env)
    check = _run([str(py), "-m", "interptool", "data", "check", "concept_world", str(cw)],
                 work, env).stdout
    assert f"OK: {cw} matches manifest concept_world" in check
    # a broken copy is still caught by the installed checker (exit 2)
    (cw / "index.csv").unlink()
    bad = subprocess.run([str(py), "-m", "interptool", "data", "check", "concept_world",
                          str(cw)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "index.csv: missing" in bad.stdout
