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
        return label if logit_norm or config.get("align_mode") == "closed-form" else f"{label} (no LN)"
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
                run = _read_run(folder)
                if run.metrics.get("tasks_done", len(run.metrics["task_accuracy"])) < len(run.config["task_sizes"]):
                    warn(f"warning: {folder} is unfinished ({len(run.metrics['task_accuracy'])} of "
                         f"{len(run.config['task_sizes'])} tasks); left out of the report")
                    continue
                found[folder.resolve()] = run
    if not found:
        raise SlcaError(f"no finished runs (metrics.json + config.json) under {', '.join(map(str, paths))}; "
                        f"train first with `slca train`")
    return list(found.values())


def _read_run(folder: Path) -> SeedRun:
    try:
        header = json.loads((folder / "config.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlcaError(f"{folder} holds a damaged config.json or metrics.json ({exc.__class__.__name__}); "
                        f"remove the folder or re-run it with --resume") from None
    config = header.get("config", {})
    if "method" not in config or "task_sizes" not in config or "task_accuracy" not in metrics:
        raise SlcaError(f"{folder} is not an slca run folder (config.json or metrics.json lacks its fields)")
    probe_file = folder / "probe.json"
    if probe_file.is_file():  # written by `slca probe`; only a probe of the final model counts here
        try:
            probe = json.loads(probe_file.read_text())
        except ValueError:
            probe = {}
        if probe.get("task") == len(metrics["task_accuracy"]):
            metrics = dict(metrics, probe_accuracy=probe.get("probe_accuracy"))
    return SeedRun(folder, int(header.get("seed", metrics.get("seed", 0))), config, metrics)


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
    groups = group_runs(find_seed_runs(paths, warn))
    out = Path(out)
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
