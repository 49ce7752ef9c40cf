"""CONTRIBUTING's "add a method" in its two steps: one module with a Method subclass, one catalog entry; nothing
else is touched, and the method runs end to end through the CLI (train, methods, eval, report)."""
import importlib
import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, read_json
from slca_cli.methods import METHODS, get_method, register_method
from slca_cli.methods.catalog import MethodSpec, Published

MODULE = '''
"""Heads only: a frozen backbone whose current head trains at ten times the head rate."""
from slca_cli.methods.base import Method, recipe_from_config


class HeadsOnly(Method):
    def recipe(self, model, task, cfg):
        head = {"params": list(model.task_heads[task].parameters()), "lr": 10 * cfg.lr_head}
        return recipe_from_config([head], cfg, frozen_modules=(model.backbone,))
'''


@pytest.fixture
def throwaway_method(tmp_path, monkeypatch):
    """Step 1: the module (in a temporary folder); step 2: its catalog entry."""
    (tmp_path / "throwaway_method.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("throwaway_method")
    register_method(MethodSpec("heads-only", "Heads only", "frozen backbone, the current head at 10x its rate",
                               lambda: module.HeadsOnly, presets=dict(fresh_norm=False),
                               paper={"synthetic": Published(12.5)}, source="a test"))
    yield module
    METHODS.pop("heads-only")
    get_method.cache_clear()
    sys.modules.pop("throwaway_method", None)


def test_a_method_is_one_module_and_one_catalog_entry(throwaway_method, cli, tmp_path):
    code, stdout, _ = cli("methods")
    assert code == 0 and "heads-only (Heads only)" in stdout
    out = tmp_path / "run"
    code, stdout, stderr = cli("train", *TINY, "--method", "heads-only", "--tasks", 2, "--epochs", 1,
                               "--num-classes", 4, "--train-per-class", 8, "--test-per-class", 4, "--out", out)
    assert code == 0, stderr
    run = out / "seed-1993"
    config = read_json(run / "config.json")["config"]
    assert config["method"] == "heads-only" and config["fresh_norm"] is False  # the entry's presets
    first, second = (load_file(str(run / f"task-{t:02d}" / "model.safetensors")) for t in (1, 2))
    backbone = [k for k in first if k.startswith("backbone.")]
    # The module's recipe ran: the base class's would train the backbone at lr_backbone (1e-4).
    assert backbone and all(torch.equal(first[k], second[k]) for k in backbone)
    code, stdout, stderr = cli("eval", run / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0 and json.loads(stdout)["matches_stored"] is True, stderr
    code, stdout, stderr = cli("report", out, "--out", tmp_path / "report", "--paper", "--no-figures")
    assert code == 0, stderr
    assert "| Heads only |" in stdout and "12.50" in stdout  # label and paper numbers from the entry
