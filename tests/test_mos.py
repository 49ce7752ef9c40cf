"""MOS (methods/mos.py): the adapter merge and the self-refined retrieval in small pieces; the whole CLI: train,
`slca eval`, `slca predict`, SIGKILL inside task 2 + --resume (equal to a straight run), `slca report`, two
processes, `slca export` refusing the plain format; bad flags and a non-ViT backbone in one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from conftest import TINY, assert_one_line_error, read_json
from procs import Running, assert_kill_and_resume_match, train_with_two_processes

from slca_cli import backbones
from slca_cli.methods.adapters import adapted_blocks, adapter_parameters
from slca_cli.methods.mos import MOSBackbone, ensemble, merged, refine
from slca_cli.model import ContinualModel

SMALL = ["--tasks", 2, "--epochs", 1, "--num-classes", 6, "--train-per-class", 8, "--test-per-class", 6,
         "--batch-size", 8, "--ca-epochs", 3]
MOS = [*TINY, *SMALL, "--method", "mos"]
RESULT_KEYS = ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc", "counts", "train_loss")


# ---- math ----

def test_merged_is_the_weighted_mean_of_the_earlier_adapters():
    current, earlier = torch.tensor([1.0, 2.0]), [torch.tensor([3.0, 0.0]), torch.tensor([5.0, 4.0])]
    torch.testing.assert_close(merged(current, earlier, 0.1), 0.9 * current + 0.1 * torch.tensor([4.0, 2.0]))
    assert merged(current, [], 0.1) is current and merged(current, earlier, 0.0) is current


def tiny_mos(tasks=2, classes=4, merge=0.1, ensemble=False):
    torch.manual_seed(0)
    vit = backbones.get_backbone("vit-tiny-test").build(None, False)
    return MOSBackbone(vit, tasks, classes, bottleneck=4, merge=merge, ensemble=ensemble).eval()


def test_merge_adapter_moves_only_the_current_tasks_adapter_in_every_block():
    mos = tiny_mos(tasks=3)
    with torch.no_grad():
        for index in range(3):
            for p in adapter_parameters(mos.vit, index):
                p.copy_(torch.randn_like(p))
    mos.start_task(2)
    assert mos.merging
    for block in adapted_blocks(mos.vit):  # the task starts from the previous task's adapter
        for a, b in zip(block.adapters[2].parameters(), block.adapters[1].parameters()):
            assert torch.equal(a, b)
    before = [[p.detach().clone() for p in block.adapters.parameters()] for block in adapted_blocks(mos.vit)]
    mos.merge_adapter()
    for block, old in zip(adapted_blocks(mos.vit), before):
        per_adapter = len(old) // 3
        first, second, third = old[:per_adapter], old[per_adapter:2 * per_adapter], old[2 * per_adapter:]
        now = list(block.adapters.parameters())
        for k in range(per_adapter):
            assert torch.equal(now[k], first[k]) and torch.equal(now[per_adapter + k], second[k])
            torch.testing.assert_close(now[2 * per_adapter + k], 0.9 * third[k] + 0.05 * (first[k] + second[k]))
    mos.finish_stage1()
    assert not mos.merging


def test_refine_follows_the_heads_until_the_task_is_stable_and_at_most_four_passes():
    task_of = torch.tensor([0, 0, 1, 1, 2, 2])
    eye = torch.eye(6)
    # features[t, b] are logits (classify is the identity): what adapter t makes image b look like
    features = torch.stack([
        torch.stack([eye[1], eye[4], eye[2]]),  # adapter 0
        torch.stack([eye[3], eye[0], eye[0]]),  # adapter 1
        torch.stack([eye[0], eye[5], eye[1]]),  # adapter 2
    ])
    logits, used = refine(torch.tensor([0, 0, 1]), features, lambda f: f, task_of)
    # image 0: adapter 0 predicts class 1 (task 0): stable at once
    # image 1: adapter 0 -> class 4 (task 2); adapter 2 -> class 5 (task 2): stable at adapter 2
    # image 2: adapter 1 -> class 0 (task 0); adapter 0 -> class 2 (task 1); ... flips until the fourth pass
    assert used.tolist() == [0, 2, 0]
    torch.testing.assert_close(logits, torch.stack([eye[1], eye[5], eye[2]]))


def test_retrieval_encodes_each_image_with_the_adapter_of_the_task_the_first_pass_predicts():
    mos = tiny_mos(tasks=2, classes=4)
    model = ContinualModel(mos, mos.num_features)
    model.add_head(2)
    model.add_head(2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prototypes = mos.encode(images, 0)  # class c's prototype: image c's first-pass features
        mos.prototypes.copy_(prototypes)
        weight = nn.functional.normalize(prototypes, dim=1)  # heads that agree with the first pass
        for head, rows in zip(model.task_heads, (weight[:2], weight[2:])):
            head.weight.copy_(rows)
            head.bias.zero_()
        for p in adapter_parameters(mos.vit, 1):  # adapter 1 differs slightly, as a trained one would
            p.add_(torch.randn_like(p) * 1e-3)
        logits, used = mos.retrieve(images, model)
    assert used.tolist() == [0, 0, 1, 1]  # images 0, 1 are task 1's classes, 2, 3 task 2's
    with torch.no_grad():
        want = torch.stack([model.logits(mos.encode(images[i:i + 1], int(used[i])))[0] for i in range(4)])
    torch.testing.assert_close(logits, want)
    assert not torch.equal(logits[2], model.logits(mos.encode(images[2:3], 0))[0])  # really adapter 1's


def test_ensemble_gives_the_mean_of_both_softmaxes_as_log_probabilities():
    logits, first = torch.randn(3, 5), torch.randn(3, 5)
    got = ensemble(logits, first, tasks=3)
    want = (torch.softmax(logits, 1) + torch.softmax(3 * first, 1)) / 2
    torch.testing.assert_close(torch.softmax(got, 1), want)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(3))
    assert torch.isfinite(ensemble(torch.tensor([[1e4, -1e4]]), torch.tensor([[1e4, -1e4]]), 2)).all()


# ---- whole CLI ----

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("mos")
    run = Running(["train", *MOS, "--out", root])
    assert run.finish() == 0, "\n".join(run.lines[-20:])
    return root / "seed-1993"


def test_mos_trains_its_adapters_and_rebuilds_from_the_folder(straight, cli, tmp_path):
    metrics = read_json(straight / "metrics.json")
    assert len(metrics["task_accuracy"]) == 2 and all(0 <= a <= 100 for a in metrics["task_accuracy"])
    config = read_json(straight / "config.json")["config"]
    assert (config["lr_backbone"], config["lr_head"], config["mos_merge"], config["align"]) == (0.03, 0.003, 0.1, True)
    first, second = (load_file(str(straight / f"task-0{t}" / "model.safetensors")) for t in (1, 2))
    adapter = lambda k, i: [n for n in first if f".adapters.{i}." in n and n.endswith(k)]  # noqa: E731
    assert adapter("up.weight", 0) and adapter("up.weight", 1)
    for name in adapter("weight", 0):  # task 1's adapter is frozen in task 2; task 2's trained (it started as 1's)
        assert torch.equal(first[name], second[name]) and torch.count_nonzero(first[name])
    assert any(not torch.equal(second[n], second[n.replace(".adapters.1.", ".adapters.0.")])
               for n in adapter("weight", 1))
    vit = [k for k in first if k.startswith("backbone.vit.") and ".adapters." not in k]
    assert vit and all(torch.equal(first[k], second[k]) for k in vit)
    assert int(second["backbone.task"]) == 1 and second["backbone.prototypes"].abs().sum(1).gt(0).all()
    stats = load_file(str(straight / "task-02" / "stats.safetensors"))
    torch.testing.assert_close(second["backbone.class_means"][3:], stats["means"].float())
    code, stdout, stderr = cli("eval", straight / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0 and json.loads(stdout)["matches_stored"] is True, stderr
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    code, stdout, stderr = cli("predict", straight / "task-02", folder, "--device", "cpu", "--no-progress",
                               "--top-k", 6, "--format", "json")
    assert code == 0, stderr
    predictions = json.loads(stdout)["predictions"]
    assert len(predictions) == 3  # the ensemble's probabilities over all six classes
    assert all(abs(sum(t["probability"] for t in p["top_k"]) - 1) < 1e-4 for p in predictions)
    code, _, stderr = cli("export", straight / "task-02", "--out", tmp_path / "plain")
    assert_one_line_error(code, stderr, "--method mos is not a plain timm model", "--format onnx")


def test_a_killed_mos_run_resumes_to_the_straight_runs_numbers_and_tensors(straight, tmp_path):
    assert_kill_and_resume_match(straight, ["train", *MOS, "--out", tmp_path / "r"], "fit task=2 epoch=1 batch=2",
                                 RESULT_KEYS)


def test_report_has_a_mos_row(straight, cli, tmp_path):
    code, stdout, stderr = cli("report", straight.parent, "--out", tmp_path / "r", "--paper", "--no-figures")
    assert code == 0, stderr
    assert any(line.startswith("| synthetic") and " | MOS | " in line for line in stdout.splitlines()), stdout


def test_mos_runs_with_two_processes(tmp_path, cli):
    """Each test image counted once over both processes (the retrieval runs in each), and the folder scores as
    stored with one process; the separation loss sees the global batch (parity: tests/test_parity.py)."""
    flags = [*MOS, "--train-per-class", 7, "--batch-size", 4]
    train_with_two_processes(flags, tmp_path / "two")
    run = tmp_path / "two" / "seed-1993"
    assert [c["total"] for c in read_json(run / "metrics.json")["counts"]] == [[18], [18, 18]]
    code, stdout, stderr = cli("eval", run / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0 and json.loads(stdout)["matches_stored"] is True, stderr


@pytest.mark.parametrize("flags,fragment", [
    (["--mos-merge", "1.5"], "--mos-merge"),
    (["--adapter-bottleneck", "0"], "--adapter-bottleneck"),
    (["--mos-reg", "-1"], "--mos-reg"),
])
def test_bad_mos_flags_are_one_line_errors(cli, tmp_path, flags, fragment):
    code, _, stderr = cli("train", *MOS, *flags, "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "x").exists()



def test_a_mos_run_cannot_be_continued():
    from slca_cli.errors import SlcaError
    from slca_cli.grow import grown_config
    from slca_cli.presets import DEFAULTS, RunConfig
    cfg = RunConfig(**dict(DEFAULTS, dataset="folder", backbone="vit-tiny-test", method="mos", num_classes=4,
                           task_sizes=(2, 2)))
    with pytest.raises(SlcaError, match="cannot be continued"):
        grown_config(cfg, 2, {})
