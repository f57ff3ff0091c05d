"""evaluate.py --save_samples, intra-class FID and SSIM, on tiny checkpoints of the real model scripts.

The saved files are checked to be the images evaluate.py scores: pytorch-fid's FID of them equals evaluate.py's,
a regeneration from the same seed gives them bit for bit, and the metrics recomputed from them (intra-class FID,
MSE, SSIM by scikit-image) equal the reported ones.
"""
import importlib
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from conftest import REPO
from test_evaluate import PixelFeatures, fid_inception_weights, read_json  # noqa: F401 (a fixture)

sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402
from evaluate import load_models  # noqa: E402

TINY = {"acgan": ("cgan", ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16"]),
        "vae": ("vae", ["--arch", "mlp", "--hidden", "32", "--latent_dim", "6", "--batch_size", "16"]),
        "srgan": ("srgan", ["--ngf", "8", "--ndf", "8", "--batch_size", "8", "--eval_images", "16"])}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints trained in-process for two steps (one thread) on 200 train and 300 test digits, 30 a class."""
    root = tmp_path_factory.mktemp("samples_out")
    dst = root / "data" / "mnist5k"
    dst.mkdir(parents=True)
    for split, n in (("train", 200), ("test", 300)):  # the embedded sample is sorted by class
        images, labels = (np.load(REPO / "data" / "mnist5k" / f"{split}{s}.npy") for s in ("", "_labels"))
        idx = np.concatenate([np.flatnonzero(labels == c)[:n // 10] for c in range(10)])
        np.save(dst / f"{split}.npy", images[idx])
        np.save(dst / f"{split}_labels.npy", labels[idx])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, (script, flags) in TINY.items():
        importlib.import_module(script).main(["--data_dir", str(root / "data"), "--out_dir", str(root / name),
                                              "--max_iters", "2", "--device", "cpu", "--sample_interval", "1000",
                                              *flags])
    yield {name: root / name / "ckpt.pt" for name in TINY}
    torch.set_num_threads(threads)


def evaluate_main(*argv):
    evaluate.main([str(a) for a in (*argv, "--device", "cpu", "--no_cache")])


def load(path):
    ckpt = torch.load(path, weights_only=True)
    module = importlib.import_module(ckpt["script"])
    return module, load_models(module, ckpt, "cpu"), ckpt["config"]


def read_pngs(folder):
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(len(files))]
    images = [Image.open(f) for f in files]
    assert all(im.mode == "L" for im in images)  # gray digits: 8-bit gray PNGs
    return torch.from_numpy(np.stack([np.asarray(im) for im in images]))[:, None]


def regenerate(path, n, batch_size, labels_of):
    """The uint8 samples evaluate.py draws: latents from one generator seeded 0, batch by batch, classes labels_of."""
    module, models, config = load(path)
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n, batch_size):
        z = module.sample_latent(config, min(batch_size, n - start), "cpu", generator=g)
        batches.append(evaluate.to_uint8(module.generate(models, z, labels_of(torch.arange(start, start + len(z))))))
    return torch.cat(batches)


def test_saved_samples_give_pytorch_fids_fid(ckpts, tmp_path, fid_inception_weights):  # noqa: F811
    from pytorch_fid import fid_score

    out, report = tmp_path / "samples", tmp_path / "fid.json"
    evaluate_main("--ckpt", ckpts["acgan"], "--n", 30, "--n_real", 20, "--metrics", "fid", "--batch_size", 25,
                  "--save_samples", out, "--json", report)
    saved = read_pngs(out)
    assert saved.shape == (30, 1, 32, 32) and saved.dtype == torch.uint8
    assert torch.equal(saved, regenerate(ckpts["acgan"], 30, 25, lambda i: i % 10))  # every class in turn
    module, _, config = load(ckpts["acgan"])
    real = module.real_images(config, "test")[0]
    real = real[evaluate.subset(torch.arange(len(real)), 20, 0)]  # the --n_real 20 that evaluate.py drew
    (tmp_path / "real").mkdir()
    for i, image in enumerate(real):
        Image.fromarray(image[0].numpy()).save(tmp_path / "real" / f"{i:03d}.png")
    # pytorch-fid's own image loading and Inception on the files, its activations compared by the exact n x n route
    # (evaluate.features_frechet_distance) instead of its 2048 x 2048 matrix square root, a minute of CPU
    inception = fid_score.InceptionV3([fid_score.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    features = [fid_score.get_activations(sorted(map(str, p.glob("*.png"))), inception, 20, 2048, "cpu", 0)
                for p in (tmp_path / "real", out)]
    theirs = evaluate.features_frechet_distance(*features)
    assert read_json(report)["metrics"]["fid"] == pytest.approx(theirs, rel=1e-4)
    assert theirs > 1


def test_one_class_and_npy_files(ckpts, tmp_path, capsys):
    out, report = tmp_path / "three.npy", tmp_path / "three.json"
    evaluate_main("--ckpt", ckpts["acgan"], "--n", 30, "--metrics", "classes", "--batch_size", 16, "--class", 3,
                  "--save_samples", out, "--json", report, "--cache_dir", tmp_path)
    saved = np.load(out)
    assert saved.shape == (30, 32, 32, 1) and saved.dtype == np.uint8  # N x H x W x C, as --real/--fake read
    expected = regenerate(ckpts["acgan"], 30, 16, lambda i: torch.full_like(i, 3))
    assert np.array_equal(saved, expected.permute(0, 2, 3, 1).numpy())
    assert read_json(report)["source"]["n_real"] == 30  # the test digits of class 3 alone
    assert f"wrote the 30 images scored to {out}" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an unconditional model has no class 3; a used folder is not written into
        evaluate_main("--ckpt", ckpts["vae"], "--class", 3)
    Image.new("L", (4, 4)).save(tmp_path / "used.png")
    with pytest.raises(SystemExit):
        evaluate_main("--ckpt", ckpts["acgan"], "--save_samples", tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no classes" in err[0] and "already holds images" in err[1]


def plain_fid(a, b):
    """FID with scipy's sqrtm, as pytorch-fid computes it."""
    (mu1, s1), (mu2, s2) = (evaluate.feature_statistics(f) for f in (a, b))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


class CentreFeatures(PixelFeatures):
    """Stands in for the FID Inception: 3x3 average pools of the centre, which varies in every digit (no singular
    covariance for scipy's sqrtm)."""

    def forward(self, images):
        features = torch.nn.functional.adaptive_avg_pool2d(images[..., 6:-6, 6:-6].float() / 255, 3).flatten(1)
        return features, features


def test_intra_class_fid_is_the_mean_of_per_class_fids(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_inception", lambda path, device: CentreFeatures())
    out, report = tmp_path / "samples.npy", tmp_path / "intra.json"
    evaluate_main("--ckpt", ckpts["acgan"], "--n", 300, "--metrics", "fid", "--save_samples", out, "--json", report)
    report = read_json(report)
    fake = CentreFeatures()(torch.from_numpy(np.load(out)).permute(0, 3, 1, 2))[0].numpy()
    module, _, config = load(ckpts["acgan"])
    real, labels = module.real_images(config, "test")
    real = CentreFeatures()(real)[0].numpy()
    per_class = [plain_fid(real[labels.numpy() == c], fake[np.arange(300) % 10 == c]) for c in range(10)]
    assert report["metrics"]["fid_per_class"] == pytest.approx(per_class, rel=1e-6)
    assert report["metrics"]["fid_intra"] == pytest.approx(np.mean(per_class), rel=1e-6)
    assert report["metrics"]["fid"] == pytest.approx(plain_fid(real, fake), rel=1e-6)
    assert list(report["metrics"])[:3] == ["fid", "fid_intra", "fid_per_class"]  # next to the unconditional FID


def test_features_frechet_distance_with_few_and_many_rows():
    rng = np.random.default_rng(0)
    for n_a, n_b in ((10, 30), (40, 5), (200, 300)):  # 64 dimensions: singular covariances, then full ones
        a, b = rng.normal(size=(n_a, 64)), rng.gamma(2.0, size=(n_b, 64))
        expected = evaluate.frechet_distance(*evaluate.feature_statistics(a), *evaluate.feature_statistics(b))
        assert evaluate.features_frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def skimage_ssim(x, y):
    """scikit-image's SSIM of two float images C x H x W in [0, 1], with the settings of Wang et al. (2004)."""
    from skimage.metrics import structural_similarity

    return structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), channel_axis=2,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


def test_ssim_matches_scikit_image():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 40, 48, dtype=torch.float64)
    y = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    y[0] = x[0].mean(0, keepdim=True)  # gray, dimmer, and the same: SSIM 1
    y[2] = x[2]
    ours = evaluate.ssim(x, y)
    assert ours.tolist() == pytest.approx([skimage_ssim(a, b) for a, b in zip(x, y)], abs=1e-10)
    assert ours[2] == pytest.approx(1.0, abs=1e-12) and ours[1] < 0.9


