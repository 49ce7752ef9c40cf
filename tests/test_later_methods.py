"""The methods later papers compare against (issue 22): CoFiMA, APER (fine-tuning variant), CODA-Prompt.

Their math in small pieces; each through the whole CLI: train, `slca eval`, SIGKILL inside task 2 + --resume (equal
to a straight run bit for bit), `slca report --paper`; CoFiMA under two processes; bad flags and backbones in one
line."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import REPO, TINY, assert_one_line_error, read_json
from procs import assert_evaluates_as_stored, assert_kill_and_resume_match, launch_two, train_each

from slca_cli.methods.base import Stage1Inputs
from slca_cli.methods.coda import component_weights, gram_schmidt_rows, orthogonality_penalty
from slca_cli.methods.cofima import diagonal_fisher, fisher_merge
from slca_cli.model import ContinualModel

SMALL = ["--tasks", 2, "--epochs", 1, "--num-classes", 6, "--train-per-class", 8, "--test-per-class", 6,
         "--batch-size", 8]
METHODS = {"cofima": ["--method", "cofima"],
           "aper": ["--method", "aper"],
           "coda-prompt": ["--method", "coda-prompt", "--prompt-pool", 10]}
KILL_AT = {"cofima": "fisher task=2", "aper": "evaluate task=2", "coda-prompt": "fit task=2 epoch=1 batch=2"}
LABELS = {"cofima": "CoFiMA", "aper": "APER (finetune)", "coda-prompt": "CODA-Prompt"}
RESULT_KEYS = ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc", "counts", "train_loss")


# ---- math ----

def test_fisher_merge_is_the_weighted_average_and_keeps_unreached_entries():
    prev, new = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([3.0, 2.0, -1.0, 8.0])
    f_prev, f_new = torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    merged = fisher_merge(prev, new, f_prev, f_new, 0.4)
    want = torch.tensor([(0.6 * 1 + 0.4 * 3) / 1.0, 2.0, 3.0, 8.0])  # the last: no Fisher at all, the new value
    torch.testing.assert_close(merged, want)
    assert torch.isfinite(merged).all()


def stub_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True)


def test_diagonal_fisher_is_the_mean_squared_batch_gradient_clamped():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
    model = ContinualModel(backbone, 4)
    model.add_head(2)
    model.add_head(3)
    batches = [(torch.randn(4, 5), torch.tensor([0, 1, 4, 2])), (torch.randn(3, 5), torch.tensor([3, 3, 0]))]
    want = {n: torch.zeros_like(p) for n, p in backbone.named_parameters()}
    for images, labels in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(images), labels),
                                    list(backbone.parameters()))
        for (n, _), g in zip(backbone.named_parameters(), grads):
            want[n] += g ** 2 / len(batches)
    fisher = diagonal_fisher(model, batches, stub_accelerator(), clamp=1e9)
    for name in want:
        torch.testing.assert_close(fisher[name], want[name])
    clamped = diagonal_fisher(model, batches, stub_accelerator(), clamp=1e-6)
    assert all(float(v.max()) <= 1e-6 for v in clamped.values())
    assert not any(p.requires_grad for p in model.parameters())  # left frozen, as stage 1 leaves it


def test_cofima_merges_the_backbone_with_the_previous_task_and_returns_the_new_fisher():
    from slca_cli.methods import get_method
    from slca_cli.presets import DEFAULTS, RunConfig
    torch.manual_seed(0)
    cfg = RunConfig(**dict(DEFAULTS, dataset="synthetic", backbone="x", method="cofima", num_classes=5,
                           task_sizes=(2, 3), fisher_max=1e9))
    model = ContinualModel(nn.Sequential(nn.Linear(5, 4), nn.Tanh()), 4)
    model.add_head(2)
    method = get_method("cofima")
    previous = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    model.add_head(3)
    method.start_task(model, 1, cfg)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))  # "stage 1"
    trained = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    batches = [(torch.randn(4, 5), torch.tensor([0, 1, 4, 2]))]
    old_fisher = {n: torch.rand_like(p) for n, p in previous.items()}
    state = method.after_stage1(model, 1, cfg, Stage1Inputs(lambda: batches, stub_accelerator(), 2,
                                                            {f"fisher.{k}": v for k, v in old_fisher.items()},
                                                            lambda _: None, False))
    new_fisher = {k[len("fisher."):]: v for k, v in state.items()}
    assert set(new_fisher) == set(previous)
    for n, p in model.backbone.named_parameters():
        torch.testing.assert_close(p, fisher_merge(previous[n], trained[n], old_fisher[n], new_fisher[n], 0.4))


def test_gram_schmidt_adds_unit_rows_orthogonal_to_the_earlier_ones():
    rows = gram_schmidt_rows(torch.zeros(6, 2, 5), 0, 3)
    rows = gram_schmidt_rows(rows, 3, 6)
    flat = rows.reshape(6, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(6), atol=1e-5, rtol=0)
    assert float(orthogonality_penalty(rows)) < 1e-10


def test_coda_component_weights_are_cosines_of_the_attended_query_and_the_keys():
    q, a, k = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 4)
    want = torch.stack([torch.nn.functional.cosine_similarity((q[b] * a), k, dim=1) for b in range(3)])
    torch.testing.assert_close(component_weights(q, a, k), want)


# ---- whole CLI ----

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run per method (one process for them all)."""
    table = {name: [*TINY, *SMALL, *flags] for name, flags in METHODS.items()}
    return train_each(tmp_path_factory.mktemp("later"), table)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_evaluates_and_resumes_after_a_kill(straight, tmp_path, cli, name):
    want = straight / name / "seed-1993"
    assert_evaluates_as_stored(cli, want)
    # SIGKILL inside task 2, then --resume: the same numbers and the same tensors as the straight run.
    args = ["train", *TINY, *SMALL, *METHODS[name], "--out", tmp_path / name]
    assert_kill_and_resume_match(want, args, KILL_AT[name], RESULT_KEYS)


