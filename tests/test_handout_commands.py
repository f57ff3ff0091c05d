"""The handout commands in docs/handouts.md set each handout's values in full.

HANDOUT_RUNS below is the one table of what each assignment asks for. Every command in docs/handouts.md
(or in the README) written under a comment that names an assignment must appear in it (by its --out_dir),
and must parse to its values, so the commands cannot drift from the handouts. Where a handout gives
epochs, --max_iters is that many epochs of the dataset the command prepares.
"""
import re
import shlex
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

ASSIGNMENTS = ["MNIST homework", "CIS 680", "DLCV HW4", "2018 assignment", "CSI5340"]


def iterations(epochs, images, batch_size):
    return round(epochs * images / batch_size)


DLCV_FACES = 40_000     # DLCV HW4's faces: 40,000 training images, 2,621 test images
CIS680_FACES = 20_000   # CIS 680's super-resolution split: 20k train / 1k test
CELEBA_TRAIN = 192_469  # all 202,599 CelebA faces less data/celeba/prepare.py's default 5 % test split
CELEBA_EPOCHS = 25      # the 2018 assignment gives no length: 25 epochs, DCGAN-tensorflow's default

GAN_HANDOUT = dict(lr=2e-4, beta1=0.5, ema_decay=0.0, augment="none")
DCGAN_HANDOUT = dict(GAN_HANDOUT, d_lr_scale=1.0, lr_decay=0.0)  # one lr, constant
DLCV_GAN = dict(GAN_HANDOUT, dataset="celeba/dlcv", img_size=64, batch_size=64, nz=100, leaky_slope=0.1)

