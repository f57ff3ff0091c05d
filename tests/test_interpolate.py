import argparse
import importlib
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_script

sys.path.insert(0, str(REPO))
import interpolate  # noqa: E402
from evaluate import load_models  # noqa: E402

TINY = {
    "dcgan": ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16"],
    "wgan": ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16", "--n_critic", "1"],
    "vae": ["--arch", "mlp", "--hidden", "32", "--latent_dim", "6", "--batch_size", "16"],
    "acgan": ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16"],
    "infogan": ["--model", "infogan", "--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16", "--cont_codes", "2"],
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, one_thread):
    """Tiny real checkpoints of every generator script, trained in-process for two steps."""
    root = tmp_path_factory.mktemp("interp")
    dst = root / "data" / "mnist5k"
    dst.mkdir(parents=True)
    for split, n in (("train", 100), ("test", 40)):  # every digit class (the embedded sample is sorted by class)
        images, labels = np.load(REPO / "data/mnist5k" / f"{split}.npy"), np.load(REPO / "data/mnist5k" / f"{split}_labels.npy")
        idx = np.linspace(0, len(images) - 1, n).astype(int)
        np.save(dst / f"{split}.npy", images[idx])
        np.save(dst / f"{split}_labels.npy", labels[idx])
    paths = {}
    for name, flags in TINY.items():
        script = "cgan" if name in ("acgan", "infogan") else name
        out = root / name
        importlib.import_module(script).main(["--data_dir", str(root / "data"), "--out_dir", str(out), "--max_iters", "2",
                                              "--device", "cpu", "--sample_interval", "1000", *flags])
        paths[name] = out / "ckpt.pt"
    return paths


def load(path):
    ckpt = torch.load(path, weights_only=True)
    module = importlib.import_module(ckpt["script"])
    return module, load_models(module, ckpt, "cpu"), ckpt["config"]


def args(**kw):
    base = dict(pairs=3, steps=5, method="lerp", extrapolate=0, dims=None, range=3.0, n_noise=4, code_range=2.0,
                seed=0, device=torch.device("cpu"), endpoints="random", fid_json="evaluate.json", script=None,
                projection="tsne", attr="Male", gif=False)
    return argparse.Namespace(**{**base, **kw})


# --- the interpolation maths ---------------------------------------------------------------


def test_coefficients_and_extrapolation():
    assert interpolate.interpolation_coefficients(10) == [i / 9 for i in range(10)]  # the MNIST homework: i/K, K = 9, 10 images
    ts = interpolate.interpolation_coefficients(11, extrapolate=2)  # the 2018 image-generation assignment: 0, 0.1, ..., 1, plus 2 each side
    assert len(ts) == 15 and ts[2] == 0 and ts[12] == 1
    assert np.allclose(np.diff(ts), 0.1) and math.isclose(ts[0], -0.2) and math.isclose(ts[-1], 1.2)
    with pytest.raises(ValueError):
        interpolate.interpolation_coefficients(1)


def test_lerp_endpoints_exact_and_extrapolation_on_the_line():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    ts = interpolate.interpolation_coefficients(10, extrapolate=3)
    z = interpolate.interpolate(z0, z1, ts, "lerp")
    assert z.shape == (4, 16, 32)
    assert torch.equal(z[:, 3], z0) and torch.equal(z[:, 12], z1)  # bit for bit
    for i, t in enumerate(ts):  # every point, extrapolated ones included, is z0 + t (z1 - z0)
        assert torch.allclose(z[:, i] - z0, t * (z1 - z0), atol=1e-5)
    d = z[:, [0, -1]] - z0[:, None]  # the outermost points are parallel to z1 - z0
    cos = torch.nn.functional.cosine_similarity(d, (z1 - z0)[:, None], dim=-1)
    assert torch.allclose(cos.abs(), torch.ones_like(cos), atol=1e-5)
    assert (cos[:, 0] < 0).all() and (cos[:, 1] > 0).all()  # one before z0, one beyond z1


