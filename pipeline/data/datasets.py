"""Datasets: raw data -> the prepared format, and minibatches of it for training.

Prepared format (written by the `prepare` stage, read by every later stage):
`<out_root>/<dataset>/{train,test}.npz`, each with `images` (uint8, N x C x H x W), `labels`
(int64, N) and `levels` (the number of evenly spaced intensity levels the data uses: 17 for
digits, 256 for 8-bit images). Three sources:

- `digits`: scikit-learn's bundled handwritten digits (1,797 images, 8x8, 17 grey levels 0..16),
  rescaled to 0..255 (level k -> round(k * 255 / 16)) and split train/test by a stratified,
  seeded split. The embedded default: it needs no download.
- `cifar10`: the standard `cifar-10-python.tar.gz`, read in place (no extraction, no checksum,
  so any archive in the same format works), with its own 50,000 / 10,000 train/test split.
- `folder`: every image under a folder, centre-cropped to a square and resized to `image_size`,
  label 0, split by a seeded split.

`image_size` and `channels` of `DataConfig` shape the `folder` images only; digits (1x8x8) and
CIFAR10 (3x32x32) keep their native shape.

The data's levels are its quantization: `to_model_range` maps level k of L to 2k / (L - 1) - 1 in
[-1, 1], the decoder of the NLL bound
(`pipeline.diffusion.likelihood.discretized_gaussian_log_likelihood`)
puts one bin on each level, and `to_uint8` snaps samples to the nearest level. For 8-bit data
(L = 256) this is the usual x / 127.5 - 1 and round((x + 1) * 127.5).

Training keeps the whole split in memory as one uint8 tensor: `ImageBatches` draws shuffled
global minibatches from it with an explicit `torch.Generator` and hands each DDP rank its slice.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.config import DataConfig
from pipeline.core.dataset_specs import DATASET_SPECS
from pipeline.core.errors import UserError
from pipeline.core.io import atomic_path, save_npz

SPLITS = ("train", "test")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the real archive; checked on download only
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_SHAPE = DATASET_SPECS["cifar10"].shape
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGITS_LEVELS = DATASET_SPECS["digits"].levels  # load_digits() pixel values run over 0..16
PIXEL_LEVELS = 256  # 8-bit images (cifar10, folder)
PREPARE_COMMAND = "`dvc repro prepare` (or `python -m stages.prepare`)"


class DataError(UserError, RuntimeError):
    """Missing or unreadable data, phrased for the user: which file, and what to do about it."""


# --------------------------------------------------------------------------------------------
# Prepared files
# --------------------------------------------------------------------------------------------


def prepared_path(out_root: str | Path, dataset: str, split: str) -> Path:
    """Where `prepare` writes one split: `<out_root>/<dataset>/<split>.npz`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(out_root) / dataset / f"{split}.npz"



class Prepared(NamedTuple):
    """One prepared split: images (uint8 N x C x H x W), labels (int64 N), and the number of
    intensity levels the images use (`to_model_range`)."""

    images: np.ndarray
    labels: np.ndarray
    levels: int


def prepare_dataset(data_cfg: DataConfig, out_root: str | Path, seed: int) -> dict[str, Any]:
    """Read the raw data named by `data_cfg`, write `<out_root>/<dataset>/{train,test}.npz`.

    Each file is written atomically. Returns a small summary: dataset, split sizes, image shape
    (C, H, W), intensity levels and the output folder.
    """
    splits = READERS[data_cfg.dataset](data_cfg, seed)
    levels = DATASET_SPECS[data_cfg.dataset].levels
    for split in SPLITS:
        images, labels = splits[split]
        save_npz(prepared_path(out_root, data_cfg.dataset, split),
                 images=np.ascontiguousarray(images, dtype=np.uint8),
                 labels=np.asarray(labels, dtype=np.int64), levels=np.asarray(levels))
    return {
        "dataset": data_cfg.dataset,
        "train": int(len(splits["train"][0])),
        "test": int(len(splits["test"][0])),
        "image_shape": [int(d) for d in splits["train"][0].shape[1:]],
        "levels": levels,
        "out_dir": str(Path(out_root) / data_cfg.dataset),
    }


