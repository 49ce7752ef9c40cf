"""`slca report` and `slca probe` on real (tiny) runs made through the CLI."""
import csv
import json
import shutil
import statistics
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, assert_one_line_error, read_json

SMALL = ["--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 8, "--test-per-class", 4]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """sl with two seeds, slca, sl+CA without logit norm, joint: enough for every table of the report."""
    from conftest import Cli
    root = tmp_path_factory.mktemp("runs")
    commands = {"sl": ["--method", "sl", "--seed", 1, "--seed", 2], "slca": ["--method", "slca", "--seed", 1],
                "sl-ca": ["--method", "sl", "--align", "--no-logit-norm", "--seed", 1],
                "joint": ["--method", "joint", "--seed", 1]}
    for name, flags in commands.items():
        code, _, stderr = Cli()("train", *TINY, *SMALL, *flags, "--out", root / name)
        assert code == 0, stderr
    return root


def test_report_tables_hold_the_numbers_of_the_runs(runs, tmp_path, cli):
    code, stdout, stderr = cli("report", runs, "--out", tmp_path / "report")
    assert code == 0, stderr
    assert "| synthetic | vit-tiny-test | SL | 2 |" in stdout and "## Ablation" in stdout
    record = read_json(tmp_path / "report" / "results.json")
    groups = {g["label"]: g for g in record["groups"]}
    assert set(groups) == {"SL", "SLCA", "SL+CA", "Joint"}
    sl_metrics = [read_json(runs / "sl" / f"seed-{s}" / "metrics.json") for s in (1, 2)]
    assert groups["SL"]["seeds"] == [1, 2]
    for key in ("last_acc", "inc_acc", "forgetting"):
        values = [m[key] for m in sl_metrics]
        assert groups["SL"][key]["values"] == values
        assert groups["SL"][key]["mean"] == statistics.mean(values)
        assert groups["SL"][key]["std"] == statistics.stdev(values)
    assert groups["SL"]["task_accuracy"]["mean"] == [statistics.mean(v) for v in
                                                     zip(*[m["task_accuracy"] for m in sl_metrics])]
    slca = read_json(runs / "slca" / "seed-1" / "metrics.json")
    assert groups["SLCA"]["last_acc"]["values"] == [slca["last_acc"]]
    assert groups["SLCA"]["old_accuracy_last_task"]["values"] == [slca["old_accuracy"][-1]]

    markdown = (tmp_path / "report" / "results.md").read_text()
    sl = groups["SL"]
    assert f"{sl['last_acc']['mean']:.2f} +- {sl['last_acc']['std']:.2f}" in markdown
    ablation = markdown[markdown.index("## Ablation"):]
    assert ablation.index("| SL |") < ablation.index("| SL+CA |") < ablation.index("| SL+CA+LN |")
    assert f"| SL+CA+LN | 1 | {slca['last_acc']:.2f} +- 0.00 | {slca['inc_acc']:.2f} +- 0.00 |" in ablation

    rows = {r["label"]: r for r in csv.DictReader((tmp_path / "report" / "results.csv").open())}
    assert float(rows["SLCA"]["last_acc_mean"]) == pytest.approx(slca["last_acc"], abs=1e-4)
    assert rows["SL"]["seeds"] == "1 2"


def test_report_figures_are_real_images(runs, tmp_path, cli):
    code, _, stderr = cli("report", runs, "--out", tmp_path / "report")
    assert code == 0, stderr
    figures = tmp_path / "report" / "figures"
    curves = figures / "accuracy-synthetic-vit-tiny-test.png"
    matrices = sorted(figures.glob("matrix-*.png"))
    assert curves.is_file() and len(matrices) == 4
    for png in [curves] + matrices:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300
            pixels = np.asarray(image.convert("RGB"), dtype=float)
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
        svg = png.with_suffix(".svg")
        assert ET.parse(svg).getroot().tag.endswith("svg") and "<path" in svg.read_text()
    assert "![accuracy-synthetic-vit-tiny-test](figures/accuracy-synthetic-vit-tiny-test.png)" in \
        (tmp_path / "report" / "results.md").read_text()


def test_report_paper_columns_and_backbone_grouping(runs, tmp_path, cli):
    """Copies of a run relabelled as CIFAR-100 on two backbones exercise --paper and the backbone table."""
    for backbone in ("vit-tiny-test", "other-backbone"):
        folder = tmp_path / "runs" / backbone / "seed-1"
        shutil.copytree(runs / "slca" / "seed-1", folder)
        for name in ("config.json", "metrics.json"):
            data = read_json(folder / name)
            target = data.get("config", data)
            target.update(dataset="cifar100", backbone=backbone)
            (folder / name).write_text(json.dumps(data))
    code, stdout, stderr = cli("report", tmp_path / "runs", "--out", tmp_path / "report", "--paper", "--no-figures")
    assert code == 0, stderr
    assert "paper Last-Acc" in stdout and "| 91.53 | 94.09 |" in stdout
    assert "## By backbone: cifar100" in stdout and "| method (Last-Acc) | other-backbone | vit-tiny-test |" in stdout
    record = read_json(tmp_path / "report" / "results.json")
    assert record["groups"][0]["paper"] == {"last_acc": 91.53, "inc_acc": 94.09, "from_figure": False}


def test_report_leaves_out_unfinished_runs_and_refuses_empty_input(runs, tmp_path, cli):
    shutil.copytree(runs / "slca", tmp_path / "partial")
    metrics = read_json(tmp_path / "partial" / "seed-1" / "metrics.json")
    metrics.update(tasks_done=1, task_accuracy=metrics["task_accuracy"][:1])
    (tmp_path / "partial" / "seed-1" / "metrics.json").write_text(json.dumps(metrics))
    code, stdout, stderr = cli("report", tmp_path / "partial", runs / "sl", "--out", tmp_path / "r", "--no-figures")
    assert code == 0 and "unfinished" in stderr and "| SLCA |" not in stdout
    code, _, err = cli("report", tmp_path / "nothing-here", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = cli("report", tmp_path / "empty", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "no finished runs", "slca train")


def test_probe_beside_the_own_classifier_and_joint(runs, cli, tmp_path):
    code, stdout, stderr = cli("probe", runs / "sl", "--joint", runs / "joint", "--device", "cpu", "--no-progress")
    assert code == 0, stderr
    assert "own classifier" in stdout and "linear probe" in stdout and "joint" in stdout and "mean" in stdout
    code, stdout, stderr = cli("probe", runs / "sl" / "seed-1", "--classifier", "ridge", "--json", "--device", "cpu",
                               "--no-progress", "--joint", runs / "joint")
    assert code == 0, stderr
    result = json.loads(stdout)
    probe = result["results"][0]
    metrics = read_json(runs / "sl" / "seed-1" / "metrics.json")
    assert probe["own_accuracy"] == metrics["last_acc"] and probe["classes"] == 4 and probe["task"] == 2
    assert 0 <= probe["probe_accuracy"] <= 100 and probe["test_images"] == 16 and probe["train_images"] == 32
    assert result["joint_last_acc"] == {"1": read_json(runs / "joint" / "seed-1" / "metrics.json")["last_acc"]}
    assert read_json(runs / "sl" / "seed-1" / "probe.json")["probe_accuracy"] == probe["probe_accuracy"]
    code, stdout, _ = cli("report", runs / "sl", "--out", tmp_path / "r", "--no-figures")
    probes = [read_json(runs / "sl" / f"seed-{s}" / "probe.json")["probe_accuracy"] for s in (1, 2)]
    assert code == 0 and "linear probe" in stdout
    assert f"{statistics.mean(probes):.2f} +- {statistics.stdev(probes):.2f} |" in stdout
    code, _, err = cli("probe", runs / "sl", "--joint", runs / "slca", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "--joint", "'slca' run")


def test_linear_probe_math():
    from slca_cli.probe import fit_ridge, probe_accuracy
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8)) * 6
    labels = np.repeat(np.arange(5), 30)
    x = centres[labels] + rng.normal(size=(150, 8))
    train = (torch.tensor(x[::2], dtype=torch.float32), torch.tensor(labels[::2]))
    test = (torch.tensor(x[1::2], dtype=torch.float32), torch.tensor(labels[1::2]))
    assert probe_accuracy(train, test, 5, "logistic") == 100.0
    assert probe_accuracy(train, test, 5, "ridge") == 100.0
    weight, bias = fit_ridge(train[0], train[1], 5, ridge=2.0)
    xc = x[::2] - x[::2].mean(0)
    y = np.eye(5)[labels[::2]]
    expected = np.linalg.solve(xc.T @ xc + 2.0 * np.eye(8), xc.T @ (y - y.mean(0))).T
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), y.mean(0) - expected @ x[::2].mean(0), rtol=1e-4, atol=1e-5)
