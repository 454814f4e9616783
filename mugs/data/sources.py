"""Where images come from: the embedded Fashion-MNIST demo (IDX arrays) and any ImageFolder tree.

Both sources describe the same thing, a list of ``(relative path, class name)`` per split, plus how to
turn one stored image into an RGB PIL image (:func:`to_rgb`), which preparation and training share so
the statistics are computed on exactly the pixels the model sees.

Fashion-MNIST's coarse labels group its ten classes by what part of the body an item is for; tops are
visually close to each other (the classic confusions are shirt/T-shirt/pullover/coat), so the coarse
task is the one a good multi-granular feature should solve almost perfectly:

==================  =========================================
coarse class        fine classes
==================  =========================================
tops                T-shirt/top, Pullover, Coat, Shirt
trousers-dresses    Trouser, Dress (long, vertical silhouettes)
footwear            Sandal, Sneaker, Ankle boot
bags                Bag
==================  =========================================
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mugs.fashion_mnist import FASHION_MNIST_CLASSES
from mugs.files import atomic_copy

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
FASHION_MNIST_COARSE_CLASSES = ["tops", "trousers-dresses", "footwear", "bags"]
FASHION_MNIST_COARSE = {
    "T-shirt/top": "tops",
    "Pullover": "tops",
    "Coat": "tops",
    "Shirt": "tops",
    "Trouser": "trousers-dresses",
    "Dress": "trousers-dresses",
    "Sandal": "footwear",
    "Sneaker": "footwear",
    "Ankle boot": "footwear",
    "Bag": "bags",
}

# Extensions PIL decodes as raster images; others (.txt, .xml, .pdf…) are ignored and counted.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff"}
    | {
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".qoi",
        ".avif",
        ".jp2",
        ".j2k",
        ".ico",
        ".psd",
        ".sgi",
        ".pcx",
    }
)
SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """A dataset is missing, empty or malformed; the message names the path and how to fix it."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB.

    16/32-bit integer images keep their dynamic range (PIL's own ``convert`` clips them at 255, which
    turns most of a 16-bit photo white); transparency is premultiplied, so fully transparent pixels are
    black whatever colour the file stores under them.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        pixels = np.asarray(image).astype(np.int64)
        gray = Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), "L")
        return gray.convert("RGB")
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        # round-half-up of rgb * alpha / 255, exactly, in integers
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (unsigned bytes) into an array of its declared shape."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path} is not a readable gzip file: {error}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header declares shape {shape} but holds {body.size} bytes of data")
    return body.reshape(shape)


def fashion_mnist_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` of the ``train`` or ``test`` split under ``root``."""
    image_file, label_file = FASHION_MNIST_FILES[split]
    images, labels = read_idx(root / image_file), read_idx(root / label_file)
    expected = FASHION_MNIST_SIZES[split]
    if images.shape != (expected, 28, 28) or labels.shape != (expected,):
        raise DataError(
            f"{root}: {image_file} / {label_file} have shapes {images.shape} / {labels.shape}, "
            f"expected ({expected}, 28, 28) / ({expected},)"
        )
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{root / label_file}: label {labels.max()} is out of range 0..9")
    return images, labels


def check_fashion_mnist_root(root: Path) -> None:
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"the Fashion-MNIST directory {root} lacks {', '.join(missing)}; copy the demo data there with "
            f"`mugs demo-data --dest {root}` (or `dvc pull`)"
        )


def install_demo_data(dest: Path, system_dir: Path = FASHION_MNIST_SYSTEM_DIR) -> None:
    """Copy the four Fashion-MNIST IDX files byte for byte from Debian's package into ``dest``.

    Files already identical are left alone (their mtime too, so the preparation cache stays valid).
    When ``system_dir`` is missing, installs the Debian package if this process is root and has
    apt-get; otherwise raises :class:`DataError` with the command to run.
    """
    dest, system_dir = Path(dest), Path(system_dir)
    if not system_dir.is_dir():
        install = ["apt-get", "install", "-y", FASHION_MNIST_PACKAGE]
        if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise DataError(
                f"{system_dir} does not exist; install the demo data with "
                f"`sudo {' '.join(install)}` (Debian/Ubuntu)"
            )
        result = subprocess.run(install, capture_output=True, text=True)
        if result.returncode != 0 or not system_dir.is_dir():
            raise DataError(
                f"`{' '.join(install)}` failed (exit {result.returncode}) and {system_dir} is still "
                f"missing:\n{result.stderr.strip()[-2000:]}"
            )
    dest.mkdir(parents=True, exist_ok=True)
    for name in (name for pair in FASHION_MNIST_FILES.values() for name in pair):
        source, target = system_dir / name, dest / name
        if not source.is_file():
            raise DataError(
                f"{source} is missing; reinstall with `sudo apt-get install --reinstall "
                f"-y {FASHION_MNIST_PACKAGE}`"
            )
        if target.is_file() and _same_bytes(source, target):
            continue
        atomic_copy(source, target)


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(1 << 20)
            if chunk != fb.read(1 << 20):
                return False
            if not chunk:
                return True