def test_slerp_on_the_unit_sphere_and_for_general_vectors():
    g = torch.Generator().manual_seed(1)
    u0, u1 = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    u0, u1 = u0 / u0.norm(dim=1, keepdim=True), u1 / u1.norm(dim=1, keepdim=True)
    ts = interpolate.interpolation_coefficients(9, extrapolate=2)
    z = interpolate.interpolate(u0, u1, ts, "slerp")
    assert torch.equal(z[:, 2], u0) and torch.equal(z[:, 10], u1)
    assert torch.allclose(z.norm(dim=-1), torch.ones(5, len(ts)), atol=1e-5)  # never leaves the sphere
    omega = torch.acos((u0 * u1).sum(1))
    angle = torch.acos((z * u0[:, None]).sum(-1).clamp(-1, 1))  # the angle from u0 grows linearly with t
    t = torch.tensor(ts)
    assert torch.allclose(angle[:, 2:], (t[2:] * omega[:, None]).clamp(max=math.pi), atol=1e-3)
    lerped = interpolate.interpolate(u0, u1, ts, "lerp")
    assert (lerped[:, 3:10].norm(dim=-1) < 0.99).all()  # lerp cuts through the ball, slerp does not

    # general vectors: the norm goes linearly from |z0| to |z1|, the direction as on the sphere
    z0, z1 = 2 * u0, 5 * u1
    z = interpolate.interpolate(z0, z1, ts, "slerp")
    assert torch.equal(z[:, 2], z0) and torch.equal(z[:, 10], z1)
    assert torch.allclose(z.norm(dim=-1), (2 * (1 - t) + 5 * t).expand(5, -1), atol=1e-4)
    assert torch.allclose(z / z.norm(dim=-1, keepdim=True), interpolate.interpolate(u0, u1, ts, "slerp"), atol=1e-5)


def test_slerp_falls_back_to_lerp_where_the_circle_is_undefined():
    z0 = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    z1 = torch.stack([z0[0] * (1 + 1e-8), -z0[1], torch.tensor([1.0, 1.0, 1.0])])  # same direction, opposite, zero norm
    ts = [0.0, 0.25, 0.5, 1.0]
    z = interpolate.interpolate(z0, z1, ts, "slerp")
    assert torch.isfinite(z).all()
    assert torch.allclose(z, interpolate.interpolate(z0, z1, ts, "lerp"))


# --- grids from real checkpoints -----------------------------------------------------------


@pytest.mark.parametrize("name,method,extrapolate", [("dcgan", "lerp", 2), ("acgan", "slerp", 1), ("infogan", "slerp", 0)])
def test_endpoints_reproduce_the_samples_of_the_endpoint_latents(ckpts, name, method, extrapolate):
    module, models, config = load(ckpts[name])
    a = args(method=method, extrapolate=extrapolate)
    grid = interpolate.pairs_grid(module, models, config, a, torch.Generator().manual_seed(7))
    assert grid["images"].shape[:2] == (3, 5 + 2 * extrapolate)
    g = torch.Generator().manual_seed(7)  # the same stream: z0, z1 (, the classes)
    z0 = module.sample_latent(config, 3, "cpu", generator=g)
    z1 = module.sample_latent(config, 3, "cpu", generator=g)
    labels = torch.randint(0, config["n_classes"], (3,), generator=g) if name == "acgan" else None
    if name == "infogan":  # only the noise moves; the codes stay those of z0
        noise = config["nz"]
        z1 = torch.cat([z1[:, :noise], z0[:, noise:]], 1)
        assert (grid["latents"][:, :, noise:] == z0[:, None, noise:]).all()
        middle = interpolate.interpolate(z0[:, :noise], z1[:, :noise], [0.0, 0.25, 0.5, 0.75, 1.0], "slerp")
        assert torch.allclose(grid["latents"][:, :, :noise], middle)  # slerp of the noise alone
    first, last = extrapolate, extrapolate + 4
    assert torch.equal(grid["images"][:, first], module.generate(models, z0, labels))
    assert torch.equal(grid["images"][:, last], module.generate(models, z1, labels))
    assert not torch.equal(grid["images"][:, first], grid["images"][:, first + 1])


