"""Prepare the full MNIST set (60,000 train / 10,000 test) as uint8 arrays.

Writes train.npy / test.npy (N x 28 x 28 x 1, uint8) and train_labels.npy /
test_labels.npy (int64, 0..9) into --out_dir (default: this folder). Images
stay at 28 x 28; the training scripts resize them when they load them.

The four raw IDX files are looked for first in --raw_dir/MNIST/raw/ (where
torchvision puts them) and then directly in --raw_dir, each either plain or
gzipped:

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

When all four are there they are read by the small IDX reader below and
nothing is downloaded, so the script works offline. Otherwise torchvision's
downloader fetches them (unless --no_download).

    python data/mnist/prepare.py                      # download if needed
    python data/mnist/prepare.py --raw_dir ~/mnist    # IDX files already on disk
"""
import argparse
import gzip
import os
import sys
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read one IDX file (plain or gzipped) into a numpy array; ValueError if malformed."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: broken gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header cut short")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_raw_file(raw_dir, stem):
    for folder in (os.path.join(raw_dir, "MNIST", "raw"), raw_dir):
        for name in (stem, stem + ".gz"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def read_split(images_path, labels_path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images N x H x W, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_path}: labels outside 0..9")
    return images[..., None], labels.astype(np.int64)


def download(raw_dir):
    """Fetch MNIST with torchvision; returns {split: (images, labels)}."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:
        sys.exit(f"prepare.py: error: the MNIST IDX files are not in {raw_dir} and torchvision is missing to download them ({e})")
    splits = {}
    try:
        for split in ("train", "test"):
            ds = MNIST(root=raw_dir, train=(split == "train"), download=True)
            splits[split] = (ds.data.numpy().astype(np.uint8)[..., None], ds.targets.numpy().astype(np.int64))
    except (OSError, RuntimeError) as e:
        message = " ".join(str(e).split())
        sys.exit(f"prepare.py: error: cannot download MNIST into {raw_dir} ({message}); "
                 f"put the four IDX files there instead")
    return splits


def save_array(path, array):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)  # a killed run never leaves a half-written array


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_dir", default=os.path.join(HERE, "raw"),
                        help="where the IDX files are (or get downloaded to); default: data/mnist/raw")
    parser.add_argument("--out_dir", default=HERE, help="where the .npy files go; default: this folder")
    parser.add_argument("--no_download", action="store_true",
                        help="fail instead of downloading when IDX files are missing")
    args = parser.parse_args()

    paths = {split: [find_raw_file(args.raw_dir, stem) for stem in stems] for split, stems in FILES.items()}
    missing = [stem for split, stems in FILES.items() for stem, p in zip(stems, paths[split]) if p is None]
    if not missing:
        splits = {}
        for split, (images_path, labels_path) in paths.items():
            try:
                splits[split] = read_split(images_path, labels_path)
            except (OSError, ValueError) as e:
                sys.exit(f"prepare.py: error: {e}")
        print(f"read the IDX files from {os.path.dirname(paths['train'][0])}")
    elif args.no_download:
        sys.exit(f"prepare.py: error: missing in {args.raw_dir} (or its MNIST/raw/): {', '.join(missing)} "
                 f"(.gz or plain); run without --no_download to fetch them")
    else:
        splits = download(args.raw_dir)

    os.makedirs(args.out_dir, exist_ok=True)
    for split, (images, labels) in splits.items():
        save_array(os.path.join(args.out_dir, f"{split}.npy"), images)
        save_array(os.path.join(args.out_dir, f"{split}_labels.npy"), labels)
        print(f"{split}: {len(images)} images {images.shape[1:]}, labels {np.bincount(labels, minlength=10).tolist()}")


if __name__ == "__main__":
    main()
