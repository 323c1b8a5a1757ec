"""Images in and out: Fashion-MNIST, a folder of your own images, a synthetic set; PNG grids and charts.

Everything is loaded into memory as uint8 tensors (N, C, H, W) with long labels (N,);
`to_float` maps them to [-1, 1] for the models and `batches` draws seeded minibatches.

- Fashion-MNIST (the default): the four idx files (`.gz` or uncompressed) are looked for
  in this order: the explicit `data_dir` (`--data DIR`), `./data`, the Debian package
  location `/usr/share/datasets/fashion-mnist` (`apt-get install dataset-fashion-mnist`),
  and finally downloaded from the official mirror into `./data`, verified against the
  official MD5 checksums. Images are 28x28, zero-padded by 2 pixels to 32x32, one channel.
- An image folder: one subfolder per class (sorted names = class ids), images resized
  so the short side is `size`, then centre-cropped; split 90% train / 10% test by seed.
- `synthetic`: a tiny deterministic, class-dependent set of oriented bars, for tests.

Every data problem raises `DataError` with one short message saying what to do. Out: `save_grid`
writes images as one PNG grid, `plot_panels` draws small line charts, both with Pillow alone.

Usage:
    import torch, data
    x, y, K = data.load_dataset(None, "train")        # (60000, 1, 32, 32) uint8, (60000,), 10
    g = torch.Generator().manual_seed(0)
    for xb, yb in data.batches(x, y, 128, g):          # one epoch of random minibatches
        x0 = data.to_float(xb)                           # (128, 1, 32, 32) float in [-1, 1]
"""
from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps


