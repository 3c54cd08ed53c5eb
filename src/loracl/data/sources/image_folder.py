"""Images on disk: <root>/<task>/{train,test}/<class>/<image files>, read with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loracl.data.stream import RawTask
from loracl.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _read_image(path: Path, image_size: int | None) -> np.ndarray:
    """An image as float32 [C, H, W] in [0, 1]; a wrong size is an error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    if image_size is not None and array.shape[:2] != (image_size, image_size):
        raise DataError(f"image {path} is {array.shape[1]}x{array.shape[0]}, expected {image_size}x{image_size}")
    return array.transpose(2, 0, 1)


def load_image_folder(root: str | Path, tasks: list[str] | None, image_size: int | None) -> list[RawTask]:
    """Read each task folder's train and test class folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    names = tasks if tasks is not None else sorted(child.name for child in root.iterdir() if child.is_dir())
    if not names:
        raise DataError(f"no task folders in {root}")
    raw_tasks = []
    for name in names:
        folder = root / name
        if not (folder / "train").is_dir() or not (folder / "test").is_dir():
            raise DataError(f"task `{name}`: expected {folder}/train/<class>/ and {folder}/test/<class>/")
        labels = sorted(child.name for child in (folder / "train").iterdir() if child.is_dir())
        splits = {}
        for split in ("train", "test"):
            pairs = []
            for class_dir in sorted(child for child in (folder / split).iterdir() if child.is_dir()):
                for file in sorted(class_dir.iterdir()):
                    if file.suffix.lower() in IMAGE_SUFFIXES:
                        pairs.append((_read_image(file, image_size), class_dir.name))
            splits[split] = pairs
        raw_tasks.append(RawTask(name, labels, splits["train"], splits["test"], origin=str(folder)))
    return raw_tasks
