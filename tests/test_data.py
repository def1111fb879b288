"""pipeline.data.datasets and stages.prepare: prepared formats, errors that say what to do,
minibatches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import make_cifar10_archive, make_image_folder
from pipeline.core.config import DataConfig
from pipeline.data.datasets import (CIFAR10_URL, DataError, ImageBatches, default_hflip,
                                    level_to_uint8, load_prepared, prepare_dataset, prepared_path,
                                    to_model_range, to_uint8)
from stages import prepare as prepare_stage


def _prepare(tmp_path, seed=0, **data):
    cfg = DataConfig(**data)
    summary = prepare_dataset(cfg, tmp_path / "prepared", seed=seed)
    train = load_prepared(prepared_path(tmp_path / "prepared", cfg.dataset, "train"))
    test = load_prepared(prepared_path(tmp_path / "prepared", cfg.dataset, "test"))
    return summary, train, test


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_prepared_format_and_stratified_split(tmp_path):
    summary, (x_train, y_train, train_levels), (x_test, y_test, test_levels) = _prepare(
        tmp_path, test_fraction=0.2)
    assert len(x_train) + len(x_test) == 1797
    assert len(x_test) == math.ceil(0.2 * 1797)  # sklearn rounds the test share up
    assert summary == {"dataset": "digits", "train": len(x_train), "test": len(x_test),
                       "image_shape": [1, 8, 8], "levels": 17,
                       "out_dir": str(tmp_path / "prepared/digits")}
    assert train_levels == test_levels == 17
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert x.dtype == np.uint8 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == np.int64 and y.shape == (len(x),)
    pixels = np.concatenate([x_train, x_test])
    assert pixels.min() == 0 and pixels.max() == 255
    levels = np.unique(pixels)
    assert len(levels) == 17
    np.testing.assert_array_equal(levels, np.rint(np.arange(17) * 255 / 16))
    # Stratified: every class keeps its share in the test split (to within one image).
    counts_all = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    counts_test = np.bincount(y_test, minlength=10)
    assert np.all(np.abs(counts_test - counts_all * len(y_test) / 1797) <= 1)


def test_digits_split_is_deterministic_per_seed(tmp_path):
    _, (a_train, a_labels, _), _ = _prepare(tmp_path / "a", seed=3)
    _, (b_train, b_labels, _), _ = _prepare(tmp_path / "b", seed=3)
    _, (c_train, _, _), _ = _prepare(tmp_path / "c", seed=4)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert a_train.shape == c_train.shape and not np.array_equal(a_train, c_train)


def test_digits_pixels_are_sklearn_rescaled(tmp_path):
    from sklearn.datasets import load_digits

    _, (x_train, _, _), (x_test, _, _) = _prepare(tmp_path)
    reference = np.rint(load_digits().images * 255 / 16).astype(np.uint8)[:, None]
    # Same multiset of images: compare sorted byte strings.
    ours = sorted(im.tobytes() for im in np.concatenate([x_train, x_test]))
    assert ours == sorted(im.tobytes() for im in reference)


# --------------------------------------------------------------------------------------------
# cifar10
# --------------------------------------------------------------------------------------------


def test_cifar10_round_trips_pixel_exactly(tmp_path):
    archive = tmp_path / "raw" / "cifar-10-python.tar.gz"
    raw = make_cifar10_archive(archive, n_train=300, n_test=60, seed=1)
    summary, (x_train, y_train, _), (x_test, y_test, _) = _prepare(
        tmp_path, dataset="cifar10", cifar10_archive=str(archive))
    assert summary["train"] == 300 and summary["test"] == 60
    assert summary["image_shape"] == [3, 32, 32] and summary["levels"] == 256
    assert x_train.shape == (300, 3, 32, 32) and x_test.shape == (60, 3, 32, 32)
    np.testing.assert_array_equal(y_train, raw["train_labels"])
    np.testing.assert_array_equal(y_test, raw["test_labels"])
    np.testing.assert_array_equal(x_train.reshape(300, -1), raw["train_data"])
    np.testing.assert_array_equal(x_test.reshape(60, -1), raw["test_data"])
    # A known image, plane by plane: the first 1024 bytes are R, then G, then B, row-major.
    k = 137  # in data_batch_3
    row = raw["train_data"][k]
    for channel in range(3):
        plane = row[channel * 1024:(channel + 1) * 1024].reshape(32, 32)
        np.testing.assert_array_equal(x_train[k, channel], plane)
    assert x_train[k, 0, 0, 1] == row[1] and x_train[k, 0, 1, 0] == row[32]


def test_cifar10_missing_archive_says_where_to_get_it(tmp_path):
    archive = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    cfg = DataConfig(dataset="cifar10", cifar10_archive=str(archive))
    with pytest.raises(DataError) as err:
        prepare_dataset(cfg, tmp_path / "prepared", seed=0)
    message = str(err.value)
    assert str(archive) in message
    assert CIFAR10_URL in message
    assert "data.cifar10_archive" in message
    assert not (tmp_path / "prepared").exists()


def test_cifar10_download_is_used_when_enabled(tmp_path, monkeypatch):
    import pipeline.data.datasets

    archive = tmp_path / "raw" / "cifar-10-python.tar.gz"
    calls = []

    def fake_download(path):
        calls.append(path)
        make_cifar10_archive(path, n_train=10, n_test=5)

    monkeypatch.setattr(pipeline.data.datasets, "_download_cifar10", fake_download)
    summary, _, _ = _prepare(tmp_path, dataset="cifar10", cifar10_archive=str(archive),
                             download=True)
    assert calls == [archive] and summary["train"] == 10 and summary["test"] == 5


def test_cifar10_truncated_archive_names_the_file(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10_archive(archive, n_train=100, n_test=20)
    data = archive.read_bytes()
    archive.write_bytes(data[:len(data) // 2])
    cfg = DataConfig(dataset="cifar10", cifar10_archive=str(archive))
    with pytest.raises(DataError) as err:
        prepare_dataset(cfg, tmp_path / "prepared", seed=0)
    assert str(archive) in str(err.value) and "download it again" in str(err.value)


def test_cifar10_not_an_archive_or_wrong_shape(tmp_path):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not a gzip file" * 10)
    with pytest.raises(DataError, match="garbage.tar.gz"):
        prepare_dataset(DataConfig(dataset="cifar10", cifar10_archive=str(garbage)),
                        tmp_path / "prepared", seed=0)

    wrong = tmp_path / "wrong.tar.gz"
    make_cifar10_archive(wrong, n_train=10, n_test=5, image_bytes=1000)
    with pytest.raises(DataError) as err:
        prepare_dataset(DataConfig(dataset="cifar10", cifar10_archive=str(wrong)),
                        tmp_path / "prepared", seed=0)
    assert "wrong.tar.gz" in str(err.value) and "(N, 3072)" in str(err.value)
    assert "download it again" in str(err.value)


# --------------------------------------------------------------------------------------------
# Loading prepared files
# --------------------------------------------------------------------------------------------


def test_load_before_prepare_names_the_command(tmp_path):
    path = prepared_path(tmp_path / "prepared", "digits", "train")
    with pytest.raises(DataError) as err:
        load_prepared(path)
    assert str(path) in str(err.value)
    assert "dvc repro prepare" in str(err.value) and "python -m stages.prepare" in str(err.value)


def test_corrupt_or_wrong_npz_is_a_data_error(tmp_path):
    _prepare(tmp_path)
    path = prepared_path(tmp_path / "prepared", "digits", "train")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError) as err:
        load_prepared(path)
    assert str(path) in str(err.value) and "rerun" in str(err.value)

    path.write_bytes(b"not an npz at all")
    with pytest.raises(DataError, match="rerun"):
        load_prepared(path)

    np.savez(path, pictures=np.zeros((2, 1, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="no array named images"):
        load_prepared(path)

    np.savez(path, images=np.zeros((2, 1, 8, 8), np.float32), labels=np.zeros(2, np.int64),
             levels=np.asarray(17))
    with pytest.raises(DataError, match="must be uint8"):
        load_prepared(path)

    np.savez(path, images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2, np.int64),
             levels=np.asarray(17))
    with pytest.raises(DataError, match="must be uint8"):
        load_prepared(path)

    np.savez(path, images=np.zeros((2, 1, 8, 8), np.uint8), labels=np.zeros(3, np.int64),
             levels=np.asarray(17))
    with pytest.raises(DataError, match="'labels' must be int64"):
        load_prepared(path)

    np.savez(path, images=np.zeros((2, 1, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="no array named levels"):
        load_prepared(path)  # prepared by an older version: prepare again

    np.savez(path, images=np.zeros((2, 1, 8, 8), np.uint8), labels=np.zeros(2, np.int64),
             levels=np.asarray(1000))
    with pytest.raises(DataError, match="'levels' must be one integer in 2..256"):
        load_prepared(path)


# --------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------


def test_folder_dataset_rgb_and_grey(tmp_path):
    folder = tmp_path / "images"
    make_image_folder(folder, n=10, size=(12, 10))
    (folder / "notes.txt").write_text("not an image")
    summary, (x_train, y_train, _), (x_test, y_test, _) = _prepare(
        tmp_path, dataset="folder", folder=str(folder), image_size=8, channels=3,
        test_fraction=0.2)
    assert summary["train"] == 8 and summary["test"] == 2 and summary["image_shape"] == [3, 8, 8]
    assert x_train.dtype == np.uint8 and x_train.shape == (8, 3, 8, 8)
    assert not y_train.any() and not y_test.any()

    _, (g_train, _, _), (g_test, _, _) = _prepare(
        tmp_path / "grey", dataset="folder", folder=str(folder), image_size=6, channels=1)
    assert g_train.shape[1:] == (1, 6, 6) and len(g_train) + len(g_test) == 10


def test_folder_center_crops_before_resizing(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    # 12 x 8 (w x h): red 2-column borders around a green 8 x 8 centre.
    pixels = np.zeros((8, 12, 3), np.uint8)
    pixels[:, :, 1] = 200
    pixels[:, :2] = pixels[:, -2:] = (255, 0, 0)
    for i in range(4):
        Image.fromarray(pixels).save(folder / f"{i}.png")
    _, (x_train, _, _), (x_test, _, _) = _prepare(tmp_path, dataset="folder", folder=str(folder),
                                            image_size=4, test_fraction=0.25)
    images = np.concatenate([x_train, x_test])
    assert images.shape == (4, 3, 4, 4)
    assert (images[:, 0] == 0).all() and (images[:, 1] == 200).all() and (images[:, 2] == 0).all()


def test_folder_empty_or_missing_names_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        with pytest.raises(DataError) as err:
            prepare_dataset(DataConfig(dataset="folder", folder=str(folder)),
                            tmp_path / "prepared", seed=0)
        assert str(folder) in str(err.value)


# --------------------------------------------------------------------------------------------
# Tensors and minibatches
# --------------------------------------------------------------------------------------------


def test_model_range_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32 and x[0] == -1.0 and x[-1] == 1.0
    assert torch.equal(to_uint8(x), pixels)
    assert torch.equal(to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0])),
                       torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))


def test_levels_round_trip_and_snap_samples_to_the_data_grid():
    # digits: 17 levels, stored as round(k * 255 / 16); level k <-> 2k / 16 - 1 exactly
    k = np.arange(17)
    pixels = torch.from_numpy(level_to_uint8(k, 17))
    assert pixels.tolist() == np.rint(k * 255 / 16).astype(int).tolist()
    x = to_model_range(pixels, 17)
    assert torch.equal(x, torch.from_numpy(k / 8.0 - 1.0).float())
    assert torch.equal(to_uint8(x, 17), pixels)
    # a sample between two levels goes to the nearer one; outside [-1, 1] to the end levels
    between = torch.tensor([-1.0 + 0.9 / 16, -1.0 + 1.1 / 16, 0.02, -5.0, 5.0])
    assert to_uint8(between, 17).tolist() == [0, 16, 128, 0, 255]
    # 8-bit data: the usual x / 127.5 - 1, bit for bit
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_model_range(every), every.float() / 127.5 - 1.0)
    assert torch.equal(to_model_range(every, 256), to_model_range(every))


def test_default_hflip():
    assert default_hflip(DataConfig(dataset="digits")) is False
    assert default_hflip(DataConfig(dataset="cifar10")) is True
    assert default_hflip(DataConfig(dataset="folder")) is True
    assert default_hflip(DataConfig(dataset="digits", hflip=True)) is True
    assert default_hflip(DataConfig(dataset="cifar10", hflip=False)) is False


def _indexed_images(n):
    """Image i is constant with value i, so a batch tells which images it holds."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 3).contiguous()