@pytest.mark.parametrize("name,extrapolate", [("dcgan", 0), ("wgan", 1), ("vae", 0), ("acgan", 0), ("infogan", 2)])
def test_pixel_mode_rows_start_and_end_on_the_same_images(ckpts, name, extrapolate):
    # the 2018 image-generation assignment, 5c: x0 = G(z0), x1 = G(z1); G(z(a)) above (1 - a) x0 + a x1, a = 0, 0.1, ..., 1
    module, models, config = load(ckpts[name])
    grid = interpolate.pixel_grid(module, models, config, args(pairs=2, steps=11, extrapolate=extrapolate), torch.Generator().manual_seed(3))
    assert grid["images"].shape[:2] == (4, 11 + 2 * extrapolate)
    assert [r.split(":")[0] for r in grid["rows"]] == ["latent 0", "pixel 0", "latent 1", "pixel 1"]
    first, last = extrapolate, extrapolate + 10
    assert grid["cols"][first:first + 3] == ["0.00", "0.10", "0.20"]
    latent, pixel = grid["images"][0::2], grid["images"][1::2]
    assert torch.equal(latent[:, first], pixel[:, first]) and torch.equal(latent[:, last], pixel[:, last])
    assert torch.allclose(pixel[:, first + 5], 0.5 * (pixel[:, first] + pixel[:, last]), atol=1e-6)  # the average halfway
    assert not torch.allclose(latent[:, first + 5], pixel[:, first + 5], atol=1e-3)  # the two schemes differ in between
    g = torch.Generator().manual_seed(3)  # the endpoints are samples: x0 = G(z0), x1 = G(z1), drawn as a pairs grid draws
    z0 = module.sample_latent(config, 2, "cpu", generator=g)
    z1 = module.sample_latent(config, 2, "cpu", generator=g)
    labels = torch.randint(0, config["n_classes"], (2,), generator=g) if name == "acgan" else None
    if name == "infogan":  # only the noise moves
        z1[:, config["nz"]:] = z0[:, config["nz"]:]
    assert torch.equal(latent[:, first], module.generate(models, z0, labels))
    assert torch.equal(latent[:, last], module.generate(models, z1, labels))


def test_vae_endpoints_can_be_test_images(ckpts, capsys):
    module, models, config = load(ckpts["vae"])
    grid = interpolate.pixel_grid(module, models, config, args(pairs=2, steps=11, endpoints="test"), torch.Generator().manual_seed(0))
    images, _ = module.real_images(config, "test")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:4]
    mu = module.encode(models, images[pick].float() / 255)[0]
    assert torch.equal(grid["images"][0::2, 0], module.generate(models, mu[:2]))  # the reconstructions of the test images
    assert torch.equal(grid["images"][0::2, 10], module.generate(models, mu[2:]))
    assert torch.equal(grid["images"][1::2, 0], grid["images"][0::2, 0])
    assert "--endpoints test needs a VAE" in error_line(capsys, "--ckpt", ckpts["dcgan"], "--endpoints", "test")


def test_classes_and_codes_keep_the_noise_and_vary_one_thing(ckpts):
    module, models, config = load(ckpts["acgan"])
    grid = interpolate.classes_grid(module, models, config, args(n_noise=3), torch.Generator().manual_seed(0))
    assert grid["images"].shape[:2] == (10, 3) and grid["rows"] == [str(c) for c in range(10)]
    assert (grid["latents"] == grid["latents"][:1]).all()  # one noise per column, the same in every row
    assert torch.equal(grid["images"][:, 1], module.generate(models, grid["latents"][:, 1], torch.arange(10)))
    assert torch.allclose(grid["images"][7], module.generate(models, grid["latents"][7], torch.full((3,), 7)), atol=1e-5)

    module, models, config = load(ckpts["infogan"])
    grids = interpolate.code_grids(module, models, config, args(n_noise=3, steps=4), torch.Generator().manual_seed(0))
    assert [g["name"] for g in grids] == ["code_cat0", "code_cont0", "code_cont1"]
    assert [g["images"].shape[:2] for g in grids] == [(3, 10), (3, 4), (3, 4)]
    cat, cont0 = grids[0]["latents"], grids[1]["latents"]
    nz = config["nz"]
    assert torch.equal(cat[0, :, nz:nz + 10], torch.eye(10))  # column j: category j
    assert (cat[:, :, :nz] == cat[:, :1, :nz]).all()  # noise fixed along each row, different between rows
    assert not torch.equal(cat[0, 0, :nz], cat[1, 0, :nz])
    assert cont0[0, :, nz + 10].tolist() == pytest.approx([-2, -2 / 3, 2 / 3, 2])


