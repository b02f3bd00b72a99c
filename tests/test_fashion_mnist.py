import gzip
import random
import struct

import numpy as np
import pytest
import torch

from poisonbench.datasets import fashion_mnist as fm


def write_idx(path, array: np.ndarray, code=0x08, compress=False):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, images, compress=compress)
    out = fm.read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([1, -2, 70000], dtype=np.int32)
    write_idx(tmp_path / "y", values, code=0x0C)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "y"), values)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        fm.read_idx(tmp_path / "magic")
    write_idx(tmp_path / "short", np.zeros((4, 2, 2), np.uint8))
    data = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="payload"):
        fm.read_idx(tmp_path / "short")
    (tmp_path / "code").write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(ValueError, match="type code"):
        fm.read_idx(tmp_path / "code")


def test_dataset_from_poisonbench_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    monkeypatch.setenv("POISONBENCH_DATA", str(tmp_path))
    bundle = fm.FashionMNIST(fm.FashionMNISTParams(n_train=30, n_eval=0, n_probe=20, n_heldout=10)).load(seed=1)
    assert bundle.train.images.shape == (30, 3, 28, 28) and bundle.train.images.dtype == torch.uint8
    assert len(bundle.eval) == 20 and bundle.eval.classnames[9] == "ankle boot"
    # every caption names its own class with one of the class words
    for caption, y in zip(bundle.train.captions, bundle.train.labels.tolist()):
        assert any(w in caption for w in fm.CLASS_WORDS[y])
    assert len(bundle.probe_train) == 20 and len(bundle.heldout) == 10
    again = fm.FashionMNIST(fm.FashionMNISTParams(n_train=30, n_probe=20, n_heldout=10)).load(seed=1)
    assert again.train.captions == bundle.train.captions  # seeded


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("POISONBENCH_DATA", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_ROOT", str(tmp_path / "none"))
    with pytest.raises(fm.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.find_root()


def test_data_folder_set_but_empty_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONBENCH_DATA", str(tmp_path))
    with pytest.raises(fm.DataNotFoundError, match=f"POISONBENCH_DATA={tmp_path} holds no Fashion-MNIST"):
        fm.find_root()


def test_corrupt_gzip_names_the_file(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((100, 28, 28), np.uint8), compress=True)
    data = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="x.gz: unreadable"):
        fm.read_idx(tmp_path / "x.gz")


def test_captions_are_varied():
    rng = random.Random(0)
    captions = {fm.write_caption(3, rng) for _ in range(200)}
    assert len(fm.CAPTION_TEMPLATES) >= 10 and all(len(w) >= 3 for w in fm.CLASS_WORDS)
    assert len(captions) > 50


def test_captions_are_grammatical():
    """Every class word gets the article its spelling calls for, and no adjective is doubled."""
    rng = random.Random(1)
    captions = [fm.write_caption(y, rng) for y in range(10) for _ in range(300)]
    assert any("an ankle boot" in c for c in captions) and any("an overcoat" in c for c in captions)
    assert any("a pair of" in c for c in captions)
    for c in captions:
        words = c.split()
        for a, b in zip(words, words[1:]):
            assert not (a == "a" and b[0] in "aeiou"), c
            assert not (a == "an" and b[0] not in "aeiou"), c
            assert a != b, c
        assert not any(f"a {w}" in c for w in ("trousers", "pants", "slacks", "sandals")), c
