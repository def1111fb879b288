"""Builders of small test data in the real formats, and assertions shared by test modules
(import as `from helpers import ...`)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                   b"dog", b"frog", b"horse", b"ship", b"truck"]


def make_cifar10_archive(path: str | Path, n_train: int = 250, n_test: int = 50, seed: int = 0,
                         *, image_bytes: int = 3072) -> dict[str, np.ndarray]:
    """Write a small `cifar-10-python.tar.gz` in the real format; return what it holds.

    The archive has `cifar-10-batches-py/` with `data_batch_1..5` (n_train images spread over
    them), `test_batch` and `batches.meta`; each batch is a pickled dict with the real keys
    (b'batch_label', b'labels', b'data' N x 3072 uint8 as R, G, B planes, b'filenames').
    `image_bytes` other than 3072 writes batches of the wrong shape.
    Returns {"train_data", "train_labels", "test_data", "test_labels"} (data as N x 3072).
    """
    rng = np.random.default_rng(seed)
    train_data = rng.integers(0, 256, size=(n_train, image_bytes), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=n_train).astype(np.int64)
    test_data = rng.integers(0, 256, size=(n_test, image_bytes), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=n_test).astype(np.int64)

    members: dict[str, dict] = {}
    bounds = np.linspace(0, n_train, 6).astype(int)
    for i in range(5):
        lo, hi = bounds[i], bounds[i + 1]
        members[f"data_batch_{i + 1}"] = _batch(f"training batch {i + 1} of 5",
                                                train_data[lo:hi], train_labels[lo:hi])
    members["test_batch"] = _batch("testing batch 1 of 1", test_data, test_labels)
    members["batches.meta"] = {b"num_cases_per_batch": int(bounds[1]),
                               b"label_names": CIFAR10_CLASSES, b"num_vis": image_bytes}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {"train_data": train_data, "train_labels": train_labels,
            "test_data": test_data, "test_labels": test_labels}


def _batch(label: str, data: np.ndarray, labels: np.ndarray) -> dict:
    return {b"batch_label": label.encode(), b"labels": [int(v) for v in labels],
            b"data": data, b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(data))]}


def make_image_folder(path: str | Path, n: int, size: tuple[int, int] | int = (12, 10),
                      seed: int = 0) -> list[Path]:
    """Write `n` random RGB PNGs of `size` (width, height) under `path`, some in a subfolder."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    path = Path(path)
    files = []
    for i in range(n):
        folder = path / "sub" if i % 2 else path
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        file = folder / f"image_{i:03d}.png"
        Image.fromarray(pixels).save(file)
        files.append(file)
    return files


def assert_refused(raw, needles):
    """`raw` parses if `needles` is empty; else it is refused in one short line that holds
    every needle."""
    import pytest

    from pipeline.config import ConfigError, parse_params

    if not needles:
        parse_params(raw)
        return
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    for needle in needles:
        assert needle in message, (needle, message)


def run_record(metrics_dir: str | Path, key: str) -> dict:
    """A run's metrics/<key>.json and metrics/<key>_run.json as one dict, checking that the
    first (the file DVC compares) holds numbers only."""
    metrics_dir = Path(metrics_dir)
    numbers = json.loads((metrics_dir / f"{key}.json").read_text())
    text = {k: v for k, v in numbers.items()
            if isinstance(v, bool) or not isinstance(v, (int, float))}
    assert not text, f"{key}.json holds more than numbers: {text}"
    return {**json.loads((metrics_dir / f"{key}_run.json").read_text()), **numbers}
