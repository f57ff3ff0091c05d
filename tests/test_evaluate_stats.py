"""evaluate.py's statistics on synthetic features: precision/recall/density/coverage against a plain
implementation and in the right direction, FID's bootstrap spread and FID-infinity on Gaussians whose
Fréchet distance is known, bits per pixel, the class bar chart, the CUDA settings. No Inception here."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.spatial
import torch
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402


# --- precision, recall, density, coverage --------------------------------------------------


def plain_prdc(real, fake, k):
    """Both papers' definitions, with scipy's exact distances and a loop per image."""
    rr, ff, fr = (scipy.spatial.distance.cdist(a, b) for a, b in ((real, real), (fake, fake), (fake, real)))
    real_radius = np.sort(rr, axis=1)[:, k]  # column 0 is the image itself
    fake_radius = np.sort(ff, axis=1)[:, k]
    precision = np.mean([any(fr[j, i] <= real_radius[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(fr[j, i] <= fake_radius[j] for j in range(len(fake))) for i in range(len(real))])
    density = np.mean([sum(fr[j, i] <= real_radius[i] for i in range(len(real))) for j in range(len(fake))]) / k
    coverage = np.mean([fr[:, i].min() <= real_radius[i] for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("n_real, n_fake", [(40, 40), (30, 55)])
def test_prdc_matches_plain_implementation(n_real, n_fake):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(n_real, 6))
    fake = rng.normal(loc=0.5, scale=0.8, size=(n_fake, 6))
    ours = evaluate.precision_recall_density_coverage(real, fake, k=3, chunk=7)  # several chunks
    reference = plain_prdc(real, fake, 3)
    for name in reference:
        assert ours[name] == pytest.approx(reference[name], abs=1e-12), name
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1  # not a degenerate case


def test_prdc_directions():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 8))
    # "good but few modes": the generator repeats 5 real images (with a little noise)
    copies = real[rng.choice(300, 5, replace=False)].repeat(60, axis=0) + 1e-3 * rng.normal(size=(300, 8))
    collapsed = evaluate.precision_recall_density_coverage(real, copies)
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.05 and collapsed["coverage"] < 0.1
    # "diverse but poor": spread over more than the real data, most samples off it
    wide = evaluate.precision_recall_density_coverage(real, rng.normal(loc=1.0, scale=2.0, size=(300, 8)))
    assert wide["precision"] < 0.5 and wide["recall"] > 0.8
    assert wide["density"] < collapsed["density"]
    same = evaluate.precision_recall_density_coverage(real, rng.normal(size=(300, 8)))
    assert min(same.values()) > 0.6 and same["density"] == pytest.approx(1, abs=0.3)  # density ~ 1 on the real law


# --- FID against a fixed reference: the routes, bootstrap spread, FID-infinity -------------


def gaussian_pair(d, seed=0):
    """Two Gaussians and their Fréchet distance, exact: a rotated and a diagonal covariance."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sigma1, sigma2 = q @ np.diag(rng.uniform(0.2, 2, d)) @ q.T, np.diag(rng.uniform(0.2, 2, d))
    mu1, mu2 = np.zeros(d), 0.3 * rng.normal(size=d)
    return (mu1, sigma1), (mu2, sigma2), evaluate.frechet_distance(mu1, sigma1, mu2, sigma2)


@pytest.mark.parametrize("n", [12, 80])  # fewer images than dimensions (the n x n route), and more
def test_frechet_to_reference_equals_frechet_distance(n):
    (mu1, sigma1), (mu2, sigma2), _ = gaussian_pair(32)
    fake = np.random.default_rng(2).multivariate_normal(mu2, sigma2, size=n)
    fid_of = evaluate.FrechetToReference(mu1, sigma1, fake)
    assert fid_of() == pytest.approx(evaluate.frechet_distance(mu1, sigma1, *evaluate.feature_statistics(fake)), rel=1e-9)
    rows = np.array([0, 0, 3, 5, 5, 5, 7, 9, 11, 2])  # a bootstrap resample repeats images
    assert fid_of(rows) == pytest.approx(evaluate.frechet_distance(mu1, sigma1, *evaluate.feature_statistics(fake[rows])),
                                         rel=1e-9)


