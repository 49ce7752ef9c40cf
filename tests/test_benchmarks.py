"""The benchmark scripts run (tiny sizes) and write their JSON; their numbers are never checked here."""
import json
import subprocess
import sys

from conftest import REPO


def run_script(path, *args):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / path), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_statistics_benchmark_runs_as_a_file_and_writes_json(tmp_path):
    stdout = run_script("bench_statistics.py", "--classes", 10, "--dim", 16, "--per-class", 8, "--epochs", 1,
                        "--out", tmp_path)
    assert "speedup" in stdout
    result = json.loads((tmp_path / "bench_statistics-cpu.json").read_text())
    case = result["cases"][0]
    assert case["classes"] == 10 and case["statistics"]["relative_error_covs"] < 1e-6
    assert case["alignment"]["seconds_authors"] > 0 and result["machine"]["gpu"] is None


def test_train_step_benchmark_runs_on_the_tiny_vit(tmp_path):
    args = ["--tiny", "--batch", "4", "--steps", "1", "--warmup", "1", "--modes", "fp32-eager", "bf16-sdpa",
            "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_step", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_train_step-vit-tiny-test-cpu.json").read_text())
    assert [r["mode"] for r in result["results"]] == ["fp32-eager", "bf16-sdpa"]
    assert all(r["images_per_s"] > 0 for r in result["results"]) and result["gflop_per_image_counted"] > 0


def test_gpu_peak_lookup_knows_the_names_torch_reports():
    sys.path.insert(0, str(REPO))
    from benchmarks.common import PEAK_FLOPS, gpu_model
    names = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA GH200 480GB": "GH200",
             "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A100 80GB PCIe": "A100", "NVIDIA GeForce RTX 4090": None}
    assert {name: gpu_model(name) for name in names} == names
    assert PEAK_FLOPS[gpu_model("NVIDIA H100 80GB HBM3")]["bf16"] == 989e12


def test_data_benchmark_runs_on_a_small_tree(tmp_path):
    stdout = run_script("bench_data.py", "--images", 12, "--size", 32, "--batch", 8, "--out", tmp_path)
    assert "fine-grained train" in stdout
    result = json.loads((tmp_path / "bench_data-cpu.json").read_text())
    assert result["images"] == 12 and all(v > 0 for v in result["images_per_s_per_core"].values())


def test_gpu_check_smoke_runs_every_stage_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py is what a lent GPU runs; its --smoke mode runs the same stages through the same
    APIs at toy sizes, so a change that breaks the check breaks this test instead of the GPU session."""
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_check import STAGES
    stdout = run_script("gpu_check.py", "--smoke", "--work", tmp_path / "work", "--out", tmp_path)
    result = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    assert list(result["stages"]) == list(STAGES)
    assert {name: r["status"] for name, r in result["stages"].items()} == {name: "ok" for name in STAGES}
    stages = result["stages"]
    assert stages["end_to_end"]["resumed_mid_task"] and stages["end_to_end"]["eval_matches_stored"]
    assert {"fit", "statistics", "align", "evaluate", "save"} <= set(stages["end_to_end"]["stage_seconds"])
    assert stages["imagenet_r"]["device_augment"] and stages["imagenet_r"]["drift_stored"]
    assert stages["train_step"]["bf16-compile"]["images_per_s"] > 0 and stages["data_supply"]["images"] > 0
    assert "host_syncs" in stdout.split("stage")[-1]  # the table closes the output
