"""`slca demo` and the digits dataset it uses (real images bundled with scikit-learn)."""
import numpy as np

from conftest import read_json


def test_digits_are_real_bundled_images_split_once():
    from slca_cli.data import load_dataset
    data = load_dataset("digits", None)
    assert data.num_classes == 10 and len(data.train) + len(data.test) == 1797
    assert 550 <= len(data.test) <= 650
    train_ids, test_ids = set(data.train.ids), set(data.test.ids)
    assert not train_ids & test_ids
    assert sorted(set(data.test.labels)) == list(range(10))
    image = np.asarray(data.train.load(0))
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and image.max() > 200
    assert load_dataset("digits", None).fingerprint() == data.fingerprint()
    capped = load_dataset("digits", None, train_per_class=5)
    assert len(capped.train) == 50 and len(capped.test) == len(data.test)


def test_demo_runs_the_three_methods_and_writes_the_report(tmp_path, cli):
    args = ["demo", "--backbone", "vit-tiny-test", "--epochs", 1, "--train-per-class", 6, "--test-per-class", 4,
            "--device", "cpu", "--no-progress", "--out", tmp_path / "demo"]
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    table = stdout[stdout.index("method    Last-Acc"):]
    for label in ("Seq FT", "SL ", "SLCA"):
        assert label in table
    assert "SLCA - Seq FT:" in table and "report:" in table
    for method in ("seqft", "sl", "slca"):
        metrics = read_json(tmp_path / "demo" / method / "seed-1993" / "metrics.json")
        assert len(metrics["task_accuracy"]) == 5 and metrics["task_sizes"] == [2] * 5
        assert f"{metrics['last_acc']:.2f}" in table
        assert read_json(tmp_path / "demo" / method / "seed-1993" / "config.json")["config"]["dataset"] == "digits"
    report = tmp_path / "demo" / "report"
    assert (report / "results.md").is_file() and (report / "figures" / "accuracy-digits-vit-tiny-test.png").is_file()
    # A second call finds the finished runs and only rebuilds the report.
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    assert "task 1/5" not in stdout and "resuming" in stdout
