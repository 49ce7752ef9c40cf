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


def test_small_vit_pretraining_smoke_writes_weights_vit_tiny_test_loads_and_caches_them(tmp_path):
    import torch
    from backbones.vit import _tiny
    stdout = run_script("pretrain_small_vit.py", "--smoke", "--cache-dir", tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["dataset"] == "synthetic" and record["classes"] == [0, 1, 2, 3]
    assert 0 <= record["test_accuracy"] <= 100
    assert f"--weights {weights}" in stdout
    loaded, fresh = _tiny(str(weights)), _tiny()  # what `--backbone vit-tiny-test --weights FILE` builds
    assert not torch.equal(loaded.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)
    assert run_script("pretrain_small_vit.py", "--smoke", "--cache-dir", tmp_path).startswith("cached: ")


def test_vit_methods_table_smoke_runs_methods_through_the_cli_and_merges(tmp_path):
    """benchmarks/vit_methods_table.py --smoke: each method a real `slca train --classes` run, the JSON written
    after every method, a later --methods call merged into it; a change of settings starts a new table."""
    sys.path.insert(0, str(REPO))
    from benchmarks.vit_methods_table import NOT_IN_TABLE, PROBE, load_previous, table_methods
    from slca_cli.methods.catalog import method_names
    assert set(table_methods()) == set(method_names()) - set(NOT_IN_TABLE)
    assert {"l2p", "dualprompt", "slca", "slca++", "simplecil", "ranpac", "cofima", "aper"} <= set(table_methods())
    from benchmarks.pretrain_small_vit import build_model
    from safetensors.torch import save_file
    import torch
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"  # a random backbone in the pre-training script's format
    save_file({k: v.contiguous() for k, v in build_model(4).state_dict().items() if not k.startswith("head.")},
              str(weights))
    out = tmp_path / "table.json"
    common = ["--smoke", "--weights", weights, "--runs", tmp_path / "runs", "--out", out]
    stdout = run_script("vit_methods_table.py", *common, "--methods", "simplecil", PROBE)
    first = json.loads(out.read_text())
    assert set(first["methods"]) == {"simplecil", PROBE} and first["settings"]["epochs"] == 1
    assert all(r["status"] == "ok" and r["commit"] and r["finished"] for r in first["methods"].values())
    assert first["methods"][PROBE]["inc_acc"] is None and 0 <= first["methods"][PROBE]["last_acc"] <= 100
    config = json.loads((tmp_path / "runs" / "simplecil" / "seed-1993" / "config.json").read_text())
    assert config["config"]["classes"] == "4-7" and config["class_names"][0].startswith("class_00")
    assert "| SimpleCIL |" in stdout and "| method | Last-Acc | Inc-Acc | forgetting |" in stdout
    run_script("vit_methods_table.py", *common, "--methods", "l2p")
    merged = json.loads(out.read_text())["methods"]
    assert set(merged) == {"simplecil", PROBE, "l2p"} and merged["simplecil"] == first["methods"]["simplecil"]
    assert merged["l2p"]["status"] == "ok" and len(merged["l2p"]["task_accuracy"]) == 2
    other = dict(json.loads(out.read_text())["settings"], seed=1996)
    assert load_previous(out, other) == {} and not out.exists() and out.with_suffix(".previous.json").is_file()
