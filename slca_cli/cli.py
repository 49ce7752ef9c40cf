"""The `slca` command line: thin Typer commands that parse flags and call the runner."""
from __future__ import annotations

import functools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import SlcaError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Continual learning on pre-trained vision models with SLCA (Slow Learner with Classifier "
                       "Alignment). Config-free: every (dataset, backbone, method) resolves to the paper's recipe.")
datasets_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                           help="List the registered datasets and where their data is expected.")
app.add_typer(datasets_app, name="datasets")


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def user_errors(fn):
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlcaError as exc:
            _err(str(exc))
            raise typer.Exit(2)
    return wrapper


@app.command()
@user_errors
def train(
    dataset: str = typer.Option(..., help="Dataset name (see `slca datasets`)."),
    backbone: str = typer.Option(..., help="Backbone name or alias (see `slca backbones`)."),
    method: str = typer.Option("slca", help="slca (slow learner + classifier alignment), sl (slow learner only), "
                                            "seqft (one learning rate for all), joint (all classes in one task), "
                                            "linear (frozen backbone), l2p, dualprompt (prompts on a frozen "
                                            "ViT), slca++ (LoRA + symmetric CE + alignment), simplecil "
                                            "(class-mean prototypes, no training) or ranpac (random projection "
                                            "+ ridge classifier)."),
    out: Optional[Path] = typer.Option(None, help="Run folder; default runs/<dataset>-<backbone>-<method>."),
    seed: List[int] = typer.Option([1993], help="Seed; repeat for several runs (paper: 1993, 1996, 1997)."),
    data_root: Optional[str] = typer.Option(None, help="Where the dataset lives (see `slca datasets`)."),
    weights: Optional[str] = typer.Option(None, help="Local backbone weights (.safetensors, .npz, .pth) "
                                                     "instead of the hub."),
    tasks: Optional[int] = typer.Option(None, help="Number of tasks."),
    init_classes: Optional[int] = typer.Option(None, help="Classes in the first task."),
    increment: Optional[int] = typer.Option(None, help="Classes per later task (the last takes the rest)."),
    num_classes: Optional[int] = typer.Option(None, help="Classes to generate (synthetic only)."),
    train_per_class: Optional[int] = typer.Option(None, help="Use at most this many training images per class."),
    test_per_class: Optional[int] = typer.Option(None, help="Use at most this many test images per class."),
    epochs: Optional[int] = typer.Option(None, help="Stage-1 epochs per task."),
    lr_drop_epoch: Optional[int] = typer.Option(None, help="Epoch after which the learning rate drops 10x."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size for training and testing."),
    lr_backbone: Optional[float] = typer.Option(None, help="Backbone learning rate (the slow learner)."),
    lr_head: Optional[float] = typer.Option(None, help="Classifier learning rate."),
    ca_epochs: Optional[int] = typer.Option(None, help="Classifier-alignment epochs."),
    ca_samples: Optional[int] = typer.Option(None, help="Gaussian samples per class per alignment epoch."),
    tau: Optional[float] = typer.Option(None, help="Logit-normalization temperature."),
    logit_norm: Optional[bool] = typer.Option(None, "--logit-norm/--no-logit-norm",
                                              help="Logit normalization during alignment."),
    mean_scaling: Optional[str] = typer.Option(None, help="Authors' shrinking of old class means before "
                                                          "sampling: task (true task of each class), authors "
                                                          "(their c // task_size) or off."),
    fresh_norm: Optional[bool] = typer.Option(None, "--fresh-norm/--keep-norm",
                                              help="Authors' quirk: replace the final LayerNorm with a fresh one "
                                                   "(default: on for ViTs, off for backbones without one)."),
    freeze_bn: Optional[bool] = typer.Option(None, "--freeze-bn/--update-bn",
                                             help="BatchNorm backbones (CNNs): keep the pre-trained running "
                                                  "statistics during the slow learner (default) or update them."),
    restore_stage1_heads: Optional[bool] = typer.Option(
        None, "--restore-stage1-heads/--keep-aligned-heads",
        help="Authors' quirk: after evaluating, the next task starts from the unaligned heads."),
    align: Optional[bool] = typer.Option(None, "--align/--no-align",
                                         help="Classifier alignment after every task (any method)."),
    weight_decay: Optional[float] = typer.Option(None, help="Stage-1 weight decay (also used by alignment)."),
    optimizer: Optional[str] = typer.Option(None, help="Stage-1 optimizer: sgd or adam."),
    schedule: Optional[str] = typer.Option(None, help="Stage-1 lr schedule per task: step, cosine or constant."),
    min_lr: Optional[float] = typer.Option(None, help="Final lr of the cosine schedule."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm at this value."),
    sce_a: Optional[float] = typer.Option(None, help="Symmetric CE: weight of cross-entropy."),
    sce_b: Optional[float] = typer.Option(None, help="Symmetric CE: weight of reverse cross-entropy (0 = plain CE)."),
    lora_rank: Optional[int] = typer.Option(None, help="slca++: LoRA rank on each block's qkv, fc1, fc2."),
    lora_scale: Optional[float] = typer.Option(None, help="slca++: LoRA scale."),
    lr_lora: Optional[float] = typer.Option(None, help="slca++: LoRA learning rate after the first task."),
    lr_lora_first: Optional[float] = typer.Option(None, help="slca++: LoRA learning rate in the first task."),
    sample_shrink: Optional[float] = typer.Option(None, help="slca++: mean s of the old-class sample shrinking "
                                                             "1/(1 + s (T - t)) in alignment (0 = off)."),
    prompt_pool: Optional[int] = typer.Option(None, help="l2p/dualprompt: prompts (and keys) in the pool."),
    prompt_length: Optional[int] = typer.Option(None, help="l2p: tokens per prompt; dualprompt: E-prompt length."),
    prompt_top_k: Optional[int] = typer.Option(None, help="l2p: prompts chosen per image."),
    g_prompt_length: Optional[int] = typer.Option(None, help="dualprompt: G-prompt length."),
    matching_weight: Optional[float] = typer.Option(None, help="l2p/dualprompt: weight of the key-query "
                                                               "matching loss."),
    covariance: Optional[str] = typer.Option(None, help="Class covariances for alignment: ridge (the paper's "
                                                        "+ 1e-4 I) or shrinkage (OAS, from the accumulated sums)."),
    align_mode: Optional[str] = typer.Option(None, help="Classifier alignment: sampled (the paper's Gaussian "
                                                        "samples) or closed-form (LDA heads from the stored means "
                                                        "and covariances, no sampling)."),
    ranpac_dim: Optional[int] = typer.Option(None, help="ranpac: random projection size M (the M x M Gram "
                                                        "matrix is 4 M^2 bytes; default 10000: 381 MiB)."),
    ranpac_adapt: Optional[bool] = typer.Option(None, "--ranpac-adapt/--no-ranpac-adapt",
                                                help="ranpac: adapt the backbone on the first task (slow-learner "
                                                     "rates) before freezing it (default: off, training-free)."),
    image_size: Optional[int] = typer.Option(None, help="Input size in pixels (default: the backbone's)."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on GPUs that support it, else fp32; under "
                                                       "accelerate launch its config's mixed precision), fp32, "
                                                       "bf16, or fp16 (with loss scaling)."),
    workers: Optional[int] = typer.Option(None, help="Data-loader processes per training process (default: the "
                                                     "machine's cores shared among the processes)."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the backbone (faster "
                                                                       "steps on GPUs after a warm-up)."),
    augment_on_device: Optional[bool] = typer.Option(
        None, "--augment-on-device/--augment-on-host",
        help="CIFAR transforms as batched ops on the training device from uint8 images uploaded once "
             "(default: on for cifar100 on a GPU) or on host loader workers."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images",
                                         help="Decode every image first and leave unreadable ones out (listed in "
                                              "the run folder's skipped-images.json) instead of stopping."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last complete task-NN/ folder."),
    checkpoint_every: int = typer.Option(0, help="Also save the task being trained every N epochs "
                                                 "(in-progress/), so --resume continues mid-task. 0: off."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    accelerate_config: Optional[str] = typer.Option(
        None, help="Run under `accelerate launch` with this accelerate config file (default: accelerate's default "
                   "config when it asks for several processes; 'none' to ignore it)."),
):
    """Train a class-incremental run: for each task fit, collect statistics, align, evaluate, save."""
    from .guard import guarded_seed, interrupt_message, stop_exit_code
    from .runner import make_accelerator, resolve_run, run_seed

    flags = dict(data_root=data_root, weights=weights, tasks=tasks, init_classes=init_classes, increment=increment,
                 num_classes=num_classes, train_per_class=train_per_class, test_per_class=test_per_class,
                 epochs=epochs, lr_drop_epoch=lr_drop_epoch, batch_size=batch_size, lr_backbone=lr_backbone,
                 lr_head=lr_head, ca_epochs=ca_epochs, ca_samples=ca_samples, tau=tau, logit_norm=logit_norm,
                 mean_scaling=mean_scaling, fresh_norm=fresh_norm, freeze_bn=freeze_bn,
                 restore_stage1_heads=restore_stage1_heads, image_size=image_size, precision=precision,
                 workers=workers, align=align, skip_bad_images=skip_bad_images or None, compile=compile or None,
                 device_augment=augment_on_device, weight_decay=weight_decay, optimizer=optimizer,
                 schedule=schedule, min_lr=min_lr, grad_clip=grad_clip, sce_a=sce_a, sce_b=sce_b,
                 lora_rank=lora_rank, lora_scale=lora_scale, lr_lora=lr_lora, lr_lora_first=lr_lora_first,
                 sample_shrink=sample_shrink, prompt_pool=prompt_pool, prompt_length=prompt_length,
                 prompt_top_k=prompt_top_k, g_prompt_length=g_prompt_length, matching_weight=matching_weight,
                 covariance=covariance, align_mode=align_mode, ranpac_dim=ranpac_dim, ranpac_adapt=ranpac_adapt)
    if checkpoint_every < 0:
        raise SlcaError(f"--checkpoint-every must be 0 (off) or a number of epochs, got {checkpoint_every}")
    cfg, data = resolve_run(dataset, backbone, method, flags)
    accelerator = make_accelerator(device, cfg.precision)
    out = out or Path("runs") / f"{cfg.dataset}-{cfg.backbone}-{cfg.method}"
    log = accelerator.print
    log(f"{cfg.dataset} ({cfg.num_classes} classes, tasks {list(cfg.task_sizes)}) | {cfg.backbone} | {cfg.method} "
        f"| {cfg.epochs} epochs, lr backbone {cfg.lr_backbone:g} head {cfg.lr_head:g} | "
        f"{accelerator.device} x{accelerator.num_processes} {accelerator.mixed_precision} | {out}")
    results = []
    for s in dict.fromkeys(seed):
        run_dir = out / f"seed-{s}"
        try:
            with guarded_seed(run_dir, s, cfg.batch_size, log, accelerator.is_main_process,
                              accelerator.wait_for_everyone):
                results.append(run_seed(cfg, s, run_dir, accelerator, data, resume=resume, log=log,
                                        show_progress=progress, checkpoint_every=checkpoint_every))
        except KeyboardInterrupt as stop:  # SIGINT / SIGTERM: the checkpoint being written was finished first
            _err(interrupt_message(stop, s, run_dir, sys.argv[1:]))
            raise typer.Exit(stop_exit_code(stop))
    if accelerator.is_main_process:
        typer.echo(seed_table(results))


def seed_table(results) -> str:
    """Last-Acc and Inc-Acc per seed, then mean +- sample standard deviation."""
    lines = [f"{'seed':>8} {'Last-Acc':>10} {'Inc-Acc':>10}"]
    lines += [f"{r['seed']:>8} {r['last_acc']:>10.2f} {r['inc_acc']:>10.2f}" for r in results]
    if results:
        def fmt(key):
            values = [r[key] for r in results]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2f} +- {std:.2f}"
        lines.append(f"{'mean':>8} {fmt('last_acc'):>10} {fmt('inc_acc'):>10}")
    return "\n".join(lines)


@app.command("eval")
@user_errors
def eval_checkpoint(
    path: Path = typer.Argument(..., help="A task-NN/ folder of a run."),
    data_root: Optional[str] = typer.Option(None, help="Where the dataset lives, if not where it was trained."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: Optional[int] = typer.Option(None, help="Evaluation batch size (does not change the result)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
):
    """Score a checkpoint on the test images of every class it has seen; rebuilt from the folder alone."""
    from .runner import evaluate_checkpoint

    result = evaluate_checkpoint(path, data_root, device, batch_size, progress)
    from accelerate import PartialState
    if not PartialState().is_main_process:  # under accelerate launch every process evaluates its shard
        return
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    row = "  ".join(f"T{j + 1} {acc:.2f}" for j, acc in enumerate(result["accuracy_row"]))
    typer.echo(f"{path} (after task {result['task']})")
    typer.echo(f"per task: {row}")
    status = "matches" if result["matches_stored"] else "DIFFERS from"
    typer.echo(f"accuracy on all seen classes: {result['accuracy']:.2f}% ({status} the stored "
               f"{result['stored_accuracy']:.2f}%)")


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), help="Where the three runs and report/ go (a rerun continues)."),
    backbone: str = typer.Option("efficientnet-lite0-in1k", help="Backbone (default: EfficientNet-Lite0 with "
                                                                 "its real ImageNet-1k weights)."),
    epochs: int = typer.Option(3, help="Stage-1 epochs per task."),
    batch_size: int = typer.Option(32, help="Batch size."),
    image_size: Optional[int] = typer.Option(None, help="Input size (default: 64 px for a CNN, else the "
                                                        "backbone's)."),
    train_per_class: Optional[int] = typer.Option(60, help="Training images per digit (of about 120)."),
    test_per_class: Optional[int] = typer.Option(None, help="Use at most this many test images per digit (all: "
                                                            "about 60)."),
    method: Optional[List[str]] = typer.Option(None, help="Methods to compare; repeat (default: seqft, sl, "
                                                          "slca; any of `slca train --method`)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
):
    """A real continual-learning experiment in minutes on a CPU, offline: scikit-learn's handwritten digits in
    5 tasks, a pre-trained backbone, Seq FT vs slow learner vs SLCA; prints the comparison, writes the report."""
    from .demo import comparison_table, run_demo, written_files

    outcome = run_demo(out, backbone=backbone, epochs=epochs, batch_size=batch_size,
                       image_size=image_size, train_per_class=train_per_class, test_per_class=test_per_class,
                       device=device, log=typer.echo, show_progress=progress,
                       **({"methods": tuple(dict.fromkeys(method))} if method else {}))
    typer.echo("")
    typer.echo(comparison_table(outcome))
    typer.echo(f"\nreport: {', '.join(written_files(outcome))}")


@app.command("report")
@user_errors
def report_command(
    runs: List[Path] = typer.Argument(..., help="Run folders: runs/<name>/ (its seed-*/ inside), a seed-*/ "
                                                "folder, or a folder holding several runs."),
    out: Path = typer.Option(Path("report"), help="Where results.md, results.csv, results.json and figures/ go."),
    paper: bool = typer.Option(False, "--paper", help="Add the published numbers (ViT-B/16 IN21K) beside ours."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write the PNG and SVG plots."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON record instead of the tables."),
):
    """Tables (mean +- std over seeds) and plots from finished runs, grouped by dataset, backbone and method."""
    from .report import build_report

    record = build_report(runs, out, paper=paper, figures=figures, warn=lambda m: typer.echo(m, err=True))
    markdown = record.pop("markdown")
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(markdown.split("\n## Figures")[0].rstrip())
    typer.echo(f"\nwrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}"
               + (f" and {len(record['figures'])} figure files under {out / 'figures'}" if record["figures"] else ""))


@app.command("probe")
@user_errors
def probe_command(
    run: Path = typer.Argument(..., help="A run folder (its seed-*/ are probed) or one seed-*/ folder."),
    joint: Optional[Path] = typer.Option(None, help="A finished `--method joint` run to show beside the probe."),
    task: Optional[int] = typer.Option(None, help="Probe after this task (default: the last finished one)."),
    classifier: str = typer.Option("logistic", help="logistic (softmax regression, L-BFGS) or ridge (closed form)."),
    data_root: Optional[str] = typer.Option(None, help="Where the dataset lives, if not where it was trained."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: Optional[int] = typer.Option(None, help="Feature extraction batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
):
    """Train a fresh linear classifier on all seen classes over the frozen, continually learned backbone and
    compare it with the model's own classifier (and with joint training); writes probe.json per seed."""
    from .probe import CLASSIFIERS, run_probe

    if classifier not in CLASSIFIERS:
        raise SlcaError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got '{classifier}'")
    outcome = run_probe(run, joint, data_root=data_root, device=device, task=task, classifier=classifier,
                        batch_size=batch_size, show_progress=progress)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in outcome.items() if k != "table"}, indent=2))
        return
    first = outcome["results"][0]
    typer.echo(f"{first['dataset']} | {first['backbone']} | {first['method']} | after task {first['task']} "
               f"({first['classes']} classes) | {classifier} probe on {first['train_images']} training images")
    typer.echo(outcome["table"])


@app.command("backbones")
@user_errors
def backbones_command():
    """List registered backbones: aliases, input size, where the weights come from, whether they are here."""
    from backbones import list_backbones

    for spec in list_backbones():
        present = {True: "weights present", False: "weights not downloaded", None: "weights unknown"}[
            spec.weights_present()]
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        typer.echo(f"{spec.name}{aliases}\n    {spec.description}\n    {spec.image_size} px, family {spec.family}; "
                   f"weights: {spec.weights_source}; {present}")
    from backbones.cache import weights_dir
    typer.echo(f"timm:<model name>\n    any timm model (e.g. timm:vit_small_patch16_224.augreg_in21k); weights from "
               f"the Hugging Face hub or --weights FILE\nweights folder (checkpoints not on the hub): {weights_dir()} "
               f"(set $SLCA_WEIGHTS_DIR to move it)")


@datasets_app.callback()
def datasets_command(ctx: typer.Context):
    """List registered datasets and the layout expected under --data-root."""
    if ctx.invoked_subcommand is not None:
        return
    from .data import DATASETS, default_data_root

    for info in DATASETS.values():
        where = f"default --data-root {default_data_root(info.name)}" if info.needs_root and \
            info.name != "folder" else ""
        typer.echo(f"{info.name}\n    {info.description}\n    data: {info.layout}{'; ' + where if where else ''}")
    typer.echo("\nCheck a dataset, build its split and see its counts: slca datasets prepare NAME --data-root DIR")


@datasets_app.command("prepare")
@user_errors
def datasets_prepare(
    name: str = typer.Argument(..., help="Dataset name (see `slca datasets`)."),
    data_root: Optional[str] = typer.Option(None, help="The dataset's folder or archive (default: the cache "
                                                       "folder `slca datasets` shows)."),
    download: bool = typer.Option(True, "--download/--no-download",
                                  help="Fetch what has a stable public address (CIFAR-100, ImageNet-R) if absent."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images",
                                      help="Decode every image and list the unreadable ones."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
):
    """Check a dataset's files, build our split, print counts per split and class; download when possible."""
    from .data.prepare import prepare_dataset

    prepare_dataset(name, data_root, download=download, check_images=check_images, show_progress=progress,
                    echo=typer.echo)


def main() -> None:
    """The `slca` command. `slca train` with an accelerate config for several processes re-runs itself under
    `accelerate launch` (see distributed.launcher_command)."""
    from .distributed import launcher_command

    try:
        command = launcher_command(sys.argv)
    except SlcaError as exc:
        _err(str(exc))
        raise SystemExit(2)
    if command is not None:
        typer.echo(f"slca: running under accelerate launch --config_file {command[4]}", err=True)
        sys.stdout.flush()
        os.execv(command[0], command)
    succeeded = False
    try:
        app()
        succeeded = True
    except SystemExit as exc:
        succeeded = exc.code in (None, 0)
        raise
    finally:
        end_process_group(wait=succeeded)


def end_process_group(wait: bool) -> None:
    """Under several processes, leave together (after a success) and tear the process group down before the
    interpreter exits; otherwise a rank that finishes first can abort its peers' gloo/NCCL threads (exit -6 after
    correct output). After a failure there is no barrier: the peers may never reach it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
