"""Dataset loaders: Fashion-MNIST, MNIST, CIFAR-10 and scikit-learn's digits.

IDX files are looked up in ``$PHALANX_DATA``, then Debian's ``/usr/share/datasets/<name>``
(package ``dataset-fashion-mnist``), then ``~/.cache/phalanx/<name>``; when none has them they
are downloaded into the cache and checked against a recorded checksum. Images come back as
float32 in [0, 1], shape [N, C, H, W]; labels as int64.

Checksums are of the *decompressed* payload (SHA-256) where we could record it, since mirrors
(Debian among them) recompress the ``.gz`` files; MNIST and CIFAR-10 carry the MD5 of the archive
that their publishers list.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..registry import DATASETS

CACHE = Path(os.environ.get("PHALANX_CACHE", Path.home() / ".cache" / "phalanx"))
DEBIAN = Path("/usr/share/datasets")

FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

# file -> ("sha256-raw" | "md5-file", hex digest)
CHECKSUMS = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": ("sha256-raw", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train-labels-idx1-ubyte.gz": ("sha256-raw", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "t10k-images-idx3-ubyte.gz": ("sha256-raw", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "t10k-labels-idx1-ubyte.gz": ("sha256-raw", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": ("md5-file", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte.gz": ("md5-file", "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte.gz": ("md5-file", "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte.gz": ("md5-file", "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    "cifar-10": {"cifar-10-python.tar.gz": ("md5-file", "c58f30108f718f92721af3b95e74349a")},
}
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")


@dataclass
class Dataset:
    """A train/test split held in memory.

    Tabular datasets (``phalanx.data.tabular``) hold feature vectors [N, F] and may say which silo
    (bank) each row belongs to: ``silo_train`` / ``silo_test`` (int64 [N], indices into ``silos``,
    the silo names); image datasets leave them None.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    silo_train: torch.Tensor | None = None
    silo_test: torch.Tensor | None = None
    silos: tuple[str, ...] = ()

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "Dataset":
        """A smaller copy with ``train`` / ``test`` samples drawn without replacement."""
        g = torch.Generator().manual_seed(seed)
        out = self
        if train is not None and train < len(self.y_train):
            out = out.take_train(torch.randperm(len(self.y_train), generator=g)[:train])
        if test is not None and test < len(self.y_test):
            i = torch.randperm(len(self.y_test), generator=g)[:test]
            out = replace(out, x_test=out.x_test[i], y_test=out.y_test[i],
                          silo_test=None if out.silo_test is None else out.silo_test[i])
        return out

    def take_train(self, index: torch.Tensor) -> "Dataset":
        """A copy keeping only the training rows ``index`` (their silo ids too); the test set is shared."""
        return replace(self, x_train=self.x_train[index], y_train=self.y_train[index],
                       silo_train=None if self.silo_train is None else self.silo_train[index])


# ---------------------------------------------------------------- files, checksums, download


def checksum_ok(path: Path, kind: str, digest: str) -> bool:
    if kind == "md5-file":
        h = hashlib.md5()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest() == digest
    if kind == "sha256-raw":
        h = hashlib.sha256()
        try:
            with gzip.open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
        return h.hexdigest() == digest
    raise DataError(f"unknown checksum kind {kind!r}")


def search_dirs(name: str) -> list[Path]:
    dirs = []
    env = os.environ.get("PHALANX_DATA")
    if env:
        dirs += [Path(env) / name, Path(env)]
    dirs += [DEBIAN / name, CACHE / name]
    return dirs


def find_files(name: str, files: tuple[str, ...]) -> Path | None:
    for d in search_dirs(name):
        if all((d / f).is_file() for f in files):
            return d
    return None


def download(url: str, dest: Path, kind: str, digest: str) -> None:
    """Download ``url`` to ``dest`` atomically and check its checksum."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as out:
            shutil.copyfileobj(r, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {e}. Install the data (for Fashion-MNIST: "
                        f"apt-get install dataset-fashion-mnist) or set PHALANX_DATA") from None
    if not checksum_ok(tmp, kind, digest):
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: checksum mismatch ({kind}), download discarded")
    os.replace(tmp, dest)


def locate(name: str, base_url: str, files: tuple[str, ...]) -> Path:
    """The folder holding ``files`` for dataset ``name``, downloading them into the cache if needed."""
    found = find_files(name, files)
    if found is not None:
        return found
    target = CACHE / name
    for f in files:
        if not (target / f).is_file():
            kind, digest = CHECKSUMS[name][f]
            download(base_url + f, target / f, kind, digest)
    return target


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzip-compressed IDX file, with clear errors on truncation or corruption."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: IDX payload has {len(raw) - header} bytes, header promises "
                        f"{expected - header} (dims {dims}); the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_dataset(name: str, base_url: str, classes) -> Dataset:
    folder = locate(name, base_url, IDX_FILES)
    xtr, ytr, xte, yte = (read_idx(folder / f) for f in IDX_FILES)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"{folder}: image and label counts differ ({len(xtr)} vs {len(ytr)}, "
                        f"{len(xte)} vs {len(yte)})")
    if int(ytr.max()) >= len(classes) or int(yte.max()) >= len(classes):
        raise DataError(f"{folder}: label out of range 0..{len(classes) - 1}")

    def imgs(a):
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(name, imgs(xtr), labels(ytr), imgs(xte), labels(yte), tuple(classes))


# ---------------------------------------------------------------- registered datasets


@DATASETS.register("fashion-mnist")
def fashion_mnist() -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey images, 10 clothing classes."""
    return load_idx_dataset("fashion-mnist", FMNIST_URL, FMNIST_CLASSES)


@DATASETS.register("mnist")
def mnist() -> Dataset:
    """MNIST handwritten digits: 60k/10k 28x28 grey images."""
    return load_idx_dataset("mnist", MNIST_URL, tuple(str(i) for i in range(10)))


@DATASETS.register("cifar10")
def cifar10() -> Dataset:
    """CIFAR-10: 50k/10k 32x32 colour images, 10 classes (python pickle archive)."""
    archive = "cifar-10-python.tar.gz"
    folder = locate("cifar-10", CIFAR10_URL.rsplit("/", 1)[0] + "/", (archive,))
    path = folder / archive
    try:
        with tarfile.open(path, "r:gz") as tar:
            def batch(member):
                d = pickle.load(tar.extractfile(member), encoding="bytes")
                return np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"])

            names = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers()}
            parts = [batch(names[f"data_batch_{i}"]) for i in range(1, 6)]
            xte, yte = batch(names["test_batch"])
            meta = pickle.load(tar.extractfile(names["batches.meta"]), encoding="bytes")
    except (OSError, EOFError, KeyError, pickle.UnpicklingError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or incomplete CIFAR-10 archive ({e})") from None
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    classes = tuple(c.decode() for c in meta[b"label_names"])
    t = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)  # noqa: E731
    return Dataset("cifar10", t(xtr), torch.from_numpy(ytr.astype(np.int64)), t(xte),
                   torch.from_numpy(yte.astype(np.int64)), classes)


@DATASETS.register("digits")
def digits() -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images), split 1,437/360 with a fixed seed; for tiny tests."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(y))
    return Dataset("digits", x[:cut], y[:cut], x[cut:], y[cut:], tuple(str(i) for i in range(10)))


_MEMO: dict[str, Dataset] = {}


def load_dataset(name: str) -> Dataset:
    """Load a registered dataset by name (memoized in the process)."""
    if name not in _MEMO:
        _MEMO[name] = DATASETS.build(name)
    return _MEMO[name]
