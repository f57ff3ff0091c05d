import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

from conftest import REPO, make_tiny_mnist, run_script

sys.path.insert(0, str(REPO))
import cgan  # noqa: E402
from evaluate import load_models  # noqa: E402

TINY = ["--ngf", "8", "--ndf", "8", "--nz", "16", "--batch_size", "16", "--device", "cpu"]
TIMING = ("ms_per_step", "images_per_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """conftest's tiny_mnist, made once for the module: 256 train and 64 test images, every class present."""
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def acgan_run(tiny_mnist, tmp_path_factory):
    """One 2-step ACGAN run (--lr 1e-3), shared by the tests that need a checkpoint to resume or to guard."""
    out = tmp_path_factory.mktemp("acgan_run") / "run"
    train("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "2", "--lr", "1e-3", "--log_interval", "2",
          "--ckpt_interval", "2", *TINY)
    return out


def copy_of(run, tmp_path):
    """A copy of a shared run's folder, to resume, break or guard."""
    return shutil.copytree(run, tmp_path / "o")


def config(**kw):
    base = dict(model="acgan", nz=16, ngf=16, ndf=16, channels=1, img_size=32, n_classes=10, leaky_slope=0.2,
                cat_codes=1, cat_dim=10, cont_codes=2, lambda_cat=1.0, lambda_cont=1.0, three_optimizers=False)
    return {**base, **kw}


def train(*argv):
    """Run cgan.py's main in this process (faster than a subprocess; the subprocess tests below cover the command line)."""
    cgan.main([str(a) for a in argv])


def read_log(out_dir):
    """The complete rows of log.jsonl (a run being killed may have half-written the last one)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# --- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [32, 64])
def test_acgan_shapes_and_class_input(img_size):
    models = cgan.build_models(config(img_size=img_size, channels=3))
    G, D = models["G"], models["D"]
    assert G[1].in_channels == 16 + 10  # one input: noise ++ one-hot class
    z, labels = torch.randn(5, 16), torch.tensor([0, 3, 9, 3, 1])
    x = G(cgan.g_input(z, labels, 10))
    assert torch.equal(cgan.g_input(z, labels, 10), torch.cat([z, F.one_hot(labels, 10).float()], 1))
    assert x.shape == (5, 3, img_size, img_size) and x.min() >= -1 and x.max() <= 1
    source, classes = D(x)
    assert source.shape == (5,) and classes.shape == (5, 10)
    G.eval()  # the class changes the image, the noise being the same
    assert not torch.allclose(G(cgan.g_input(z, labels, 10)), G(cgan.g_input(z, (labels + 1) % 10, 10)))
    # the conv body is dcgan.py's: 32x32 -> 16 -> 32 -> 64 channels at 4x4, then one 4x4 conv per head
    assert [m.out_channels for m in D.body if isinstance(m, nn.Conv2d)] == [16 * 2 ** i for i in range(int(np.log2(img_size)) - 2)]
    assert not isinstance(D.body[1], nn.BatchNorm2d)


def test_infogan_shapes_layout_and_latent():
    cfg = config(model="infogan", n_classes=0, nz=62, cat_codes=2, cat_dim=10, cont_codes=2)
    models = cgan.build_models(cfg)
    assert models["G"][1].in_channels == 62 + 2 * 10 + 2 and models["G"].n_classes == 0
    layout = cgan.latent_layout(cfg)
    assert [(p["name"], p["kind"], p["start"], p["size"]) for p in layout] == [
        ("noise", "noise", 0, 62), ("cat0", "categorical", 62, 10), ("cat1", "categorical", 72, 10),
        ("cont0", "continuous", 82, 1), ("cont1", "continuous", 83, 1)]
    z = cgan.sample_latent(cfg, 500, "cpu", torch.Generator().manual_seed(0))
    assert z.shape == (500, 84)
    onehots = z[:, 62:82].view(500, 2, 10)
    assert torch.equal(onehots.sum(-1), torch.ones(500, 2)) and set(onehots.unique().tolist()) == {0.0, 1.0}
    assert onehots.sum((0, 1)).min() > 50  # every category drawn
    cont = z[:, 82:]
    assert cont.min() >= -1 and cont.max() <= 1 and cont.std() > 0.5
    noise, cat, c = cgan.split_codes(z, cfg)
    assert torch.equal(noise, z[:, :62]) and torch.equal(cat, onehots.argmax(-1)) and torch.equal(c, cont)
    source, q = models["D"](models["G"](z[:4]))
    assert source.shape == (4,) and q.shape == (4, 22)  # Q: 2 x 10 logits + 2 means
    assert cgan.latent_layout(config()) == [{"name": "noise", "kind": "noise", "start": 0, "size": 16}]
    assert cgan.sample_labels(cfg, 4, "cpu") is None
    labels = cgan.sample_labels(config(), 1000, "cpu", torch.Generator().manual_seed(0))
    assert labels.shape == (1000,) and torch.bincount(labels, minlength=10).min() > 50


# --- losses --------------------------------------------------------------------------------


def test_acgan_losses_match_their_formulas():
    torch.manual_seed(0)
    r, f = torch.randn(6), torch.randn(6)
    rc, fc = torch.randn(6, 10), torch.randn(6, 10)
    yr, yf = torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))
    log_p = lambda logits, y: torch.log(torch.softmax(logits, 1)[torch.arange(6), y])  # noqa: E731
    L_S_D = torch.log(torch.sigmoid(r)).mean() + torch.log(1 - torch.sigmoid(f)).mean()
    L_C = log_p(rc, yr).mean() + log_p(fc, yf).mean()
    assert torch.allclose(cgan.acgan_discriminator_loss(r, f, rc, fc, yr, yf), -(L_S_D + L_C))
    expected_G = -torch.log(torch.sigmoid(f)).mean() - log_p(fc, yf).mean()
    assert torch.allclose(cgan.acgan_generator_loss(f, fc, yf), expected_G)
    # the defaults: D's class head learns the real images' classes only, and G's class term weighs 0.1
    assert torch.allclose(cgan.acgan_discriminator_loss(r, f, rc, fc, yr, yf, class_of_fakes=False),
                          -(L_S_D + log_p(rc, yr).mean()))
    assert torch.allclose(cgan.acgan_generator_loss(f, fc, yf, class_weight=0.1),
                          -torch.log(torch.sigmoid(f)).mean() - 0.1 * log_p(fc, yf).mean())
    args = cgan.get_args([])
    assert (args.class_of_fakes, args.class_weight) == (False, 0.1)
    args = cgan.get_args(["--class_of_fakes", "--class_weight", "1"])  # Odena et al.'s, DLCV HW4's
    assert (args.class_of_fakes, args.class_weight) == (True, 1.0)
    # a binary attribute: the 2-way softmax is DLCV HW4's sigmoid cross-entropy on the logit difference
    two = torch.randn(6, 2)
    y = torch.randint(0, 2, (6,))
    bce = F.binary_cross_entropy_with_logits(two[:, 1] - two[:, 0], y.float())
    assert torch.allclose(F.cross_entropy(two, y), bce)


def test_unlabelled_real_images_train_only_the_source_head():
    torch.manual_seed(0)
    r, f = torch.randn(6), torch.randn(6)
    rc = torch.randn(6, 10, requires_grad=True)
    fc = torch.randn(6, 10)
    yr, yf = torch.tensor([3, -1, 0, -1, -1, 9]), torch.randint(0, 10, (6,))
    known = yr >= 0
    expected = F.softplus(-r).mean() + F.softplus(f).mean() + F.cross_entropy(rc[known], yr[known]) + F.cross_entropy(fc, yf)
    loss = cgan.acgan_discriminator_loss(r, f, rc, fc, yr, yf)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (rc.grad[~known] == 0).all() and (rc.grad[known] != 0).any()  # unlabelled images teach the class head nothing
    none_labelled = torch.full((6,), -1)
    assert cgan.labelled_cross_entropy(rc, none_labelled) == 0  # not 0 / 0
    logits = torch.eye(10)[[3, 5, 0, 1, 2, 9]]  # predicts 3, 5, 0, 1, 2, 9
    assert cgan.class_accuracy(logits, yr) == 1.0  # the 3 labelled ones are right; the others do not count
    assert cgan.class_accuracy(logits, torch.tensor([3, -1, 1, -1, -1, 9])) == pytest.approx(2 / 3)
    assert cgan.class_accuracy(logits, none_labelled) == 0


def test_info_loss_is_the_negative_lower_bound():
    cfg = config(model="infogan", n_classes=0, cat_codes=2, cat_dim=3, cont_codes=2, lambda_cat=1.0, lambda_cont=0.5)
    z = cgan.sample_latent(cfg, 8, "cpu", torch.Generator().manual_seed(1))
    q = torch.randn(8, 2 * 3 + 2)
    _, cat, cont = cgan.split_codes(z, cfg)
    ce = -sum(torch.log_softmax(q[:, 3 * k:3 * k + 3], 1)[torch.arange(8), cat[:, k]] for k in range(2)).mean()
    gauss = 0.5 * ((cont - q[:, 6:]) ** 2).sum(1).mean()
    assert torch.allclose(cgan.info_loss(q, z, cfg), ce + 0.5 * gauss)
    # Q that is sure of the right category: the categorical term vanishes, accuracy is 1
    perfect = torch.cat([z[:, 16:22] * 50, cont], 1)
    assert cgan.info_loss(perfect, z, cfg) < 1e-6 and cgan.code_accuracy(perfect, z, cfg) == 1


@pytest.mark.parametrize("model", ["acgan", "infogan"])
def test_leaky_slope_sets_every_leaky_relu_of_D(model):
    extra = {} if model == "acgan" else {"n_classes": 0}
    for slope in (0.2, 0.1):
        models = cgan.build_models(config(model=model, **extra, leaky_slope=slope))
        slopes = [m.negative_slope for m in models["D"].modules() if isinstance(m, nn.LeakyReLU)]
        assert len(slopes) == (3 if model == "acgan" else 4) and set(slopes) == {slope}  # InfoGAN: the Q head's too


def test_three_optimizers_hold_the_parameters_dlcv_hw4_gives_them():
    cfg = config(model="infogan", n_classes=0, lr=2e-4, beta1=0.5, beta2=0.999)
    models = cgan.build_models(cfg)
    G, D = models["G"], models["D"]

    def held(optimizer):
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    def ids(*modules):
        return {id(p) for m in modules for p in m.parameters()}

    paper = cgan.build_optimizers(G, D, cfg)
    assert set(paper) == {"G", "D"} and held(paper["D"]) == ids(D) and held(paper["G"]) == ids(G)
    three = cgan.build_optimizers(G, D, {**cfg, "three_optimizers": True})
    assert set(three) == {"G", "D", "Q"}
    assert held(three["G"]) == ids(G)
    assert held(three["D"]) == ids(D.body, D.source)  # the discriminator without the Q network
    assert held(three["Q"]) == ids(G, D.aux)  # "adjusting both parameters from the generator and Q network"
    for optimizer in three.values():
        assert optimizer.defaults["lr"] == 2e-4 and optimizer.defaults["betas"] == (0.5, 0.999)


def one_infogan_step(tiny_mnist, out, *flags):
    """The weights after one iteration of InfoGAN in float32, without augmentation or averaging."""
    train("--model", "infogan", "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "1", "--ema_decay", "0",
          "--augment", "none", "--dtype", "float32", *TINY, *flags)
    return torch.load(out / "ckpt.pt", weights_only=True)


def test_three_optimizers_keep_the_information_term_out_of_D_body(tiny_mnist, tmp_path):
    # the same seed, two weights of the information term: what it trains moves with the weight, the rest not
    weights = {}
    for form in ("paper", "three"):
        flags = ["--three_optimizers"] if form == "three" else []
        for lam in ("1", "5"):
            ckpt = one_infogan_step(tiny_mnist, tmp_path / f"{form}{lam}", "--lambda_cat", lam, "--lambda_cont", lam, *flags)
            weights[form, lam] = ckpt["models"]
    def same(form, net, prefix):
        a, b = weights[form, "1"][net], weights[form, "5"][net]
        return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and "running" not in k and "num_batches" not in k)

    assert not same("paper", "D", "body.")  # the paper's form: the D step trains the shared body on the term too
    assert same("three", "D", "body.") and same("three", "D", "source.")  # DLCV HW4's: D's optimizer never sees it
    assert not same("three", "D", "aux.") and not same("three", "G", "")  # the Q step moves the Q head and G
    ckpt = torch.load(tmp_path / "three1" / "ckpt.pt", weights_only=True)
    assert set(ckpt["optimizers"]) == {"G", "D", "Q"}
    steps = {name: {float(s["step"]) for s in opt["state"].values()} for name, opt in ckpt["optimizers"].items()}
    assert steps == {"G": {1.0}, "D": {1.0}, "Q": {1.0}}  # 1:1:1
    built = cgan.build_models(ckpt["config"])
    assert len(ckpt["optimizers"]["Q"]["state"]) == len([*built["G"].parameters(), *built["D"].aux.parameters()])
    assert len(ckpt["optimizers"]["D"]["state"]) == len([*built["D"].body.parameters(), *built["D"].source.parameters()])
    assert set(torch.load(tmp_path / "paper1" / "ckpt.pt", weights_only=True)["optimizers"]) == {"G", "D"}


def test_three_optimizers_resume_and_refusals(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["--model", "infogan", "--data_dir", tiny_mnist, "--out_dir", out, "--log_interval", "1", "--leaky_slope", "0.1", *TINY]
    train("--max_iters", "2", "--three_optimizers", *common)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["three_optimizers"] is True and ckpt["config"]["leaky_slope"] == 0.1
    models = load_models(cgan, ckpt, "cpu")
    assert {m.negative_slope for m in models["D"].modules() if isinstance(m, nn.LeakyReLU)} == {0.1}
    train("--max_iters", "3", "--resume", *common)  # the checkpoint's config brings the flag back
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and {float(s["step"]) for s in ckpt["optimizers"]["Q"]["state"].values()} == {3.0}
    assert all(np.isfinite(r["loss_info"]) for r in read_log(out))
    train("--max_iters", "1", *common, "--out_dir", tmp_path / "paper")
    assert "--three_optimizers cannot change" in error_line(capsys, "--max_iters", "2", "--resume", "--three_optimizers", *common,
                                                            "--out_dir", tmp_path / "paper")
    assert "ACGAN" in error_line(capsys, "--three_optimizers", "--data_dir", tiny_mnist, "--out_dir", tmp_path / "a", *TINY)
    assert "--leaky_slope: -1 is outside [0, 1)" in error_line(capsys, *common, "--leaky_slope", "-1", "--out_dir",
                                                                tmp_path / "b")


# --- data ----------------------------------------------------------------------------------


def test_attribute_labels_pick_one_column(tmp_path):
    names = ["Bald", "Smiling", "Young"]
    labels = torch.tensor([[0, 1, 1], [1, 0, 1], [0, 0, 0]])
    folder = tmp_path / "celeba"
    folder.mkdir()
    (folder / "attr_names.json").write_text(json.dumps(names))
    def labels_of(dataset, labels, attr):
        return cgan.class_labels({"data_dir": str(tmp_path), "dataset": dataset, "attr": attr}, labels)

    y, class_names = labels_of("celeba", labels, "Smiling")
    assert y.tolist() == [1, 0, 0] and class_names == ["not Smiling", "Smiling"]
    with pytest.raises(ValueError, match="--attr"):
        labels_of("celeba", labels, None)
    with pytest.raises(ValueError, match="Bald, Smiling, Young"):
        labels_of("celeba", labels, "Smile")
    with pytest.raises(FileNotFoundError, match="attr_names.json"):
        labels_of("other", labels, "Smiling")
    y, class_names = labels_of("mnist5k", torch.tensor([3, 0, 9]), None)
    assert y.tolist() == [3, 0, 9] and class_names == [str(c) for c in range(10)]


def partly_labelled(tmp_path, labels):
    """data/stl10 as data/stl10/prepare.py writes train+unlabeled: colour images, label -1 for the unlabelled ones."""
    folder = tmp_path / "data" / "stl10"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    np.save(folder / "train.npy", images)
    np.save(folder / "train_labels.npy", np.array(labels, dtype=np.int64))
    return tmp_path / "data"


def test_acgan_trains_on_partly_labelled_data(tmp_path, capsys):
    # 16 labelled images and 80 unlabelled: with batches of 16, many batches hold no labelled image at all
    labels = [c % 10 for c in range(16)] + [-1] * 80
    data_dir = partly_labelled(tmp_path, labels)
    out = tmp_path / "run"
    train("--dataset", "stl10", "--data_dir", data_dir, "--out_dir", out, "--max_iters", "6", "--log_interval", "1", *TINY)
    rows = read_log(out)
    assert len(rows) == 6 and all(np.isfinite(r[k]) for r in rows for k in ("loss_D", "loss_G", "acc_real"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["n_classes"] == 10 and ckpt["config"]["channels"] == 3

    shutil.rmtree(tmp_path / "data")
    data_dir = partly_labelled(tmp_path, [-1] * 32)
    bad = ["--dataset", "stl10", "--out_dir", tmp_path / "o", "--max_iters", "1", *TINY]  # a missed check trains briefly
    assert "--model infogan" in error_line(capsys, "--data_dir", data_dir, *bad)
    shutil.rmtree(tmp_path / "data")
    data_dir = partly_labelled(tmp_path, [0, 1, -2, 3])
    assert "label -2" in error_line(capsys, "--data_dir", data_dir, *bad)
    assert not (tmp_path / "o").exists()


# --- training aids: augmentation, EMA, dtype, one G forward --------------------------------


@pytest.mark.parametrize("model", ["acgan", "infogan"])
def test_D_sees_only_augmented_images_and_G_runs_once_per_iteration(tiny_mnist, tmp_path, monkeypatch, model):
    seen, G_calls = [], []
    original_D, original_G = cgan.Discriminator.forward, cgan.Generator.forward
    monkeypatch.setattr(cgan.Discriminator, "forward", lambda self, x: seen.append(x.detach().clone()) or original_D(self, x))
    monkeypatch.setattr(cgan.Generator, "forward", lambda self, x: G_calls.append(self.training) or original_G(self, x))
    drawn = []
    original_to_unit_range = cgan.to_unit_range
    monkeypatch.setattr(cgan, "to_unit_range", lambda x: drawn.append(original_to_unit_range(x)) or drawn[-1])
    common = ["--model", model, "--data_dir", tiny_mnist, "--max_iters", "3", "--ema_decay", "0", "--dtype", "float32", *TINY]
    train("--out_dir", tmp_path / "cut", "--augment", "cutout", *common)
    # D's inputs, 3 an iteration: the real batch and the fakes in D's update, the fakes in G's update.
    # Both heads read the one input; digits in [-1, 1] never hold an exact 0, so every image has a cut-out square.
    assert len(seen) == 3 * 3 and all((x == 0).flatten(1).any(dim=1).all() for x in seen)
    assert G_calls.count(True) == 3  # one training forward of G per iteration (the other call draws the grid)
    seen.clear()
    drawn.clear()
    train("--out_dir", tmp_path / "plain", "--augment", "none", *common)
    assert torch.equal(seen[0], drawn[0])  # no augmentation: D sees the batch that was drawn


def test_ema_generator_is_saved_drawn_and_returned_by_load_models(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    train("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "4", "--sample_interval", "4", "--dtype", "float32", *TINY)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    G = load_models(cgan, ckpt, "cpu")["G"]
    for key, value in G.state_dict().items():
        assert torch.equal(value, ckpt["ema"]["G"][key]), key
    for key in ("1.weight", "2.running_mean"):  # averaged weights, and batch-norm statistics of their own
        assert not torch.equal(ckpt["ema"]["G"][key], ckpt["models"]["G"][key]), key
    torch.manual_seed(ckpt["config"]["seed"])  # the initial weights, as main() draws them
    initial = cgan.build_models(ckpt["config"])["G"].state_dict()["1.weight"]
    trained, averaged = ckpt["models"]["G"]["1.weight"], ckpt["ema"]["G"]["1.weight"]
    assert (averaged - trained).norm() < 0.5 * (initial - trained).norm()  # the short warm-up follows the weights
    # those statistics: update_bn over G's full input (latents and classes, drawn as in training) from a fixed seed
    cfg, recomputed = ckpt["config"], load_models(cgan, ckpt, "cpu")["G"]
    inputs = cgan.fixed_inputs(cfg, 10, 16, cfg["seed"] + 1)
    assert inputs.shape == (10, 16, 16 + 10) and torch.equal(inputs[:, :, 16:].sum(-1), torch.ones(10, 16))
    assert len(set(inputs[:, :, 16:].argmax(-1).flatten().tolist())) == 10  # every class asked for
    for m in recomputed.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    cgan.update_bn(inputs, recomputed)
    for key, value in recomputed.state_dict().items():
        assert torch.allclose(value.float(), ckpt["ema"]["G"][key].float(), atol=1e-5), key
    # the grid is the EMA generator's output on the fixed latents, classes 0, 1, 2, ... in reading order
    fixed_z = cgan.sample_latent(cfg, 36, "cpu", torch.Generator().manual_seed(cfg["seed"]))
    with torch.no_grad():
        grid = G(cgan.g_input(fixed_z, torch.arange(36) % 10, 10))
    assert torch.equal(cgan.generate({"G": G}, fixed_z), grid.add(1).div(2).clamp(0, 1))
    save_image(grid.add(1).div(2), tmp_path / "expected.png", nrow=6, padding=2)  # torchvision's, the reference
    from PIL import Image
    expected = np.asarray(Image.open(tmp_path / "expected.png"), dtype=int)
    drawn = np.asarray(Image.open(out / "samples" / "step_000004.png"), dtype=int)
    assert np.abs(expected - drawn).max() <= 1  # channels_last may round a pixel the other way

    off = tmp_path / "off"
    train("--model", "infogan", "--data_dir", tiny_mnist, "--out_dir", off, "--max_iters", "2", "--ema_decay", "0", *TINY)
    ckpt = torch.load(off / "ckpt.pt", weights_only=True)
    assert ckpt["ema"] == {}
    G = load_models(cgan, ckpt, "cpu")["G"]
    assert all(torch.equal(v, ckpt["models"]["G"][k]) for k, v in G.state_dict().items())


def test_bfloat16_autocast_trains(tiny_mnist, tmp_path):
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "3", "--log_interval", "1", "--dtype", dtype, *TINY)
        rows[dtype] = read_log(out)
    ckpt = torch.load(tmp_path / "bfloat16" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in ckpt["models"]["G"].values() if v.is_floating_point())  # autocast, fp32 weights
    first32, first16 = rows["float32"][0], rows["bfloat16"][0]  # the same weights and batches; bf16 rounds the convs
    for key in ("loss_D", "loss_G"):
        assert first16[key] != first32[key] and abs(first16[key] - first32[key]) < 0.05 * abs(first32[key]), key
    assert all(np.isfinite(r[k]) for r in rows["bfloat16"] for k in ("loss_D", "loss_G", "acc_real"))


# --- training runs -------------------------------------------------------------------------


def test_acgan_run_writes_every_output(tiny_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "4", "--log_interval", "2",
          "--sample_interval", "2", "--ckpt_interval", "2", *TINY)
    for name in ("ckpt.pt", "log.jsonl", "config.json", "samples/step_000002.png", "samples/step_000004.png"):
        assert (out / name).exists(), name
    rows = read_log(out)
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss_D", "loss_G", "D_x", "D_G_z1", "D_G_z2", "acc_real", "acc_fake", "ms_per_step", "images_per_s"} <= set(rows[0])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    cfg = ckpt["config"]
    assert ckpt["script"] == "cgan" and ckpt["step"] == 4
    assert cfg["n_classes"] == 10 and cfg["class_names"] == [str(c) for c in range(10)] and cfg["channels"] == 1
    models = load_models(cgan, ckpt, "cpu")
    z = cgan.sample_latent(cfg, 4, "cpu")
    images = cgan.generate(models, z, torch.tensor([0, 1, 2, 3]))
    assert images.shape == (4, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(cgan.generate(models, z), images)  # no labels: classes 0, 1, 2, ... in turn
    real, labels = cgan.real_images(cfg, "test")
    assert real.shape == (64, 1, 32, 32) and labels.shape == (64,)
    from PIL import Image
    assert Image.open(out / "samples/step_000004.png").size == (6 * 34 + 2, 6 * 34 + 2)


def test_auxiliary_losses_teach_the_heads(tiny_mnist, tmp_path):
    """ACGAN: D's class head learns the real digits and G's fakes become classifiable as the requested class.
    InfoGAN: Q learns to recover the categorical code G was given. Without augmentation, which makes the heads'
    task harder: 40 steps of tiny networks are then too few to tell learning from chance."""
    plain = ["--augment", "none", "--ema_decay", "0"]
    out = tmp_path / "acgan"
    train("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "40", "--log_interval", "10", "--lr", "1e-3", *plain,
          "--class_of_fakes", "--class_weight", "1", *TINY)  # the paper's class terms: 40 steps suffice to see them work
    rows = read_log(out)
    assert rows[-1]["acc_real"] > 0.6 and rows[-1]["acc_real"] > rows[0]["acc_real"] + 0.2, rows
    assert rows[-1]["acc_fake"] > 0.5 and rows[-1]["acc_fake"] > rows[0]["acc_fake"] + 0.2, rows
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    D = load_models(cgan, ckpt, "cpu")["D"]
    images, labels = cgan.real_images(ckpt["config"], "test")  # digits D never saw
    with torch.no_grad():
        accuracy = (D(cgan.to_unit_range(images))[1].argmax(1) == labels).float().mean()
    assert accuracy > 0.4  # chance is 0.1

    out = tmp_path / "infogan"
    train("--model", "infogan", "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "50", "--log_interval", "10",
          "--lr", "1e-3", *plain, *TINY)
    rows = read_log(out)
    assert rows[-1]["acc_code"] > 0.4 and rows[-1]["loss_info"] < rows[0]["loss_info"] - 0.3, rows  # chance: 0.1


def test_sigkill_then_resume_gives_identical_log_and_ema(tiny_mnist, tmp_path):
    # checkpoints every 5 steps, log rows every 7: the resumed run starts mid-window, and its rows must
    # still average the same steps as the uninterrupted run's (the window's sums are checkpointed)
    # Only the killed run needs a process of its own; the others run here, the uninterrupted one while it starts.
    common = ["--data_dir", tiny_mnist, "--log_interval", "7", "--ckpt_interval", "5", "--sample_interval", "1000",
              "--dtype", "float32", *TINY]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "cgan.py", "--out_dir", killed, "--max_iters", "100000", *map(str, common)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill_after_two_log_rows():
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (killed / "ckpt.pt").exists() and (killed / "log.jsonl").exists() and len(read_log(killed)) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_two_log_rows)
    killer.start()
    straight = tmp_path / "straight"
    try:
        train("--out_dir", straight, "--max_iters", "30", *common)
    finally:
        killer.join()
        proc.wait()
    expected = without_timing(read_log(straight))
    saved_step = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert 10 <= saved_step < 30 and saved_step % 5 == 0 and saved_step % 7 != 0, proc.stderr.read()

    train("--out_dir", killed, "--max_iters", "30", "--resume", *common)
    rows = without_timing(read_log(killed))
    assert [r["step"] for r in rows] == [7, 14, 21, 28, 30]  # lines after the checkpoint replaced, not duplicated
    assert rows == expected  # every logged number, exactly
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(killed / "ckpt.pt", weights_only=True)
    for name in ("models", "ema"):
        for key, value in a[name]["G"].items():
            assert torch.equal(value, b[name]["G"][key]), (name, key)


def test_infogan_resumed_mid_window_logs_as_uninterrupted(tiny_mnist, tmp_path, monkeypatch):
    common = ["--model", "infogan", "--data_dir", tiny_mnist, "--log_interval", "4", "--ckpt_interval", "6",
              "--sample_interval", "1000", "--dtype", "float32", *TINY]
    out = tmp_path / "run"
    save = cgan.save_checkpoint

    def keeping_step_6(config, step, *args):
        save(config, step, *args)
        if step == 6:
            shutil.copy(out / "ckpt.pt", tmp_path / "step6.pt")

    monkeypatch.setattr(cgan, "save_checkpoint", keeping_step_6)
    train("--out_dir", out, "--max_iters", "12", *common)
    expected = without_timing(read_log(out))
    assert [r["step"] for r in expected] == [4, 8, 12] and {"loss_info", "acc_code"} <= set(expected[0])
    assert torch.load(tmp_path / "step6.pt", weights_only=True)["log_window"]["steps"] == 2  # steps 5 and 6
    shutil.copy(tmp_path / "step6.pt", out / "ckpt.pt")
    train("--out_dir", out, "--max_iters", "12", "--resume", *common)
    assert without_timing(read_log(out)) == expected


DDP_PROBE = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import cgan
built = []
original = cgan.build_models
cgan.build_models = lambda config: built.append(original(config)) or built[-1]
dist, init, destroy = torch.distributed, torch.distributed.init_process_group, torch.distributed.destroy_process_group
# two runs in one launch (each torchrun start costs a fresh torch import per process): the first keeps the process
# group for the second, which joins it instead of making a new one, and leaves it as main() always does
for i, (out, flags) in enumerate({runs!r}):
    dist.init_process_group = init if i == 0 else (lambda *args, **kwargs: None)
    dist.destroy_process_group = destroy if i == {last} else (lambda *args, **kwargs: None)
    cgan.main(sys.argv[1:] + ["--out_dir", out, *flags])
    torch.save(built[-1]["G"].state_dict(), out + f"/G_rank{{os.environ['RANK']}}.pt")
"""
DDP_FLAGS = [[], ["--three_optimizers"]]  # three: DDP needs unused()'s zero gradients


def test_torchrun_two_processes_infogan(tiny_mnist, tmp_path):
    outs = [tmp_path / f"ddp{i}" for i in range(len(DDP_FLAGS))]
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE.format(repo=str(REPO), runs=[(str(out), flags) for out, flags in zip(outs, DDP_FLAGS)],
                                      last=len(DDP_FLAGS) - 1))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29643",
                           str(probe), "--model", "infogan", "--data_dir", str(tiny_mnist),
                           "--max_iters", "3", "--log_interval", "1", "--dtype", "float32", *TINY],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for out, flags in zip(outs, DDP_FLAGS):
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["step"] == 3 and ckpt["config"]["n_classes"] == 0
        assert ckpt["config"]["three_optimizers"] == bool(flags)
        assert set(ckpt["optimizers"]) == ({"G", "D", "Q"} if flags else {"G", "D"})
        assert not any(k.startswith("module.") for k in ckpt["models"]["D"])
        assert len(read_log(out)) == 3
        # the ranks start from different seeds; DDP broadcasts rank 0's weights and averages the gradients
        G0, G1 = (torch.load(out / f"G_rank{r}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(G0[k], G1[k]) for k in G0 if "running" not in k and "num_batches" not in k)


# --- bad input -----------------------------------------------------------------------------


def one_error_line(proc):  # the same for a subprocess
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    return lines[0]


def error_line(capsys, *argv):
    """cgan.main in this process: it must exit non-zero with exactly one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train(*argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code != 0 and len(lines) == 1, lines
    return lines[0]


def test_missing_dataset_names_prepare_command(tmp_path):
    proc = run_script("cgan.py", "--data_dir", tmp_path, "--dataset", "celeba", "--attr", "Smiling", "--out_dir", tmp_path / "o", check=False)
    assert "python " in one_error_line(proc) and "celeba/prepare.py" in proc.stderr


def test_bad_settings_one_line_each(tiny_mnist, tmp_path, capsys):
    out = ["--data_dir", tiny_mnist, "--out_dir", tmp_path / "o", "--max_iters", "1", *TINY]  # a missed check trains briefly
    assert "--img_size: invalid choice: 48" in error_line(capsys, *out, "--img_size", "48")
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(tiny_mnist, unlabelled)
    (unlabelled / "mnist5k" / "train_labels.npy").unlink()
    assert "--model infogan" in error_line(capsys, *out, "--data_dir", unlabelled)
    assert "--attr Smiling" in error_line(capsys, *out, "--attr", "Smiling")
    assert "without labels" in error_line(capsys, *out, "--model", "infogan", "--attr", "Smiling")
    assert "at least one code" in error_line(capsys, *out, "--model", "infogan", "--cat_codes", "0", "--cont_codes", "0")
    for flag, value in (("batch_size", "0"), ("max_iters", "0"), ("log_interval", "-1"), ("nz", "0"), ("ngf", "-8"),
                        ("cat_dim", "0"), ("sample_interval", "0"), ("ckpt_interval", "0")):
        assert f"--{flag}: {value} is outside [1, " in error_line(capsys, *out, f"--{flag}", value)
    assert "--lr: 0.0 is outside (0, inf]" in error_line(capsys, *out, "--lr", "0.0")
    assert "--cat_codes: -1 is outside [0, 100]" in error_line(capsys, *out, "--model", "infogan", "--cat_codes", "-1")
    assert "--lambda_cont: nan is outside [0, inf]" in error_line(capsys, *out, "--lambda_cont", "nan")
    assert "--ema_decay: 1 is outside [0, 1)" in error_line(capsys, *out, "--ema_decay", "1")
    assert "translation,flip: use none or a comma list" in error_line(capsys, *out, "--augment", "translation,flip")
    assert not (tmp_path / "o").exists()  # nothing written for a run that never started


def make_read_only(paths):
    """chmod paths read-only, and where that does not bind (root) also chattr +i; -> the function that undoes it."""
    immutable = []
    for path in paths:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
        if os.geteuid() == 0 and shutil.which("chattr") and subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0:
            immutable.append(path)

    def undo():
        for path in immutable:
            subprocess.run(["chattr", "-i", path], check=True)
        for path in paths:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return undo


def test_unwritable_out_dir_one_line(tiny_mnist, acgan_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where --out_dir wants a folder")
    assert "cannot write to --out_dir" in error_line(capsys, "--data_dir", tiny_mnist, "--out_dir", blocker / "run", *TINY)

    out, empty = copy_of(acgan_run, tmp_path), tmp_path / "empty"
    empty.mkdir()
    files = sorted(p for p in out.rglob("*") if p.is_file())
    saved = {p: p.read_bytes() for p in files}
    undo = make_read_only([empty, out, out / "samples", *files])
    try:
        try:
            (empty / "probe").touch()
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        except PermissionError:
            pass
        for argv in (["--out_dir", empty], ["--out_dir", out, "--max_iters", "4", "--resume"], ["--out_dir", out]):
            assert "cannot write to --out_dir" in error_line(capsys, "--data_dir", tiny_mnist, *argv, *TINY)
    finally:
        undo()
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == data for p, data in saved.items())


def test_resume_refuses_other_checkpoints_and_fixed_flags(tiny_mnist, acgan_run, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    assert "cannot read checkpoint" in error_line(capsys, "--resume", "--data_dir", tiny_mnist, "--out_dir", bad, *TINY)
    assert (bad / "ckpt.pt").read_bytes() == b"not a checkpoint at all"
    torch.save({"script": "dcgan", "format": 2, "config": {}, "step": 2}, bad / "ckpt.pt")
    other = (bad / "ckpt.pt").read_bytes()
    assert "is not a format-2 cgan checkpoint" in error_line(capsys, "--resume", "--data_dir", tiny_mnist, "--out_dir", bad,
                                                             *TINY)
    assert (bad / "ckpt.pt").read_bytes() == other

    out = copy_of(acgan_run, tmp_path)  # 2 steps at --lr 1e-3
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--log_interval", "2", *TINY]
    good = (out / "ckpt.pt").read_bytes()
    for flag, value in (("model", "infogan"), ("augment", "none"), ("ema_decay", "0"), ("ngf", "16")):
        assert f"--{flag} cannot change" in error_line(capsys, "--max_iters", "4", "--resume", *common, f"--{flag}", value)
    assert (out / "ckpt.pt").read_bytes() == good
    train("--max_iters", "3", "--lr", "2e-4", "--resume", *common)  # 2e-4 is the default: typed, so taken
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["lr"] == 2e-4
    assert {g["lr"] for opt in ckpt["optimizers"].values() for g in opt["param_groups"]} == {2e-4}


def test_nan_loss_keeps_what_was_saved(tiny_mnist, acgan_run, tmp_path, capsys):
    out = copy_of(acgan_run, tmp_path)  # 2 steps, a checkpoint at step 2
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--ckpt_interval", "2", "--log_interval", "2", *TINY]
    good = (out / "ckpt.pt").read_bytes()
    assert "non-finite loss" in error_line(capsys, "--max_iters", "20", "--resume", "--lr", "1e30", *common)
    assert (out / "ckpt.pt").read_bytes() == good


@pytest.mark.parametrize("poisoned", ["G", "ema"])
def test_non_finite_weights_never_reach_a_checkpoint(tiny_mnist, acgan_run, tmp_path, monkeypatch, poisoned):
    # the losses of step 3 are computed before its update; then G's (or the average's) weights turn NaN
    out = copy_of(acgan_run, tmp_path)  # 2 steps, a checkpoint at step 2
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--ckpt_interval", "1", "--log_interval", "100", *TINY]
    good = (out / "ckpt.pt").read_bytes()
    original = cgan.update_ema

    def poisoning_update(ema, G, decay):
        original(ema, G, decay)
        with torch.no_grad():
            next((G if poisoned == "G" else ema).parameters()).fill_(float("nan"))

    monkeypatch.setattr(cgan, "update_ema", poisoning_update)
    with pytest.raises(SystemExit):
        train("--max_iters", "3", "--resume", *common)
    assert (out / "ckpt.pt").read_bytes() == good


def test_copied_alone_into_an_empty_folder_runs(tiny_mnist, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / "cgan.py", alone)
    shutil.copytree(tiny_mnist, alone / "data")
    run_script("cgan.py", "--model", "infogan", "--max_iters", "2", *TINY, cwd=alone)
    assert (alone / "out" / "cgan" / "ckpt.pt").exists()


def test_old_format_checkpoint_is_refused_in_one_line(tiny_mnist, acgan_run, tmp_path, capsys):
    # format 1 (an older cgan.py: no "ema" when off, "fixed_noise", another log window) once ended in a KeyError
    out = copy_of(acgan_run, tmp_path)
    common = ["--data_dir", tiny_mnist, "--out_dir", out, *TINY]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for old in ({**ckpt, "format": 1}, {k: v for k, v in ckpt.items() if k != "format"}):
        torch.save(old, out / "ckpt.pt")
        saved = (out / "ckpt.pt").read_bytes()
        if "format" in old:  # as a user runs it
            proc = run_script("cgan.py", "--max_iters", "3", "--resume", *common, check=False)
            assert "is not a format-2 cgan checkpoint" in one_error_line(proc) and "Traceback" not in proc.stderr
        else:
            assert "is not a format-2 cgan checkpoint" in error_line(capsys, "--max_iters", "3", "--resume", *common)
        assert (out / "ckpt.pt").read_bytes() == saved
        with pytest.raises(ValueError, match="not a format-2 cgan checkpoint"):
            load_models(cgan, old, "cpu")
    assert load_models(cgan, ckpt, "cpu")["G"].n_classes == 10  # the format-2 checkpoint itself loads


def poison_batchnorm(model, name):
    """Fill a buffer of model's first batch-norm layer with NaN."""
    with torch.no_grad():
        getattr(next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), name).fill_(float("nan"))


@pytest.mark.parametrize("where", ["D batch norm", "EMA weights", "EMA batch norm"])
def test_non_finite_state_anywhere_stops_before_the_checkpoint(tiny_mnist, tmp_path, monkeypatch, capsys, where):
    # the losses stay finite (D in training uses batch statistics): only save_checkpoint's check can see these
    if where == "D batch norm":  # after each D update (poisoned before a forward, it would break autograd instead)
        build = cgan.build_optimizers

        def poisoning(G, D, config):
            optimizers = build(G, D, config)
            step = optimizers["D"].step
            optimizers["D"].step = lambda: step() or poison_batchnorm(D, "running_var")
            return optimizers
        monkeypatch.setattr(cgan, "build_optimizers", poisoning)
    elif where == "EMA weights":
        update_ema = cgan.update_ema

        def poisoning(ema, G, decay):
            update_ema(ema, G, decay)
            with torch.no_grad():
                next(ema.parameters()).fill_(float("nan"))
        monkeypatch.setattr(cgan, "update_ema", poisoning)
    else:
        update_bn = cgan.update_bn
        monkeypatch.setattr(cgan, "update_bn", lambda loader, model: update_bn(loader, model) or poison_batchnorm(model, "running_mean"))
    out = tmp_path / "o"
    line = error_line(capsys, "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "2", "--log_interval", "1",
                      "--dtype", "float32", *TINY)
    assert "non-finite loss or weights by step 2" in line  # the log rows of steps 1 and 2 were finite
    assert len(read_log(out)) == 2 and not (out / "ckpt.pt").exists()


@pytest.mark.parametrize("flags", [[], ["--model", "infogan"], ["--model", "infogan", "--three_optimizers"]])
def test_D_is_frozen_during_G_update(tiny_mnist, tmp_path, monkeypatch, flags):
    # at each optimizer step, D's gradients and whether they are on; G's loss must add nothing to D's gradients
    records = []
    build = cgan.build_optimizers

    def recording(G, D, config):
        optimizers = build(G, D, config)
        for name, optimizer in optimizers.items():
            def step(*args, _name=name, _step=optimizer.step, **kwargs):
                records.append((_name, [None if p.grad is None else p.grad.clone() for p in D.parameters()],
                                {p.requires_grad for p in D.parameters()}))
                return _step(*args, **kwargs)
            optimizer.step = step
        return optimizers
    monkeypatch.setattr(cgan, "build_optimizers", recording)
    train("--data_dir", tiny_mnist, "--out_dir", tmp_path / "o", "--max_iters", "3", "--dtype", "float32", *TINY, *flags)
    updates = ["D", "G", "Q"] if "--three_optimizers" in flags else ["D", "G"]
    assert [name for name, _, _ in records] == updates * 3
    for i in range(0, len(records), len(updates)):
        (_, d_grads, d_on), (_, g_grads, g_on), *q = records[i:i + len(updates)]
        assert d_on == {True} and g_on == {False} and all(on == {True} for _, _, on in q)  # unfrozen after G's update
        assert all(a is not None and torch.equal(a, b) for a, b in zip(d_grads, g_grads))
    if "--three_optimizers" in flags:  # the Q update reaches D's body and Q head: D was unfrozen for it
        assert not all(torch.equal(a, b) for a, b in zip(records[1][1], records[2][1]))


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_dtype_auto_takes_the_faster_precision_on_a_bfloat16_cpu(tiny_mnist, tmp_path, monkeypatch, faster):
    trials = []

    def fake_time_trial(step, device, dtype):
        step()  # the trial step runs, on copies of the networks
        trials.append(dtype)
        return 10.0 if dtype == faster else 20.0
    monkeypatch.setattr(cgan, "cpu_computes_bfloat16", lambda: True)
    monkeypatch.setattr(cgan, "time_trial", fake_time_trial)
    common = ["--data_dir", tiny_mnist, "--max_iters", "2", "--log_interval", "1", *TINY]
    train("--out_dir", tmp_path / "auto", "--dtype", "auto", *common)
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["precision"] == faster and sorted(trials) == ["bfloat16", "float32"]
    assert config["dtype_trial_ms"] == {"float32": 10.0 if faster == "float32" else 20.0,
                                        "bfloat16": 10.0 if faster == "bfloat16" else 20.0}
    if faster == "float32":  # the trial touched neither the networks nor the random streams
        train("--out_dir", tmp_path / "fp32", "--dtype", "float32", *common)
        assert without_timing(read_log(tmp_path / "auto")) == without_timing(read_log(tmp_path / "fp32"))
        a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("auto", "fp32"))
        for group in ("models", "ema"):  # batch-norm statistics included
            assert all(torch.equal(v, b[group][net][k]) for net in a[group] for k, v in a[group][net].items()), group