class DataError(RuntimeError):
    """A data problem the user can fix (missing, corrupt or malformed data); the message says how."""


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_DIRS: tuple[str, ...] = ("data", "/usr/share/datasets/fashion-mnist")
"""Where Fashion-MNIST is looked for after the explicit `data_dir`, in this order."""
DOWNLOAD_DIR = "data"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_FILES = {  # split -> (images file, labels file), without ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MD5 = {  # official checksums of the .gz files (zalandoresearch/fashion-mnist README)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
IDX_MAGIC = {1: 0x0801, 3: 0x0803}  # ndim -> magic number of an unsigned-byte idx file


def _options(reason: str = "") -> str:
    """The one message that lists every way to provide Fashion-MNIST."""
    files = ", ".join(FASHION_MD5)
    msg = (f"Fashion-MNIST not found{f' ({reason})' if reason else ''}. Provide it in one of these ways: "
           f"--data DIR with the four idx files ({files}); put them in ./data; "
           "apt-get install dataset-fashion-mnist (puts them in /usr/share/datasets/fashion-mnist); "
           f"or allow network access to download them from {FASHION_URL} into ./data")
    return msg


def _find_file(folder: Path, name: str) -> Path | None:
    """`folder/name.gz` or the uncompressed `folder/name`, whichever exists."""
    for p in (folder / (name + ".gz"), folder / name):
        if p.is_file():
            return p
    return None


def has_idx_files(folder: str | os.PathLike) -> bool:
    """True if `folder` holds any of the four Fashion-MNIST idx files."""
    return any(_find_file(Path(folder), n) for pair in FASHION_FILES.values() for n in pair)


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (gzipped or not) with `ndim` dimensions; checks magic and length."""
    path = Path(path)
    fix = "Delete it and download it again (or reinstall dataset-fashion-mnist)."
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"Corrupt or truncated file {path} ({e}).\n{fix}") from None
    head = 4 + 4 * ndim
    if len(raw) < head or int.from_bytes(raw[:4], "big") != IDX_MAGIC[ndim]:
        raise DataError(f"Not an idx file with {ndim} dimension(s) (wrong magic number): {path}.\n{fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != head + int(np.prod(shape)):
        raise DataError(f"Truncated or padded file {path}: header says shape {shape}, "
                        f"expected {head + int(np.prod(shape))} bytes, found {len(raw)}.\n{fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def download_fashion_mnist(folder: str = DOWNLOAD_DIR, timeout: float = 30.0) -> Path:
    """Download the four official .gz files into `folder`, MD5-verified; raises DataError on failure."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, md5 in FASHION_MD5.items():
        dst = out / name
        if dst.is_file():
            continue
        print(f"downloading {FASHION_URL}{name} -> {dst}", file=sys.stderr)
        tmp = dst.with_name(dst.name + ".part")
        h = hashlib.md5()
        try:
            with urllib.request.urlopen(FASHION_URL + name, timeout=timeout) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            tmp.unlink(missing_ok=True)
            raise DataError(_options(f"download of {name} failed: {e}")) from None
        if h.hexdigest() != md5:
            tmp.unlink(missing_ok=True)
            raise DataError(_options(f"download of {name} has MD5 {h.hexdigest()}, expected {md5}"))
        os.replace(tmp, dst)
    return out


def _locate_fashion(split: str, data_dir: str | None, download: bool) -> Path:
    """The folder holding both idx files of `split`, following the search order."""
    names = FASHION_FILES[split]
    if data_dir is not None:
        d = Path(data_dir)
        if not d.is_dir():
            raise DataError(_options(f"--data {data_dir}: no such folder"))
        if not all(_find_file(d, n) for n in names):
            raise DataError(_options(f"--data {data_dir}: missing {names[0]}[.gz] or {names[1]}[.gz]"))
        return d
    for d in map(Path, FASHION_DIRS):
        if all(_find_file(d, n) for n in names):
            return d
    if not download:
        raise DataError(_options("download disabled"))
    return download_fashion_mnist(DOWNLOAD_DIR)


def pad_to_32(x: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32), zero padding of 2 pixels on each side."""
    out = x.new_zeros(x.shape[0], 1, 32, 32)                 # (N, 1, 32, 32)
    out[:, 0, 2:30, 2:30] = x
    return out


def load_fashion_mnist(split: str, data_dir: str | None = None,
                       download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST `split` ("train": 60000, "test": 10000) as uint8 (N, 1, 32, 32), long (N,)."""
    if split not in FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _locate_fashion(split, data_dir, download)
    img_path, lab_path = (_find_file(folder, n) for n in FASHION_FILES[split])
    images = read_idx(img_path, 3)                            # (N, 28, 28)
    labels = read_idx(lab_path, 1)                            # (N,)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: expected 28x28 images, found {images.shape[1]}x{images.shape[2]}.")
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels.")
    if labels.size and labels.max() >= 10:
        raise DataError(f"{lab_path}: label {labels.max()} out of range 0..9.")
    x = pad_to_32(torch.from_numpy(images.copy()))            # (N, 1, 32, 32) uint8
    y = torch.from_numpy(labels.astype(np.int64))             # (N,) long
    return x, y


# ----------------------------------------------------------------------------- image folder

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image -> uint8 (C, size, size): short side resized to `size` (Lanczos), centre crop."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = size / min(w, h)
            W, H = max(size, round(w * s)), max(size, round(h * s))
            im = im.resize((W, H), Image.Resampling.LANCZOS)
            left, top = (W - size) // 2, (H - size) // 2
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)                # (size, size) or (size, size, 3)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"Cannot read image {path} ({e}). Delete or fix it.") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)   # (C, size, size)


