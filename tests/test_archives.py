"""Archives as data: extracted once into the cache, never outside the folder they are extracted to."""
import io
import os
import tarfile
import zipfile

import pytest

from slca_cli.data.archives import extract_archive, extract_cached, extracted_folder, member_target
from slca_cli.errors import SlcaError


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLCA_DATA_ROOT", str(tmp_path / "cache"))


def tar_with(path, members):
    """A .tar.gz holding ``members``: (name, bytes) for files, (name, None) for folders, (name, '->target')
    for symbolic links."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt"])
def test_member_names_that_escape_are_refused(tmp_path, name):
    assert member_target(name) is None
    archive = tar_with(tmp_path / "bad.tar.gz", [("ok/a.txt", b"a"), (name, b"evil")])
    with pytest.raises(SlcaError, match="outside the folder"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_zip_member_that_escapes_is_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../evil.txt", b"evil")
    with pytest.raises(SlcaError, match="outside the folder"):
        extract_archive(archive, tmp_path / "a" / "b")
    assert not (tmp_path / "evil.txt").exists()


def test_links_are_not_extracted(tmp_path):
    archive = tar_with(tmp_path / "links.tar.gz", [("d", None), ("d/real.txt", b"x"), ("d/link", "->/etc/passwd"),
                                                   ("d/._real.txt", b"mac fork")])
    assert extract_archive(archive, tmp_path / "out") == 1
    assert (tmp_path / "out" / "d" / "real.txt").read_bytes() == b"x"
    assert not os.path.lexists(tmp_path / "out" / "d" / "link")
    assert not (tmp_path / "out" / "d" / "._real.txt").exists()


def test_extracted_once_and_again_when_the_archive_changes(tmp_path):
    archive = tar_with(tmp_path / "data.tar.gz", [("train/a/1.txt", b"1")])
    first = extract_cached([archive])
    assert (first / "train" / "a" / "1.txt").is_file() and first == extracted_folder([archive])
    (first / "marker").write_text("kept")
    assert extract_cached([archive]) == first and (first / "marker").exists()  # not extracted again
    tar_with(archive, [("train/a/1.txt", b"1"), ("train/a/2.txt", b"2")])
    os.utime(archive, ns=(1, 1))
    second = extract_cached([archive])
    assert second != first and (second / "train" / "a" / "2.txt").is_file()
    assert not [p for p in second.parent.iterdir() if ".partial" in p.name]


def test_a_truncated_archive_is_one_clear_error(tmp_path):
    archive = tar_with(tmp_path / "data.tar.gz", [("train/a/1.bin", os.urandom(200_000))])
    archive.write_bytes(archive.read_bytes()[:50_000])
    with pytest.raises(SlcaError, match="cannot extract .*download it again"):
        extract_cached([archive])
    assert not extracted_folder([archive]).exists()
    assert not [p for p in extracted_folder([archive]).parent.iterdir() if ".partial" in p.name]
