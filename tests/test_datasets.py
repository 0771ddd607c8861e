"""Dataset loaders, the IDX reader, transforms and the synthetic generators."""

from __future__ import annotations

import gzip
import re
import socket
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from workers import datasets
from workers.datasets import DatasetError

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
               np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Independent IDX writer: magic (0, 0, type, ndim), big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, _TYPE_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_idx_set(directory: Path, prefix: str = "", num_train: int = 12, num_test: int = 6) -> dict:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 5, 5), dtype=np.uint8),
              "train-labels-idx1-ubyte": (np.arange(num_train) % 4).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 5, 5), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(num_test) % 4).astype(np.uint8)}
    directory.mkdir(parents=True, exist_ok=True)
    for i, (name, array) in enumerate(arrays.items()):  # mix compressed and plain files
        compress = i % 2 == 0
        write_idx(directory / f"{prefix}{name}{'.gz' if compress else ''}", array, compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-5, 0, 7, 2**30], dtype=np.int32),
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    np.array([[-3, 4]], dtype=np.int16),
])
def test_read_idx_round_trips_plain_and_gzip(tmp_path, array, compress):
    path = write_idx(tmp_path / "a.idx", array, compress)
    loaded = datasets.read_idx(path)
    assert loaded.dtype == array.dtype.newbyteorder("=") and loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)


def test_read_idx_rejects_bad_magic_naming_the_file(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DatasetError, match="magic") as info:
        datasets.read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")  # unknown type code
    with pytest.raises(DatasetError, match="magic"):
        datasets.read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_truncated_data(tmp_path, compress):
    payload = write_idx(tmp_path / "full", np.zeros((4, 3), np.uint8), compress=False).read_bytes()
    path = tmp_path / "cut.idx"
    short = payload[:-1]
    path.write_bytes(gzip.compress(short) if compress else short)
    with pytest.raises(DatasetError, match=r"truncated IDX data.*need 12 bytes, found 11") as info:
        datasets.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip_stream_and_header(tmp_path):
    payload = gzip.compress(write_idx(tmp_path / "full", np.zeros((40, 30), np.uint8), False).read_bytes())
    (tmp_path / "cut.gz").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DatasetError, match="gzip"):
        datasets.read_idx(tmp_path / "cut.gz")
    (tmp_path / "header").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 3))  # 3 dims, 1 given
    with pytest.raises(DatasetError, match="truncated IDX header"):
        datasets.read_idx(tmp_path / "header")


def test_read_idx_rejects_trailing_bytes(tmp_path):
    path = write_idx(tmp_path / "a", np.zeros((2, 2), np.uint8), compress=False)
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(DatasetError, match="2 unexpected trailing bytes"):
        datasets.read_idx(path)


def test_read_idx_missing_file_is_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="cannot read") as info:
        datasets.read_idx(tmp_path / "nope.idx")
    assert str(tmp_path / "nope.idx") in str(info.value)


def test_load_idx_dataset_scales_images_and_finds_prefixed_mixed_files(tmp_path):
    arrays = write_idx_set(tmp_path, prefix="emnist-x-")
    data = datasets.load_idx_dataset(tmp_path, "emnist", prefix="emnist-x-")
    np.testing.assert_allclose(data.x_train, arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32


def test_load_idx_dataset_rejects_label_image_count_mismatch(tmp_path):
    write_idx_set(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8), compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink(missing_ok=True)
    with pytest.raises(DatasetError, match="do not match 6 images"):
        datasets.load_idx_dataset(tmp_path)


def test_missing_fashion_mnist_is_one_line_naming_every_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetError) as info:
        datasets.load_fashion_mnist(tmp_path / "absent")
    message = str(info.value)
    assert "\n" not in message
    tried = set(re.findall(r"(/[^\s,;]+)[,;]", message))
    expected = {f"{tmp_path / 'absent' / part}{suffix}" for suffix in (".gz", "")
                for part in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                             "t10k-labels-idx1-ubyte")}
    assert expected <= tried
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "BLUR_FASHION_MNIST_DIR" in message