def test_batches_shard_a_global_batch_across_ranks():
    images = _indexed_images(24)
    labels = torch.arange(24) + 100

    def stream(rank, world_size, steps):
        g = torch.Generator().manual_seed(7)
        batches = ImageBatches(images, 8, g, labels=labels, rank=rank, world_size=world_size)
        return [next(batches) for _ in range(steps)]

    whole = stream(0, 1, 6)
    rank0, rank1 = stream(0, 2, 6), stream(1, 2, 6)
    seen = []
    for (g_x, g_y), (x0, y0), (x1, y1) in zip(whole, rank0, rank1):
        assert x0.shape == x1.shape == (4, 1, 2, 3)
        ids0, ids1 = x0[:, 0, 0, 0].tolist(), x1[:, 0, 0, 0].tolist()
        assert set(ids0).isdisjoint(ids1)
        assert ids0 + ids1 == g_x[:, 0, 0, 0].tolist()  # the ranks' slices tile the global batch
        assert torch.equal(torch.cat([y0, y1]), g_y) and torch.equal(y0, x0[:, 0, 0, 0] + 100)
        seen.extend(ids0 + ids1)
    # Every 24 indices of the stream are one epoch: a permutation of 0..23.
    assert sorted(seen[:24]) == list(range(24)) and sorted(seen[24:]) == list(range(24))
    assert seen[:24] != seen[24:]