HANDOUT_RUNS = {
    # The MNIST DCGAN homework: latent-dim and hidden-dim 16 by default, then 100 (four runs), and an MLP GAN.
    "out/dcgan_z16_h16": ("dcgan", dict(DCGAN_HANDOUT, dataset="mnist", img_size=32, nz=16, ngf=16, ndf=16)),
    "out/dcgan_z100_h16": ("dcgan", dict(DCGAN_HANDOUT, dataset="mnist", img_size=32, nz=100, ngf=16, ndf=16)),
    "out/dcgan_z16_h100": ("dcgan", dict(DCGAN_HANDOUT, dataset="mnist", img_size=32, nz=16, ngf=100, ndf=100)),
    "out/dcgan_z100_h100": ("dcgan", dict(DCGAN_HANDOUT, dataset="mnist", img_size=32, nz=100, ngf=100, ndf=100)),
    "out/dcgan_mlp": ("dcgan", dict(DCGAN_HANDOUT, dataset="mnist", arch="mlp")),
    # CIS 680 assignment 4: the MLP VAE (784-400-20-400-784, KL 1:1); DCGAN on STL-10 at 64x64, generator
    # 1024-512-256-128-3, "batch size of 128, input noise of 100 dimension and Adam ... 2e-4";
    # super-resolution with "batch size of 32, 100 epochs, and Adam optimizer with 2e-4 learning rate".
    "out/vae": ("vae", dict(arch="mlp", latent_dim=20, kl_weight=1.0, recon="bce")),
    "out/dcgan_stl10": ("dcgan", dict(DCGAN_HANDOUT, dataset="stl10", img_size=64, ngf=128, ndf=128, batch_size=128, nz=100)),
    "out/srgan_celeba": ("srgan", dict(dataset="celeba/cis680", batch_size=32, lr=2e-4, ema_decay=0.0, residual=False,
                                       max_iters=iterations(100, CIS680_FACES, 32))),
    # DLCV HW4: VAE "batch size 64 to train 200 epochs", 512 latents, lr 2e-4, MSE + 1e-2 KL (both means);
    # GAN "updating ratio between discriminator and generator is set to 1:2 ... batch size 64 to train 300 epochs";
    # ACGAN 1:1, 300 epochs, noise 100 + the smile bit; InfoGAN 64 noise + five 10-way codes, 300 epochs.
    "out/vae_faces": ("vae", dict(dataset="celeba/dlcv", img_size=64, arch="conv", depth=4, latent_dim=512, recon="mse",
                                  kl_weight=0.24, lr=2e-4, batch_size=64, max_iters=iterations(200, DLCV_FACES, 64))),
    "out/dcgan_celeba": ("dcgan", dict(DLCV_GAN, d_lr_scale=1.0, lr_decay=0.0, ngf=64, ndf=64, g_steps=2, max_iters=iterations(300, DLCV_FACES, 64))),
    "out/wgan_faces": ("wgan", dict(dataset="celeba/dlcv", img_size=64, batch_size=64, nz=100, ema_decay=0.0,
                                    augment="none", mode="gp", ngf=64, ndf=64, n_critic=5, lr=1e-4,
                                    max_iters=iterations(300, DLCV_FACES, 64) // 5)),
    "out/acgan_smiling": ("cgan", dict(DLCV_GAN, model="acgan", attr="Smiling", ngf=64, ndf=64, class_of_fakes=True,
                                       class_weight=1.0, max_iters=iterations(300, DLCV_FACES, 64))),
    "out/infogan_faces": ("cgan", dict(DLCV_GAN, model="infogan", nz=64, cat_codes=5, cat_dim=10, cont_codes=0, three_optimizers=True,
                                       max_iters=iterations(300, DLCV_FACES, 64))),
    "out/infogan_faces_mnist_setup": ("cgan", dict(DLCV_GAN, model="infogan", nz=62, cat_codes=1, cat_dim=10,
                                                   cont_codes=2, three_optimizers=True, max_iters=iterations(300, DLCV_FACES, 64))),
    # The 2018 image-generation assignment: 64x64 faces, "a latent dimension on the order of 10^2"; the three
    # upsampling schemes; LSGAN; WGAN with W_D clipped to [-0.05, 0.05]; IWAE with 5 importance samples; flows.
    "out/dcgan_convtranspose": ("dcgan", dict(DCGAN_HANDOUT, dataset="celeba", img_size=64, upsample="convtranspose",
                                              batch_size=128, max_iters=iterations(CELEBA_EPOCHS, CELEBA_TRAIN, 128))),
    "out/dcgan_nearest": ("dcgan", dict(DCGAN_HANDOUT, dataset="celeba", img_size=64, upsample="nearest", batch_size=128,
                                        max_iters=iterations(CELEBA_EPOCHS, CELEBA_TRAIN, 128))),
    "out/dcgan_bilinear": ("dcgan", dict(DCGAN_HANDOUT, dataset="celeba", img_size=64, upsample="bilinear", batch_size=128,
                                         max_iters=iterations(CELEBA_EPOCHS, CELEBA_TRAIN, 128))),
    "out/dcgan_lsgan": ("dcgan", dict(DCGAN_HANDOUT, dataset="celeba", img_size=64, loss="lsgan", batch_size=128,
                                      max_iters=iterations(CELEBA_EPOCHS, CELEBA_TRAIN, 128))),
    "out/wgan_clip05": ("wgan", dict(mode="clip", clip=0.05, ema_decay=0.0, augment="none")),
    "out/wgan_faces_clip": ("wgan", dict(mode="clip", clip=0.05, dataset="celeba", img_size=64, batch_size=64,
                                         upsample="nearest", ema_decay=0.0, augment="none",
                                         max_iters=iterations(CELEBA_EPOCHS, CELEBA_TRAIN, 64) // 5)),
    "out/vae_iwae": ("vae", dict(iw_k=5)),
    "out/vae_planar": ("vae", dict(flow="planar")),
    "out/vae_iaf": ("vae", dict(flow="iaf")),
    "out/vae_nearest": ("vae", dict(dataset="celeba", img_size=64, arch="conv", latent_dim=100, upsample="nearest",
                                    max_iters=iterations(CELEBA_EPOCHS, CELEBA_TRAIN, 64))),
    # CSI5340 assignment 4: "z_dim = 100, lr = 3e-4, depth = 5" on MNIST, "as deep as five layers and as shallow
    # as one"; its GAN loss is mse on D's sigmoid (no batch size or length given).
    **{f"out/dcgan_depth{d}": ("dcgan", dict(DCGAN_HANDOUT, dataset="mnist", depth=d, nz=100, lr=3e-4, loss="sigmoid_mse"))
       for d in range(1, 6)},
    **{f"out/wgan_depth{d}": ("wgan", dict(dataset="mnist", depth=d, nz=100, lr=3e-4, n_critic=5, ema_decay=0.0,
                                           augment="none"))
       for d in range(1, 6)},
    **{f"out/vae_csi5340_depth{d}": ("vae", dict(arch="csi5340", depth=d, latent_dim=100, lr=3e-4, recon="mse_mean"))
       for d in range(1, 6)},
}


HANDOUTS = REPO / "docs" / "handouts.md"  # where the assignment commands live
README = REPO / "README.md"


def handout_commands(path):
    """(assignment named by the comment above, script, argv) for each command of `path` under such a comment."""
    commands, heading, in_code, after_comment = [], None, False, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code, heading = not in_code, None
            continue
        if not in_code:
            continue
        if line.startswith("#"):  # a comment's second line continues its heading
            named = next((name for name in ASSIGNMENTS if name in line), None)
            heading, after_comment = named or (heading if after_comment else None), True
            continue
        after_comment = False
        loop = re.match(r"for (\w+) in ([\w ]+); do (.*); done", line.strip())
        variants = [(loop.group(3), loop.group(1), value) for value in loop.group(2).split()] if loop else [(line, None, None)]
        for text, variable, value in variants:
            tokens = shlex.split(text.split(" #")[0])
            if variable:
                tokens = [t.replace(f"${variable}", value) for t in tokens]
            if heading and len(tokens) >= 2 and tokens[0] == "python" and not tokens[1].startswith("data/"):
                commands.append((heading, tokens[1][:-3], tokens[2:]))
    return commands


COMMANDS = handout_commands(HANDOUTS)
README_COMMANDS = handout_commands(README)  # the README may show one, under an assignment's name, too


def out_dir_of(script, argv):
    return __import__(script).get_args(argv).out_dir or f"out/{script}"


def handout_value(script, argv, flag, value):
    """What the script's parser makes of the handout's value of `flag` (a flag may convert its text, e.g.
    --augment none into an empty policy): the value typed after the shown command, where argparse keeps the last."""
    if isinstance(value, bool):  # store_true flags take no value
        return value
    return getattr(__import__(script).get_args([*argv, f"--{flag}", str(value)]), flag)


def test_the_readme_points_to_the_handout_commands():
    assert "docs/handouts.md" in README.read_text()


def test_every_assignment_has_commands_and_every_command_is_in_the_table():
    assert {heading for heading, _, _ in COMMANDS} == set(ASSIGNMENTS)
    unlisted = [f"python {s}.py {' '.join(a)}" for _, s, a in COMMANDS + README_COMMANDS if out_dir_of(s, a) not in HANDOUT_RUNS]
    assert not unlisted, f"handout commands missing from HANDOUT_RUNS: {unlisted}"


@pytest.mark.parametrize("out_dir", sorted(HANDOUT_RUNS))
def test_handout_command_sets_the_handout_values(out_dir):
    script, expected = HANDOUT_RUNS[out_dir]
    shown = [argv for _, s, argv in COMMANDS if s == script and out_dir_of(s, argv) == out_dir]
    assert len(shown) == 1, f"{out_dir}: {len(shown)} commands in docs/handouts.md under an assignment's comment"
    also = [argv for _, s, argv in README_COMMANDS if s == script and out_dir_of(s, argv) == out_dir]
    for argv in shown + also:
        args = __import__(script).get_args(argv)
        wrong = {flag: (getattr(args, flag), value) for flag, value in expected.items()
                 if getattr(args, flag) != handout_value(script, argv, flag, value)}
        assert not wrong, f"python {script}.py {' '.join(argv)}: (flag: shown, handout) {wrong}"
