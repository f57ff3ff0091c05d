"""Prepare CelebA aligned faces as 64 x 64 uint8 arrays with their 40 attributes.

Each image of img_align_celeba (178 x 218) is centre-cropped to a square of
side --crop (default 178, the largest centred square, which is what the
PyTorch DCGAN tutorial's Resize(64) + CenterCrop(64) amounts to; --crop 140
or 108 give tighter face crops, as some other DCGAN code uses) and resized to
--size x --size (default 64) with PIL's LANCZOS filter, which antialiases.

Writes into --out_dir (default: this folder):
    train.npy, test.npy                N x 64 x 64 x 3, uint8
    train_labels.npy, test_labels.npy  N x 40, int64 in {0, 1}
                                       (only when an attribute file is known)
    attr_names.json                    the 40 attribute names, in column order

Where the images come from (one of):
    --zip img_align_celeba.zip   the official zip (images at any depth inside)
    --images DIR                 a folder of the .jpg files
    neither                      --raw_dir/celeba/ as torchvision lays it out;
                                 if it is not there, torchvision's CelebA
                                 downloader fetches it (needs `pip install
                                 gdown`; Google Drive often refuses with
                                 "quota exceeded", then get the files by hand)

--attr_file list_attr_celeba.txt: first line the image count, second line the
40 names, then one line per image, "000001.jpg" and 40 values of -1 or 1
(stored as 0 or 1). The Kaggle CSV copy (list_attr_celeba.csv) works too.

Split: with --partition_file list_eval_partition.txt (0 = train, 1 = val,
2 = test), train = partitions 0 and 1 (182,637 images), test = partition 2
(19,962). Without it, a random split seeded by --seed with --test_fraction
(default 0.05) or --test_size images in the test set. --limit N keeps only N
images for quick experiments: the first N in file-name order for the random
split; with a partition file, the first images of each split, in proportion
to the split sizes. Images that cannot be decoded are skipped and counted.

    python data/celeba/prepare.py --zip img_align_celeba.zip \\
        --attr_file list_attr_celeba.txt --partition_file list_eval_partition.txt
    python data/celeba/prepare.py --images img_align_celeba/ --limit 20000
    python data/celeba/prepare.py           # torchvision layout in data/celeba/raw
"""
import argparse
import io
import json
import os
import sys
import zipfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def is_image_name(path):
    base = os.path.basename(path)
    parts = path.replace("\\", "/").split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return base.lower().endswith(IMAGE_EXTS) and not hidden


def list_images(zip_file, images_dir):
    """-> {file name: zip member or file path}, keyed by base name (as the attribute file is)."""
    if zip_file is not None:
        entries = [(os.path.basename(m), m) for m in zip_file.namelist() if not m.endswith("/") and is_image_name(m)]
    else:
        entries = [(n, os.path.join(images_dir, n)) for n in os.listdir(images_dir)
                   if is_image_name(n) and os.path.isfile(os.path.join(images_dir, n))]
    found = {}
    for name, where in entries:
        if name in found:
            raise ValueError(f"two images are called {name} ({found[name]} and {where})")
        found[name] = where
    return found


def split_fields(line, csv):
    return [f.strip() for f in line.split(",")] if csv else line.split()


def read_attributes(path):
    """-> (40 names, {file name: int64 array of 0/1}); ValueError if the format is off."""
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    csv = bool(lines) and "," in lines[0]
    if csv:  # Kaggle copy: header "image_id,5_o_Clock_Shadow,...", then one row per image
        names, rows = split_fields(lines[0], csv)[1:], lines[1:]
    else:
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise ValueError(f"{path}: expected the image count on line 1 and the attribute names on line 2")
        names, rows = lines[1].split(), lines[2:]
    if not names:
        raise ValueError(f"{path}: no attribute names")
    attrs = {}
    for number, line in enumerate(rows, start=3 if not csv else 2):
        fields = split_fields(line, csv)
        if len(fields) != len(names) + 1 or any(v not in ("-1", "0", "1") for v in fields[1:]):
            raise ValueError(f"{path}: line {number}: expected a file name and {len(names)} values of -1 or 1")
        attrs[fields[0]] = np.array([v == "1" for v in fields[1:]], dtype=np.int64)
    return names, attrs