def load_prepared(path: str | Path) -> Prepared:
    """Read one prepared split: `Prepared(images, labels, levels)`, validated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found; run {PREPARE_COMMAND} first")
    rerun = f"delete it and rerun {PREPARE_COMMAND}"
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in Prepared._fields if name not in npz.files]
            if missing:
                raise DataError(f"{path}: no array named {', '.join(missing)} "
                                f"(found: {', '.join(npz.files) or 'none'}); {rerun}")
            images, labels, levels = npz["images"], npz["labels"], npz["levels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc}); "
                        f"{rerun}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{path}: 'images' must be uint8 N x C x H x W with C in (1, 3), got "
                        f"{images.dtype} of shape {images.shape}; {rerun}")
    if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
        raise DataError(f"{path}: 'labels' must be int64 of shape ({len(images)},), got "
                        f"{labels.dtype} of shape {labels.shape}; {rerun}")
    if levels.shape != () or not np.issubdtype(levels.dtype, np.integer) \
            or not 2 <= int(levels) <= PIXEL_LEVELS:
        raise DataError(f"{path}: 'levels' must be one integer in 2..256, got {levels!r}; "
                        f"{rerun}")
    return Prepared(images, labels, int(levels))


def default_hflip(data_cfg: DataConfig) -> bool:
    """Random horizontal flips: `data.hflip` if set, else the dataset's spec (`flip`).

    Ho et al. 2020 (App. B) flip CIFAR10 randomly during training; handwritten digits are not
    mirror-symmetric, so a flipped digit is not a digit.
    """
    if data_cfg.hflip is not None:
        return data_cfg.hflip
    return DATASET_SPECS[data_cfg.dataset].flip


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _read_digits(data_cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = level_to_uint8(digits.images, DIGITS_LEVELS)[:, None]
    labels = digits.target.astype(np.int64)
    return _split(images, labels, data_cfg.test_fraction, seed, stratify=True, source="digits")


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int, *,
           stratify: bool, source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(images))
    try:
        train, test = train_test_split(index, test_size=test_fraction, random_state=seed,
                                       shuffle=True, stratify=labels if stratify else None)
    except ValueError as exc:
        raise DataError(f"{source}: cannot split {len(images)} images into train and test with "
                        f"data.test_fraction = {test_fraction} ({exc})") from None
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


# --------------------------------------------------------------------------------------------
# cifar10
# --------------------------------------------------------------------------------------------


def _read_cifar10(data_cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    del seed  # CIFAR10 comes with its own train/test split
    archive = Path(data_cfg.cifar10_archive)
    if not archive.is_file():
        if not data_cfg.download:
            raise DataError(
                f"CIFAR10 archive not found at {archive}. Download {CIFAR10_URL} and put it "
                f"there, point the params key data.cifar10_archive at your copy, or set "
                f"data.download: true where the network allows")
        _download_cifar10(archive)
    batches = read_cifar10_archive(archive)
    train = [batches[name] for name in CIFAR10_TRAIN_BATCHES]
    return {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": batches[CIFAR10_TEST_BATCH],
    }


def _download_cifar10(archive: Path) -> None:
    """Fetch the real archive to `archive` (atomically) with torchvision's downloader."""
    from torchvision.datasets.utils import download_url

    try:
        with atomic_path(archive) as tmp:
            download_url(CIFAR10_URL, root=str(tmp.parent), filename=tmp.name, md5=CIFAR10_MD5)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        raise DataError(f"could not download {CIFAR10_URL} to {archive} ({exc}); download it "
                        f"by hand and point data.cifar10_archive at it") from None


def read_cifar10_archive(archive: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every batch of a `cifar-10-python.tar.gz` in place, without extracting it.

    Returns {batch name: (images uint8 N x 3 x 32 x 32, labels int64 N)}. Each pickled batch is
    a dict with b'data' (N x 3072 uint8: the R, G, B planes of a 32 x 32 image, row-major) and
    b'labels' (N ints in 0..9).
    """
    archive = Path(archive)
    wanted = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
    redownload = f"the file is damaged; delete it and download it again from {CIFAR10_URL}"
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:  # one sequential pass over the gzip stream
                name = PurePosixPath(member.name)
                if not member.isfile() or name.parent.name != CIFAR10_FOLDER:
                    continue
                if name.name in wanted:
                    raw = tar.extractfile(member).read()
                    batches[name.name] = _decode_cifar10_batch(raw, archive, name.name,
                                                               redownload)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{archive}: cannot read the CIFAR10 archive "
                        f"({type(exc).__name__}: {exc}); {redownload}") from None
    missing = [name for name in wanted if name not in batches]
    if missing:
        raise DataError(f"{archive}: no {CIFAR10_FOLDER}/{', '.join(missing)} in the archive; "
                        f"is it cifar-10-python.tar.gz? {redownload}")
    return batches


def _decode_cifar10_batch(raw: bytes, archive: Path, name: str,
                          redownload: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = pickle.load(io.BytesIO(raw), encoding="bytes")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except Exception as exc:  # a damaged pickle can fail in many ways
        raise DataError(f"{archive}: member {name} is not a CIFAR10 batch "
                        f"({type(exc).__name__}: {exc}); {redownload}") from None
    pixels = int(np.prod(CIFAR10_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DataError(f"{archive}: member {name} holds b'data' of {data.dtype} {data.shape}, "
                        f"expected uint8 (N, {pixels}); {redownload}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{archive}: member {name} holds b'labels' of {labels.dtype} "
                        f"{labels.shape}, expected {len(data)} integers in 0..9; {redownload}")
    return data.reshape(len(data), *CIFAR10_SHAPE), labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------


def _read_folder(data_cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = Path(data_cfg.folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found; put images there or point the params "
                        f"key data.folder at yours")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"image folder {folder} holds no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
    mode = {1: "L", 3: "RGB"}[data_cfg.channels]
    images = np.stack([_load_image(p, mode, data_cfg.image_size) for p in files])
    labels = np.zeros(len(images), dtype=np.int64)
    return _split(images, labels, data_cfg.test_fraction, seed, stratify=False,
                  source=f"image folder {folder}")


def _load_image(path: Path, mode: str, size: int) -> np.ndarray:
    """One image as uint8 C x size x size: centre crop to a square, then Lanczos resize."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert(mode)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}); remove or replace it") from None
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop first, so the resampling filter sees no pixels from outside the square.
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), resample=Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


