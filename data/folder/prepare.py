"""Prepare any folder or .zip of images as square uint8 arrays.

Every .jpg .jpeg .png .bmp .webp .gif file found at any depth (hidden files
and __MACOSX/ excluded; the first frame of a GIF) is centre-cropped to its
largest square, resized to --size x --size (default 64) with PIL's LANCZOS
filter (which antialiases), and made RGB (--channels 3, transparent parts put
on white) or grey (--channels 1). Files that cannot be decoded are skipped and
counted; if no image at all can be read the script stops with an error.

The files, in path order, are split at random (seeded by --seed) into test
and train sets: --test_fraction of them (default 0.1) or --test_size of them
in the test set. The split is drawn over the file list, so an unreadable file
leaves its own split one image short.

With --labels_from_dirs each image is labelled by its top-level subfolder
(class index = position of the folder name in sorted order, as torchvision's
ImageFolder does) and classes.json lists the names; otherwise no label files
are written. In a zip whose files all sit in one top folder, that folder is
the root.

Writes train.npy / test.npy (N x size x size x channels, uint8), and with
--labels_from_dirs train_labels.npy / test_labels.npy (int64) and classes.json,
into --out_dir; by default data/folder/<name of the folder or zip>/, so
`python data/folder/prepare.py ~/photos/flowers.zip` writes data/folder/flowers/.

    python data/folder/prepare.py ~/photos/flowers --labels_from_dirs
    python data/folder/prepare.py pokemon.zip --size 32 --out_dir /tmp/pokemon
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
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


def is_image_path(relpath):
    parts = relpath.split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return parts[-1].lower().endswith(IMAGE_EXTS) and not hidden


def list_folder(root):
    """-> sorted list of (relative posix path, file path)"""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if is_image_path(rel) and os.path.isfile(path):
                found.append((rel, path))
    return sorted(found)


def list_zip(zip_file):
    """-> sorted list of (relative path, member name); a single common top folder is stripped."""
    members = [m for m in zip_file.namelist() if not m.endswith("/") and is_image_path(m)]
    tops = {m.split("/")[0] for m in members}
    strip = len(tops) == 1 and all("/" in m for m in members)
    return sorted((m.split("/", 1)[1] if strip else m, m) for m in members)


def to_square(img, size, channels):
    """Largest centre square, resized with LANCZOS; -> uint8 array size x size x channels."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB" if channels == 3 else "L")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(img)
    return array if channels == 3 else array[..., None]


def load_image(zip_file, where, size, channels):
    source = io.BytesIO(zip_file.read(where)) if zip_file is not None else where
    with Image.open(source) as img:
        img.seek(0)  # first frame of an animation
        img.load()
        return to_square(img, size, channels)