def test_fashion_mnist_directory_comes_from_env_var(tmp_path, monkeypatch):
    arrays = write_idx_set(tmp_path)
    monkeypatch.setenv("BLUR_FASHION_MNIST_DIR", str(tmp_path))
    data = datasets.load_fashion_mnist()
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte"])


def test_fashion_mnist_loads_from_the_system_package():
    data = datasets.load_fashion_mnist(datasets.FASHION_MNIST_DEFAULT_DIR)
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() == 1.0
    np.testing.assert_array_equal(np.bincount(data.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(data.y_test), np.full(10, 1000))


def test_mnist_needs_a_directory(monkeypatch):
    monkeypatch.delenv("BLUR_MNIST_DIR", raising=False)
    with pytest.raises(DatasetError, match="BLUR_MNIST_DIR"):
        datasets.load_mnist()


def test_digits_are_scaled_images():
    x, y = datasets.load_digits()
    assert x.shape == (1797, 8, 8) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))


def test_mnist1d_is_generated_offline_cached_atomically_and_keeps_global_rng(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = datasets.load_mnist1d(tmp_path, num_samples=500)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    assert first.x_train.shape == (400, 40) and first.x_test.shape == (100, 40)
    assert first.x_train.dtype == np.float32 and set(np.unique(first.y_train)) == set(range(10))
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no temporary file left behind
    second = datasets.load_mnist1d(tmp_path, num_samples=500)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_area_resize_averages_blocks_and_preserves_constants():
    x = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(datasets.resize(x, 14), x.reshape(3, 14, 2, 14, 2).mean((2, 4)), atol=1e-6)
    constant = np.full((2, 14, 14), 0.3, np.float32)
    for method in ("area", "bilinear"):
        np.testing.assert_allclose(datasets.resize(constant, 10, method), 0.3, atol=1e-6)
    # non-integer area factor keeps the image mean (every input pixel has the same total weight)
    np.testing.assert_allclose(datasets.resize(x, 10).mean((1, 2)), x.mean((1, 2)), atol=1e-5)
    signal = np.arange(40, dtype=np.float32)[None]
    np.testing.assert_allclose(datasets.resize(signal, 20), signal.reshape(1, 20, 2).mean(2))


def test_center_crop_takes_the_middle():
    x = np.arange(36).reshape(1, 6, 6)
    np.testing.assert_array_equal(datasets.center_crop(x, 2), [[[14, 15], [20, 21]]])
    with pytest.raises(ValueError, match="larger"):
        datasets.center_crop(x, 7)


@pytest.mark.parametrize("name", list(datasets.TOY_FUNCTIONS))
def test_toy_function_gives_both_labels_and_differs_per_task(name):
    fn = datasets.TOY_FUNCTIONS[name]
    point_key = jax.random.PRNGKey(1)
    outputs = []
    for task in range(4):
        x, y = fn(jax.random.PRNGKey(100 + task), point_key, 400)
        assert x.shape == (400, 2) and y.shape == (400,) and y.dtype == np.int32
        assert set(np.unique(np.asarray(y))) == {0, 1}, f"{name} task {task} has a single label"
        assert np.all(np.abs(np.asarray(x)) < 3.0)
        outputs.append(np.concatenate([np.asarray(x), np.asarray(y)[:, None]], axis=1))
    assert not np.array_equal(outputs[0], outputs[1])  # the task key changes the function instance
    again = fn(jax.random.PRNGKey(100), point_key, 400)
    np.testing.assert_array_equal(np.concatenate([again[0], again[1][:, None]], axis=1), outputs[0])


def test_teacher_student_labels_use_every_class_and_depend_on_the_teacher():
    fn = datasets.teacher_student
    point_key = jax.random.PRNGKey(0)
    _, first = fn(jax.random.PRNGKey(1), point_key, 2000, 8, (16,), 4)
    _, second = fn(jax.random.PRNGKey(2), point_key, 2000, 8, (16,), 4)
    assert set(np.unique(np.asarray(first))) == {0, 1, 2, 3}
    assert np.mean(np.asarray(first) == np.asarray(second)) < 0.6
