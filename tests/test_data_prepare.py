"""The data/<name>/prepare.py scripts, run as subprocesses on tiny inputs made here.

Offline and CPU only: only the paths that read files already on disk are
exercised (the torchvision download paths need the network).
"""
import gzip
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(dataset, *args, script=None):
    script = script or ROOT / "data" / dataset / "prepare.py"
    return subprocess.run([sys.executable, str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def ok(dataset, *args, **kw):
    result = run(dataset, *args, **kw)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(dataset, *args):
    """The script must exit non-zero with exactly one 'prepare.py: error: ...' line on stderr."""
    result = run(dataset, *args)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare.py: error: "), result.stderr
    return lines[0]


def load(out, split):
    images = np.load(out / f"{split}.npy")
    labels_path = out / f"{split}_labels.npy"
    return images, (np.load(labels_path) if labels_path.exists() else None)


# ----------------------------------------------------------------------------- mnist

def write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_mnist(folder, gz, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays["train" if prefix == "train" else "test"] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz, layout", [(True, "MNIST/raw"), (False, ".")])
def test_mnist_idx_round_trip(tmp_path, gz, layout):
    raw, out = tmp_path / "raw", tmp_path / "out"
    written = make_mnist(raw / layout, gz)
    stdout = ok("mnist", "--raw_dir", raw, "--out_dir", out, "--no_download")
    assert "train: 5 images (28, 28, 1)" in stdout and "test: 3 images" in stdout
    for split, (images, labels) in written.items():
        got, got_labels = load(out, split)
        assert got.dtype == np.uint8 and got.shape == (len(images), 28, 28, 1)
        np.testing.assert_array_equal(got[..., 0], images)
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_labels, labels)


def test_mnist_bad_files(tmp_path):
    raw = tmp_path / "raw"
    message = fails("mnist", "--raw_dir", raw, "--out_dir", tmp_path / "out", "--no_download")
    assert "t10k-labels-idx1-ubyte" in message  # names what is missing
    make_mnist(raw, gz=False)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x89PNG\r\n" + bytes(100))
    assert "not an IDX file" in fails("mnist", "--raw_dir", raw, "--out_dir", tmp_path / "out")
    make_mnist(raw, gz=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)  # 4 labels, 3 images
    assert "expected 3 labels" in fails("mnist", "--raw_dir", raw, "--out_dir", tmp_path / "out")
    (raw / "t10k-labels-idx1-ubyte").write_bytes(gzip.compress(b"\x00\x00\x08\x01")[:-6])  # cut gzip
    fails("mnist", "--raw_dir", raw, "--out_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on failure


# ----------------------------------------------------------------------------- celeba

ATTR_NAMES = ["5_o_Clock_Shadow", "Arched_Eyebrows"] + [f"Attr_{i}" for i in range(37)] + ["Young"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (220, 40, 220),
           (128, 128, 128), (250, 250, 250), (10, 10, 10)]


def make_celeba(tmp_path, n=8):
    """n solid-colour 178x218 faces, a corrupt one, the attribute and partition files, a zip of it all."""
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    rng = np.random.default_rng(1)
    attrs = {}
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.new("RGB", (178, 218), COLOURS[i]).save(folder / name, quality=95)
        attrs[name] = rng.choice([-1, 1], len(ATTR_NAMES))
    corrupt = f"{n + 1:06d}.jpg"
    (folder / corrupt).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    attrs[corrupt] = np.ones(len(ATTR_NAMES), dtype=int)
    lines = [str(len(attrs)), " ".join(ATTR_NAMES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in values) for name, values in attrs.items()]
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    # 1-5 train, 6 val, 7-8 test, the corrupt one train
    parts = {name: (0 if i < 5 else 1 if i == 5 else 2) for i, name in enumerate(sorted(attrs)[:n])}
    parts[corrupt] = 0
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{k} {v}\n" for k, v in parts.items()))
    with zipfile.ZipFile(tmp_path / "img_align_celeba.zip", "w") as z:
        for path in sorted(folder.iterdir()):
            z.write(path, f"img_align_celeba/{path.name}")
    return folder, attrs


def colour_of(image):
    return image.reshape(-1, image.shape[-1]).mean(0)


def test_celeba_zip_with_partition(tmp_path):
    folder, attrs = make_celeba(tmp_path)
    out = tmp_path / "out"
    stdout = ok("celeba", "--zip", tmp_path / "img_align_celeba.zip", "--out_dir", out,
                "--attr_file", tmp_path / "list_attr_celeba.txt",
                "--partition_file", tmp_path / "list_eval_partition.txt")
    assert "skipped 1 unreadable file" in stdout and "000009.jpg" in stdout
    train, train_labels = load(out, "train")
    test, test_labels = load(out, "test")
    assert train.shape == (6, 64, 64, 3) and test.shape == (2, 64, 64, 3)  # train = partitions 0 + 1
    assert train.dtype == test.dtype == np.uint8
    assert train_labels.shape == (6, 40) and train_labels.dtype == np.int64
    assert set(np.unique(train_labels)) <= {0, 1}
    names = sorted(attrs)
    for images, labels, idx in ((train, train_labels, range(6)), (test, test_labels, (6, 7))):
        for image, label, i in zip(images, labels, idx):
            np.testing.assert_allclose(colour_of(image), COLOURS[i], atol=3)
            np.testing.assert_array_equal(label, attrs[names[i]] > 0)
    assert json.loads((out / "attr_names.json").read_text()) == ATTR_NAMES


def test_celeba_folder_random_split_and_limit(tmp_path):
    folder, attrs = make_celeba(tmp_path)
    out = tmp_path / "out"
    stdout = ok("celeba", "--images", folder, "--out_dir", out, "--attr_file", tmp_path / "list_attr_celeba.txt",
                "--limit", 6, "--test_size", 2, "--seed", 3)
    train, train_labels = load(out, "train")
    test, test_labels = load(out, "test")
    assert len(train) == 4 and len(test) == 2 and "skipped" not in stdout  # the corrupt one is past the limit
    found = [int(np.abs(np.subtract(COLOURS, colour_of(im))).max(1).argmin()) for im in np.concatenate([train, test])]
    assert sorted(found) == list(range(6))  # the first six files, each once
    assert len(train_labels) == 4 and len(test_labels) == 2
    # no attribute file: no label files, and the stale ones are gone
    stdout = ok("celeba", "--images", folder, "--out_dir", out, "--test_fraction", 0.25)
    assert "skipped 1 unreadable file" in stdout
    assert len(np.load(out / "train.npy")) + len(np.load(out / "test.npy")) == 8
    assert not (out / "train_labels.npy").exists() and not (out / "attr_names.json").exists()


def test_celeba_crop_flag(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    image = np.zeros((218, 178, 3), np.uint8)
    image[:] = (0, 255, 0)
    image[39:179, 19:159] = (0, 0, 255)  # the centre 140 x 140 square
    Image.fromarray(image).save(folder / "000001.png")
    Image.fromarray(image).save(folder / "000002.png")
    ok("celeba", "--images", folder, "--out_dir", tmp_path / "a", "--crop", 140, "--test_size", 1)
    ok("celeba", "--images", folder, "--out_dir", tmp_path / "b", "--test_size", 1)
    tight = np.load(tmp_path / "a" / "train.npy")[0]
    assert tight.shape == (64, 64, 3) and (tight == (0, 0, 255)).all()
    wide = np.load(tmp_path / "b" / "train.npy")[0]  # default --crop 178: green border, blue centre
    assert tuple(wide[0, 0]) == (0, 255, 0) and tuple(wide[32, 32]) == (0, 0, 255)


def test_celeba_torchvision_layout_offline(tmp_path):
    raw = tmp_path / "raw" / "celeba"
    raw.mkdir(parents=True)
    make_celeba(raw)
    out = tmp_path / "out"
    ok("celeba", "--raw_dir", tmp_path / "raw", "--out_dir", out, "--no_download")  # finds the list files itself
    assert load(out, "train")[1].shape == (6, 40) and load(out, "test")[0].shape == (2, 64, 64, 3)


def test_celeba_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no images" in fails("celeba", "--images", tmp_path / "empty", "--out_dir", tmp_path / "out")
    assert "img_align_celeba" in fails("celeba", "--raw_dir", tmp_path / "nothing", "--no_download")
    folder, _ = make_celeba(tmp_path)
    (tmp_path / "bad_attr.txt").write_text("3\nA B\n000001.jpg 1 2\n")
    message = fails("celeba", "--images", folder, "--attr_file", tmp_path / "bad_attr.txt", "--out_dir", tmp_path / "out")
    assert "line 3" in message
    (tmp_path / "all_train.txt").write_text("".join(f"{i:06d}.jpg 0\n" for i in range(1, 10)))
    message = fails("celeba", "--images", folder, "--partition_file", tmp_path / "all_train.txt",
                    "--out_dir", tmp_path / "out")
    assert "test split is empty" in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- stl10

def write_stl(folder, split, images, labels=None):
    """images N x 96 x 96 x 3 -> the official layout: per image 3 planes, each column by column."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())
    if labels is not None:
        (folder / f"{split}_y.bin").write_bytes((np.asarray(labels) + 1).astype(np.uint8).tobytes())


def make_stl(folder, seed=0):
    rng = np.random.default_rng(seed)
    data = {"train": (rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8), np.array([0, 9, 3, 3, 7])),
            "test": (rng.integers(0, 256, (4, 96, 96, 3), dtype=np.uint8), np.array([1, 2, 8, 9])),
            "unlabeled": (rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8), None)}
    for split, (images, labels) in data.items():
        write_stl(folder, split, images, labels)
    return data


def test_stl10_binary_round_trip(tmp_path):
    data = make_stl(tmp_path / "raw" / "stl10_binary")
    out = tmp_path / "out"
    stdout = ok("stl10", "--raw_dir", tmp_path / "raw", "--out_dir", out, "--size", 96, "--no_download")
    assert "5 train + 3 unlabeled" in stdout
    train, train_labels = load(out, "train")
    test, test_labels = load(out, "test")
    assert train.dtype == np.uint8 and train.shape == (8, 96, 96, 3) and test.shape == (4, 96, 96, 3)
    np.testing.assert_array_equal(train, np.concatenate([data["train"][0], data["unlabeled"][0]]))
    np.testing.assert_array_equal(test, data["test"][0])
    assert train_labels.dtype == np.int64
    assert train_labels.tolist() == [0, 9, 3, 3, 7, -1, -1, -1] and test_labels.tolist() == [1, 2, 8, 9]


def test_stl10_orientation_from_raw_bytes(tmp_path):
    """One lit pixel written by byte offset (channel plane, column-major) must land at (row, column, channel)."""
    folder = tmp_path / "raw"
    raw = np.zeros((2, 3 * 96 * 96), np.uint8)
    row, col, channel = 5, 70, 2
    raw[1, channel * 96 * 96 + col * 96 + row] = 255
    for split in ("train", "test"):
        (folder / f"{split}_X.bin").parent.mkdir(exist_ok=True)
        (folder / f"{split}_X.bin").write_bytes(raw.tobytes())
        (folder / f"{split}_y.bin").write_bytes(bytes([1, 10]))
    out = tmp_path / "out"
    ok("stl10", "--raw_dir", folder, "--out_dir", out, "--splits", "train", "--size", 96, "--no_download")
    train, labels = load(out, "train")
    assert labels.tolist() == [0, 9]
    assert train[1, row, col, channel] == 255 and train.sum() == 255


def test_stl10_resize_keeps_colour(tmp_path):
    folder = tmp_path / "raw" / "stl10_binary"
    colours = np.array([(255, 0, 0), (0, 128, 255), (7, 7, 7)], np.uint8)
    solid = np.broadcast_to(colours[:, None, None, :], (3, 96, 96, 3))
    for split in ("train", "test", "unlabeled"):
        write_stl(folder, split, solid, None if split == "unlabeled" else [0, 1, 2])
    out = tmp_path / "out"
    ok("stl10", "--raw_dir", tmp_path / "raw", "--out_dir", out, "--no_download")
    train, labels = load(out, "train")
    assert train.shape == (6, 64, 64, 3) and labels.tolist() == [0, 1, 2, -1, -1, -1]
    np.testing.assert_array_equal(train, np.broadcast_to(np.concatenate([colours, colours])[:, None, None], train.shape))


def test_stl10_errors(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    assert "unlabeled_X.bin" in fails("stl10", "--raw_dir", raw, "--out_dir", out, "--no_download")
    make_stl(raw)
    assert "--splits" in fails("stl10", "--raw_dir", raw, "--splits", "train+test", "--out_dir", out)
    (raw / "test_X.bin").write_bytes(bytes(3 * 96 * 96 * 4 - 1))
    assert "not a whole number" in fails("stl10", "--raw_dir", raw, "--out_dir", out, "--no_download")
    make_stl(raw)
    (raw / "train_y.bin").write_bytes(bytes([1, 2, 11, 4, 5]))
    assert "1..10" in fails("stl10", "--raw_dir", raw, "--out_dir", out, "--no_download")
    assert not out.exists()


# ----------------------------------------------------------------------------- folder

def solid(colour, size=(40, 30), mode="RGB"):
    return Image.new(mode, size, colour)


def make_tree(src):
    """Two classes at different depths, several formats, two broken files, and files to ignore."""
    (src / "cats").mkdir(parents=True)
    (src / "dogs" / "deep").mkdir(parents=True)
    (src / ".hidden").mkdir()
    solid((255, 0, 0)).save(src / "cats" / "a.png")
    solid((0, 0, 255)).save(src / "cats" / "b.JPG", quality=95)
    solid((0, 255, 0)).save(src / "dogs" / "deep" / "c.bmp")
    frames = [solid((255, 255, 0)).convert("P"), solid((255, 0, 255)).convert("P")]
    frames[0].save(src / "dogs" / "d.gif", save_all=True, append_images=frames[1:])
    solid((0, 255, 255)).save(src / "dogs" / "e.webp", lossless=True)
    solid((0, 0, 0, 0), mode="RGBA").save(src / "dogs" / "f.png")  # fully transparent: white
    (src / "dogs" / "corrupt.jpg").write_bytes(b"this is not an image")
    png = (src / "cats" / "a.png").read_bytes()
    (src / "cats" / "truncated.png").write_bytes(png[: len(png) // 2])
    (src / "notes.txt").write_text("not an image")
    solid((1, 2, 3)).save(src / ".hidden" / "x.png")
    return {(255, 0, 0): 0, (0, 0, 255): 0, (0, 255, 0): 1, (255, 255, 0): 1, (0, 255, 255): 1, (255, 255, 255): 1}


def test_folder_nested_with_labels_and_corrupt_files(tmp_path):
    expected = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    stdout = ok("folder", tmp_path / "src", "--out_dir", out, "--size", 16, "--labels_from_dirs", "--test_size", 2)
    assert "skipped 2 unreadable files" in stdout
    train, train_labels = load(out, "train")
    test, test_labels = load(out, "test")
    assert train.dtype == np.uint8 and train.shape[1:] == (16, 16, 3) and test.shape[1:] == (16, 16, 3)
    assert len(train) + len(test) == 6 and train_labels.dtype == np.int64
    assert json.loads((out / "classes.json").read_text()) == ["cats", "dogs"]
    seen = {}
    for image, label in zip(np.concatenate([train, test]), np.concatenate([train_labels, test_labels])):
        colour = tuple(int(v) for v in np.round(colour_of(image)))
        match = [c for c in expected if np.abs(np.subtract(c, colour)).max() <= 3]
        assert len(match) == 1, colour
        assert np.abs(image.astype(int) - colour).max() <= 3  # solid in, solid out
        seen[match[0]] = int(label)
    assert seen == expected  # every readable file once, with its folder's label (GIF: first frame)


def test_folder_zip_crop_grey_and_default_out_dir(tmp_path):
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20], stripes[:, 20:40], stripes[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    pics = tmp_path / "pics"
    for cls, name in (("a", "x.png"), ("b", "y.png"), ("b", "z.png")):
        (pics / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(stripes).save(pics / cls / name)
    archive = tmp_path / "pics.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(pics.rglob("*.png")):
            z.write(path, path.relative_to(tmp_path).as_posix())  # pics/a/x.png: one top folder
    # a copy of the script, so that its default --out_dir (next to it) lands in tmp_path
    script = tmp_path / "data" / "folder" / "prepare.py"
    script.parent.mkdir(parents=True)
    shutil.copy(ROOT / "data" / "folder" / "prepare.py", script)
    stdout = ok("folder", archive, "--labels_from_dirs", "--test_fraction", 0.3, "--size", 8, script=script)
    out = tmp_path / "data" / "folder" / "pics"
    assert json.loads((out / "classes.json").read_text()) == ["a", "b"]
    train, train_labels = load(out, "train")
    test, test_labels = load(out, "test")
    assert len(train) == 2 and len(test) == 1 and "skipped" not in stdout
    assert sorted(np.concatenate([train_labels, test_labels]).tolist()) == [0, 1, 1]
    assert (train == (0, 255, 0)).all()  # the centre square of the stripes is the green one
    # greyscale, no labels: label files and classes.json of the earlier run are removed
    ok("folder", archive, "--channels", 1, "--size", 8, "--test_size", 1, script=script)
    grey, labels = load(out, "train")
    assert grey.shape == (2, 8, 8, 1) and labels is None and not (out / "classes.json").exists()
    assert (grey == round(0.587 * 255)).all()


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    assert "no images" in fails("folder", tmp_path / "empty", "--out_dir", tmp_path / "out")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"junk")
    (tmp_path / "broken" / "b.png").write_bytes(b"junk")
    message = fails("folder", tmp_path / "broken", "--out_dir", tmp_path / "out", "--test_fraction", 0)
    assert "no readable images" in message and "skipped 2" in message
    assert "no such folder" in fails("folder", tmp_path / "missing", "--out_dir", tmp_path / "out")
    (tmp_path / "not.zip").write_bytes(b"junk")
    assert "cannot read" in fails("folder", tmp_path / "not.zip", "--out_dir", tmp_path / "out")
    solid((9, 9, 9)).save(tmp_path / "loose.png")
    (tmp_path / "mixed").mkdir()
    shutil.copy(tmp_path / "loose.png", tmp_path / "mixed" / "loose.png")
    assert "not in a subfolder" in fails("folder", tmp_path / "mixed", "--labels_from_dirs", "--out_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()