def cell_counts(png):
    """(rows, cols) of image cells in a written grid, counted from the white separators between them."""
    image = Image.open(png)
    meta = {k: int(v) for k, v in image.text.items()}
    a = np.asarray(image.convert("L"))[meta["top"]:, meta["left"]:]
    width = meta["cols"] * (meta["cell_w"] + meta["pad"]) + meta["pad"]
    height = meta["rows"] * (meta["cell_h"] + meta["pad"]) + meta["pad"]
    assert a.shape[0] == height and a.shape[1] >= width
    a = a[:, :width]
    runs = lambda blank: int(np.sum(~blank[1:] & blank[:-1]))  # noqa: E731 (a cell starts after a white line)
    return (runs((a == 255).all(1)), runs((a == 255).all(0))), (meta["rows"], meta["cols"])


@pytest.mark.parametrize("name", ["dcgan", "wgan", "vae", "acgan", "infogan"])
def test_every_grid_has_the_rows_and_columns_asked_for(ckpts, tmp_path, capsys, name):
    out = tmp_path / "grids"
    interpolate.main(["--ckpt", str(ckpts[name]), "--out_dir", str(out), "--pairs", "3", "--steps", "4",
                      "--extrapolate", "1", "--dims", "0,2", "--n_noise", "2", "--device", "cpu"])
    written = capsys.readouterr().out.split()
    expected = {"pairs_lerp": (3, 6), "traverse": (2, 4), "pixel": (6, 6)}
    expected.update({"acgan": {"classes": (10, 2)},
                     "infogan": {"code_cat0": (2, 10), "code_cont0": (2, 4), "code_cont1": (2, 4)}}.get(name, {}))
    assert sorted(written) == sorted(str(out / f"{k}.png") for k in expected)  # latents.png only when asked for
    for key, shape in expected.items():
        counted, meta = cell_counts(out / f"{key}.png")
        assert counted == shape and meta == shape, key