def test_super_resolution_outputs_saved_and_their_ssim(ckpts, tmp_path):
    out, report = tmp_path / "outputs", tmp_path / "sr.json"
    evaluate_main("--ckpt", ckpts["srgan"], "--metrics", "mse,ssim", "--save_samples", out, "--json", report)
    metrics, notes = (read_json(report)[k] for k in ("metrics", "notes"))
    module, models, config = load(ckpts["srgan"])
    real = module.real_images(config, "test")[0].float() / 255
    saved = read_pngs(out).float() / 255
    assert saved.shape == real.shape == (300, 1, 64, 64)
    bilinear = evaluate.to_uint8(module.degrade(real, config)).float() / 255
    assert metrics["mse"] == pytest.approx((saved - real).pow(2).mean().item(), rel=1e-6)  # the outputs scored
    assert metrics["ssim"] == pytest.approx(np.mean([skimage_ssim(a, b) for a, b in zip(saved, real)]), abs=1e-7)
    assert metrics["ssim_bilinear"] == pytest.approx(np.mean([skimage_ssim(a, b) for a, b in zip(bilinear, real)]),
                                                     abs=1e-7)
    assert "11x11 Gaussian" in notes["ssim"] and metrics["ssim"] != pytest.approx(metrics["ssim_bilinear"])


def test_vae_samples_and_reconstructions(ckpts, tmp_path):
    samples, recons, report = tmp_path / "samples", tmp_path / "recons", tmp_path / "vae.json"
    evaluate_main("--ckpt", ckpts["vae"], "--n", 20, "--metrics", "mse", "--save_samples", samples)
    assert torch.equal(read_pngs(samples), regenerate(ckpts["vae"], 20, 50, lambda i: None))
    evaluate_main("--ckpt", ckpts["vae"], "--n", 20, "--metrics", "mse", "--save_samples", recons, "--reconstructions",
                  "--json", report)
    module, models, config = load(ckpts["vae"])
    real = module.real_images(config, "test")[0]
    saved = read_pngs(recons)
    assert saved.shape == real.shape and not torch.equal(saved, real)
    mse = (saved.float() / 255 - real.float() / 255).pow(2).mean().item()
    assert read_json(report)["metrics"]["mse"] == pytest.approx(mse, rel=1e-6)  # the reconstructions scored
