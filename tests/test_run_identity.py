"""Run identity is derived from RunConfig: every setting that changes the numbers is part of it, a --resume that
changes any of them is refused, and execution-only settings may change."""
import dataclasses
import subprocess
import sys
import typing

import pytest
import typer.main

from conftest import TINY, Cli, assert_one_line_error, read_json
from slca_cli.cli import app
from slca_cli.errors import SlcaError
from slca_cli.presets import CHOICES, IDENTITY_FIELDS, RunConfig
from slca_cli.restore import check_same_experiment

BASE = ["--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 4, "--test-per-class", 2]
# Identity fields without a flag of their own (task_sizes comes from --tasks / --init-classes / --increment): the
# fields declared without presets.option (train's options are generated from the declarations, cli.train_signature).
WITHOUT_FLAG = {f.name for f in dataclasses.fields(RunConfig) if "panel" not in f.metadata} & set(IDENTITY_FIELDS)
HINTS = typing.get_type_hints(RunConfig)
OTHER_VALUE = {"dataset": "digits", "backbone": "efficientnet-lite0-in1k", "method": "sl", "num_classes": 6,
               "classes": "0-2", "inflora_threshold": 0.5, "inflora_threshold_end": 0.5}  # their bound is 1


def train_options():
    command = typer.main.get_command(app).commands["train"]
    return {p.name: p for p in command.params if p.param_type_name == "option"}


def changed_flag(name, stored, option):
    """Command-line arguments that set ``name`` to a value other than ``stored``."""
    if name in OTHER_VALUE:
        return [option.opts[0], OTHER_VALUE[name]]
    if option.is_flag:
        return [option.secondary_opts[0] if stored else option.opts[0]]
    if name in CHOICES:
        return [option.opts[0], next(c for c in CHOICES[name] if c != stored)]
    if int in (HINTS[name], *typing.get_args(HINTS[name])):
        return [option.opts[0], 1 if stored is None else stored + 1]
    return [option.opts[0], 0.5 if not stored else stored * 2]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity") / "run"
    code, _, err = Cli()("train", *TINY, *BASE, "--out", out)
    assert code == 0, err
    return out


def test_identity_fields_without_a_flag_are_the_papers_fixed_values():
    assert WITHOUT_FLAG == {"task_sizes", "momentum", "ca_lr", "ca_batch_size", "cov_ridge", "mean", "std"}
    assert "weight_decay" in IDENTITY_FIELDS  # the bug of issue 10: it was missing


def test_resume_refuses_a_change_of_any_identity_flag(finished):
    stored = read_json(finished / "seed-1993" / "config.json")["config"]
    options = train_options()
    base = dict(zip(TINY[0:6:2] + BASE[0::2], TINY[1:6:2] + BASE[1::2]))  # --dataset synthetic ... --num-classes 4
    refused = []
    for name in IDENTITY_FIELDS:
        if name in WITHOUT_FLAG:
            continue
        change = changed_flag(name, stored[name], options[name])
        valued = dict(base, **dict([change])) if len(change) == 2 else base
        if name == "dataset":  # digits has its own classes
            valued = {k: v for k, v in valued.items() if k != "--num-classes"}
        switches = change if len(change) == 1 else []
        code, _, err = Cli()("train", *[x for pair in valued.items() for x in pair], *switches, "--no-progress",
                             "--out", finished, "--resume")
        if name == "image_size":  # vit-tiny-test takes 32 px only: refused before the resume (issue 18, item 11)
            assert_one_line_error(code, err, "--image-size 33 does not fit backbone vit-tiny-test")
        else:
            assert_one_line_error(code, err, "another experiment", f"{name}=")
        refused.append(name)
    assert len(refused) == len(IDENTITY_FIELDS) - len(WITHOUT_FLAG)


def test_execution_settings_may_change_on_resume(finished):
    code, out, err = Cli()("train", *TINY, *BASE, "--out", finished, "--resume", "--precision", "fp32",
                           "--workers", 0, "--checkpoint-every", 1, "--no-compile")
    assert code == 0, err
    assert "resuming" in out


@pytest.mark.parametrize("name", sorted(WITHOUT_FLAG))
def test_identity_fields_without_a_flag_are_compared_too(name, tmp_path):
    cfg = RunConfig(dataset="synthetic", backbone="vit-tiny-test", method="slca", num_classes=4, task_sizes=(2, 2))
    value = getattr(cfg, name)
    other = (3, 1) if name == "task_sizes" else tuple(v * 0.5 for v in value) if isinstance(value, tuple) \
        else value * 2
    with pytest.raises(SlcaError, match=f"{name}="):
        check_same_experiment(cfg, cfg.replace(**{name: other}), tmp_path)


def test_catalog_and_presets_import_without_torch():
    code = ("import sys; import slca_cli.methods.catalog, slca_cli.presets, slca_cli.report; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