def test_cofima_stores_each_tasks_clamped_fisher_and_merges_after_stage_one(straight):
    run = straight / "cofima" / "seed-1993"
    first, second = (load_file(str(run / f"task-0{t}" / "stats.safetensors")) for t in (1, 2))
    model = load_file(str(run / "task-02" / "model.safetensors"))
    backbone = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    for stats in (first, second):
        fisher = {k[len("method.fisher."):]: v for k, v in stats.items() if k.startswith("method.fisher.")}
        assert fisher.keys() == backbone.keys()
        assert all(fisher[k].shape == backbone[k].shape and float(fisher[k].min()) >= 0 and
                   float(fisher[k].max()) <= 1e-4 for k in fisher)
        assert any(float(v.max()) > 0 for v in fisher.values())
    assert read_json(run / "config.json")["config"]["align"] is True  # SLCA's alignment follows the merge


def test_aper_adapts_on_the_first_task_only_and_concatenates_both_branches(straight):
    run = straight / "aper" / "seed-1993"
    assert [len(x) for x in read_json(run / "metrics.json")["train_loss"]] == [1, 0]
    first, second = (load_file(str(run / f"task-0{t}" / "model.safetensors")) for t in (1, 2))
    adapted = [k for k in first if k.startswith("backbone.adapted.")]
    pretrained = [k for k in first if k.startswith("backbone.pretrained.")]
    assert adapted and len(adapted) == len(pretrained)
    assert any(not torch.equal(first[k], first[k.replace("adapted", "pretrained")]) for k in adapted)
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith("backbone."))
    stats = load_file(str(run / "task-02" / "stats.safetensors"))
    assert stats["means"].shape[1] == 2 * 64 == second["task_heads.1.weight"].shape[1]  # [pre-trained, adapted]
    torch.testing.assert_close(second["task_heads.1.weight"].norm(dim=1), torch.ones(3))


def test_coda_prompt_trains_only_the_current_tasks_components(straight):
    run = straight / "coda-prompt" / "seed-1993"
    first, second = (load_file(str(run / f"task-0{t}" / "model.safetensors")) for t in (1, 2))
    for key in ("backbone.prompt_keys", "backbone.prompt_attention", "backbone.prompts"):
        assert torch.equal(first[key][:, :5], second[key][:, :5]), key  # task 1's components are frozen
        assert not torch.equal(first[key][:, 5:], second[key][:, 5:]), key
    vit = [k for k in first if k.startswith("backbone.vit.")]
    assert vit and all(torch.equal(first[k], second[k]) for k in vit)
    assert int(second["backbone.task"]) == 1


