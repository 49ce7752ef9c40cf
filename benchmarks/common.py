"""What every benchmark shares: the machine's description, peak-memory probes, timing, tables and JSON output."""
from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_x.py` as well as `python -m benchmarks.bench_x`
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
# The real CIFAR-100 PNGs: ../shared/data next to the repository (or next to the folder of worktrees).
CIFAR100_ARCHIVE = next((p for p in (REPO.parent / "shared" / "data" / "cifar100-png.tar.gz",
                                     REPO.parent.parent / "shared" / "data" / "cifar100-png.tar.gz") if p.exists()),
                        REPO.parent / "shared" / "data" / "cifar100-png.tar.gz")

# Dense (no sparsity) peak FLOP/s of known accelerators, per dtype; from the vendors' data sheets.
PEAK_FLOPS = {
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 495e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12, "tf32": 378e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12, "tf32": 418e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 495e12},
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12, "tf32": 418e12},
    "GH200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 495e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12},
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> Dict[str, Any]:
    """Name and size of the machine the numbers were measured on."""
    info: Dict[str, Any] = {"device": device.type, "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
                            "cpu_cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["gpu"] = None
        info["note"] = "no GPU in this session: CPU numbers only"
    return info


def peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    """The data-sheet peak for this GPU and dtype, or None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    key = gpu_model(torch.cuda.get_device_properties(device).name)
    return PEAK_FLOPS[key].get(dtype) if key else None


# (words that must all appear in the name torch reports, PEAK_FLOPS entry); the first match wins. An H100 that
# names no form factor is the SXM one: torch reports it as "NVIDIA H100 80GB HBM3".
GPU_MODELS = ((("H100", "PCIE"), "H100 PCIe"), (("H100", "NVL"), "H100 NVL"), (("H100",), "H100 SXM"),
              (("H200", "NVL"), "H200 NVL"), (("H200",), "H200"), (("GH200",), "GH200"), (("A100",), "A100"))


def gpu_model(name: str) -> Optional[str]:
    """The PEAK_FLOPS entry of a device name as torch reports it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 PCIe"), matching whole words case-insensitively; None for an unknown GPU."""
    words = set(name.upper().replace("-", " ").replace("_", " ").split())
    return next((key for needed, key in GPU_MODELS if words.issuperset(needed)), None)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra memory of a code block: CUDA allocator peak on GPUs, resident set size (sampled) on CPUs."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = _rss_bytes()
            self._peak = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes()) - self._start
        return False

    @property
    def mb(self) -> float:
        return self.peak_bytes / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_name(device: torch.device) -> str:
    return "process CPU seconds" if device.type == "cpu" else "wall seconds (device synchronized)"


@contextmanager
def timed(device: torch.device, into: Dict[str, float], key: str):
    """Seconds of the block stored as ``into[key]`` (wall seconds as ``into[key + '_wall']``).

    On a GPU: wall time, device synchronized. On a CPU: the process's CPU time, which on a shared machine does
    not count the time other processes hold the cores (run single-threaded, see ``apply_threads``, it is the
    compute the block needs)."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    yield
    synchronize(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    into[key] = cpu if device.type == "cpu" else wall
    into[key + "_wall"] = wall


def table(headers: Sequence[str], rows: List[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_result(name: str, payload: Dict[str, Any], out_dir: Optional[Path] = None) -> Path:
    """benchmarks/results/<name>-<device>.json; the device name keeps CPU and GPU results side by side."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = payload.get("machine", {})
    tag = (machine.get("gpu") or "cpu").lower().replace(" ", "-")
    path = out_dir / f"{name}-{tag}.json"
    payload = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_backbone_flags(parser) -> None:
    parser.add_argument("--tiny", action="store_true", help="vit-tiny-test at 32 px (default on CPU)")
    parser.add_argument("--backbone", default=None)


def resolve_backbone(args, device: torch.device):
    """(tiny, backbone name): the 2-block test ViT with --tiny or on a CPU without --backbone, else ViT-B/16."""
    tiny = args.tiny or (device.type == "cpu" and args.backbone is None)
    return tiny, args.backbone or ("vit-tiny-test" if tiny else "vit-b16-in21k")


def add_threads_flag(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default on CPU: 1, so that both sides of a comparison run "
                             "alike on a shared machine, where parallel regions stall on descheduled threads; "
                             "0 = torch's default)")


def apply_threads(threads, device: torch.device) -> None:
    if threads is None:
        threads = 1 if device.type == "cpu" else 0
    if threads > 0:
        torch.set_num_threads(threads)
