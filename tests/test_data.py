"""Tests for data.py on tiny files written into tmp_path; the real data set is never needed."""
import gzip
import hashlib
import io
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError


def idx_bytes(a: np.ndarray) -> bytes:
    """An unsigned-byte idx file holding array `a`."""
    head = (0x0800 + a.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return head + a.astype(np.uint8).tobytes()


def write_fashion(folder, n=5, split="train", gz=True, seed=0):
    """Valid idx files of `n` random 28x28 images for `split`; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in zip(data.FASHION_FILES[split], (x, y)):
        raw = idx_bytes(a)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return x, y


@pytest.fixture
def no_search(monkeypatch, tmp_path):
    """Run in an empty cwd with no default search folders, so nothing real is found."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "FASHION_DIRS", ("data",))


# ------------------------------------------------------------------ synthetic

def test_synthetic_shapes_dtype_determinism():
    x, y = data.synthetic(50, size=24, channels=3, num_classes=5, seed=3)
    assert x.shape == (50, 3, 24, 24) and x.dtype == torch.uint8
    assert y.shape == (50,) and y.dtype == torch.long
    assert y.bincount().tolist() == [10] * 5
    x2, y2 = data.synthetic(50, size=24, channels=3, num_classes=5, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, data.synthetic(50, size=24, channels=3, num_classes=5, seed=4)[0])
    flat = x.float().flatten(1)
    assert (flat.max(1).values > 120).all() and (flat.median(1).values < 40).all()  # bright shape, dark ground


def test_synthetic_is_class_dependent():
    """A nearest-class-mean classifier fit on one seed classifies another seed's images."""
    xtr, ytr = data.synthetic(500, seed=0)
    xte, yte = data.synthetic(200, seed=1)
    f_tr, f_te = data.to_float(xtr).flatten(1), data.to_float(xte).flatten(1)
    means = torch.stack([f_tr[ytr == c].mean(0) for c in range(10)])      # (10, D)
    pred = torch.cdist(f_te, means).argmin(1)
    assert (pred == yte).float().mean() > 0.9


def test_to_float_to_uint8_roundtrip():
    x = torch.arange(256, dtype=torch.uint8)
    f = data.to_float(x)
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(data.to_uint8(f), x)
    assert data.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


# ------------------------------------------------------------------ Fashion-MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_loads_and_pads(tmp_path, gz):
    x, y = write_fashion(tmp_path / "fm", n=5, split="test", gz=gz)
    xt, yt = data.load_fashion_mnist("test", str(tmp_path / "fm"), download=False)
    assert xt.shape == (5, 1, 32, 32) and xt.dtype == torch.uint8
    assert yt.dtype == torch.long and yt.tolist() == y.tolist()
    assert torch.equal(xt[:, 0, 2:30, 2:30], torch.from_numpy(x))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (xt[:, 0][:, border] == 0).all()


def test_fashion_search_order(tmp_path, monkeypatch):
    """./data is used first; then the next folder in FASHION_DIRS."""
    monkeypatch.chdir(tmp_path)
    write_fashion(tmp_path / "other", n=3)
    monkeypatch.setattr(data, "FASHION_DIRS", ("data", str(tmp_path / "other")))
    assert len(data.load_fashion_mnist("train", download=False)[0]) == 3
    write_fashion(tmp_path / "data", n=4)
    assert len(data.load_fashion_mnist("train", download=False)[0]) == 4


def test_truncated_gzip_names_file(tmp_path):
    write_fashion(tmp_path, n=5)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz") as e:
        data.load_fashion_mnist("train", str(tmp_path), download=False)
    assert "download" in str(e.value)


def test_wrong_magic(tmp_path):
    write_fashion(tmp_path, n=5)
    f = tmp_path / "train-labels-idx1-ubyte.gz"
    f.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + gzip.decompress(f.read_bytes())[4:]))
    with pytest.raises(DataError, match="magic.*train-labels-idx1-ubyte.gz"):
        data.load_fashion_mnist("train", str(tmp_path), download=False)


def test_wrong_length(tmp_path):
    write_fashion(tmp_path, n=5, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        data.load_fashion_mnist("train", str(tmp_path), download=False)


def test_count_mismatch(tmp_path):
    write_fashion(tmp_path, n=5)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(DataError, match="5 images but"):
        data.load_fashion_mnist("train", str(tmp_path), download=False)


def test_missing_explicit_folder_lists_options(tmp_path, no_search):
    with pytest.raises(DataError) as e:
        data.load_fashion_mnist("train", str(tmp_path / "nope"), download=False)
    msg = str(e.value)
    for option in ("--data DIR", "./data", "apt-get install dataset-fashion-mnist", "download", "no such folder"):
        assert option in msg


def test_explicit_folder_without_files_does_not_fall_back(tmp_path, no_search):
    write_fashion(tmp_path / "data", n=3)  # would be found by the search
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="missing"):
        data.load_fashion_mnist("train", str(tmp_path / "empty"), download=False)