def split_indices(n, test_fraction, test_size, seed):
    n_test = test_size if test_size is not None else round(n * test_fraction)
    if test_size is None and test_fraction > 0 and n > 1:
        n_test = max(n_test, 1)
    if n_test >= n:
        raise ValueError(f"a test set of {n_test} leaves no training images out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def save_array(path, array):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)  # a killed run never leaves a half-written array


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder of images (searched recursively) or a .zip of them")
    parser.add_argument("--out_dir", help="where the .npy files go; default: data/folder/<name of the source>")
    parser.add_argument("--size", type=int, default=64, help="output side in pixels")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3: RGB, 1: greyscale")
    parser.add_argument("--test_fraction", type=float, default=0.1, help="share of the images in the test set")
    parser.add_argument("--test_size", type=int, help="number of test images (overrides --test_fraction)")
    parser.add_argument("--labels_from_dirs", action="store_true",
                        help="label each image by its top-level subfolder; writes label files and classes.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
    args = parser.parse_args()
    if args.size < 1:
        sys.exit("prepare.py: error: --size must be >= 1")
    if not 0 <= args.test_fraction < 1 or (args.test_size is not None and args.test_size < 0):
        sys.exit("prepare.py: error: --test_fraction must be in [0, 1) and --test_size >= 0")

    source = os.path.abspath(args.source)
    name = os.path.basename(source.rstrip(os.sep))
    if name.lower().endswith(".zip"):
        name = name[:-4]
    if not name and not args.out_dir:
        sys.exit(f"prepare.py: error: cannot name an output folder after {args.source}; pass --out_dir")
    out_dir = args.out_dir or os.path.join(HERE, name)
    zip_file = None
    try:
        if os.path.isdir(source):
            files = list_folder(source)
        elif os.path.isfile(source):
            zip_file = zipfile.ZipFile(source)
            files = list_zip(zip_file)
        else:
            sys.exit(f"prepare.py: error: no such folder or zip: {args.source}")
    except (OSError, zipfile.BadZipFile) as e:
        sys.exit(f"prepare.py: error: cannot read {args.source}: {e}")
    if not files:
        sys.exit(f"prepare.py: error: no images ({' '.join(IMAGE_EXTS)}) found in {args.source}")

    classes, labels = None, None
    if args.labels_from_dirs:
        loose = [rel for rel, _ in files if "/" not in rel]
        if loose:
            sys.exit(f"prepare.py: error: --labels_from_dirs: {len(loose)} images are not in a subfolder "
                     f"(e.g. {loose[0]})")
        classes = sorted({rel.split("/")[0] for rel, _ in files})
        labels = np.array([classes.index(rel.split("/")[0]) for rel, _ in files], dtype=np.int64)
    try:
        splits = dict(zip(("train", "test"), split_indices(len(files), args.test_fraction, args.test_size, args.seed)))
    except ValueError as e:
        sys.exit(f"prepare.py: error: {e}")

    arrays, skipped = {}, []
    for split, idx in splits.items():
        images = np.zeros((len(idx), args.size, args.size, args.channels), dtype=np.uint8)  # filled as we go
        kept = np.zeros(len(idx), dtype=bool)
        n = 0
        for j, i in enumerate(idx):
            rel, where = files[i]
            try:
                images[n] = load_image(zip_file, where, args.size, args.channels)
            except Exception as e:  # any decoding failure: count it, never stop
                skipped.append(f"{rel}: {' '.join(str(e).split()) or type(e).__name__}")
                continue
            kept[j] = True
            n += 1
            if n % 10000 == 0 and sys.stderr.isatty():  # progress, for a terminal only
                print(f"\r{split}: {n}/{len(idx)}", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty() and len(idx) >= 10000:
            print(file=sys.stderr)
        arrays[split] = (images[:n], labels[idx[kept]] if labels is not None else None)  # a view: no copy
    if skipped:
        print(f"skipped {len(skipped)} unreadable file{'s' if len(skipped) != 1 else ''} (e.g. {skipped[0]})")
    if len(arrays["train"][0]) == 0:
        sys.exit(f"prepare.py: error: no readable images in {args.source} (skipped {len(skipped)} unreadable files)")

    os.makedirs(out_dir, exist_ok=True)
    for split, (images, split_labels) in arrays.items():
        save_array(os.path.join(out_dir, f"{split}.npy"), images)
        label_path = os.path.join(out_dir, f"{split}_labels.npy")
        if split_labels is not None:
            save_array(label_path, split_labels)
            what = f"labels {np.bincount(split_labels, minlength=len(classes)).tolist()}"
        else:
            if os.path.exists(label_path):
                os.remove(label_path)  # stale labels of an earlier run would no longer match
            what = "no labels"
        print(f"{split}: {len(images)} images {images.shape[1:]}, {what}")
    classes_path = os.path.join(out_dir, "classes.json")
    if classes is not None:
        with open(classes_path, "w") as f:
            json.dump(classes, f, indent=1)
    elif os.path.exists(classes_path):
        os.remove(classes_path)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