def test_fid_bootstrap_std_is_the_spread_of_fid():
    (mu1, sigma1), (mu2, sigma2), _ = gaussian_pair(16)
    draw = lambda seed: np.random.default_rng(seed).multivariate_normal(mu2, sigma2, size=300)  # noqa: E731
    fid_of, calls = evaluate.FrechetToReference(mu1, sigma1, draw(3)), []
    recording = lambda rows: calls.append((rows.copy(), fid_of(rows))) or calls[-1][1]  # noqa: E731
    recording.features = fid_of.features
    std = evaluate.fid_bootstrap_std(recording, resamples=40, seed=4)
    assert len(calls) == 40 and std == pytest.approx(np.std([fid for _, fid in calls], ddof=1), rel=1e-12)
    # each resample is n draws with replacement: about 1 - 1/e of the images appear, the rest are repeats
    distinct = [len(np.unique(rows)) / 300 for rows, _ in calls]
    assert all(len(rows) == 300 for rows, _ in calls) and 0.55 < np.mean(distinct) < 0.71
    assert len({tuple(rows) for rows, _ in calls}) == 40  # fresh resamples, not one repeated
    # and it estimates how much FID moves between independent sets of 300 generated images
    spread = np.std([evaluate.frechet_distance(mu1, sigma1, *evaluate.feature_statistics(draw(100 + i)))
                     for i in range(40)], ddof=1)
    assert 0.5 * spread < std < 2 * spread


def test_fid_infinity_extrapolates_a_line_in_one_over_n():
    # a stand-in whose FID_N is exactly 5 + 300 / N: the limit is 5
    subsets = []
    line = lambda rows: subsets.append(rows) or 5 + 300 / len(rows)  # noqa: E731
    line.features = np.zeros((500, 1))
    value, sizes = evaluate.fid_infinity(line, points=15, seed=0)
    assert value == pytest.approx(5, rel=1e-9)
    assert sizes[0] == 100 and sizes[-1] == 500 and len(sizes) == 15
    # subsets without replacement: no image twice, and the largest is the whole set
    assert [len(rows) for rows in subsets] == list(sizes)
    assert all(len(np.unique(rows)) == len(rows) for rows in subsets)
    assert sorted(subsets[-1]) == list(range(500))


def test_fid_infinity_on_gaussians_removes_the_bias():
    (mu1, sigma1), (mu2, sigma2), true = gaussian_pair(32)
    fid_n, fid_inf = [], []
    for seed in range(8):
        fake = np.random.default_rng(10 + seed).multivariate_normal(mu2, sigma2, size=400)
        fid_of = evaluate.FrechetToReference(mu1, sigma1, fake)  # the reference side is exact
        fid_n.append(fid_of())
        fid_inf.append(evaluate.fid_infinity(fid_of, seed=seed)[0])
    bias_n, bias_inf = np.mean(fid_n) - true, np.mean(fid_inf) - true
    assert bias_n > 0.05 * true  # FID on 400 images is biased upwards ...
    assert abs(bias_inf) < 0.25 * bias_n  # ... and FID-infinity removes most of it


# --- bits per pixel, the class bar chart, the CUDA settings --------------------------------


def test_bits_per_pixel_is_bits_per_dim_times_channels():
    # p(x | z) uniform on [0, 1]^D: exactly 8 bits per dimension, 3 x 8 per RGB pixel
    uniform = SimpleNamespace(log_importance_weights=lambda models, x, k: torch.zeros(k, len(x)))
    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8)
    args = SimpleNamespace(seed=0, bpd_n=None, bpd_k=2, batch_size=4, device="cpu", split="test")
    rows = {name: (value, note) for name, value, note in evaluate.vae_rows(uniform, {}, ["bpd"], images, args)}
    assert rows["bpd"][0] == pytest.approx(8.0, abs=1e-12) and "C x H x W = 72" in rows["bpd"][1]
    assert rows["bpp"][0] == pytest.approx(24.0, abs=1e-12) and "H x W = 24" in rows["bpp"][1]


def test_class_histogram_bar_chart(tmp_path):
    real_labels = torch.arange(200) % 4
    rows = evaluate.class_metrics(torch.full((100,), 2), None, real_labels, 4, 0.99)  # every sample a 2
    path = tmp_path / "run" / "class_histogram.png"
    counts = dict((name, value) for name, value, _ in rows)["class_histogram"]
    note = evaluate.draw_class_histogram(counts, real_labels, path, ["zero", "one", "two", "three"])
    assert note == f"bar chart beside the real mix: {path}"
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    orange = (np.abs(image - [255, 127, 14]).sum(-1) < 30).sum()  # the samples' bars (tab:orange)
    gray = (np.abs(image - [127, 127, 127]).sum(-1) < 30).sum()  # the real mix (tab:gray)
    assert orange > 500 and gray > 500  # the one tall sample bar holds as many pixels as the 4 real ones
    blocked = tmp_path / "file"
    blocked.write_text("")
    note = evaluate.draw_class_histogram([1, 2], torch.tensor([0, 1]), blocked / "x.png")
    assert note.startswith("no bar chart: cannot write")


def test_cuda_feature_pass_is_deterministic():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = True, True
        evaluate.configure_backends(torch.device("cuda"))  # sets flags only: no GPU needed
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved
