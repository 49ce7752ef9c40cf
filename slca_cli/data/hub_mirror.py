"""A benchmark fetched from a Hugging Face hub mirror (parquet shards of image bytes + label), checked against the
official split (per-split counts, class count, a checksum of the (file, label) list) and laid out on disk in the
official layout that the loader already reads.

Downloads go through ``huggingface_hub.hf_hub_download`` (its cache, its resume of a broken transfer, $HF_ENDPOINT);
a shard already in the cache is never fetched again, so an interrupted prepare picks up where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

from ..errors import SlcaError

DEFAULT_ENDPOINT = "https://huggingface.co"
RECORD_FILE = "slca-mirror.json"


@dataclass(frozen=True)
class Mirror:
    """Where a benchmark's copy lives on the hub and what it must contain to be the official split.

    ``list_sha256``: sha256 of the laid-out (split, file, class) list (``list_checksum``); None where it has not
    been recorded yet (prepare then prints the value to record)."""
    dataset: str
    repo_id: str
    revision: str
    files: Dict[str, Tuple[str, ...]]          # split -> parquet shards in the repo, in order
    expected: Tuple[int, int, int]             # (classes, train images, test images)
    list_sha256: Optional[str] = None
    class_names: Tuple[str, ...] = ()         # the official names of the mirror's labels 0, 1, ... (checked)
    image_column: str = "image"
    label_column: str = "label"
    size: str = ""                             # for messages: about how much is downloaded

    @property
    def where(self) -> str:
        return f"hub dataset {self.repo_id}@{self.revision[:12]}"

    def all_files(self) -> List[str]:
        return [f for split in ("train", "test") for f in self.files[split]]


@dataclass
class Row:
    """One image of the mirror: its bytes, its label (the mirror's class index) and, when the mirror kept it, the
    original file name."""
    split: str
    index: int
    data: bytes
    label: int
    filename: Optional[str]


# Writing the official layout from the rows: (folder, class names, rows) -> [(split, relative path, class name)].
LayoutWriter = Callable[[Path, List[str], Iterator[Row]], List[Tuple[str, str, str]]]


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick connection test (so an offline machine fails at once, not after minutes of retries)."""
    from ..backbones.cache import offline

    if offline():
        return False
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_download(mirror: Mirror, filename: str, local_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(mirror.repo_id, filename, repo_type="dataset", revision=mirror.revision,
                           endpoint=endpoint(), local_files_only=local_only)


def cached_shards(mirror: Mirror) -> Dict[str, Optional[Path]]:
    """Each shard's path in the hub cache, or None where it is not there yet (no network used)."""
    found: Dict[str, Optional[Path]] = {}
    for filename in mirror.all_files():
        try:
            found[filename] = Path(_hub_download(mirror, filename, local_only=True))
        except Exception:  # not cached: the hub raises one of several errors
            found[filename] = None
    return found


class HubUnavailable(SlcaError):
    """The mirror cannot be fetched now (offline, no network) and is not in the hub cache: the caller adds this
    to the loader's own message, which names the official files to place."""


def unavailable(mirror: Mirror, why: str) -> HubUnavailable:
    return HubUnavailable(f"{why}, so `slca datasets prepare {mirror.dataset}` cannot fetch its copy ({mirror.where}: "
                          f"{', '.join(mirror.all_files())}); run it on a machine that is online")


def download_shards(mirror: Mirror, root: Path, manual: str, show_progress: bool, echo) -> Dict[str, Path]:
    """Every shard of ``mirror`` from the hub cache, downloading the missing ones."""
    from ..backbones.cache import offline

    shards = cached_shards(mirror)
    missing = [f for f, path in shards.items() if path is None]
    if not missing:
        return {f: p for f, p in shards.items() if p is not None}
    if offline():
        raise unavailable(mirror, "downloads are off (SLCA_OFFLINE or HF_HUB_OFFLINE is set)")
    if not reachable(endpoint()):
        raise unavailable(mirror, f"the hub ({endpoint()}) is not reachable")
    echo(f"downloading {mirror.dataset} from {mirror.where} ({len(missing)} of {len(shards)} files, "
         f"{mirror.size or 'size unknown'}; into the hub cache, $HF_HOME, default ~/.cache/huggingface)")
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    was_disabled = are_progress_bars_disabled()
    if not show_progress:
        disable_progress_bars()
    try:
        for filename in missing:
            try:
                shards[filename] = Path(_hub_download(mirror, filename, local_only=False))
            except Exception as exc:  # network and hub errors come in many types; the message is what matters
                reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
                done = len(missing) - sum(1 for f in missing if shards[f] is None)
                raise SlcaError(f"could not download {filename} of {mirror.where} ({reason}); run the same command "
                                f"again to go on ({done} of {len(missing)} files were complete and are kept in "
                                f"the hub cache), or put {manual} in {root}") from None
    finally:
        if not show_progress and not was_disabled:
            enable_progress_bars()
    return {f: p for f, p in shards.items() if p is not None}


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise SlcaError("reading the hub mirror's parquet files needs pyarrow: pip install pyarrow") from None
    return pq


def hf_features(shard: Path) -> dict:
    """The `datasets` library's feature description stored in a parquet file's schema ({} when absent)."""
    pq = _parquet()
    meta = (pq.read_schema(shard).metadata or {}).get(b"huggingface")
    try:
        info = json.loads(meta) if meta else {}
    except ValueError:
        return {}
    return info.get("info", {}).get("features", {}) or info.get("features", {}) or {}


def columns_of(mirror: Mirror, shard: Path) -> Tuple[str, str, List[str]]:
    """(image column, label column, class names): the mirror's named columns, else the one Image and the one
    ClassLabel feature the schema declares (a renamed column is still found); the names come from the schema."""
    features = hf_features(shard)

    def only(kind: str, preferred: str) -> Optional[str]:
        if preferred in features:
            return preferred
        found = [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == kind]
        return found[0] if len(found) == 1 else None
    image, label = only("Image", mirror.image_column), only("ClassLabel", mirror.label_column)
    names = (features.get(label) or {}).get("names") if label else None
    if not image or not names:
        raise SlcaError(f"{mirror.where}: {shard.name} does not declare {'an image column' if not image else ''}"
                        f"{' and ' if not image and not names else ''}{'named classes' if not names else ''} "
                        f"(features: {', '.join(features) or 'none'}); the mirror changed: report it, or put the "
                        f"official files in the data folder")
    return image, label, [str(n) for n in names]


def name_key(name: str) -> Tuple[str, ...]:
    """A class name compared loosely: without a CUB number prefix, case, punctuation, a possessive 's' or word
    order ("Brewer's blackbird" is 009.Brewer_Blackbird, "2000 AM General Hummer SUV" the devkit's "AM General
    Hummer SUV 2000"); distinct for every official class."""
    name = re.sub(r"^\d+\.", "", name.strip()).lower()
    return tuple(sorted(t for t in re.findall(r"[a-z0-9]+", name) if t != "s"))


def official_names(mirror: Mirror, names: Sequence[str]) -> List[str]:
    """The official names of the mirror's labels, after checking that label k is the official class k: a mirror
    with other classes, or the official ones in another order, would change every class id, and is refused."""
    if not mirror.class_names:
        return list(names)
    for label, (got, want) in enumerate(zip(names, mirror.class_names)):
        if name_key(got) != name_key(want):
            raise SlcaError(f"{mirror.where}: its class {label} is '{got}', the official class {label + 1} is "
                            f"'{want}': its classes are not the official ones in the official order; refusing it "
                            f"(put the official files in the data folder instead)")
    return list(mirror.class_names)


def split_counts(mirror: Mirror, shards: Dict[str, Path]) -> Dict[str, int]:
    pq = _parquet()
    return {split: sum(pq.ParquetFile(shards[f]).metadata.num_rows for f in mirror.files[split])
            for split in ("train", "test")}


def check_counts(mirror: Mirror, num_classes: int, counts: Dict[str, int]) -> None:
    """The official split's sizes; anything else is another split (or a damaged mirror) and is refused."""
    classes, train, test = mirror.expected
    found = (num_classes, counts["train"], counts["test"])
    if found != (classes, train, test):
        raise SlcaError(f"{mirror.where} is not the official {mirror.dataset} split: it has {found[0]} classes, "
                        f"{found[1]:,} train / {found[2]:,} test images, the official split {classes} classes, "
                        f"{train:,} / {test:,}; refusing it (put the official files in the data folder instead)")


def read_rows(mirror: Mirror, shards: Dict[str, Path], columns: Tuple[str, str]) -> Iterator[Row]:
    """The mirror's rows, train shards then test shards, in stored order, a batch at a time."""
    pq = _parquet()
    for split in ("train", "test"):
        index = 0
        for filename in mirror.files[split]:
            reader = pq.ParquetFile(shards[filename])
            missing = [c for c in columns if c not in reader.schema_arrow.names]
            if missing:
                raise SlcaError(f"{mirror.where}: {filename} has no column {', '.join(missing)} (columns: "
                                f"{', '.join(reader.schema_arrow.names)}); the mirror changed: report it")
            for batch in reader.iter_batches(batch_size=64, columns=list(columns)):
                images = batch.column(0).to_pylist()
                labels = batch.column(1).to_pylist()
                for image, label in zip(images, labels):
                    data = image.get("bytes") if isinstance(image, dict) else image
                    path = image.get("path") if isinstance(image, dict) else None
                    if not data or label is None:
                        raise SlcaError(f"{mirror.where}: row {index} of {split} has no image bytes or no label; "
                                        f"the mirror is damaged: delete it from the hub cache and prepare again")
                    yield Row(split, index, bytes(data), int(label), safe_file_name(path))
                    index += 1


def safe_file_name(path: Optional[str]) -> Optional[str]:
    """The original file name a row kept, if it can be written as it is inside a class folder (no folders, not
    hidden, no control characters); else None and the image is numbered."""
    name = os.path.basename((path or "").replace("\\", "/"))
    if not name or name.startswith(".") or any(ord(c) < 32 for c in name):
        return None
    return name


def image_suffix(data: bytes) -> str:
    """The file extension the bytes are (the mirror's bytes are written as they are, never re-encoded)."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return ".jpg"


def list_checksum(entries: Sequence[Tuple[str, str, str]]) -> str:
    """sha256 of the (split, file, class) list as laid out: equal for the same mirror on every machine."""
    digest = hashlib.sha256()
    for split, path, name in entries:
        digest.update(f"{split}\t{path}\t{name}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def remove_stale_partials(root: Path, folder_name: str) -> None:
    """Partial layouts left by a process that was killed (its id no longer runs): each holds a dataset's size."""
    for partial in root.glob(f".{folder_name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            if int(pid) != os.getpid():
                os.kill(int(pid), 0)
                continue  # another prepare is writing it now
        except ProcessLookupError:
            pass
        except OSError:  # exists, but not ours to signal
            continue
        shutil.rmtree(partial, ignore_errors=True)


def fetch_from_mirror(mirror: Mirror, root: Path, folder_name: str, write: LayoutWriter, manual: str,
                      show_progress: bool, echo) -> Path:
    """Download ``mirror`` (resuming), check it is the official split, and write ``root/folder_name`` in the
    official layout through a partial folder renamed only once everything checked out."""
    from ..progress import progress

    target = root / folder_name
    if target.exists():  # the loader found no complete copy there: never overwrite what the user put there
        raise SlcaError(f"{target} exists but is not a complete {mirror.dataset} copy; move it away (or complete it) "
                        f"and run `slca datasets prepare {mirror.dataset}` again")
    shards = download_shards(mirror, root, manual, show_progress, echo)
    image_column, label_column, names = columns_of(mirror, shards[mirror.files["train"][0]])
    check_counts(mirror, len(names), split_counts(mirror, shards))
    names = official_names(mirror, names)
    partial = root / f".{folder_name}.partial-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(root, folder_name)
        total = sum(mirror.expected[1:])
        bar = progress(f"laying out {mirror.dataset}", total, "image", enabled=show_progress)

        def counted(rows: Iterator[Row]) -> Iterator[Row]:
            for row in rows:
                if not 0 <= row.label < len(names):
                    raise SlcaError(f"{mirror.where}: a {row.split} image has label {row.label}, outside "
                                    f"0..{len(names) - 1}; the mirror is damaged")
                yield row
                bar.update(1)
        try:
            entries = write(partial, names, counted(read_rows(mirror, shards, (image_column, label_column))))
        finally:
            bar.close()
        checksum = list_checksum(entries)
        if mirror.list_sha256 and checksum != mirror.list_sha256:
            raise SlcaError(f"{mirror.where}: its (file, label) list has checksum {checksum[:16]}..., the recorded "
                            f"official list {mirror.list_sha256[:16]}...; the mirror changed: refusing it (put the "
                            f"official files in {root} instead)")
        record = {"dataset": mirror.dataset, "repo_id": mirror.repo_id, "revision": mirror.revision,
                  "files": mirror.all_files(), "classes": len(names),
                  "train": sum(1 for e in entries if e[0] == "train"),
                  "test": sum(1 for e in entries if e[0] == "test"), "list_sha256": checksum,
                  "list_sha256_checked": bool(mirror.list_sha256)}
        (partial / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        try:
            partial.rename(target)
        except OSError:
            if not (target / RECORD_FILE).is_file():  # not another prepare of the same mirror finishing first
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise SlcaError(f"cannot write {mirror.dataset} into {root} ({exc.strerror or exc}); free some space or pass "
                        f"a writable --data-root (or set $SLCA_DATA_ROOT)") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    status = "matches the recorded list" if mirror.list_sha256 else "not recorded for this mirror yet"
    echo(f"laid out {mirror.dataset} from {mirror.where} into {target}: (file, label) list sha256 {checksum} "
         f"({status})")
    return target
