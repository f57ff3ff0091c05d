"""Prepare STL-10 as uint8 arrays, resized from 96 x 96 to --size (default 64).

Writes into --out_dir (default: this folder):
    train.npy, train_labels.npy   the splits named by --splits (default
                                  train+unlabeled: 5,000 + 100,000 images)
    test.npy, test_labels.npy     the 8,000 test images
Images are N x size x size x 3 uint8, resized with PIL's LANCZOS filter (which
antialiases); labels are int64 0..9 (the files store 1..10), and -1 for the
unlabeled images.

The binary files are looked for in --raw_dir/stl10_binary/ (where torchvision
and the official stl10_binary.tar.gz put them) and then directly in --raw_dir:
    train_X.bin train_y.bin test_X.bin test_y.bin unlabeled_X.bin
Each *_X.bin holds uint8 images one after the other, each 3 x 96 x 96 with
every channel stored column by column; each *_y.bin one uint8 label per image.
When the files needed are there they are read by the reader below, offline;
otherwise torchvision's STL10 downloader fetches the 2.6 GB archive first
(unless --no_download).

    python data/stl10/prepare.py                        # train+unlabeled, 64x64
    python data/stl10/prepare.py --splits train --size 96 --raw_dir ~/stl10
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
         "unlabeled": ("unlabeled_X.bin", None)}


def read_images(path):
    """Memory-map a *_X.bin file as N x 96 x 96 x 3 (a view: nothing is read until used)."""
    size = os.path.getsize(path)
    if size == 0 or size % IMAGE_BYTES:
        raise ValueError(f"{path}: {size} bytes is not a whole number of 3 x 96 x 96 images")
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, SIDE, SIDE)  # n, channel, column, row
    return raw.transpose(0, 3, 2, 1)  # n, row, column, channel


def read_labels(path, n):
    labels = np.fromfile(path, dtype=np.uint8)
    if len(labels) != n:
        raise ValueError(f"{path}: {len(labels)} labels for {n} images")
    if n and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(f"{path}: labels outside 1..10")
    return labels.astype(np.int64) - 1


def find_folder(raw_dir, names):
    for folder in (os.path.join(raw_dir, "stl10_binary"), raw_dir):
        if all(os.path.isfile(os.path.join(folder, n)) for n in names):
            return folder
    return None


def download(raw_dir):
    try:
        from torchvision.datasets import STL10
    except ImportError as e:
        sys.exit(f"prepare.py: error: the STL-10 files are not in {raw_dir} and torchvision is missing to download them ({e})")
    try:  # one archive holds every split; "test" is the smallest split for torchvision to load afterwards
        STL10(root=raw_dir, split="test", download=True)
    except (OSError, RuntimeError) as e:
        message = " ".join(str(e).split())
        sys.exit(f"prepare.py: error: cannot download STL-10 into {raw_dir} ({message}); "
                 f"extract stl10_binary.tar.gz there instead")


def resize(image, size):
    if size == SIDE:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.LANCZOS))


def build(folder, splits, size):
    """Read and resize the given splits into one preallocated array; -> (images, labels, counts)."""
    parts = []
    for split in splits:
        images_name, labels_name = FILES[split]
        images = read_images(os.path.join(folder, images_name))
        labels = (read_labels(os.path.join(folder, labels_name), len(images)) if labels_name
                  else np.full(len(images), -1, dtype=np.int64))
        parts.append((images, labels))
    out = np.empty((sum(len(p[0]) for p in parts), size, size, 3), dtype=np.uint8)
    n = 0
    for images, _ in parts:
        for image in images:
            out[n] = resize(image, size)
            n += 1
    return out, np.concatenate([p[1] for p in parts]), [len(p[0]) for p in parts]


def save_array(path, array):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)  # a killed run never leaves a half-written array


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_dir", default=os.path.join(HERE, "raw"),
                        help="where stl10_binary/ is (or gets downloaded to); default: data/stl10/raw")
    parser.add_argument("--out_dir", default=HERE, help="where the .npy files go; default: this folder")
    parser.add_argument("--splits", default="train+unlabeled",
                        help="what goes into train.npy: train, unlabeled or train+unlabeled")
    parser.add_argument("--size", type=int, default=64, help="output side in pixels (96: no resizing)")
    parser.add_argument("--no_download", action="store_true", help="fail instead of downloading missing files")
    args = parser.parse_args()
    splits = args.splits.split("+")
    if not splits or any(s not in ("train", "unlabeled") for s in splits) or len(set(splits)) != len(splits):
        sys.exit(f"prepare.py: error: --splits {args.splits}: use train, unlabeled or train+unlabeled")
    if args.size < 1:
        sys.exit("prepare.py: error: --size must be >= 1")

    needed = [name for split in splits + ["test"] for name in FILES[split] if name]
    folder = find_folder(args.raw_dir, needed)
    if folder is None:
        if args.no_download:
            sys.exit(f"prepare.py: error: missing in {args.raw_dir} (or its stl10_binary/): "
                     f"some of {', '.join(needed)}; run without --no_download to fetch them")
        download(args.raw_dir)
        folder = find_folder(args.raw_dir, needed)
        if folder is None:
            sys.exit(f"prepare.py: error: after downloading, {', '.join(needed)} are still not all in {args.raw_dir}")

    arrays = {}
    try:
        for name, split_list in (("train", splits), ("test", ["test"])):
            arrays[name] = build(folder, split_list, args.size)
    except (OSError, ValueError) as e:
        sys.exit(f"prepare.py: error: {e}")

    os.makedirs(args.out_dir, exist_ok=True)
    for name, (images, labels, counts) in arrays.items():
        save_array(os.path.join(args.out_dir, f"{name}.npy"), images)
        save_array(os.path.join(args.out_dir, f"{name}_labels.npy"), labels)
        split_list = splits if name == "train" else ["test"]
        parts = " + ".join(f"{c} {s}" for c, s in zip(counts, split_list))
        labelled = labels[labels >= 0]
        print(f"{name}: {len(images)} images {images.shape[1:]} ({parts}), "
              f"labels {np.bincount(labelled, minlength=10).tolist()}"
              + (f" + {int((labels < 0).sum())} unlabeled (-1)" if (labels < 0).any() else ""))


if __name__ == "__main__":
    main()