def error_line(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        interpolate.main([*map(str, argv), "--device", "cpu"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code != 0 and len(lines) == 1, lines
    return lines[0]


def test_bad_requests_end_with_one_line(ckpts, tmp_path, capsys, monkeypatch):
    assert "needs a class-conditional" in error_line(capsys, "--ckpt", ckpts["dcgan"], "--mode", "classes")
    assert "needs a class-conditional" in error_line(capsys, "--ckpt", ckpts["infogan"], "--mode", "classes")
    assert "dimensions 0..7" in error_line(capsys, "--ckpt", ckpts["dcgan"], "--mode", "traverse", "--dims", "3,8")
    sr = tmp_path / "sr.pt"  # a script without a latent space, as srgan.py
    torch.save({"script": "srgan", "format": 1, "config": {}, "models": {}}, sr)
    (tmp_path / "fakesr.py").write_text("import argparse\ncheck_format = print\nget_args = argparse.ArgumentParser().parse_args\n"
                                         "def build_models(config):\n    return {}\n")  # as srgan.py, untrained
    assert "no latent space" in error_line(capsys, "--ckpt", sr, "--script", tmp_path / "fakesr.py")
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"garbage")
    assert "cannot read checkpoint" in error_line(capsys, "--ckpt", bad)
    assert "no checkpoint" in error_line(capsys, "--ckpt", tmp_path / "missing.pt")


def wrong_kind_checkpoints(ckpts, folder):
    """A cut-off checkpoint, a torch file that is none, and a dcgan checkpoint whose weights are not dcgan's."""
    data = ckpts["dcgan"].read_bytes()
    (folder / "truncated.pt").write_bytes(data[:len(data) // 2])
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    ckpt = torch.load(ckpts["dcgan"], weights_only=True)
    for group in ("models", "ema"):
        if group in ckpt:
            ckpt[group] = {name: torch.nn.Linear(3, 5).state_dict() for name in ckpt[group]}
    torch.save(ckpt, folder / "mismatched.pt")
    return folder


def test_bad_input_ends_with_one_line(ckpts, tmp_path, capsys):
    bad = wrong_kind_checkpoints(ckpts, tmp_path)
    assert "cannot read checkpoint" in error_line(capsys, "--ckpt", bad / "truncated.pt")
    assert "not a checkpoint of this project" in error_line(capsys, "--ckpt", bad / "foreign.pt")
    assert "does not load into dcgan.py's models" in error_line(capsys, "--ckpt", bad / "mismatched.pt")
    for flag, value, expected in (("pairs", 0, "--pairs must be at least 1"), ("n_noise", -1, "--n_noise must be at least 1"),
                                  ("steps", 1, "--steps must be at least 2"), ("extrapolate", -1, "--extrapolate must be 0"),
                                  ("pairs", "two", "invalid int value")):
        line = error_line(capsys, "--ckpt", ckpts["dcgan"], f"--{flag}", value)
        assert line.startswith("interpolate.py: error: ") and expected in line, line
    (tmp_path / "a_file").write_text("")
    assert "--out_dir" in error_line(capsys, "--ckpt", ckpts["dcgan"], "--mode", "pairs", "--out_dir", tmp_path / "a_file")


def test_wrong_kind_of_checkpoint_from_the_command_line(ckpts, tmp_path):
    bad = wrong_kind_checkpoints(ckpts, tmp_path)
    proc = run_script("interpolate.py", "--ckpt", bad / "mismatched.pt", "--device", "cpu", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "does not load into dcgan.py's models" in lines[0], proc.stderr


def test_command_line_writes_next_to_the_checkpoint(ckpts):
    proc = run_script("interpolate.py", "--ckpt", ckpts["acgan"], "--mode", "classes,pairs", "--method", "slerp")
    paths = proc.stdout.split()
    assert paths == [str(ckpts["acgan"].parent / "interpolations" / f) for f in ("classes.png", "pairs_slerp.png")]
    image = Image.open(paths[0])
    assert image.text["rows"] == "10" and image.text["cols"] == "10"  # defaults: 10 noise vectors x 10 digits


# --- --compare: the same noise through several runs ------------------------------------------


@pytest.fixture(scope="module")
def upsample_runs(ckpts, one_thread):
    """The 2018 image-generation assignment's three upsampling schemes, as tiny dcgan runs beside the default one."""
    root = ckpts["dcgan"].parent.parent
    paths = [ckpts["dcgan"]]
    for mode in ("nearest", "bilinear"):
        out = root / f"dcgan_{mode}"
        importlib.import_module("dcgan").main(["--data_dir", str(root / "data"), "--out_dir", str(out), "--max_iters", "2",
                                               "--device", "cpu", "--sample_interval", "1000", "--upsample", mode, *TINY["dcgan"]])
        paths.append(out / "ckpt.pt")
    return paths


def test_compare_draws_the_same_noise_through_each_run(upsample_runs, tmp_path, capsys):
    (upsample_runs[1].parent / "evaluate.json").write_text(json.dumps({"source": {"step": 2}, "metrics": {"fid": 123.456}}))
    (upsample_runs[2].parent / "evaluate.json").write_text(json.dumps({"source": {"step": 1}, "metrics": {"fid": 80.0}}))
    grid = interpolate.compare_grid(args(compare=[str(p) for p in upsample_runs], n_noise=3))
    assert grid["images"].shape[:2] == (3, 3)
    assert grid["rows"] == ["dcgan, upsample=convtranspose", "dcgan_nearest, upsample=nearest, FID 123.5",
                            "dcgan_bilinear, upsample=bilinear, FID 80.0 (step 1)"]  # a report of another step says so
    for row, path in zip(grid["images"], upsample_runs):
        module, models, config = load(path)
        z = module.sample_latent(config, 3, "cpu", generator=torch.Generator().manual_seed(0))  # the same z in every row
        assert torch.equal(row, module.generate(models, z))
    assert not torch.allclose(grid["images"][0], grid["images"][1])
    (upsample_runs[0].parent / "evaluate.json").write_text(json.dumps({"source": {"step": 2}, "metrics": {"kid": 0.1}}))
    assert interpolate.compare_grid(args(compare=[str(p) for p in upsample_runs], n_noise=3))["rows"][0] == "dcgan, upsample=convtranspose"
    (upsample_runs[0].parent / "evaluate.json").write_text("[1, 2")
    assert "not an evaluate.py --json report" in error_line(capsys, "--compare", *upsample_runs)
    (upsample_runs[0].parent / "evaluate.json").unlink()

    interpolate.main(["--compare", *map(str, upsample_runs), "--n_noise", "4", "--out_dir", str(tmp_path), "--device", "cpu"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "compare.png")]
    assert cell_counts(tmp_path / "compare.png")[0] == (3, 4)


def test_compare_refuses_what_it_cannot_draw(ckpts, capsys):
    line = error_line(capsys, "--compare", ckpts["dcgan"], ckpts["vae"])
    assert "different latent or image sizes" in line and "latent 8" in line and "latent 6" in line
    assert "--compare needs two or more" in error_line(capsys, "--compare", ckpts["dcgan"])
    assert "either --ckpt or --compare" in error_line(capsys, "--ckpt", ckpts["dcgan"], "--compare", ckpts["dcgan"], ckpts["wgan"])


# --- latents: the 2-D map of a VAE's test latents ---------------------------------------------


def test_latent_map_pca_and_tsne_paths(monkeypatch, capsys):
    torch.manual_seed(0)
    points = torch.randn(200, 6) * torch.tensor([5.0, 1, 1, 1, 3, 1])
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import fails: PCA, saying so in one line
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # (an earlier test may have imported it)
    xy, method = interpolate.latent_map(points)
    assert method == "PCA" and xy.shape == (200, 2)
    assert abs(xy[:, 0].var().item() - 25) < 5 and abs(xy[:, 1].var().item() - 9) < 2.5  # the two widest directions
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "scikit-learn is not installed" in err[0] and "PCA" in err[0]
    fake = types.ModuleType("sklearn.manifold")
    fake.TSNE = lambda n, **kw: types.SimpleNamespace(fit_transform=lambda a: a[:, :n].copy())
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", fake)
    xy, method = interpolate.latent_map(points)
    assert method == "t-SNE" and torch.equal(xy, points[:, :2])
    assert interpolate.latent_map(points, "pca")[1] == "PCA"  # --projection pca, with scikit-learn installed
    assert capsys.readouterr().err == ""


def test_latent_map_is_a_tsne_of_every_test_image(ckpts, tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")  # a requirement (requirements.txt)
    xy, method = interpolate.latent_map(torch.randn(40, 5))
    assert method == "t-SNE" and xy.shape == (40, 2)
    data = tmp_path / "data" / "mnist5k"  # 2,100 test images: more than the 2,000 vae.py's map once took
    data.mkdir(parents=True)
    source = ckpts["vae"].parent.parent / "data" / "mnist5k"
    for name in ("train.npy", "train_labels.npy"):
        (data / name).write_bytes((source / name).read_bytes())
    np.save(data / "test.npy", np.tile(np.load(source / "test.npy"), (53, 1, 1, 1))[:2100])
    np.save(data / "test_labels.npy", np.tile(np.load(source / "test_labels.npy"), 53)[:2100])
    calls = []
    monkeypatch.setattr(interpolate, "latent_map", lambda points, method: calls.append((len(points), method)) or (points[:, :2], method))
    for flags in ([], ["--projection", "pca"]):
        interpolate.main(["--ckpt", str(ckpts["vae"]), "--mode", "latents", "--data_dir", str(tmp_path / "data"),
                          "--out_dir", str(tmp_path / "maps"), "--device", "cpu", *flags])
    assert calls == [(2100, "tsne"), (2100, "pca")]
    assert capsys.readouterr().out.split() == [str(tmp_path / "maps" / "latents.png")] * 2
    np.save(data / "test.npy", np.zeros((0, 28, 28, 1), np.uint8))  # no test split: the training images
    np.save(data / "test_labels.npy", np.zeros(0, np.int64))
    interpolate.main(["--ckpt", str(ckpts["vae"]), "--mode", "latents", "--data_dir", str(tmp_path / "data"),
                      "--out_dir", str(tmp_path / "maps"), "--device", "cpu"])
    assert calls[-1] == (100, "tsne")


def test_latents_png_is_coloured_by_label(ckpts, tmp_path, capsys):
    interpolate.main(["--ckpt", str(ckpts["vae"]), "--mode", "latents", "--projection", "pca", "--out_dir", str(tmp_path),
                      "--device", "cpu"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "latents.png")]
    image = np.asarray(Image.open(tmp_path / "latents.png").convert("RGB")).reshape(-1, 3)
    assert image.shape[0] == 600 * 550 and len(np.unique(image, axis=0)) > 50  # points in several colours, a colour bar
    assert not list(tmp_path.glob("*.tmp.png"))
    assert "needs an encoder" in error_line(capsys, "--ckpt", ckpts["dcgan"], "--mode", "latents")


def test_latent_map_colours_by_one_attribute(tmp_path):
    labels = torch.tensor([[0, 1, 1], [1, 0, 1]])
    config = {"data_dir": str(tmp_path), "dataset": "faces"}
    assert interpolate.map_labels(labels, config, "Male")[1] == "attribute 0"  # no names: the first column
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "attr_names.json").write_text(json.dumps(["Smiling", "Male", "Young"]))
    values, name = interpolate.map_labels(labels, config, "Male")
    assert name == "Male" and values.tolist() == [1, 0]
    assert interpolate.map_labels(labels, config, "Bald")[1] == "Smiling"
    assert interpolate.map_labels(torch.tensor([3, 1]), config, "Male")[1] == "label"


# --- animations: --gif and --movie ---------------------------------------------------------


def gif_frames(path):
    """Every frame of a GIF as a gray uint8 array, and the frames' durations."""
    gif = Image.open(path)
    frames, durations = [], []
    for k in range(gif.n_frames):
        gif.seek(k)
        frames.append(np.asarray(gif.convert("L")))
        durations.append(gif.info["duration"])
    return frames, durations


def test_movie_has_one_frame_per_grid_in_step_order(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    rng = np.random.default_rng(0)
    steps = [300, 20, 1000, 100, 5000]  # written out of order, padded to different widths: as text, out of order
    grids = {step: rng.integers(0, 256, (40, 52), dtype=np.uint8) for step in steps}
    for step, grid in grids.items():
        Image.fromarray(grid).convert("RGB").save(run / "samples" / f"step_{step:0{len(str(step)) + 1}d}.png")
    Image.fromarray(grids[20]).save(run / "samples" / "strip.png")  # not a grid
    interpolate.main(["--movie", str(run)])
    assert capsys.readouterr().out.split() == [str(run / "training.gif")]
    frames, durations = gif_frames(run / "training.gif")
    assert len(frames) == len(steps)
    for frame, step in zip(frames, sorted(steps)):
        assert np.array_equal(frame[-40:, :52], grids[step])  # the grid, exactly, under the line of its step
    captions = [frame[:-40] for frame in frames]
    assert all((c < 128).any() for c in captions) and len({c.tobytes() for c in captions}) == len(steps)
    assert durations[-1] > durations[0]  # the last grid stays longer
    assert "neither grids samples/step_*.png nor rows in log.jsonl" in error_line(capsys, "--movie", tmp_path)


def test_movie_draws_the_logs_curves_one_panel_per_name_prefix(tmp_path, capsys):
    rows = [{"step": s, "loss_D": 1 / s, "loss_G": s, "D_x": 0.5, "D_G_z1": 0.4, "ms_per_step": 9.0, "images_per_s": 3.0,
             **({"test_mse": 0.1} if s % 20 == 0 else {})} for s in range(10, 70, 10)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    interpolate.main(["--movie", str(tmp_path)])  # no grids yet: the curves alone
    assert capsys.readouterr().out.split() == [str(tmp_path / "curves.png")]
    # panels: loss (loss_D, loss_G), D (D_x, D_G_z1), test (test_mse); speed left out; 5 x 4 inches each at 100 dpi
    assert Image.open(tmp_path / "curves.png").size == (3 * 500, 400)


def test_gif_frames_are_the_columns_of_the_grid(ckpts, tmp_path, capsys):
    out = tmp_path / "gifs"
    interpolate.main(["--ckpt", str(ckpts["acgan"]), "--mode", "pairs,classes", "--gif", "--pairs", "2", "--steps", "4",
                      "--n_noise", "3", "--out_dir", str(out), "--device", "cpu"])
    names = ("pairs_lerp.png", "pairs_lerp.gif", "classes.png", "classes.gif")
    assert sorted(capsys.readouterr().out.split()) == sorted(str(out / name) for name in names)
    for name, columns, per_column in (("pairs_lerp", 4, 1), ("classes", 3, 3)):  # classes: walks z0 -> z1 -> z2 -> z0
        png = Image.open(out / f"{name}.png")
        meta = {k: int(v) for k, v in png.text.items()}
        grid = np.asarray(png.convert("L"))
        frames, _ = gif_frames(out / f"{name}.gif")
        assert len(frames) == columns * per_column
        h, w, pad = meta["cell_h"], meta["cell_w"], meta["pad"]
        for j in range(columns):  # each column's images, in the frame of its step: all rows stacked
            frame, x = frames[j * per_column], meta["left"] + pad + j * (w + pad)
            cells = grid[meta["top"]:, x:x + w]
            assert np.array_equal(frame[meta["top"]:meta["top"] + cells.shape[0], meta["left"] + pad:][:, :w], cells)
        assert not np.array_equal(frames[0], frames[1])
