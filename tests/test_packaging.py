"""The wheel installs slca_cli (with slca_cli.backbones, py.typed) and no top-level `backbones`; a source tree finds
slca_cli.backbones in the repository's backbones/ folder; __version__ is the package metadata's."""
import re
import subprocess
import sys
import zipfile

import pytest

import slca_cli
from tests.conftest import REPO


def pyproject_version():
    return re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)


def test_the_source_tree_version_is_pyprojects():
    assert slca_cli.__version__ == pyproject_version()


def test_a_source_tree_run_finds_slca_cli_backbones_in_the_top_level_folder(tmp_path):
    code = "import slca_cli.backbones as b, slca_cli.backbones.vit as v; print(b.__file__); print(v.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(REPO / "backbones" / "__init__.py"), "slca_cli.backbones.vit"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                            str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    return next(out.glob("slca-*.whl"))


def test_the_wheel_holds_slca_cli_backbones_and_no_top_level_backbones(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"slca_cli", f"slca-{pyproject_version()}.dist-info"}, tops
    assert {"slca_cli/backbones/__init__.py", "slca_cli/backbones/vit.py", "slca_cli/py.typed",
            "slca_cli/data/__init__.py", "slca_cli/methods/__init__.py"} <= set(names)
    # Every Python file of the repository's packages is in the wheel.
    for folder, prefix in ((REPO / "slca_cli", "slca_cli"), (REPO / "backbones", "slca_cli/backbones")):
        for path in folder.rglob("*.py"):
            assert f"{prefix}/{path.relative_to(folder).as_posix()}" in names, path


def test_the_unpacked_wheel_imports_and_reports_its_metadata_version(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import importlib.metadata, importlib.util, slca_cli, slca_cli.backbones as b; "
            "print(b.__file__); print(slca_cli.__version__, importlib.metadata.version('slca')); "
            "spec = importlib.util.find_spec('backbones'); print(spec.origin if spec else None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    path, versions, top = done.stdout.strip().splitlines()
    assert path == str(site / "slca_cli" / "backbones" / "__init__.py")
    assert versions == f"{pyproject_version()} {pyproject_version()}"
    assert not top.startswith(str(site))  # (an editable checkout in this environment may provide its own)
