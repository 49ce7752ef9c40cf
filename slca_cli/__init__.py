"""slca: class-incremental learning on pre-trained vision models with SLCA (Slow Learner + Classifier Alignment)."""
import importlib.abc
import importlib.util
import re
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SOURCE_ROOT = _HERE.parent


def _version() -> str:
    """The version of the code being run: pyproject.toml's in a source tree (also editable installs), else the
    installed distribution's metadata."""
    pyproject = _SOURCE_ROOT / "pyproject.toml"
    if pyproject.is_file() and (_SOURCE_ROOT / "backbones" / "__init__.py").is_file():
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        if found:
            return found.group(1)
    try:
        from importlib.metadata import version
        return version("slca")
    except Exception:  # neither a source tree nor installed (e.g. copied files)
        return "0+unknown"


__version__ = _version()


class _SourceTreeBackbones(importlib.abc.MetaPathFinder):
    """``slca_cli.backbones`` in a source tree: the wheel installs the repository's top-level ``backbones/``
    folder as ``slca_cli/backbones/``; running from the repository (``PYTHONPATH=.``) finds it here instead."""

    def find_spec(self, name, path=None, target=None):
        folder = _SOURCE_ROOT / "backbones"
        if name != __name__ + ".backbones" or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if not (_HERE / "backbones").is_dir() and not any(isinstance(f, _SourceTreeBackbones) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceTreeBackbones())  # before an editable install of another checkout
