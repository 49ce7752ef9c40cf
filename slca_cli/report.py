"""Tables and figures from run folders: Last-Acc / Inc-Acc as mean +- std over seeds, ablation, per-backbone
comparison, forgetting and old/new accuracy; Markdown, CSV, JSON, and PNG + SVG plots."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import SlcaError
from .methods import METHODS
from .methods.catalog import RANPAC_PAPER, SLCA_PAPER, Published
from .presets import identity

PAPER_NOTE = ("published numbers (ViT-B/16 IN21K, 10 tasks, mean of 3 seeds; * read from a figure in the "
              "authors' repository); RanPAC and SimpleCIL rows: the RanPAC paper (McDonnell et al., NeurIPS 2023, "
              "Tables 1-2, one seed, M = 10000; RanPAC (adapted) = their Algorithm 1, RanPAC = 'No Phase 1', "
              "SimpleCIL = 'NCM only'), ViT-B/16 IN21K on CIFAR-100 and Cars (16 + 9 x 20 classes), the "
              "IN21K + IN1K fine-tuned ViT-B/16 on ImageNet-R and CUB")

ABLATION_ROWS = ("SL", "SL+CA", "SL+CA+LN")


def paper_note(groups: Sequence["Group"]) -> str:
    """The paper columns' note: the seed paper's and RanPAC's sources, then each other row's own (its catalog
    entry's), e.g. CoFiMA's."""
    extra = []
    for group in groups:
        spec = METHODS.get(group.method)
        covered = not spec or not spec.source or spec.source == SLCA_PAPER or spec.source.startswith(RANPAC_PAPER)
        if not covered and group.paper() and f"{spec.label}: {spec.source}" not in extra:
            extra.append(f"{spec.label}: {spec.source}")
    return "; ".join([PAPER_NOTE] + extra)


@dataclass
class SeedRun:
    path: Path
    seed: int
    config: Dict[str, Any]
    metrics: Dict[str, Any]


@dataclass
class Stat:
    """Mean and sample standard deviation (0 for one seed) of one number over seeds."""

    values: List[float]

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def fmt(self) -> str:
        return f"{self.mean:.2f} +- {self.std:.2f}"

    def to_dict(self) -> Dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "values": self.values}


@dataclass
class Group:
    """The seeds of one experiment: same dataset, backbone, method and settings."""

    dataset: str
    backbone: str
    method: str
    label: str
    runs: List[SeedRun] = field(default_factory=list)

    @property
    def seeds(self) -> List[int]:
        return [r.seed for r in self.runs]

    def stat(self, key: str) -> Optional[Stat]:
        values = [r.metrics.get(key) for r in self.runs]
        return Stat([float(v) for v in values]) if values and None not in values else None

    def last_split(self, key: str) -> Optional[Stat]:
        """old_accuracy / new_accuracy after the last task."""
        values = [r.metrics[key][-1] for r in self.runs if r.metrics.get(key)]
        return Stat([float(v) for v in values]) if len(values) == len(self.runs) and None not in values else None

    def curve(self) -> Tuple[List[int], List[float], List[float]]:
        """(classes seen after each task, mean accuracy, std) over seeds."""
        sizes = self.runs[0].metrics["task_sizes"]
        seen = [sum(sizes[: t + 1]) for t in range(len(self.runs[0].metrics["task_accuracy"]))]
        per_task = list(zip(*[r.metrics["task_accuracy"] for r in self.runs]))
        return seen, [statistics.mean(v) for v in per_task], [Stat(list(v)).std for v in per_task]

    def mean_matrix(self) -> List[List[Optional[float]]]:
        matrices = [r.metrics["accuracy_matrix"] for r in self.runs]
        rows = len(matrices[0])
        return [[None if matrices[0][i][j] is None else statistics.mean(m[i][j] for m in matrices)
                 for j in range(len(matrices[0][i]))] for i in range(rows)]

    def paper(self) -> Optional[Published]:
        """The published numbers of this row (its method's catalog entry), if any."""
        spec = METHODS.get(self.method)
        return spec.published(self.dataset, self.label) if spec else None


def method_label(config: Dict[str, Any]) -> str:
    """A row name: the method, plus what alignment flags add to or remove from it (SL+CA, SL+CA+LN...)."""
    method = config["method"]
    spec = METHODS.get(method)
    label = spec.label if spec else method
    align, logit_norm = config.get("align"), config.get("logit_norm", True)
    variant = spec.variant_of(config) if spec else None
    if variant is not None:
        label += variant.suffix
    if spec is not None and spec.aligns:
        if not align:
            return f"{label} (no CA)"
        label = label + alignment_suffix(config)
        preset = spec.preset(config.get("dataset", "")).get("logit_norm", True)  # MOS aligns without it
        if logit_norm == preset or config.get("align_mode") == "closed-form":
            return label
        return f"{label} (no LN)" if not logit_norm else f"{label} (+LN)"
    if align and method != "joint":
        return f"{label}+CA+LN" if logit_norm else f"{label}+CA"
    return label


def alignment_suffix(config: Dict[str, Any]) -> str:
    """What --align-mode closed-form, --covariance shrinkage and --drift-compensation change:
    `` (closed-form, shrinkage, drift-compensated)``."""
    parts = [p for p, on in (("closed-form", config.get("align_mode") == "closed-form"),
                             ("shrinkage", config.get("covariance") == "shrinkage"),
                             ("drift-compensated", config.get("drift_compensation", "off") != "off")) if on]
    return f" ({', '.join(parts)})" if parts else ""


def experiment_key(config: Dict[str, Any]) -> str:
    """Runs with equal run identity (presets.IDENTITY_FIELDS) are seeds of one experiment."""
    return json.dumps(identity(config), sort_keys=True)


def find_seed_runs(paths: Iterable[Path], warn: Callable[[str], None] = print) -> List[SeedRun]:
    """Every folder holding metrics.json + config.json at or below the given paths (seed-*/ folders);
    unfinished runs are left out with a warning."""
    paths = list(paths)
    found: Dict[Path, SeedRun] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise SlcaError(f"{path} does not exist; give run folders (runs/<name>/ or runs/<name>/seed-N/)")
        candidates = [path / "metrics.json"] if (path / "metrics.json").is_file() else \
            sorted(path.rglob("metrics.json"))
        for metrics_file in candidates:
            folder = metrics_file.parent
            if (folder / "config.json").is_file() and folder.resolve() not in found:
                try:
                    run = _read_run(folder)
                    if run.metrics.get("tasks_done", len(run.metrics["task_accuracy"])) < len(
                            run.config["task_sizes"]):
                        warn(f"warning: {folder} is unfinished ({len(run.metrics['task_accuracy'])} of "
                             f"{len(run.config['task_sizes'])} tasks); left out of the report")
                        continue
                    run = _checked_metrics(run, warn)
                except SlcaError as exc:  # one damaged run never hides the others
                    warn(f"warning: {exc}; left out of the report")
                    continue
                found[folder.resolve()] = run
    if not found:
        raise SlcaError(f"no finished runs (metrics.json + config.json) under {', '.join(map(str, paths))}; "
                        f"train first with `slca train`")
    return list(found.values())


def _read_run(folder: Path) -> SeedRun:
    """One seed folder's config.json and metrics.json: the config and the progress fields checked (SlcaError
    naming the folder and the field); the metrics are checked by _checked_metrics."""
    header, metrics = _read_json(folder, "config.json"), _read_json(folder, "metrics.json")
    config = header.get("config") if isinstance(header, dict) else None
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        raise SlcaError(f"{folder} is damaged (config.json's 'config' or metrics.json is not an object)")
    if "method" not in config or "task_sizes" not in config or "task_accuracy" not in metrics:
        raise SlcaError(f"{folder} is not an slca run folder (config.json or metrics.json lacks its fields)")
    problem = config_problem(config)
    seed = header.get("seed", metrics.get("seed", 0))
    if problem is None and not _is_int(seed):
        problem = "config.json: 'seed' is not an integer"
    if problem is None and not (_numbers(metrics["task_accuracy"]) and _is_int(metrics.get("tasks_done", 0))):
        problem = "metrics.json: 'task_accuracy' or 'tasks_done' is malformed"
    if problem is not None:
        raise SlcaError(f"{folder} is damaged ({problem})")
    return SeedRun(folder, seed, config, metrics)


def _checked_metrics(run: SeedRun, warn: Callable[[str], None]) -> SeedRun:
    """A finished run's metrics: every field the report uses checked, the accuracies checked against the last task
    folder's state.json, the probe's accuracy added where `slca probe` ran on the final model."""
    folder, config, metrics = run.path, run.config, run.metrics
    problem = metrics_problem(metrics, len(config["task_sizes"]))
    if problem is not None:
        raise SlcaError(f"{folder} is damaged ({problem})")
    metrics = checked_against_tasks(folder, dict(metrics, task_sizes=metrics.get("task_sizes", config["task_sizes"])),
                                    len(config["task_sizes"]), warn)
    probe_file = folder / "probe.json"
    if probe_file.is_file():  # written by `slca probe`; only a probe of the final model counts here
        try:
            probe = json.loads(probe_file.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            probe = {}
        if isinstance(probe, dict) and probe.get("task") == len(metrics["task_accuracy"]) and _is_number(
                probe.get("probe_accuracy")):
            metrics = dict(metrics, probe_accuracy=probe.get("probe_accuracy"))
    return SeedRun(folder, run.seed, config, metrics)


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SlcaError(f"{folder} holds a damaged {name} ({exc.__class__.__name__}); remove the folder or re-run it "
                        f"with --resume") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any, length: Optional[int] = None, optional: bool = False) -> bool:
    """A list of finite numbers (or None where ``optional``), of ``length`` when given."""
    return isinstance(value, list) and (length is None or len(value) == length) and all(
        _is_number(v) or (optional and v is None) for v in value)


def config_problem(config: Dict[str, Any]) -> Optional[str]:
    """What the report reads from config.json's ``config``, by type; None when all is well."""
    for key in ("dataset", "backbone", "method"):
        if not isinstance(config.get(key), str):
            return f"config.json: '{key}' is not a name"
    sizes = config.get("task_sizes")
    if not isinstance(sizes, list) or not sizes or not all(_is_int(s) and s > 0 for s in sizes):
        return "config.json: 'task_sizes' is not a list of positive integers"
    return None


def metrics_problem(metrics: Dict[str, Any], num_tasks: int) -> Optional[str]:
    """What the report reads from metrics.json, by type and length; None when all is well."""
    accuracy = metrics.get("task_accuracy")
    if not _numbers(accuracy) or len(accuracy) > num_tasks:
        return "metrics.json: 'task_accuracy' is not a list of numbers, one per finished task"
    done = len(accuracy)
    if "tasks_done" in metrics and not _is_int(metrics["tasks_done"]):
        return "metrics.json: 'tasks_done' is not an integer"
    sizes = metrics.get("task_sizes")
    if "task_sizes" in metrics and not (isinstance(sizes, list) and len(sizes) == num_tasks and all(
            _is_int(s) and s > 0 for s in sizes)):
        return "metrics.json: 'task_sizes' does not match config.json"
    matrix = metrics.get("accuracy_matrix")
    if not isinstance(matrix, list) or len(matrix) != done or not all(_numbers(row, num_tasks, True) for row in matrix):
        return "metrics.json: 'accuracy_matrix' is not a tasks x tasks list of numbers"
    for key in ("last_acc", "inc_acc", "forgetting"):
        if metrics.get(key) is not None and not _is_number(metrics[key]):
            return f"metrics.json: '{key}' is not a number"
    for key in ("old_accuracy", "new_accuracy"):
        if key in metrics and not _numbers(metrics[key], done, True):
            return f"metrics.json: '{key}' is not a list of numbers, one per finished task"
    return None


# metrics.json's numbers that are recomputed from the last task folder's counts (metrics.summarize).
CHECKED_METRICS = ("accuracy_matrix", "task_accuracy", "old_accuracy", "new_accuracy", "last_acc", "inc_acc",
                   "forgetting")


def checked_against_tasks(folder: Path, metrics: Dict[str, Any], num_tasks: int,
                          warn: Callable[[str], None]) -> Dict[str, Any]:
    """metrics.json's accuracies recomputed from the last finished task's state.json (its counts, covered by the
    state's own checksum). An edited or damaged metrics.json is reported with the task folders' numbers and a
    warning; without a readable task folder the report says it cannot check."""
    from .checkpoint import read_state, task_dir_name
    from .metrics import summarize

    done = len(metrics["task_accuracy"])
    if done == 0:
        return metrics
    task_dir = folder / task_dir_name(done - 1)
    try:
        state = read_state(task_dir)
    except SlcaError as exc:
        warn(f"warning: cannot check {folder / 'metrics.json'} against its task folders ({exc}); reported as "
             f"written")
        return metrics
    recomputed = summarize(state.counts, num_tasks)
    differ = [k for k in CHECKED_METRICS if not _same_numbers(metrics.get(k), recomputed[k])]
    if differ:
        warn(f"warning: {folder / 'metrics.json'} disagrees with {task_dir.name}/state.json on {', '.join(differ)} "
             f"(edited or damaged); the report uses the task folders' numbers")
    return dict(metrics, **{k: recomputed[k] for k in CHECKED_METRICS})


def _same_numbers(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_numbers(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return _is_number(a) and _is_number(b) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def group_runs(runs: Sequence[SeedRun]) -> List[Group]:
    """Seeds of the same experiment together; rows sorted by dataset, backbone, then a fixed method order."""
    groups: Dict[Tuple[str, str, str], Group] = {}
    for run in runs:
        key = (run.config["dataset"], run.config["backbone"], experiment_key(run.config))
        if key not in groups:
            groups[key] = Group(run.config["dataset"], run.config["backbone"], run.config["method"],
                                method_label(run.config))
        groups[key].runs.append(run)
    result = list(groups.values())
    for group in result:
        group.runs.sort(key=lambda r: r.seed)
    _disambiguate(result)
    order = list(METHODS)
    result.sort(key=lambda g: (g.dataset, g.backbone, order.index(g.method) if g.method in order else len(order),
                               g.label))
    return result


def _disambiguate(groups: List[Group]) -> None:
    """Two experiments with the same row name (e.g. two learning rates): add their run folder's name."""
    by_name: Dict[Tuple[str, str, str], List[Group]] = {}
    for g in groups:
        by_name.setdefault((g.dataset, g.backbone, g.label), []).append(g)
    for same in by_name.values():
        if len(same) > 1:
            for g in same:
                g.label = f"{g.label} [{g.runs[0].path.parent.name}]"


# ---- tables ----

def _cell(stat: Optional[Stat]) -> str:
    return "-" if stat is None else stat.fmt()


def _paper_cells(group: Group) -> List[str]:
    paper = group.paper()
    if paper is None:
        return ["-", "-"]
    return [f"{paper.last_acc:.2f}{'*' if paper.from_figure else ''}",
            "-" if paper.inc_acc is None else f"{paper.inc_acc:.2f}"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_rows(groups: Sequence[Group], paper: bool) -> Tuple[List[str], List[List[str]]]:
    header = ["dataset", "backbone", "method", "seeds", "Last-Acc", "Inc-Acc", "forgetting", "old (last task)",
              "new (last task)"]
    probes = any(g.stat("probe_accuracy") is not None for g in groups)
    if probes:
        header.append("linear probe")
    if paper:
        header += ["paper Last-Acc", "paper Inc-Acc"]
    rows = []
    for g in groups:
        row = [g.dataset, g.backbone, g.label, str(len(g.runs)), _cell(g.stat("last_acc")), _cell(g.stat("inc_acc")),
               _cell(g.stat("forgetting")), _cell(g.last_split("old_accuracy")), _cell(g.last_split("new_accuracy"))]
        row += [_cell(g.stat("probe_accuracy"))] if probes else []
        rows.append(row + (_paper_cells(g) if paper else []))
    return header, rows


def ablation_rows(groups: Sequence[Group]) -> List[Tuple[str, str, List[List[str]]]]:
    """Per (dataset, backbone) holding at least two of SL, SL+CA, SL+CA+LN: their Last-Acc / Inc-Acc rows.
    SLCA with default flags is SL+CA+LN."""
    tables = []
    for dataset, backbone in dict.fromkeys((g.dataset, g.backbone) for g in groups):
        found: Dict[str, Group] = {}
        for g in groups:
            if (g.dataset, g.backbone) != (dataset, backbone):
                continue
            name = "SL+CA+LN" if g.label == "SLCA" else g.label
            if name in ABLATION_ROWS and name not in found:
                found[name] = g
        if len(found) >= 2:
            rows = [[name, str(len(found[name].runs)), _cell(found[name].stat("last_acc")),
                     _cell(found[name].stat("inc_acc"))] for name in ABLATION_ROWS if name in found]
            tables.append((dataset, backbone, rows))
    return tables


def backbone_table(groups: Sequence[Group], dataset: str) -> Optional[Tuple[List[str], List[List[str]]]]:
    """Methods x backbones (Last-Acc) for one dataset: the pre-training paradigm comparison."""
    chosen = [g for g in groups if g.dataset == dataset]
    backbones = list(dict.fromkeys(g.backbone for g in chosen))
    if len(backbones) < 2:
        return None
    labels = list(dict.fromkeys(g.label for g in chosen))
    rows = []
    for label in labels:
        cells = {g.backbone: _cell(g.stat("last_acc")) for g in chosen if g.label == label}
        rows.append([label] + [cells.get(b, "-") for b in backbones])
    return ["method (Last-Acc)"] + backbones, rows


def group_record(group: Group) -> Dict[str, Any]:
    seen, mean, std = group.curve()
    record = {"dataset": group.dataset, "backbone": group.backbone, "method": group.method, "label": group.label,
              "seeds": group.seeds, "runs": [str(r.path) for r in group.runs],
              "task_sizes": group.runs[0].metrics["task_sizes"], "classes_seen": seen,
              "task_accuracy": {"mean": mean, "std": std}, "accuracy_matrix_mean": group.mean_matrix()}
    for key in ("last_acc", "inc_acc", "forgetting", "probe_accuracy"):
        stat = group.stat(key)
        record[key] = None if stat is None else stat.to_dict()
    for key in ("old_accuracy", "new_accuracy"):
        stat = group.last_split(key)
        record[f"{key}_last_task"] = None if stat is None else stat.to_dict()
    paper = group.paper()
    record["paper"] = None if paper is None else {"last_acc": paper.last_acc, "inc_acc": paper.inc_acc,
                                                  "from_figure": paper.from_figure}
    return record


# ---- figures ----

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("+", "plus")).strip("-")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(groups: Sequence[Group], title: str, out_stem: Path) -> List[Path]:
    """Accuracy on all seen classes after each task, one line per method (mean over seeds, +- std band);
    joint training (one task) is a dashed horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, group in enumerate(groups):
        seen, mean, std = group.curve()
        colour = f"C{i % 10}"
        if len(seen) == 1:
            ax.axhline(mean[0], color=colour, linestyle="--", label=f"{group.label} ({mean[0]:.1f})")
            continue
        ax.plot(seen, mean, marker="o", color=colour, label=f"{group.label} ({mean[-1]:.1f})")
        if len(group.runs) > 1:
            ax.fill_between(seen, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colour, alpha=0.2)
    ax.set_xlabel("classes seen")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, out_stem)


def plot_matrix(group: Group, out_stem: Path) -> List[Path]:
    """acc[i][j]: accuracy after task i on the classes of task j, mean over seeds."""
    plt = _pyplot()
    import numpy as np
    matrix = np.array([[np.nan if v is None else v for v in row] for row in group.mean_matrix()], dtype=float)
    size = max(3.5, 0.45 * matrix.shape[1] + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis")
    if matrix.shape[1] <= 12:
        for (i, j), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 60 else "black")
    ticks = range(matrix.shape[1])
    ax.set_xticks(list(ticks), [str(t + 1) for t in ticks])
    ax.set_yticks(list(range(matrix.shape[0])), [str(t + 1) for t in range(matrix.shape[0])])
    ax.set_xlabel("evaluated on the classes of task")
    ax.set_ylabel("after training task")
    ax.set_title(f"{group.label}: {group.dataset}, {group.backbone}", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return _save(fig, out_stem)


def _save(fig, out_stem: Path) -> List[Path]:
    plt = _pyplot()
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".svg"):
        path = out_stem.with_suffix(suffix)
        fig.savefig(path, dpi=150)
        paths.append(path)
    plt.close(fig)
    return paths


# ---- the report ----

def build_report(paths: Sequence[Path], out: Path, paper: bool = False, figures: bool = True,
                 warn: Callable[[str], None] = print) -> Dict[str, Any]:
    """Read the runs, write results.{md,csv,json} and figures/ under ``out``; return the JSON record plus
    the Markdown text under ``markdown``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SlcaError(f"--out {out} is a file; give a folder (results.md, results.csv, results.json and figures/ "
                        f"are written into it)")
    groups = group_runs(find_seed_runs(paths, warn))
    try:
        return _write_report(groups, out, paper, figures)
    except OSError as exc:
        raise SlcaError(f"cannot write the report under {out} ({exc.strerror or exc.__class__.__name__}"
                        f"{': ' + str(exc.filename) if exc.filename else ''}); choose another --out") from None


def _write_report(groups: List[Group], out: Path, paper: bool, figures: bool) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    header, rows = results_rows(groups, paper)
    sections = ["# slca report", "", "Last-Acc / Inc-Acc: accuracy (%) on all seen classes after the last task / "
                "averaged over tasks; mean +- sample std over seeds. Forgetting: mean drop from each earlier "
                "task's best accuracy. Old / new: accuracy on earlier / last task's classes after the last task. "
                "Linear probe (where `slca probe` ran): a fresh linear classifier on the final representation.",
                "", "## Results", "", markdown_table(header, rows)]
    if paper:
        sections += ["", f"paper columns: {paper_note(groups)}."]
    ablation = ablation_rows(groups)
    for dataset, backbone, table in ablation:
        sections += ["", f"## Ablation: {dataset}, {backbone}", "",
                     markdown_table(["components", "seeds", "Last-Acc", "Inc-Acc"], table)]
    by_backbone = {}
    for dataset in dict.fromkeys(g.dataset for g in groups):
        table = backbone_table(groups, dataset)
        if table is not None:
            by_backbone[dataset] = {"header": table[0], "rows": table[1]}
            sections += ["", f"## By backbone: {dataset}", "", markdown_table(*table)]
    figure_files: List[str] = []
    if figures:
        for dataset, backbone in dict.fromkeys((g.dataset, g.backbone) for g in groups):
            chosen = [g for g in groups if (g.dataset, g.backbone) == (dataset, backbone)]
            stem = out / "figures" / f"accuracy-{_slug(dataset)}-{_slug(backbone)}"
            figure_files += [str(p.relative_to(out)) for p in plot_curves(chosen, f"{dataset}, {backbone}", stem)]
            for g in chosen:
                stem = out / "figures" / f"matrix-{_slug(dataset)}-{_slug(backbone)}-{_slug(g.label)}"
                figure_files += [str(p.relative_to(out)) for p in plot_matrix(g, stem)]
        pngs = [f for f in figure_files if f.endswith(".png")]
        sections += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in pngs]
    markdown = "\n".join(sections) + "\n"
    record = {"groups": [group_record(g) for g in groups],
              "ablation": [{"dataset": d, "backbone": b, "rows": [dict(zip(["components", "seeds", "last_acc",
                                                                           "inc_acc"], r)) for r in t]}
                           for d, b, t in ablation],
              "by_backbone": by_backbone, "figures": figure_files, "paper_note": paper_note(groups) if paper else None}
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.csv").write_text(results_csv(groups, paper))
    record["markdown"] = markdown
    return record


def results_csv(groups: Sequence[Group], paper: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["dataset", "backbone", "method", "label", "seeds", "last_acc_mean", "last_acc_std", "inc_acc_mean",
              "inc_acc_std", "forgetting_mean", "forgetting_std", "old_acc_last_mean", "new_acc_last_mean"]
    writer.writerow(header + (["paper_last_acc", "paper_inc_acc"] if paper else []))
    for g in groups:
        stats = [g.stat("last_acc"), g.stat("inc_acc"), g.stat("forgetting")]
        row = [g.dataset, g.backbone, g.method, g.label, " ".join(map(str, g.seeds))]
        for stat in stats:
            row += ["", ""] if stat is None else [f"{stat.mean:.4f}", f"{stat.std:.4f}"]
        for key in ("old_accuracy", "new_accuracy"):
            stat = g.last_split(key)
            row.append("" if stat is None else f"{stat.mean:.4f}")
        if paper:
            p = g.paper()
            row += ["", ""] if p is None else [f"{p.last_acc:.2f}", "" if p.inc_acc is None else f"{p.inc_acc:.2f}"]
        writer.writerow(row)
    return buffer.getvalue()
