import gzip
import shutil

import pytest
import torch

from phalanx.data import datasets as dsmod
from phalanx.errors import DataError

FILES = dsmod.IDX_FILES


@pytest.fixture(scope="module")
def fmnist_dir():
    found = dsmod.find_files("fashion-mnist", FILES)
    assert found is not None, "Fashion-MNIST is not installed: run `make setup` (apt-get install dataset-fashion-mnist)"
    return found


def test_loads_installed_fashion_mnist(fmnist_dir):
    ds = dsmod.fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and 0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1
    assert torch.equal(torch.bincount(ds.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))
    assert ds.classes[0] == "T-shirt/top"


def test_installed_files_match_recorded_checksums(fmnist_dir):
    for f in FILES:
        kind, digest = dsmod.CHECKSUMS["fashion-mnist"][f]
        assert dsmod.checksum_ok(fmnist_dir / f, kind, digest), f


def copy_data(src, dst):
    dst.mkdir()
    for f in FILES:
        shutil.copy(src / f, dst / f)
    return dst


def test_truncated_file_names_the_file(fmnist_dir, tmp_path):
    d = copy_data(fmnist_dir, tmp_path / "fm")
    bad = d / "train-labels-idx1-ubyte.gz"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        dsmod.read_idx(bad)


def test_payload_shorter_than_header_promises(tmp_path):
    bad = tmp_path / "x-idx1-ubyte.gz"
    header = bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big")
    bad.write_bytes(gzip.compress(header + bytes(50)))
    with pytest.raises(DataError, match="x-idx1-ubyte.gz.*truncated or corrupt"):
        dsmod.read_idx(bad)


def test_bad_magic(tmp_path):
    bad = tmp_path / "junk.gz"
    bad.write_bytes(gzip.compress(b"hello world, not an idx file"))
    with pytest.raises(DataError, match="junk.gz.*magic"):
        dsmod.read_idx(bad)


def test_phalanx_data_env_is_searched_first(fmnist_dir, tmp_path, monkeypatch):
    d = copy_data(fmnist_dir, tmp_path / "fashion-mnist")
    monkeypatch.setenv("PHALANX_DATA", str(tmp_path))
    assert dsmod.find_files("fashion-mnist", FILES) == d


def test_download_checks_checksum(fmnist_dir, tmp_path):
    src = fmnist_dir / "t10k-labels-idx1-ubyte.gz"
    kind, digest = dsmod.CHECKSUMS["fashion-mnist"]["t10k-labels-idx1-ubyte.gz"]
    dest = tmp_path / "cache" / "t10k-labels-idx1-ubyte.gz"
    dsmod.download(src.as_uri(), dest, kind, digest)  # file:// URL: the real code path, no network
    assert dest.is_file() and dsmod.checksum_ok(dest, kind, digest)
    other = tmp_path / "cache2" / "x.gz"
    with pytest.raises(DataError, match="checksum mismatch"):
        dsmod.download(src.as_uri(), other, kind, "0" * 64)
    assert not other.exists() and not other.with_suffix(".gz.part").exists()


def test_download_failure_is_clear(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        dsmod.download((tmp_path / "missing.gz").as_uri(), tmp_path / "out.gz", "md5-file", "0" * 32)


def test_digits_tiny_set():
    ds = dsmod.digits()
    assert ds.in_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797
