"""`slca export`: the merged-classifier timm model, its README loading lines, ONNX, and refusals."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, read_json


def readme_loading_lines() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Export: `slca export`"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def exported(digit_run, tmp_path_factory):
    from conftest import Cli
    folder = tmp_path_factory.mktemp("export")
    code, stdout, stderr = Cli()("export", digit_run, "--out", folder / "export")
    assert code == 0, stderr
    return folder, stdout


def test_export_writes_the_merged_classifier_and_its_descriptions(exported, digit_run):
    folder, stdout = exported
    state = read_json(digit_run / "task-02" / "state.json")
    assert "after task 2, 8 classes" in stdout
    assert read_json(folder / "export" / "classes.json") == state["class_names"]
    pre = read_json(folder / "export" / "preprocessing.json")
    assert (pre["resize"], pre["crop"], pre["mean"], pre["std"]) == (37, 32, [0.5] * 3, [0.5] * 3)
    spec = read_json(folder / "export" / "model.json")
    assert spec["num_classes"] == 8 and spec["source"]["model_sha256"] == state["sha256"]["model.safetensors"]
    from safetensors.torch import load_file
    weights = load_file(folder / "export" / "model.safetensors")
    assert weights["head.weight"].shape == (8, 64) and not any(k.startswith("task_heads") for k in weights)


def test_the_readme_lines_load_the_export_with_torch_and_timm_alone(exported, digit_run, digit_folders, cli):
    folder, _ = exported
    image = folder / "digits-8-9" / "test" / "8" / "0008.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(digit_folders[1] / "test" / "8" / "0008.png", image)
    code = readme_loading_lines() + "\nimport sys\nassert not any(m.startswith('slca') for m in sys.modules)\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    name, probability = run.stdout.split()
    code, stdout, stderr = cli("predict", digit_run, image, "--format", "jsonl", "--no-progress")
    assert code == 0, stderr
    top = json.loads(stdout)["top_k"][0]
    assert (name, float(probability)) == pytest.approx((top["class"], top["probability"]), abs=1e-4)


def test_onnx_logits_equal_pytorch(exported, digit_run, digit_folders, tmp_path, cli):
    onnxruntime = pytest.importorskip("onnxruntime", reason="--format onnx needs the onnx extra: pip install "
                                                           "'slca[onnx]'")
    pytest.importorskip("onnx", reason="--format onnx needs the onnx extra: pip install 'slca[onnx]'")
    code, stdout, stderr = cli("export", digit_run, "--out", tmp_path / "onnx", "--format", "onnx")
    assert code == 0, stderr
    assert "as onnx" in stdout and (tmp_path / "onnx" / "classes.json").is_file()
    import torch
    from PIL import Image
    from slca_cli.export import build_plain
    from safetensors.torch import load_file
    from slca_cli.predict import preprocessing
    from slca_cli.checkpoint import read_state
    folder, _ = exported
    spec = read_json(folder / "export" / "model.json")
    plain = build_plain(spec)
    plain.load_state_dict(load_file(folder / "export" / "model.safetensors"))
    transform, finish = preprocessing(read_state(digit_run / "task-02"))
    images = finish(torch.stack([transform(Image.open(p).convert("RGB"))
                                 for p in sorted((digit_folders[1] / "test").rglob("*.png"))]))
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        torch_logits = plain.eval()(images).numpy()
    assert onnx_logits.shape == (len(images), 8)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=0)  # the tolerance README states


@pytest.mark.parametrize("method", ["slca++", "l2p"])
def test_lora_is_merged_and_prompt_methods_export_as_onnx_only(method, method_run, tmp_path, cli):
    run = method_run(method)
    code, stdout, stderr = cli("export", run, "--out", tmp_path / "export")
    if method == "l2p":
        assert_one_line_error(code, stderr, "--method l2p is not a plain timm model", "--format onnx")
        assert not (tmp_path / "export" / "model.safetensors").exists()
        if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
            code, stdout, stderr = cli("export", run, "--out", tmp_path / "export", "--format", "onnx")
            assert code == 0, stderr
            assert float(re.search(r"within (\S+)$", stdout.splitlines()[0]).group(1)) <= 1e-4
    else:
        assert code == 0, stderr
        assert float(re.search(r"within (\S+)$", stdout.splitlines()[0]).group(1)) <= 1e-4
        from safetensors.torch import load_file
        keys = load_file(tmp_path / "export" / "model.safetensors")
        assert "blocks.0.attn.qkv.weight" in keys and not any("lora" in k or ".base." in k for k in keys)


def test_bad_exports_are_one_line_errors(digit_run, tmp_path, cli):
    code, _, stderr = cli("export", tmp_path / "missing", "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, "does not exist")
    code, _, stderr = cli("export", digit_run, "--out", tmp_path / "x", "--format", "tflite")
    assert_one_line_error(code, stderr, "--format must be one of safetensors, onnx")
    (tmp_path / "file").write_text("")
    code, _, stderr = cli("export", digit_run, "--out", tmp_path / "file")
    assert_one_line_error(code, stderr, "is a file")