def test_batches_flip_mirrors_some_images_and_nothing_else():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 4, 5), dtype=torch.uint8, generator=gen)
    batches = ImageBatches(images, 16, torch.Generator().manual_seed(1), hflip=True)
    flipped = kept = 0
    for _ in range(4):
        for image in next(batches):
            same = (image == images).flatten(1).all(1)
            mirrored = (image == images.flip(-1)).flatten(1).all(1)
            assert same.sum() + mirrored.sum() == 1  # exactly one source, as is or mirrored
            flipped += int(mirrored.any())
            kept += int(same.any())
    assert flipped > 10 and kept > 10

    no_flip = ImageBatches(images, 16, torch.Generator().manual_seed(1), hflip=False)
    batch = next(no_flip)
    assert all((im == images).flatten(1).all(1).any() for im in batch)


def test_batches_agree_across_ranks_with_flips_and_resume():
    images = torch.randint(0, 256, (10, 1, 3, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))

    def make(rank, world_size):
        return ImageBatches(images, 4, torch.Generator().manual_seed(5), hflip=True,
                            rank=rank, world_size=world_size)

    whole, r0, r1 = make(0, 1), make(0, 2), make(1, 2)
    for _ in range(5):  # crosses epoch boundaries (10 images, batches of 4)
        assert torch.equal(torch.cat([next(r0), next(r1)]), next(whole))

    state = whole.state_dict()
    expected = [next(whole) for _ in range(3)]
    resumed = make(0, 1)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), e) for e in expected)

    with pytest.raises(ValueError, match="multiple of world_size"):
        ImageBatches(images, 5, torch.Generator(), world_size=2)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def test_stage_prepare_writes_the_files(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  seed: 1\n  dataset: digits\n  test_fraction: 0.25\n")
    out = tmp_path / "data" / "prepared"
    assert prepare_stage.main(["--params", str(params), "--out", str(out)]) == 0
    x_train = load_prepared(out / "digits" / "train.npz").images
    x_test = load_prepared(out / "digits" / "test.npz").images
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == math.ceil(0.25 * 1797)
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "digits" in line and str(len(x_train)) in line


def test_stage_prepare_reports_errors_briefly(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  dataset: digits\n  test_fractoin: 0.2\n")
    assert prepare_stage.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "test_fractoin" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1

    archive = tmp_path / "missing.tar.gz"
    params.write_text(f"data:\n  dataset: cifar10\n  cifar10_archive: {archive}\n"
                      "model:\n  attn_resolutions: [16]\n")
    assert prepare_stage.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(archive) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_stage_prepare_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_stage.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--params" in text and "--out" in text


def test_the_data_section_of_params_yaml_is_what_prepare_reads(tmp_path, capsys, monkeypatch):
    """The keys of params.yaml's data section reach prepare: a folder dataset's folder,
    image_size, channels, test_fraction and seed shape the prepared splits; a value prepare
    cannot use is refused in one line naming the key, before anything is written."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images", 20, size=(12, 10))
    out = tmp_path / "prepared"

    def prepare(seed, channels=1):
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"data": {
            "dataset": "folder", "folder": str(tmp_path / "images"), "image_size": 8,
            "channels": channels, "test_fraction": 0.25, "seed": seed}}))
        code = prepare_stage.main(["--params", str(params), "--out", str(out / str(seed))])
        return code, capsys.readouterr()

    assert prepare(3)[0] == 0
    train = load_prepared(out / "3" / "folder" / "train.npz").images
    test = load_prepared(out / "3" / "folder" / "test.npz").images
    assert train.shape == (15, 1, 8, 8) and test.shape == (5, 1, 8, 8)
    assert prepare(4)[0] == 0
    other = load_prepared(out / "4" / "folder" / "test.npz").images
    assert not np.array_equal(test, other)  # data.seed draws the split

    code, captured = prepare(5, channels=2)
    assert code == 2 and not (out / "5").exists()
    message = captured.err.strip()
    assert message.startswith("error: ") and "\n" not in message
    assert "data.channels" in message and "must be 1 or 3" in message
