"""`slca datasets prepare cub200|cars196` from a hub mirror, offline: a tiny copy in the mirror's format (parquet
shards: image bytes + label, class names in the schema) served by a local stand-in for the hub (HF_ENDPOINT), so
the download goes through huggingface_hub exactly as a real one does. Count check, wrong split, checksum,
interrupted downloads, offline errors."""
import hashlib
import http.server
import json
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from slca_cli.data import cars196, cub200, load_dataset
from slca_cli.data.cars196 import class_key
from slca_cli.data.class_names import CARS196, CUB200
from slca_cli.data.hub_mirror import RECORD_FILE, list_checksum, name_key, safe_file_name

from conftest import assert_one_line_error
from fake_datasets import image_bytes

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_shard(path: Path, rows, names, with_paths: bool, columns=("image", "label")) -> None:
    """A parquet shard as the `datasets` library writes one: image struct (bytes, path), int label, and the class
    names in the schema's "huggingface" metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image, label = columns
    features = {image: {"_type": "Image"}, label: {"names": list(names), "_type": "ClassLabel"}}
    schema = pa.schema([(image, pa.struct([("bytes", pa.binary()), ("path", pa.string())])), (label, pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    images = [{"bytes": data, "path": name if with_paths else None} for name, data, _ in rows]
    table = pa.table({image: images, label: [number for _, _, number in rows]}, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def tiny_mirror(folder: Path, mirror, names, per_split=(1, 1), move_to_train: int = 0, with_paths=True,
                columns=("image", "label")):
    """The mirror's files under ``folder`` (its repo layout), two shards per split; ``move_to_train`` test rows
    become train rows (another split with the same classes)."""
    rows = {split: [(f"{split}_{c:03d}_{k}.jpg", image_bytes((c + 100 * (split == "test") + k) % 250), c)
                    for c in range(len(names)) for k in range(count)]
            for split, count in zip(("train", "test"), per_split)}
    rows["train"] += rows["test"][:move_to_train]
    rows["test"] = rows["test"][move_to_train:]
    for split in ("train", "test"):
        half = len(rows[split]) // 2
        for shard, part in zip(mirror.files[split], (rows[split][:half], rows[split][half:])):
            write_shard(folder / shard, part, names, with_paths, columns)
    return rows


class Hub:
    """A local stand-in for the hub's resolve endpoint: HEAD and GET (with Range) of the files under ``folder``.
    ``cut``: file names whose first GET stops halfway (a dropped connection); ``fail``: names whose first request
    gets a 404 (the transfer of that file fails)."""

    def __init__(self, folder: Path):
        self.folder, self.cut, self.fail, self.log = folder, set(), set(), []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _file(self):
                prefix = "/datasets/"
                path = self.path.split("?")[0]
                if not path.startswith(prefix) or "/resolve/" not in path:
                    return None, None
                name = path.split("/resolve/", 1)[1].split("/", 1)[1]
                return name, hub.folder / name

            def _answer(self, with_body: bool):
                name, path = self._file()
                hub.log.append((self.command, name, self.headers.get("Range")))
                if name in hub.fail:
                    hub.fail.discard(name)
                    path = None
                if path is None or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start = 0
                ranged = self.headers.get("Range")
                if ranged and ranged.startswith("bytes="):
                    start = int(ranged[6:].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not with_body:
                    return
                if name in hub.cut and not start:
                    hub.cut.discard(name)
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data[start:])

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, name=None):
        return [entry for entry in self.log if entry[0] == "GET" and (name is None or entry[1] == name)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def cub_names():
    return [name.replace("_", " ") for name in CUB200]   # as a mirror may spell them: no number, spaces


def cars_names():
    return [name.lower() for name in CARS196]   # lower case: sorted as they are, the class ids would change


def official_cub(label):
    return f"{label + 1:03d}.{CUB200[label]}"


def test_a_mirror_file_name_never_leaves_its_class_folder():
    assert [safe_file_name(p) for p in ("../../x.jpg", "a\\b.jpg", "..", ".hidden", "a\nb.jpg", None)] == \
        ["x.jpg", "b.jpg", None, None, None, None]


def test_the_official_names_are_distinct_under_loose_comparison():
    assert len(CUB200) == 200 and len(CARS196) == 196
    for names in (CUB200, CARS196):
        assert len({name_key(n) for n in names}) == len(names)
    assert name_key("Brewer's Blackbird") == name_key("009.Brewer_Blackbird")
    assert name_key("2000 AM General Hummer SUV") == name_key(CARS196[0])


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    server = Hub(tmp_path / "repo")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("SLCA_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("SLCA_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield server
    server.close()


def use_mirror(monkeypatch, module, **changes):
    """The real mirror's spec with the tiny copy's expected values (one train and one test image per class)."""
    classes = module.MIRROR.expected[0]
    mirror = replace(module.MIRROR, revision=COMMIT, expected=(classes, classes, classes), **changes)
    monkeypatch.setattr(module, "MIRROR", mirror)
    return mirror


def test_cub200_fetched_checked_and_laid_out_in_the_official_layout(hub, tmp_path, cli, monkeypatch):
    mirror = use_mirror(monkeypatch, cub200)
    rows = tiny_mirror(hub.folder, mirror, cub_names())
    # The checksum the tiny copy must have: its (split, images.txt path, class) list.
    expected = list_checksum([(split, f"images/{official_cub(label)}/{name}", official_cub(label))
                              for split in ("train", "test") for name, _, label in rows[split]])
    use_mirror(monkeypatch, cub200, list_sha256=expected)
    code, out, err = cli("datasets", "prepare", "cub200", "--no-progress")
    assert code == 0, err
    assert "cub200: 200 classes; train 200 images, test 200" in out and "all 400 images decode" in out
    assert f"list sha256 {expected} (matches the recorded list)" in out
    folder = tmp_path / "data" / "cub200" / "CUB_200_2011"
    for name in ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt"):
        assert (folder / name).is_file()
    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["list_sha256"] == expected and record["list_sha256_checked"] and record["train"] == 200
    data = load_dataset("cub200", None)
    assert data.layout.startswith("official CUB_200_2011")
    # Official class ids and names: the mirror's label k is classes.txt's class k+1; its bytes are written untouched.
    assert data.class_names == [official_cub(k) for k in range(200)]
    assert data.train.describe(7) == "images/008.Rhinoceros_Auklet/train_007_0.jpg" and data.train.labels[7] == 7
    assert data.test.files[3].read_bytes() == rows["test"][3][1]
    # A second prepare finds the data and downloads nothing.
    before = len(hub.gets())
    code, _, err = cli("datasets", "prepare", "cub200", "--no-progress", "--no-check-images")
    assert code == 0, err
    assert len(hub.gets()) == before


def test_a_mirror_with_another_split_or_list_is_refused(hub, tmp_path, cli, monkeypatch):
    mirror = use_mirror(monkeypatch, cub200)
    tiny_mirror(hub.folder, mirror, cub_names(), move_to_train=3)
    stale = tmp_path / "data" / "cub200" / ".CUB_200_2011.partial-999999999"   # left by a killed prepare
    stale.mkdir(parents=True)
    code, _, err = cli("datasets", "prepare", "cub200", "--no-progress")
    assert_one_line_error(code, err, "bentrevett/caltech-ucsd-birds-200-2011", "not the official cub200 split",
                          "203 train / 197 test", "200 / 200")
    assert not (tmp_path / "data" / "cub200" / "CUB_200_2011").exists()
    swapped = cub_names()
    swapped[3], swapped[4] = swapped[4], swapped[3]
    tiny_mirror(hub.folder, mirror, swapped)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache-2"))
    code, _, err = cli("datasets", "prepare", "cub200", "--no-progress")
    assert_one_line_error(code, err, "its class 3 is 'Crested Auklet', the official class 4 is '004.Groove_billed_Ani'",
                          "not the official ones in the official order")
    tiny_mirror(hub.folder, mirror, cub_names())
    use_mirror(monkeypatch, cub200, list_sha256="0" * 64)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache-3"))
    code, _, err = cli("datasets", "prepare", "cub200", "--no-progress")
    assert_one_line_error(code, err, "checksum", "the mirror changed: refusing it")
    assert [p.name for p in (tmp_path / "data" / "cub200").iterdir()] == []   # no partial folder left


def test_cars196_download_cut_halfway_resumes_and_gives_the_devkit_class_ids(hub, tmp_path, cli, monkeypatch):
    mirror = use_mirror(monkeypatch, cars196)
    rows = tiny_mirror(hub.folder, mirror, cars_names(), with_paths=False)
    hub.cut = set(mirror.all_files())
    # Small reads, so that the first part of a shard is on disk before the cut (the hub reads 10 MB at a time).
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 1024)
    code, out, err = cli("datasets", "prepare", "cars196", "--no-progress", "--no-check-images")
    assert code == 0, err
    assert "cars196: 196 classes; train 196 images, test 196" in out and "not recorded for this mirror yet" in out
    # Each shard's first transfer broke off halfway; huggingface_hub asked for the rest with a Range request.
    for shard in mirror.all_files():
        ranges = [r for _, _, r in hub.gets(shard)]
        assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes="), (shard, hub.log)
    data = load_dataset("cars196", None)
    assert data.layout.startswith("devkit")
    # The devkit's ids (its names sorted, "/" as "-"), though the mirror spells every name in lower case.
    assert data.class_names == sorted(class_key(n) for n in CARS196)
    assert data.class_names[0] == "AM General Hummer SUV 2000" and data.class_names[-1] == "smart fortwo Convertible 2012"
    label = rows["train"][5][2]
    assert data.class_names[data.train.labels[5]] == class_key(CARS196[label])
    assert data.train.describe(0) == "cars_train/00001.jpg" and data.test.describe(195) == "cars_test/00196.jpg"


def test_a_failed_file_is_fetched_by_the_next_prepare_and_only_it(hub, tmp_path, cli, monkeypatch):
    mirror = use_mirror(monkeypatch, cub200)
    # Columns renamed from the mirror's: the schema's one Image and one ClassLabel feature are used.
    tiny_mirror(hub.folder, mirror, cub_names(), columns=("img", "species"))
    broken = mirror.files["test"][0]
    hub.fail = {broken}
    code, _, err = cli("datasets", "prepare", "cub200", "--no-progress", "--no-check-images")
    assert_one_line_error(code, err, f"could not download {broken}", "run the same command again")
    assert not (tmp_path / "data" / "cub200" / "CUB_200_2011").exists()
    got_before = {f: len(hub.gets(f)) for f in mirror.all_files()}
    code, out, err = cli("datasets", "prepare", "cub200", "--no-progress", "--no-check-images")
    assert code == 0, err
    fetched_again = [f for f in mirror.all_files() if len(hub.gets(f)) > got_before[f]]
    assert broken in fetched_again and mirror.files["train"][0] not in fetched_again
    assert load_dataset("cub200", None).class_names[199] == "200.Common_Yellowthroat"


@pytest.mark.parametrize("variable", ["SLCA_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_names_the_files_to_place(hub, tmp_path, cli, monkeypatch, variable):
    mirror = use_mirror(monkeypatch, cub200)
    tiny_mirror(hub.folder, mirror, cub_names())
    monkeypatch.setenv(variable, "1")
    code, _, err = cli("datasets", "prepare", "cub200", "--no-progress")
    assert_one_line_error(code, err, "downloads are off", "CUB_200_2011.tgz", str(tmp_path / "data" / "cub200"),
                          "slca datasets prepare cub200", mirror.files["train"][0])
    assert hub.gets() == []


def test_no_network_names_the_files_to_place(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("SLCA_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for var in ("SLCA_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = cli("datasets", "prepare", "cars196", "--no-progress")
    assert_one_line_error(code, err, "not reachable", "cars_test_annos_withlabels.mat", "isaacchung/StanfordCars")
    code, _, err = cli("datasets", "prepare", "cars196", "--no-download")
    assert_one_line_error(code, err, "slca datasets prepare cars196", "cars_train_annos.mat")


def test_train_on_a_fresh_machine_fetches_the_benchmark_first(hub, tmp_path, cli, monkeypatch):
    mirror = use_mirror(monkeypatch, cars196)
    tiny_mirror(hub.folder, mirror, cars_names())
    out = tmp_path / "run"
    code, _, err = cli("train", "--dataset", "cars196", "--backbone", "vit-tiny-test", "--device", "cpu", "--epochs", 1,
                       "--train-per-class", 1, "--test-per-class", 1, "--workers", 0, "--ca-samples", 4,
                       "--ca-epochs", 1, "--tasks", 2, "--no-progress", "--out", out)
    assert code == 0, err
    assert "cars196 is not in" in err and "laid out cars196" in err
    config = json.loads((out / "seed-1993" / "config.json").read_text())
    assert config["data_fingerprint"] == load_dataset("cars196", None, train_per_class=1, test_per_class=1).fingerprint()
    # With several processes nothing is fetched: each would fetch it; the loader's error names the command.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SLCA_DATA_ROOT", str(tmp_path / "elsewhere"))
    from slca_cli.data.prepare import fetch_if_absent
    fetch_if_absent("cars196", None)
    assert not (tmp_path / "elsewhere").exists()