# ------------------------------------------------------------------------------------- ImageFolder


@dataclass(frozen=True)
class ClassDir:
    """One ``root/<split>/<class>`` directory to scan."""

    split: str
    name: str
    path: Path


def stat_reason(path: str, error: OSError) -> str:
    """Why ``os.stat(path)`` failed, for ``bad-files.json``."""
    if error.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if error.errno == errno.ENOENT and os.path.islink(path):
        return f"dangling symlink to {os.readlink(path)}"
    if error.errno == errno.EACCES:
        return "unreadable: permission denied"
    return f"cannot stat: {error.strerror}"


def loop_reason(real: str, ancestors: Iterable[str]) -> str | None:
    """Why a directory whose real path is ``real`` cannot be entered below ``ancestors`` (real paths):
    it is one of them or holds one (a link to itself, to its parent, ...); None when it can."""
    if any(a == real or a.startswith(real + os.sep) for a in ancestors):
        return f"symlink loop: points back to its ancestor {real}"
    return None


def _class_entries(split_dir: Path, split: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The class directories of ``split_dir`` by name, and ``(split, path, reason)`` for each entry that
    looks like one but cannot be: a link to itself, to its split or above (its images would come again
    as a class of duplicates), or one that cannot be followed."""
    names, problems = [], []
    ancestors = [os.path.realpath(split_dir)]
    for entry in os.scandir(split_dir):
        if entry.name.startswith("."):
            continue
        try:
            is_dir = stat.S_ISDIR(os.stat(entry.path).st_mode)
        except OSError as error:
            if entry.is_symlink():
                problems.append((split, f"{split}/{entry.name}", stat_reason(entry.path, error)))
            continue
        loop = loop_reason(os.path.realpath(entry.path), ancestors) if is_dir else None
        if loop:
            problems.append((split, f"{split}/{entry.name}", loop))
        elif is_dir:
            names.append(entry.name)
    return sorted(names), problems


def imagefolder_layout(
    root: Path, classes: list[str] | None
) -> tuple[list[str], dict[str, list[ClassDir]], list[tuple[str, str, str]]]:
    """Check the ``root/{train,val,test}/<class>/`` layout; returns the class names, per split present
    its class directories, and ``(split, path, reason)`` for the entries that cannot be classes
    (:func:`_class_entries`). Missing or empty roots and class lists that differ between splits are errors.
    """
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory")
    if not any(root.iterdir()):
        raise DataError(f"dataset root {root} is empty; expected {root}/train/<class>/<image> (and val/)")
    if not (root / "train").is_dir():
        raise DataError(
            f"dataset root {root} has no train/ directory; expected {root}/train/<class>/<image> "
            "(an ImageNet-style tree)"
        )
    per_split: dict[str, list[str]] = {}
    not_classes: list[tuple[str, str, str]] = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        names, problems = _class_entries(split_dir, split)
        not_classes += problems
        if not names:
            raise DataError(f"split directory {split_dir} contains no class directories")
        per_split[split] = names
    if classes is not None:
        for split, names in per_split.items():
            missing = [c for c in classes if c not in names]
            if missing:
                raise DataError(f"{root / split} has no directory for the configured class(es) {missing}")
        chosen = sorted(classes)
    else:
        chosen = per_split["train"]
        for split, names in per_split.items():
            if names != chosen:
                only_here = sorted(set(names) - set(chosen))
                only_train = sorted(set(chosen) - set(names))
                raise DataError(
                    f"the class lists of {root / 'train'} and {root / split} differ: only in {split}: "
                    f"{only_here[:10]}, only in train: {only_train[:10]}; fix the tree or list the shared "
                    "classes in data.classes"
                )
    layout = {split: [ClassDir(split, name, root / split / name) for name in chosen] for split in per_split}
    return chosen, layout, not_classes


def imagefolder_coarse(root: Path, classes: list[str]) -> tuple[list[str], list[int]] | None:
    """Coarse labels from an optional ``root/coarse.json`` mapping every class name to a group name."""
    path = root / "coarse.json"
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(mapping, dict):
        raise DataError(f"{path} must map class names to coarse group names")
    missing = [c for c in classes if not isinstance(mapping.get(c), str)]
    if missing:
        raise DataError(f"{path} gives no coarse group for class(es) {missing[:10]}")
    groups = sorted({mapping[c] for c in classes})
    return groups, [groups.index(mapping[c]) for c in classes]