def test_report_quotes_each_methods_published_numbers(straight, tmp_path, cli):
    runs = tmp_path / "cifar"
    for name in METHODS:
        folder = runs / name / "seed-1993"
        shutil.copytree(straight / name / "seed-1993", folder)
        for file in ("config.json", "metrics.json"):
            data = read_json(folder / file)
            data.get("config", data).update(dataset="cifar100")
            (folder / file).write_text(json.dumps(data))
    code, stdout, stderr = cli("report", runs, "--out", tmp_path / "r", "--paper", "--no-figures")
    assert code == 0, stderr
    rows = {line.split(" | ")[2]: line for line in stdout.splitlines() if line.startswith("| cifar100")}
    assert set(LABELS.values()) <= set(rows), rows
    assert "| 92.01 |" in rows["CoFiMA"]
    assert "CoFiMA" in stdout and "Marouf" in stdout


@pytest.mark.parametrize("flags,fragment", [
    (["--method", "cofima", "--cofima-alpha", "1.5"], "--cofima-alpha"),
    (["--method", "cofima", "--fisher-max", "0"], "--fisher-max"),
    (["--method", "coda-prompt", "--ortho-weight", "-1"], "--ortho-weight"),
    (["--method", "coda-prompt", "--prompt-pool", "1"], "--prompt-pool"),
    (["--method", "coda-prompt", "--prompt-length", "3"], "--prompt-length"),
])
def test_bad_method_flags_are_one_line_errors(cli, tmp_path, flags, fragment):
    code, _, stderr = cli("train", *TINY, *SMALL, *flags, "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "x").exists()


TWO = [*TINY, *SMALL, "--train-per-class", 7, "--batch-size", 4]
# Stage 1 itself is not the one-process run's under two host processes (tests/test_distributed.py): for CoFiMA a
# frozen backbone and a (nearly) still head keep the models equal, so what is compared is the Fisher pass and the merge.
TWO_PROCESS_RUNS = {"cofima": [*TWO, "--method", "cofima", "--lr-backbone", 0, "--lr-head", 1e-9],
                    "aper": [*TWO, *METHODS["aper"]], "coda-prompt": [*TWO, *METHODS["coda-prompt"]]}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """TWO_PROCESS_RUNS under one 2-process launch (tests/launched_runs.py: one process start for all three)."""
    base = tmp_path_factory.mktemp("two")
    plan = base / "plan.json"
    plan.write_text(json.dumps([[str(base / name), [str(a) for a in args], None]
                                for name, args in TWO_PROCESS_RUNS.items()]))
    launch_two(REPO / "tests" / "launched_runs.py", plan)
    return base


def test_cofima_with_two_processes_computes_the_fisher_of_one(two_processes, tmp_path):
    from conftest import Cli
    code, _, stderr = Cli()("train", *TWO_PROCESS_RUNS["cofima"], "--out", tmp_path / "one")
    assert code == 0, stderr
    runs = {"one": tmp_path / "one", "two": two_processes / "cofima"}
    for task in ("task-01", "task-02"):
        one, two = (load_file(str(runs[r] / "seed-1993" / task / "stats.safetensors")) for r in ("one", "two"))
        fisher = [k for k in one if k.startswith("method.fisher.")]
        assert fisher and set(fisher) == {k for k in two if k.startswith("method.fisher.")}
        for key in fisher:
            torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-9)
        a, b = (load_file(str(runs[r] / "seed-1993" / task / "model.safetensors")) for r in ("one", "two"))
        for key in a:
            if key.startswith("backbone."):
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_a_coda_prompt_run_whose_pool_is_used_up_cannot_be_continued():
    from slca_cli.errors import SlcaError
    from slca_cli.grow import grown_config
    from slca_cli.presets import DEFAULTS, RunConfig
    cfg = RunConfig(**dict(DEFAULTS, dataset="folder", backbone="vit-tiny-test", method="coda-prompt",
                           num_classes=4, task_sizes=(2, 2), prompt_pool=100, prompt_length=8))
    with pytest.raises(SlcaError, match="cannot be continued"):
        grown_config(cfg, 2, {})
    assert grown_config(cfg.replace(prompt_pool=3), 2, {}).num_tasks == 3  # one component per task, one left


@pytest.mark.parametrize("name", ["aper", "coda-prompt"])
def test_aper_and_coda_prompt_run_with_two_processes(two_processes, cli, name):
    """Each test image counted once over both processes, and the folder scores as stored with one process."""
    run = two_processes / name / "seed-1993"
    assert [c["total"] for c in read_json(run / "metrics.json")["counts"]] == [[18], [18, 18]]
    code, stdout, stderr = cli("eval", run / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0 and json.loads(stdout)["matches_stored"] is True, stderr