def load_image_folder(root: str, size: int = 32,
                      channels: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images under root/<class>/... as uint8 (N, C, size, size), labels long (N,), class names."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    rootp = Path(root)
    if not rootp.is_dir():
        raise DataError(f"Image folder {root} does not exist.")
    classes = sorted(d.name for d in rootp.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"No class subfolders in {root}: expected {root}/<class name>/<images>.")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (rootp / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise DataError(f"No images ({', '.join(sorted(IMAGE_EXTS))}) in class folder {rootp / name}.")
        paths += files
        labels += [c] * len(files)
    x = np.empty((len(paths), channels, size, size), dtype=np.uint8)  # (N, C, size, size)
    for i, p in enumerate(paths):
        x[i] = _load_image(p, size, channels)
    return torch.from_numpy(x), torch.tensor(labels, dtype=torch.long), classes


# ----------------------------------------------------------------------------- synthetic

def synthetic(n: int, size: int = 32, channels: int = 1, num_classes: int = 10,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic toy set: class c is a bright bar at angle pi*c/num_classes (colour by c if RGB).

    Each sample jitters the bar's centre, angle, length and brightness and adds pixel noise.
    Returns uint8 (n, channels, size, size) and balanced, shuffled long labels (n,).
    """
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]          # (n,)
    u = torch.rand(n, 5, generator=g)                                             # (n, 5) jitters
    angle = torch.pi * (y + (u[:, 0] - 0.5) * 0.3) / num_classes                  # (n,)
    cx, cy = ((u[:, 1:3] - 0.5) * size / 8 + (size - 1) / 2).unbind(1)            # (n,), (n,)
    length = size * (0.55 + 0.2 * u[:, 3])                                        # (n,)
    bright = 170 + 85 * u[:, 4]                                                   # (n,)
    r = torch.arange(size, dtype=torch.float32)
    py, px = r[None, :, None] - cy[:, None, None], r[None, None, :] - cx[:, None, None]  # (n, size, 1), (n, 1, size)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    along, across = px * cos + py * sin, -px * sin + py * cos                     # (n, size, size)
    half_w = size / 20
    bar = torch.sigmoid(2 * (half_w - across.abs())) * torch.sigmoid(2 * (length[:, None, None] / 2 - along.abs()))
    img = bar[:, None] * bright[:, None, None, None]                              # (n, 1, size, size)
    if channels == 3:
        hue = 2 * torch.pi * y / num_classes                                      # (n,)
        phase = torch.tensor([0.0, 2.0, 4.0]) * torch.pi / 3                      # (3,)
        colour = 0.6 + 0.4 * torch.cos(hue[:, None] - phase)                      # (n, 3) in [0.2, 1]
        img = img * colour[:, :, None, None]                                      # (n, 3, size, size)
    elif channels != 1:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = img + 8 * torch.randn(img.shape, generator=g) + 10
    return img.round().clamp(0, 255).to(torch.uint8), y


# ----------------------------------------------------------------------------- one entry point

def _adapt(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, size, size): repeat grey to RGB / average RGB, bicubic resize."""
    if x.shape[1] != channels:
        x = x.expand(-1, 3, -1, -1) if channels == 3 else x.float().mean(1, keepdim=True).round().to(torch.uint8)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def load_dataset(data: str | None, split: str, size: int = 32, channels: int = 1,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images uint8 (N, channels, size, size), labels long (N,), num_classes) for `split`.

    `data`: None (Fashion-MNIST, searched), "synthetic" (2000 train / 500 test), a folder
    with the Fashion-MNIST idx files, or a folder of class subfolders (90/10 split by `seed`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data == "synthetic":
        n, s = (2000, seed) if split == "train" else (500, seed + 1)
        x, y = synthetic(n, size, channels, 10, s)
        return x, y, 10
    if data is None or (Path(data).is_dir() and has_idx_files(data)):
        x, y = load_fashion_mnist(split, data)
        return _adapt(x, size, channels), y, 10
    path = Path(data)
    if not path.exists():
        raise DataError(_options(f"--data {data}: no such file or folder"))
    if not path.is_dir() or not any(d.is_dir() and not d.name.startswith(".") for d in path.iterdir()):
        raise DataError(f"--data {data}: expected a folder holding the Fashion-MNIST idx files "
                        f"({', '.join(FASHION_MD5)}) or one subfolder of images per class.")
    x, y, classes = load_image_folder(data, size, channels)
    if len(y) < 2:
        raise DataError(f"--data {data}: need at least 2 images for a train/test split, found {len(y)}.")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))  # (N,)
    n_test = max(1, round(0.1 * len(y)))
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    return x[idx], y[idx], len(classes)


# ----------------------------------------------------------------------------- batches

def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return x.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255] (clamped, rounded); inverse of `to_float`."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
            drop_last: bool = True, infinite: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random minibatches (x[idx], y[idx]) over one epoch (or forever), order drawn from `generator`."""
    n = len(x)
    if n == 0 or (drop_last and n < batch_size):
        raise DataError(f"The data set has {n} images, fewer than one batch of {batch_size}.")
    while True:
        perm = torch.randperm(n, generator=generator)        # (N,) on the generator's (CPU) device
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            idx = perm[i:i + batch_size].to(x.device)         # (B,)
            yield x[idx], y[idx.to(y.device)]
        if not infinite:
            return



# ----------------------------------------------------------------------------- PNG output (Pillow, no matplotlib)

def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 3, save: bool = True) -> None:
    """images (n, C, H, W) in [-1, 1] -> a PNG with `nrow` images per row (save=False: draw only)."""
    x = to_uint8(images)                                         # (n, C, H, W)
    n, C, H, W = x.shape
    canvas = torch.full((C, -(-n // nrow) * (H + 2) + 2, nrow * (W + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, 2 + r * (H + 2):2 + r * (H + 2) + H, 2 + col * (W + 2):2 + col * (W + 2) + W] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if C == 1 else arr)
    if save:
        img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def plot_panels(path: str, panels: list[dict], title: str = "", size: tuple = (300, 200), save: bool = True,
                legend: tuple = ()) -> None:
    """Line charts with Pillow, one panel each, side by side. panel = {"title", "series": [{"x", "y", "color",
    "dashed", "band": (lo, hi)}]}; legend: (name, color) pairs written after the title. save=False draws
    without writing (the other ranks of a torchrun job)."""
    W, H = size
    ml, mr, mt, mb = 46, 10, 22, 22                                   # margins: left, right, top, bottom
    img = Image.new("RGB", (W * len(panels), H + (18 if title else 0)), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 2), title, fill="black")
    x_text = 12 + d.textlength(title)
    for name, color in legend:
        d.text((x_text, 2), name, fill=color)
        x_text += 8 + d.textlength(name)
    for p_i, panel in enumerate(panels):
        ox, oy = p_i * W, 18 if title else 0
        xs = [x for s in panel["series"] for x in s["x"]]
        ys = [y for s in panel["series"] for y in s["y"] if y == y] + \
             [v for s in panel["series"] if s.get("band") for part in s["band"] for v in part]
        if not xs or not ys:
            continue
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        pad = (max(ys) - min(ys)) * 0.05 or abs(min(ys)) * 0.05 or 1.0
        y0, y1 = min(ys) - pad, max(ys) + pad
        px = lambda x: ox + ml + (x - x0) / (x1 - x0) * (W - ml - mr)
        py = lambda y: oy + mt + (y1 - y) / (y1 - y0) * (H - mt - mb)
        d.rectangle([ox + ml, oy + mt, ox + W - mr, oy + H - mb], outline=(160, 160, 160))
        d.text((ox + ml, oy + 6), panel["title"], fill="black")
        for text, xy in ((f"{y1:.3g}", (ox + 2, oy + mt - 4)), (f"{y0:.3g}", (ox + 2, oy + H - mb - 8)),
                         (f"{x0:g}", (ox + ml, oy + H - mb + 4)), (f"{x1:g}", (ox + W - mr - 24, oy + H - mb + 4))):
            d.text(xy, text, fill=(90, 90, 90))
        for s in panel["series"]:
            if s.get("band"):
                lo, hi = s["band"]
                poly = [(px(x), py(v)) for x, v in zip(s["x"], hi)] + [(px(x), py(v)) for x, v in reversed(list(zip(s["x"], lo)))]
                d.polygon(poly, fill=tuple(int(255 - (255 - c) * 0.25) for c in s["color"]))
            pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if y == y]
            for k, (a, b) in enumerate(zip(pts, pts[1:])):
                if not s.get("dashed") or k % 2 == 0:
                    d.line([a, b], fill=s["color"], width=2)
            for x, y in pts if len(pts) == 1 or s.get("dashed") else []:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], outline=s["color"])
    if save:
        img.save(path)

if __name__ == "__main__":
    x, y = synthetic(200, channels=3)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (200,)
    assert torch.equal(x, synthetic(200, channels=3)[0])
    print(f"synthetic: {tuple(x.shape)} {x.dtype}, labels {y.bincount().tolist()}")
    xb, yb = next(batches(x, y, 64, torch.Generator().manual_seed(0)))
    assert torch.equal(to_uint8(to_float(xb)), xb) and xb.shape == (64, 3, 32, 32)
    try:
        for split in ("train", "test"):
            x, y = load_fashion_mnist(split, download=False)
            print(f"fashion-mnist {split}: {tuple(x.shape)} {x.dtype}, labels {tuple(y.shape)} "
                  f"{y.dtype}, per class {y.bincount().tolist()}")
    except DataError as e:
        print(f"fashion-mnist not checked:\n{e}")
    print("ok")
