"""Official archives as data: extracted once, safely, into a cache folder; finding a layout under a data root."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..errors import SlcaError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
IGNORED_NAMES = ("__MACOSX",)


class MissingData(SlcaError):
    """Nothing of the dataset is under the data root (as opposed to a layout that is there but broken)."""


def data_home() -> Path:
    """$SLCA_DATA_ROOT, else ~/.cache/slca/data: default data roots and extracted archives live here."""
    return Path(os.environ.get("SLCA_DATA_ROOT") or Path.home() / ".cache" / "slca" / "data").expanduser()


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def member_target(name: str) -> Optional[PurePosixPath]:
    """Where an archive member goes inside the destination; None for a name that would land outside it
    (absolute, drive letter, or ``..``)."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(clean).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _is_junk(target: PurePosixPath) -> bool:
    """macOS resource forks (``__MACOSX/``, ``._name``): not data, and unreadable as images."""
    return bool(target.parts) and (target.parts[0] in IGNORED_NAMES or target.name.startswith("._"))


def _members_tar(archive: Path):
    """(name, kind, open) of every member; kind is dir, file or other (links, devices: never extracted)."""
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            kind = "dir" if member.isdir() else "file" if member.isfile() else "other"
            yield member.name, kind, (lambda m=member: tar.extractfile(m))


def _members_zip(archive: Path):
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if info.is_dir():
                kind = "dir"
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits (ZipFile.writestr): a file
                kind = "other"
            else:
                kind = "file"
            yield info.filename, kind, (lambda i=info: zf.open(i))


def extract_archive(archive: Path, dest: Path, keep: Optional[Callable[[str], bool]] = None) -> int:
    """Extract ``archive`` into the folder ``dest`` (made), regular files and folders only; a member whose
    name would escape ``dest`` is an error. ``keep(name)`` selects members. Returns the number of files."""
    members = _members_zip(archive) if archive.name.lower().endswith(".zip") else _members_tar(archive)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    skipped: List[str] = []
    for name, kind, open_member in members:
        target = member_target(name)
        if target is None:
            raise SlcaError(f"{archive} has a member '{name}' that would be written outside the folder it is "
                            f"extracted to; refusing to extract it: use a trusted copy of the archive")
        if kind == "other" or _is_junk(target):
            skipped.append(name)
            continue
        if keep and not keep(name):
            continue
        path = dest.joinpath(*target.parts)
        if kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        source = open_member()
        with source, open(path, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        count += 1
    if skipped:
        print(f"warning: {archive}: skipped {len(skipped)} member(s) that are links, devices or macOS metadata, not "
              f"regular files: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr,
              flush=True)
    return count


def _cache_key(archives: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for archive in sorted(archives):
        info = archive.stat()
        digest.update(f"{archive.name}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def extracted_folder(archives: Sequence[Path]) -> Path:
    """The cache folder that ``archives`` extract into: named after them, keyed by their names, sizes and times
    so that a replaced archive extracts afresh."""
    stem = "+".join(archive_stem(a) for a in sorted(archives))[:80]
    return data_home() / "extracted" / f"{stem}-{_cache_key(archives)}"


def extract_cached(archives: Sequence[Path]) -> Path:
    """Extract ``archives`` (together, into one folder) on first use; later calls return the same folder."""
    dest = extracted_folder(archives)
    if dest.is_dir():
        return dest
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    names = ", ".join(str(a) for a in archives)
    print(f"extracting {names} into {dest} (once; later runs reuse it)", file=sys.stderr, flush=True)
    try:
        for archive in sorted(archives):
            extract_archive(archive, partial)
        try:
            partial.rename(dest)
        except OSError:
            if not dest.is_dir():  # another process may have finished the same extraction first
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except SlcaError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise SlcaError(f"cannot extract {names} into {dest.parent}: {exc.__class__.__name__}: {exc}; if the archive "
                        f"is truncated download it again, if the disk is full or read-only set $SLCA_DATA_ROOT "
                        f"to another folder") from None
    return dest


Detector = Callable[[Path], bool]


def _subfolders(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_NAMES)


def find_layout(root: Path, detectors: Dict[str, Detector], hints: Iterable[str] = (),
                depth: int = 3) -> Optional[Tuple[str, Path]]:
    """The first (layout, folder) whose detector accepts a hinted subfolder of ``root``, ``root`` itself, or the
    folder that a chain of single subfolders leads to (archives unpack into one top folder)."""
    hints = tuple(hints)
    current = root
    for _ in range(depth + 1):
        for folder in [current / h for h in hints] + [current]:  # a named subfolder before a guess
            if folder.is_dir():
                for layout, detect in detectors.items():
                    if detect(folder):
                        return layout, folder
        subfolders = _subfolders(current)
        if len(subfolders) != 1:
            return None
        current = subfolders[0]
    return None


class Located(NamedTuple):
    layout: str
    folder: Path   # where the layout was found (perhaps inside the extraction cache)
    origin: Path   # the folder the user named (or holding the archive they named): loose files may sit there


def locate_dataset(name: str, root: Path, detectors: Dict[str, Detector], expected: str,
                   hints: Iterable[str] = (), advice: str = "") -> Located:
    """Where dataset ``name`` is under ``root``: a folder, an archive, or a folder holding archives
    (extracted into the cache on first use). Nothing found: MissingData naming the expected layout."""
    hints = tuple(hints)
    origin = root.parent if root.is_file() else root
    if root.is_file():
        if not is_archive(root):
            raise SlcaError(f"--data-root {root} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)}); "
                            f"give the folder holding {expected}")
        root = extract_cached([root])
    elif not root.is_dir():
        raise MissingData(f"{name}: {root} does not exist; expected {expected}{advice}")
    found = find_layout(root, detectors, hints)
    if found:
        return Located(*found, origin)
    archives = sorted(p for p in root.iterdir() if is_archive(p))
    if archives:
        found = find_layout(extract_cached(archives), detectors, hints)
        if found:
            return Located(*found, origin)
        raise SlcaError(f"{name}: the archives in {root} ({', '.join(a.name for a in archives)}) do not hold "
                        f"{expected}")
    raise MissingData(f"{name}: {root} does not hold {expected}{advice}")