# Each dataset's reader, under its name in pipeline.core.dataset_specs (tests/test_config.py
# holds the two registries equal): params -> {split: (uint8 images N x C x H x W, labels)}
READERS = {"digits": _read_digits, "cifar10": _read_cifar10, "folder": _read_folder}


# --------------------------------------------------------------------------------------------
# Tensors for the model, minibatches for training
# --------------------------------------------------------------------------------------------


def level_to_uint8(level: Any, levels: int) -> np.ndarray:
    """Level k of `levels` evenly spaced levels -> its uint8 pixel value round(k * 255 / (L-1))."""
    return np.rint(np.asarray(level, dtype=np.float64) * (255.0 / (levels - 1))).astype(np.uint8)


def to_model_range(images: torch.Tensor, levels: int = PIXEL_LEVELS) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], the DDPM data scaling: the pixel's level k of L
    (round(x * (L - 1) / 255)) becomes k / ((L - 1) / 2) - 1; for 8-bit data x / 127.5 - 1."""
    pixels = images.to(torch.float32)
    if levels != PIXEL_LEVELS:
        pixels = (pixels * ((levels - 1) / 255.0)).round()
    return pixels / ((levels - 1) / 2.0) - 1.0


def to_uint8(images: torch.Tensor, levels: int = PIXEL_LEVELS) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 pixels on the data's levels: the nearest level k of L,
    round((x + 1) * (L - 1) / 2) clamped to 0..L-1, as the pixel round(k * 255 / (L - 1));
    for 8-bit data round((x + 1) * 127.5)."""
    level = ((images + 1.0) * ((levels - 1) / 2.0)).round().clamp(0, levels - 1)
    if levels != PIXEL_LEVELS:
        level = (level * (255.0 / (levels - 1))).round()
    return level.to(torch.uint8)


class ImageBatches:
    """Endless shuffled minibatches of one in-memory uint8 image tensor (N x C x H x W).

    Indices come from a stream of permutations of 0..N-1 drawn with `generator`: each run of N
    indices is one epoch, and a global batch that crosses an epoch boundary takes the rest of one
    permutation and the start of the next (so no image is dropped). With `world_size` > 1, rank
    `r` gets the r-th of `world_size` equal, contiguous slices of every global batch: pass every
    rank a CPU generator seeded alike and used for nothing else, and the ranks agree on the
    permutation and the flips and see disjoint slices. With `hflip`, each image of the global
    batch is mirrored left-right with probability 1/2 (one `torch.where` over the batch).

    Yields images (uint8, on the device of `images`), or (images, labels) when `labels` is given.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, generator: torch.Generator, *,
                 labels: Optional[torch.Tensor] = None, hflip: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty uint8 N x C x H x W tensor, got "
                             f"{images.dtype} of shape {tuple(images.shape)}")
        if labels is not None and labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, "
                             f"world_size {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"the global batch size ({batch_size}) must be a positive multiple "
                             f"of world_size ({world_size})")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.generator = generator
        self.hflip = hflip
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self._order = torch.empty(0, dtype=torch.int64)
        self._cursor = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        index = self._next_global_indices()
        flip = torch.rand(self.batch_size, generator=self.generator) < 0.5 if self.hflip else None
        mine = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        local = index[mine].to(self.images.device)
        batch = self.images[local]
        if flip is not None:
            mirror = flip[mine].to(batch.device).view(-1, 1, 1, 1)
            batch = torch.where(mirror, batch.flip(-1), batch)
        if self.labels is None:
            return batch
        return batch, self.labels[local.to(self.labels.device)]

    def _next_global_indices(self) -> torch.Tensor:
        parts, need, n = [], self.batch_size, len(self.images)
        while need:
            if self._cursor == len(self._order):
                self._order = torch.randperm(n, generator=self.generator)
                self._cursor = 0
            take = min(need, n - self._cursor)
            parts.append(self._order[self._cursor:self._cursor + take])
            self._cursor += take
            need -= take
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        """Generator state and position in the current permutation, for resuming a run."""
        return {"generator": self.generator.get_state(), "order": self._order.clone(),
                "cursor": self._cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"].clone()
        self._cursor = int(state["cursor"])


def uint8_images(images: Any, what: str = "images") -> torch.Tensor:
    """A uint8 (N, C, H, W) tensor from a numpy array or tensor, checked."""
    tensor = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if tensor.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8 (0..255), got dtype {tensor.dtype}")
    if tensor.dim() != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be N x C x H x W with C = 1 or 3, got shape "
                         f"{tuple(tensor.shape)}")
    return tensor.contiguous()