def read_partition(path):
    """-> {file name: 0, 1 or 2}"""
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    csv = bool(lines) and "," in lines[0]
    if csv and not lines[0].split(",")[-1].strip().isdigit():
        lines = lines[1:]  # header "image_id,partition"
    partition = {}
    for number, line in enumerate(lines, start=1):
        fields = split_fields(line, csv)
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}: line {number}: expected a file name and 0, 1 or 2")
        partition[fields[0]] = int(fields[1])
    return partition


def crop_and_resize(img, crop, size):
    """Centre square of side min(crop, width, height) (crop 0: the largest), resized with LANCZOS."""
    w, h = img.size
    side = min(w, h) if crop <= 0 else min(crop, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img


def load_image(zip_file, where, crop, size):
    data = zip_file.read(where) if zip_file is not None else where
    with Image.open(io.BytesIO(data) if zip_file is not None else data) as img:
        img = img.convert("RGB")
    return np.asarray(crop_and_resize(img, crop, size))


def choose_split(names, partition, test_fraction, test_size, limit, seed):
    """-> (train names, test names, how many images had no partition entry)"""
    if partition is not None:
        unknown = sum(1 for n in names if n not in partition)
        train = [n for n in names if partition.get(n) in (0, 1)]
        test = [n for n in names if partition.get(n) == 2]
        if limit is not None and limit < len(train) + len(test):
            n_train = round(limit * len(train) / (len(train) + len(test)))
            train, test = train[:n_train], test[:limit - n_train]
        return train, test, unknown
    if limit is not None:
        names = names[:limit]
    n_test = test_size if test_size is not None else round(len(names) * test_fraction)
    if test_size is None and test_fraction > 0 and len(names) > 1:
        n_test = max(n_test, 1)
    if n_test >= len(names):
        raise ValueError(f"a test set of {n_test} leaves no training images out of {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    test_idx = set(order[:n_test].tolist())
    train = [n for i, n in enumerate(names) if i not in test_idx]
    test = [n for i, n in enumerate(names) if i in test_idx]
    return train, test, 0


def find_or_download(raw_dir, no_download):
    """The torchvision layout raw_dir/celeba/: use it if present, else download it there."""
    base = os.path.join(raw_dir, "celeba")
    images_dir = os.path.join(base, "img_align_celeba")
    if not os.path.isdir(images_dir):
        if no_download:
            sys.exit(f"prepare.py: error: no {images_dir}; pass --zip or --images, or run without --no_download")
        try:
            from torchvision.datasets import CelebA
        except ImportError as e:
            sys.exit(f"prepare.py: error: no --zip or --images given and torchvision is missing to download CelebA ({e})")
        try:
            CelebA(root=raw_dir, split="all", target_type="attr", download=True)
        except (OSError, RuntimeError) as e:
            message = " ".join(str(e).split())
            sys.exit(f"prepare.py: error: cannot download CelebA into {base} ({message}); "
                     f"download img_align_celeba.zip and the list_*.txt files by hand and pass --zip")
    attr = os.path.join(base, "list_attr_celeba.txt")
    partition = os.path.join(base, "list_eval_partition.txt")
    return images_dir, (attr if os.path.isfile(attr) else None), (partition if os.path.isfile(partition) else None)


def save_array(path, array):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)  # a killed run never leaves a half-written array


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--zip", help="img_align_celeba.zip")
    source.add_argument("--images", help="folder holding the aligned .jpg images")
    parser.add_argument("--raw_dir", default=os.path.join(HERE, "raw"),
                        help="torchvision layout (RAW_DIR/celeba/...) used when neither --zip nor --images is given")
    parser.add_argument("--no_download", action="store_true", help="never call torchvision's downloader")
    parser.add_argument("--attr_file", help="list_attr_celeba.txt (or .csv); without it no label files are written")
    parser.add_argument("--partition_file", help="list_eval_partition.txt; train = 0 + 1, test = 2")
    parser.add_argument("--out_dir", default=HERE, help="where the .npy files go; default: this folder")
    parser.add_argument("--size", type=int, default=64, help="output side in pixels")
    parser.add_argument("--crop", type=int, default=178,
                        help="side of the centre square cut before resizing (0: the largest square)")
    parser.add_argument("--test_fraction", type=float, default=0.05, help="random split: share of test images")
    parser.add_argument("--test_size", type=int, help="random split: number of test images (overrides --test_fraction)")
    parser.add_argument("--limit", type=int, help="use only N images, for quick experiments")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
    args = parser.parse_args()
    if args.size < 1 or args.crop < 0 or (args.limit is not None and args.limit < 2):
        sys.exit("prepare.py: error: --size must be >= 1, --crop >= 0 and --limit >= 2")
    if not 0 <= args.test_fraction < 1 or (args.test_size is not None and args.test_size < 1):
        sys.exit("prepare.py: error: --test_fraction must be in [0, 1) and --test_size >= 1")

    attr_file, partition_file = args.attr_file, args.partition_file
    zip_file, images_dir = None, args.images
    if args.zip is None and args.images is None:
        images_dir, found_attr, found_partition = find_or_download(args.raw_dir, args.no_download)
        attr_file, partition_file = attr_file or found_attr, partition_file or found_partition
    try:
        if args.zip is not None:
            zip_file = zipfile.ZipFile(args.zip)
        where = list_images(zip_file, images_dir)
        names, attrs = (read_attributes(attr_file) if attr_file else (None, None))
        partition = read_partition(partition_file) if partition_file else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        sys.exit(f"prepare.py: error: {e}")
    if not where:
        sys.exit(f"prepare.py: error: no images ({' '.join(IMAGE_EXTS)}) in {args.zip or images_dir}")

    files = sorted(where)
    if attrs is not None:
        no_attr = [f for f in files if f not in attrs]
        if no_attr:
            print(f"skipped {len(no_attr)} images without a row in {attr_file} (e.g. {no_attr[0]})")
            files = [f for f in files if f in attrs]
    try:
        train, test, unknown = choose_split(files, partition, args.test_fraction, args.test_size, args.limit, args.seed)
    except ValueError as e:
        sys.exit(f"prepare.py: error: {e}")
    if unknown:
        print(f"skipped {unknown} images without a row in {partition_file}")
    if not train or not test:
        sys.exit(f"prepare.py: error: the {'train' if not train else 'test'} split is empty "
                 f"({len(files)} images{', partition file ' + partition_file if partition_file else ''})")

    arrays, skipped = {}, []
    for split, split_files in (("train", train), ("test", test)):
        images = np.zeros((len(split_files), args.size, args.size, 3), dtype=np.uint8)  # filled as we go
        labels = np.zeros((len(split_files), len(names) if names else 0), dtype=np.int64)
        n = 0
        for name in split_files:
            try:
                images[n] = load_image(zip_file, where[name], args.crop, args.size)
            except Exception as e:  # any decoding failure: count it, never stop
                skipped.append(f"{name}: {' '.join(str(e).split()) or type(e).__name__}")
                continue
            if attrs is not None:
                labels[n] = attrs[name]
            n += 1
            if n % 10000 == 0 and sys.stderr.isatty():  # progress, for a terminal only
                print(f"\r{split}: {n}/{len(split_files)}", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty() and len(split_files) >= 10000:
            print(file=sys.stderr)
        if n == 0:
            sys.exit(f"prepare.py: error: no readable images for the {split} split"
                     + (f" (skipped {len(skipped)} unreadable files)" if skipped else ""))
        arrays[split] = (images[:n], labels[:n])  # views: no copy of the big array
    if skipped:
        print(f"skipped {len(skipped)} unreadable file{'s' if len(skipped) != 1 else ''} (e.g. {skipped[0]})")

    os.makedirs(args.out_dir, exist_ok=True)
    for split, (images, labels) in arrays.items():
        save_array(os.path.join(args.out_dir, f"{split}.npy"), images)
        label_path = os.path.join(args.out_dir, f"{split}_labels.npy")
        if attrs is not None:
            save_array(label_path, labels)
        elif os.path.exists(label_path):
            os.remove(label_path)  # stale labels of an earlier run would no longer match
        what = f"{labels.shape[1]} attributes" if attrs is not None else "no attribute file, no labels"
        print(f"{split}: {len(images)} images {images.shape[1:]}, {what}")
    names_path = os.path.join(args.out_dir, "attr_names.json")
    if attrs is not None:
        with open(names_path, "w") as f:
            json.dump(names, f, indent=1)
    elif os.path.exists(names_path):
        os.remove(names_path)


if __name__ == "__main__":
    main()