INT_FLAGS = ["img_size", "nz", "cat_codes", "cat_dim", "cont_codes", "ngf", "ndf", "batch_size", "max_iters",
             "log_interval", "sample_interval", "ckpt_interval", "seed"]
FLOAT_FLAGS = ["lambda_cat", "lambda_cont", "class_weight", "leaky_slope", "lr", "beta1", "beta2", "ema_decay"]


def numeric_flags(monkeypatch):
    """The flags of get_args' parser whose type is int or a number(...) range."""
    parsers = []
    parse_args = cgan.argparse.ArgumentParser.parse_args
    monkeypatch.setattr(cgan.argparse.ArgumentParser, "parse_args", lambda self, *a: parsers.append(self) or parse_args(self, *a))
    cgan.get_args([])
    monkeypatch.undo()
    return {a.dest for a in parsers[0]._actions if a.type is int or "number" in getattr(a.type, "__qualname__", "")}


def test_fuzz_numeric_flags_end_normally_or_in_one_line(tiny_mnist, tmp_path, monkeypatch, capsys):
    assert numeric_flags(monkeypatch) == set(INT_FLAGS + FLOAT_FLAGS)  # every int and float flag is fuzzed
    common = ["--data_dir", tiny_mnist, "--max_iters", "2", "--dtype", "float32", *TINY]
    # --max_iters 1e9 is a valid, very long run: a process of its own, alongside the others, must train (its first
    # log row, with the time left) and show no traceback
    long_run = subprocess.Popen([sys.executable, "cgan.py", *map(str, common), "--out_dir", tmp_path / "long", "--max_iters",
                                 "1000000000", "--log_interval", "10"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = []

    def read_stdout():
        for line in long_run.stdout:
            printed.append(line)
    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    outcomes = {}
    try:
        for model in ("acgan", "infogan"):
            for flag in INT_FLAGS + FLOAT_FLAGS:
                for value in ("0", "-1", "1000000000" if flag in INT_FLAGS else "1e9"):
                    if (flag, value) == ("max_iters", "1000000000"):
                        continue
                    capsys.readouterr()
                    try:
                        train("--model", model, *common, "--out_dir", tmp_path / f"{model}{flag}{value}", f"--{flag}", value)
                        outcomes[model, flag, value] = "ran"
                    except SystemExit as e:  # anything else (a traceback) fails the test here
                        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
                        assert e.code != 0 and len(lines) == 1 and lines[0].startswith("cgan.py: error: "), (flag, value, lines)
                        outcomes[model, flag, value] = lines[0]
        deadline = time.time() + 300  # until it has logged its first row: it trains
        while long_run.poll() is None and time.time() < deadline and not any(line.startswith("step ") for line in printed):
            time.sleep(0.1)
    finally:
        long_run.kill()
        reader.join()
    stderr = long_run.communicate()[1]
    assert long_run.returncode in (0, -signal.SIGKILL) and "Traceback" not in stderr, stderr
    assert any(line.startswith("step 10/1000000000 |") and " left" in line for line in printed), printed
    ran = {key for key, outcome in outcomes.items() if outcome == "ran"}
    assert {("infogan", "cat_codes", "0"), ("acgan", "ema_decay", "0"), ("acgan", "seed", "-1"), ("acgan", "seed", "1000000000"),
            ("infogan", "lambda_cat", "1e9"), ("acgan", "log_interval", "1000000000")} <= ran, sorted(ran)
    assert "--nz: 0 is outside" in outcomes["acgan", "nz", "0"] and "--ngf: 1000000000 is outside" in outcomes["acgan", "ngf", "1000000000"]


def test_class_flags_reach_the_training_loop(tiny_mnist, tmp_path, monkeypatch):
    seen = []
    original_D, original_G = cgan.acgan_discriminator_loss, cgan.acgan_generator_loss
    monkeypatch.setattr(cgan, "acgan_discriminator_loss", lambda *a: seen.append(("D", a[-1])) or original_D(*a))
    monkeypatch.setattr(cgan, "acgan_generator_loss", lambda *a: seen.append(("G", a[-1])) or original_G(*a))
    common = ["--data_dir", tiny_mnist, "--max_iters", "1", "--dtype", "float32", *TINY]
    train(*common, "--out_dir", tmp_path / "a")
    assert seen == [("D", False), ("G", 0.1)]
    seen.clear()
    train(*common, "--out_dir", tmp_path / "b", "--class_of_fakes", "--class_weight", "0.3")
    assert seen == [("D", True), ("G", 0.3)]