def test_nothing_found_and_no_network(tmp_path, no_search, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as e:
        data.load_fashion_mnist("train")
    assert "no network" in str(e.value)
    assert not list((tmp_path / "data").glob("*"))  # no partial files left behind


def test_download_verifies_md5(tmp_path, no_search, monkeypatch):
    for split in ("train", "test"):
        write_fashion(tmp_path / "src", n=6, split=split)
    files = {name: (tmp_path / "src" / name).read_bytes() for name in data.FASHION_MD5}
    served = dict(files)
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO(served[url.rsplit("/", 1)[1]]))
    monkeypatch.setattr(data, "FASHION_MD5", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    served["t10k-images-idx3-ubyte.gz"] = b"corrupted"
    with pytest.raises(DataError, match="MD5"):
        data.load_fashion_mnist("train")
    served["t10k-images-idx3-ubyte.gz"] = files["t10k-images-idx3-ubyte.gz"]
    xs, ys = data.load_fashion_mnist("test")
    assert xs.shape == (6, 1, 32, 32)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(files)


# ------------------------------------------------------------------ image folder

def write_images(root, sizes=((40, 60), (50, 50), (64, 30)), classes=("cat", "dog")):
    """A few random RGB PNG/JPG images per class subfolder."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.{'PNG' if i % 2 else 'jpg'}")
    (root / "cat" / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(tmp_path, channels):
    write_images(tmp_path)
    x, y, names = data.load_image_folder(str(tmp_path), size=32, channels=channels)
    assert names == ["cat", "dog"]
    assert x.shape == (6, channels, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_centre_crop(tmp_path):
    """A 64x32 image, left half black, right half white: resized to 32 high, centre 32 kept."""
    (tmp_path / "a").mkdir()
    a = np.zeros((32, 64), np.uint8)
    a[:, 32:] = 255
    Image.fromarray(a).save(tmp_path / "a" / "x.png")
    x, _, _ = data.load_image_folder(str(tmp_path), size=16)
    assert x.shape == (1, 1, 16, 16)
    assert x[0, 0, :, 0].float().mean() < 20 and x[0, 0, :, -1].float().mean() > 235


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_image_folder(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="No class subfolders"):
        data.load_image_folder(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No images.*empty"):
        data.load_image_folder(str(tmp_path))
    (tmp_path / "empty" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        data.load_image_folder(str(tmp_path))


# ------------------------------------------------------------------ load_dataset, batches

def test_load_dataset_synthetic():
    x, y, k = data.load_dataset("synthetic", "train")
    assert x.shape == (2000, 1, 32, 32) and k == 10
    xt, _, _ = data.load_dataset("synthetic", "test", size=16, channels=3)
    assert xt.shape == (500, 3, 16, 16)


def test_load_dataset_idx_folder(tmp_path):
    write_fashion(tmp_path, n=5)
    x, y, k = data.load_dataset(str(tmp_path), "train", size=16, channels=3)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.uint8 and k == 10


def test_load_dataset_image_folder_split(tmp_path):
    write_images(tmp_path, sizes=[(40, 40)] * 10)
    xtr, ytr, k = data.load_dataset(str(tmp_path), "train", seed=1)
    xte, yte, _ = data.load_dataset(str(tmp_path), "test", seed=1)
    assert k == 2 and len(ytr) == 18 and len(yte) == 2
    rows = {tuple(r) for r in torch.cat([xtr, xte]).flatten(1).tolist()}
    assert len(rows) == 20  # disjoint and complete
    assert torch.equal(data.load_dataset(str(tmp_path), "test", seed=1)[0], xte)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="no such"):
        data.load_dataset(str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match="class"):
        data.load_dataset(str(tmp_path), "train")  # empty folder


def test_batches():
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    out = list(data.batches(x, y, 3, torch.Generator().manual_seed(0)))
    assert len(out) == 3 and all(len(b) == 3 for b, _ in out)
    seen = torch.cat([b[:, 0] for b, _ in out])
    assert len(set(seen.tolist())) == 9
    assert all(torch.equal(b[:, 0], c) for b, c in out)
    again = list(data.batches(x, y, 3, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(out, again))
    full = list(data.batches(x, y, 3, torch.Generator().manual_seed(0), drop_last=False))
    assert sorted(torch.cat([b for _, b in full]).tolist()) == list(range(10))
    it = data.batches(x, y, 4, torch.Generator().manual_seed(0), infinite=True)
    assert len([next(it) for _ in range(7)]) == 7
    with pytest.raises(DataError):
        next(data.batches(x, y, 11, torch.Generator()))
