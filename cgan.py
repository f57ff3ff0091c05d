"""Conditional GANs on dcgan.py's networks. ACGAN (Odena et al. 2017): G gets a class, a second head on D classifies.
InfoGAN (Chen et al. 2016): G gets latent codes, a Q head on D recovers them.

    python cgan.py                          # ACGAN on the MNIST sample: one class per digit
    python cgan.py --model infogan          # InfoGAN: 62 noise + one 10-way code + 2 continuous codes
    torchrun --nproc_per_node=2 cgan.py     # DistributedDataParallel

--out_dir gets ckpt.pt, samples/step_*.png, log.jsonl, config.json.
"""
import argparse, copy, io, json, math, os, sys, time, timeit

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

SCRIPT = "cgan"
CHECKPOINT_FORMAT = 2

# -----------------------------------------------------------------------------
# Data: data/<dataset>/{train,test}.npy, uint8 N x H x W x C, held on the device
def load_images(data_dir, dataset, split, img_size):
    """data/<dataset>/<split>.npy as uint8 N x C x H x W at img_size, and <split>_labels.npy (None where absent)."""
    prepare = f"python {os.path.join(data_dir, dataset.split('/')[0], 'prepare.py')}"  # data/folder/<name>: folder's
    path, labels_path = (os.path.join(data_dir, dataset, f"{split}{suffix}.npy") for suffix in ("", "_labels"))
    if not os.path.isdir(data_dir) or not os.path.exists(path):
        raise FileNotFoundError(f"no {split} split of '{dataset}' at {path}; make it with: {prepare}")
    arrays = []
    for file in (path, labels_path)[:1 + os.path.exists(labels_path)]:
        try:
            arrays.append(np.load(file))
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"cannot read {file} ({e}); remake it with: {prepare}") from None
    images, labels = arrays[0], arrays[1] if len(arrays) > 1 else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path} should hold uint8 N x H x W x C, C = 1 or 3, not {images.dtype} {images.shape}; "
                         f"remake it with: {prepare}")
    if labels is not None and labels.shape[:1] != images.shape[:1]:
        raise ValueError(f"{labels_path} has {len(labels)} labels for {len(images)} images; remake it with: {prepare}")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if images.shape[-2:] != (img_size, img_size):
        images = resize_uint8(images, img_size)
    return images, None if labels is None else torch.from_numpy(labels).long()

def resize_uint8(images, size, chunk=1024):
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out

def class_labels(config, labels):
    """-> (each image's class id, the class names). Labels (N,) are the classes, -1 an unlabelled image (trains D's
    source head only); attributes (N x 40 in {0, 1}, named in attr_names.json) give "not <attr>" and "<attr>"."""
    data_dir, dataset, attr = config["data_dir"], config["dataset"], config["attr"]
    if labels is None or labels.ndim == 1 and not (labels >= 0).any():
        raise ValueError(f"'{dataset}' has no labelled image; ACGAN needs labels (InfoGAN does not: --model infogan)")
    if labels.ndim == 1:
        if attr:
            raise ValueError(f"--attr {attr}: '{dataset}' has one class label per image, not attributes")
        if labels.min() < -1:
            raise ValueError(f"'{dataset}' has label {int(labels.min())}: a label is a class id 0, 1, ... or -1")
        return labels, [str(c) for c in range(int(labels.max()) + 1)]
    if not attr:
        raise ValueError(f"'{dataset}' has {labels.shape[1]} attributes per image: pick one with --attr, e.g. Smiling")
    names_path = os.path.join(data_dir, dataset, "attr_names.json")
    try:
        with open(names_path) as f:
            names = json.load(f)
    except (OSError, ValueError):
        raise FileNotFoundError(f"--attr needs the attribute names in {names_path}; remake them with: python "
                                f"{os.path.join(data_dir, dataset, 'prepare.py')}") from None
    if attr not in names:
        raise ValueError(f"--attr {attr} is not an attribute of '{dataset}'; choose from: {', '.join(names)}")
    return labels[:, names.index(attr)], [f"not {attr}", attr]

def real_images(config, split):
    """The checkpoint's data; for ACGAN the labels are the classes it was conditioned on (the --attr column)."""
    images, labels = load_images(config["data_dir"], config["dataset"], split, config["img_size"])
    return images, class_labels(config, labels)[0] if config["n_classes"] else labels

def to_unit_range(images_uint8):
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's tanh."""
    return images_uint8.float().div(127.5).sub(1.0)

# -----------------------------------------------------------------------------
# Models: dcgan.py's networks; G's one input is z ++ the one-hot class (ACGAN), D has a second head.
# InfoGAN's z: noise (nz) ++ cat_codes one-hot blocks of cat_dim ++ cont_codes values in U(-1, 1).
def latent_layout(config):
    """The slices of z: [{"name", "kind": "noise" | "categorical" | "continuous", "start", "size"}]."""
    info = config["model"] == "infogan"
    parts = [("noise", "noise", config["nz"])]
    parts += [(f"cat{i}", "categorical", config["cat_dim"]) for i in range(info * config["cat_codes"])]
    parts += [(f"cont{i}", "continuous", 1) for i in range(info * config["cont_codes"])]
    starts = np.cumsum([0] + [size for *_, size in parts]).tolist()
    return [dict(name=name, kind=kind, start=start, size=size) for (name, kind, size), start in zip(parts, starts)]

def split_codes(z, config):
    """z -> (noise, categorical ids (N, cat_codes) int64, continuous codes (N, cont_codes))."""
    nz, k, d = config["nz"], config["cat_codes"], config["cat_dim"]
    return z[:, :nz], z[:, nz:nz + k * d].reshape(len(z), k, d).argmax(-1), z[:, nz + k * d:]

def sample_latent(config, n, device, generator=None):
    z = torch.randn(n, config["nz"], device=device, generator=generator)
    if config["model"] != "infogan":
        return z
    cat = torch.randint(0, config["cat_dim"], (n, config["cat_codes"]), device=device, generator=generator)
    cont = torch.rand(n, config["cont_codes"], device=device, generator=generator) * 2 - 1
    return torch.cat([z, F.one_hot(cat, config["cat_dim"]).float().flatten(1), cont], 1)

def sample_labels(config, n, device, generator=None):
    """ACGAN: uniformly drawn classes for G. InfoGAN: None."""
    n_classes = config["n_classes"]
    return torch.randint(0, n_classes, (n,), device=device, generator=generator) if n_classes else None

def g_input(z, labels, n_classes):
    return torch.cat([z, F.one_hot(labels, n_classes).to(z.dtype)], 1) if n_classes else z

class Generator(nn.Sequential):
    """G's input (in_dim) -> image in [-1, 1], dcgan.py's generator: in -> (ngf * img_size / 8) x 4 x 4, each layer
    then doubling the size and halving the width, to ngf x img_size/2 squared and C x img_size x img_size."""

    def __init__(self, in_dim, n_classes, ngf, channels, img_size):
        width = ngf * img_size // 8
        layers = [nn.Unflatten(1, (in_dim, 1, 1)), nn.ConvTranspose2d(in_dim, width, 4, 1, 0, bias=False),
                  nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(int(math.log2(img_size)) - 3):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(True)]
            width //= 2
        super().__init__(*layers, nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh())
        self.n_classes = n_classes  # the one-hot class at the end of the input (0: none)

class Discriminator(nn.Module):
    """image -> (source logit, class logits (ACGAN) or Q's code logits ++ continuous means (InfoGAN)): two heads on
    dcgan.py's discriminator body (C x img_size x img_size -> ndf x img_size/2 squared -> ... -> width x 4 x 4)."""

    def __init__(self, ndf, channels, img_size, aux_dim, infogan, slope):
        super().__init__()
        layers, width = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(slope, True)], ndf
        for _ in range(int(math.log2(img_size)) - 3):
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
                       nn.LeakyReLU(slope, True)]
            width *= 2
        self.body, self.source = nn.Sequential(*layers), nn.Conv2d(width, 1, 4, 1, 0, bias=False)
        self.aux = (nn.Sequential(nn.Conv2d(width, 128, 4, 1, 0, bias=False), nn.BatchNorm2d(128),
                                  nn.LeakyReLU(slope, True), nn.Conv2d(128, aux_dim, 1))
                    if infogan else nn.Conv2d(width, aux_dim, 4, 1, 0))

    def forward(self, x):
        h = self.body(x)
        return self.source(h).flatten(), self.aux(h).flatten(1)

def init_weights(module):
    """N(0, 0.02) for conv weights, N(1, 0.02) for batch-norm scales, zero biases (Radford et al. §4)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0 if isinstance(module, nn.BatchNorm2d) else 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

def build_models(config):
    c, s, n_classes = config["channels"], config["img_size"], config["n_classes"]
    in_dim = sum(part["size"] for part in latent_layout(config)) + n_classes  # D's second head: the rest
    G = Generator(in_dim, n_classes, config["ngf"], c, s)
    D = Discriminator(config["ndf"], c, s, in_dim - config["nz"], config["model"] == "infogan", config["leaky_slope"])
    return {"G": G.apply(init_weights), "D": D.apply(init_weights)}

def build_optimizers(G, D, config):
    """Adam for G and D. --three_optimizers: D's holds only its body and source head, and a third, Q, holds G and the
    Q head, the only one to minimise the information term, which so never trains D's body."""
    parts = {"G": [G], "D": [D.body, D.source], "Q": [G, D.aux]} if config["three_optimizers"] else {"G": [G], "D": [D]}
    betas = (config["beta1"], config["beta2"])
    return {name: torch.optim.Adam([p for m in modules for p in m.parameters()], config["lr"], betas)
            for name, modules in parts.items()}

@torch.no_grad()
def generate(models, z, labels=None):
    """Images in [0, 1]. ACGAN: labels are class ids (int64, (n,)); None gives the classes 0, 1, 2, ... in turn."""
    n_classes = models["G"].n_classes
    if n_classes and labels is None:
        labels = torch.arange(len(z), device=z.device) % n_classes
    return models["G"](g_input(z, labels, n_classes)).float().add(1).div(2).clamp(0, 1)

# -----------------------------------------------------------------------------
# Losses. D's source head outputs logits: D(x) = sigmoid(logit).
def gan_discriminator_loss(real_logits, fake_logits):
    """-E[log D(x)] - E[log(1 - D(G(z)))]"""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()

def gan_generator_loss(fake_logits):
    """The non-saturating -E[log D(G(z))] (the log-D trick)."""
    return F.softplus(-fake_logits).mean()

def labelled_cross_entropy(class_logits, labels):
    """Cross-entropy over the labelled images (label -1 adds nothing); 0, not 0 / 0, for a batch without any."""
    labelled = (labels >= 0).sum().clamp(min=1)
    return F.cross_entropy(class_logits, labels, ignore_index=-1, reduction="sum") / labelled

def acgan_discriminator_loss(real_logits, fake_logits, real_class_logits, fake_class_logits, real_labels, fake_labels,
                             class_of_fakes=True):
    """D maximises L_S + L_C (Odena et al. eq. 2-3): the right source, and the right class of real (where labelled)
    and fake images. For a binary attribute the two-way softmax is the sigmoid cross-entropy on one logit."""
    return (gan_discriminator_loss(real_logits, fake_logits) + labelled_cross_entropy(real_class_logits, real_labels)
            + (F.cross_entropy(fake_class_logits, fake_labels) if class_of_fakes else 0))

def acgan_generator_loss(fake_logits, fake_class_logits, fake_labels, class_weight=1.0):
    """G maximises L_C - L_S (non-saturating): its fakes taken for real, of the class it asked for."""
    return gan_generator_loss(fake_logits) + class_weight * F.cross_entropy(fake_class_logits, fake_labels)

def info_loss(q_out, z, config):
    """-L_I + H(c), the negative lower bound on I(c; G(z, c)) less c's constant entropy, summed over codes: the
    cross-entropy of the categorical ones (x lambda_cat), 0.5 (c - mu)^2 of the continuous ones (x lambda_cont)."""
    _, cat, cont = split_codes(z, config)
    k, d = config["cat_codes"], config["cat_dim"]
    loss = config["lambda_cont"] * 0.5 * (cont - q_out[:, k * d:]).pow(2).sum(1).mean()  # 0 without continuous codes
    if k:  # (the cross-entropy of no categorical code would be the NaN of an empty mean)
        loss = loss + config["lambda_cat"] * k * F.cross_entropy(q_out[:, :k * d].reshape(-1, d), cat.reshape(-1))
    return loss

def unused(*outputs):
    """0 from outputs a loss leaves out: DDP waits for a gradient (here zero) of every parameter used forward."""
    return sum(output.sum() * 0 for output in outputs)

def class_accuracy(class_logits, labels):
    """How often the class head is right, over the labelled images (0 when a batch has none)."""
    labelled = labels >= 0
    return ((class_logits.argmax(1) == labels) & labelled).sum() / labelled.sum().clamp(min=1)

def code_accuracy(q_out, z, config):
    """How often Q's most likely category is the one G was given (over all categorical codes)."""
    _, cat, _ = split_codes(z, config)
    k, d = config["cat_codes"], config["cat_dim"]
    return (q_out[:, :k * d].reshape(len(z), k, d).argmax(-1) == cat).float().mean() if k else q_out.new_zeros(())

# -----------------------------------------------------------------------------
# Training aids that leave the model as defined: augmenting what D sees, and averaging G's weights
def augment_color(x):
    """Random brightness, saturation and contrast, per image (Zhao et al. 2020, DiffAugment)."""
    def rand():
        return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
    x = x + (rand() - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (rand() + 0.5) + mean

def augment_translation(x, ratio=0.125):
    """Shift each image by up to ratio * size pixels; the edge pixels fill the gap (the background on digits)."""
    n, c, h, w = x.shape
    shift = int(h * ratio + 0.5)
    dy, dx = (torch.randint(-shift, shift + 1, (n, 1, 1), device=x.device) for _ in range(2))
    rows = (torch.arange(h, device=x.device).view(1, h, 1) - dy).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) - dx).clamp(0, w - 1)
    source = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, source).view(n, c, h, w)

def augment_cutout(x, ratio=0.5):
    """Zero a square of ratio * size pixels at a random place in each image; it may hang over the edge."""
    n, _, h, w = x.shape
    size = int(h * ratio + 0.5)
    top, left = (torch.randint(-(size // 2), h - size // 2, (n, 1, 1), device=x.device) for _ in range(2))
    rows, cols = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)

AUGMENTATIONS = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}

def diff_augment(x, policy):
    """The same random, differentiable transforms on real and generated images before D sees them (Zhao et al.
    2020, DiffAugment): D cannot memorise a small training set, and G's gradient passes through the transforms."""
    for kind in policy:
        x = AUGMENTATIONS[kind](x)
    return x

def augment_policy(text):
    """'translation,cutout' -> ["translation", "cutout"]; 'none' -> []."""
    policy = [] if text == "none" else text.split(",")
    if any(kind not in AUGMENTATIONS for kind in policy):
        raise argparse.ArgumentTypeError(f"{text}: use none or a comma list of {', '.join(AUGMENTATIONS)}")
    return policy

@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * weights, for every parameter."""
    for averaged, current in zip(ema_model.parameters(), model.parameters()):
        averaged.lerp_(current, 1 - decay)

# -----------------------------------------------------------------------------
# Training
def get_args(argv=None, defaults=None):
    p = argparse.ArgumentParser(description="Train a conditional GAN: ACGAN or InfoGAN.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", default="acgan", choices=["acgan", "infogan"], help="class labels or latent codes")
    p.add_argument("--img_size", type=int, default=32, choices=[32, 64], help="32 or 64 (4 or 5 layers)")
    p.add_argument("--attr", help="ACGAN on attribute data (celeba): the binary attribute to condition on (Smiling)")
    p.add_argument("--nz", type=number(int, 1, 4096), help="noise size; unset: 100 (acgan), 62 (infogan, Chen et al.)")
    p.add_argument("--cat_codes", type=number(int, 0, 100), default=1, help="InfoGAN: number of categorical codes")
    p.add_argument("--cat_dim", type=number(int, 1, 1000), default=10, help="InfoGAN: categories per categorical code")
    p.add_argument("--cont_codes", type=number(int, 0, 100), default=2, help="InfoGAN: continuous codes, each U(-1, 1)")
    p.add_argument("--lambda_cat", type=number(float, 0), default=1.0, help="InfoGAN: weight of the categorical term")
    p.add_argument("--lambda_cont", type=number(float, 0), default=1.0, help="InfoGAN: weight of the continuous term")
    p.add_argument("--three_optimizers", action="store_true", help="InfoGAN: a third optimizer for info loss")
    p.add_argument("--ngf", type=number(int, 1, 4096), default=32, help="G's width before its output layer")
    p.add_argument("--ndf", type=number(int, 1, 4096), default=32, help="discriminator width of its first layer")
    p.add_argument("--leaky_slope", type=FRACTION, default=0.2, help="negative slope of D's LeakyReLUs (Q head too)")
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=2e-4, help="Adam learning rate")
    p.add_argument("--beta1", type=FRACTION, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=FRACTION, default=0.999, help="Adam beta2")
    p.add_argument("--augment", type=augment_policy, default="translation,cutout",
                   help="DiffAugment of what D sees: none, or a comma list of color, translation, cutout")
    p.add_argument("--class_of_fakes", action=argparse.BooleanOptionalAction, default=False,
                   help="ACGAN: D's class head also learns the fakes' classes, as in Odena et al.")
    p.add_argument("--class_weight", type=number(float, 0), default=0.1, help="ACGAN: weight of G's class term "
                   "(Odena et al.: 1); with the two defaults FID 44.5 -> 34.3 on the digits (docs/cgan.md)")
    p.add_argument("--ema_decay", type=FRACTION, default=0.999, help="G's weight average; 0: off")
    args = parse_run_flags(p, argv, defaults, batch_size=64, max_iters=5000)
    if args.nz is None:
        args.nz = 100 if args.model == "acgan" else 62
    if args.model == "infogan" and args.cat_codes + args.cont_codes == 0:
        fail("InfoGAN needs at least one code: --cat_codes or --cont_codes")
    if args.model == "acgan" and args.three_optimizers:
        fail("--three_optimizers trains InfoGAN's Q head with an optimizer of its own; ACGAN trains with two")
    if args.model == "infogan" and args.attr:
        fail(f"--attr {args.attr} conditions ACGAN on an attribute; InfoGAN learns its codes without labels")
    return args

def fixed_inputs(config, n, batch, seed):
    """n batches of G's input, latents and classes drawn as in training, from a stream of their own."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([g_input(sample_latent(config, batch, "cpu", g), sample_labels(config, batch, "cpu", g),
                                config["n_classes"]) for _ in range(n)])

def main(argv=None):
    config, ckpt = parse_config(get_args, argv)
    device, rank, world = setup_distributed(config)
    ddp, master, out_dir, local_batch = world > 1, rank == 0, config["out_dir"], config["batch_size"] // world
    data, labels = train_data(config, device)
    try:  # ACGAN: the class of each image, and their names
        labels, config["class_names"] = class_labels(config, labels) if config["model"] == "acgan" else (None, [])
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    n_classes = config["n_classes"] = len(config["class_names"])
    acgan, three, policy = n_classes > 0, config["three_optimizers"], config["augment"]
    torch.manual_seed(config["seed"])  # the same initial weights on every rank, so the EMA starts from DDP's
    models = {name: m.to(device, memory_format=torch.channels_last) for name, m in build_models(config).items()}
    if rank:  # from here each rank draws its own noise; rank 0 goes on as a single process does
        torch.manual_seed(config["seed"] + rank)
    G, D = models["G"], models["D"]
    optimizers = build_optimizers(G, D, config)
    ema = {"G": copy.deepcopy(G).eval().requires_grad_(False)} if config["ema_decay"] else {}
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    state = {"models": models, "optimizers": optimizers, "ema": ema}  # what a checkpoint holds and restores
    step, window = restore(ckpt, config, state, data_gen, device)
    bn_inputs = fixed_inputs(config, 10, local_batch, config["seed"] + 1)  # the EMA generator's batch-norm statistics
    trial = [copy.deepcopy(G), copy.deepcopy(D), bn_inputs[0].to(device)]
    autocast = choose_precision(config, device, lambda: sum(o.sum() for o in trial[1](trial[0](trial[2]))).backward())
    fixed_z = sample_latent(config, 36, "cpu", torch.Generator().manual_seed(config["seed"])).to(device)  # the grids'
    G_train, D_train = (torch.compile(G), torch.compile(D)) if config["compile"] else (G, D)
    D_judge = D_train  # D in G's update: outside DDP, since its frozen weights get no gradient there
    if ddp:
        G_train, D_train = (torch.nn.parallel.DistributedDataParallel(m) for m in (G_train, D_train))
    log_path = prepare_out_dir(config, step) if master else None
    t0, timed = time.perf_counter(), 0
    while step < config["max_iters"]:
        # (1) Update D: the right source of real and fake images, and their class (ACGAN) or the fakes' codes (InfoGAN)
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        real = to_unit_range(data[idx]).contiguous(memory_format=torch.channels_last)
        real_labels = labels[idx] if acgan else None
        z, fake_labels = sample_latent(config, local_batch, device), sample_labels(config, local_batch, device)
        with autocast:
            fake = G_train(g_input(z, fake_labels, n_classes))  # keeps its graph: G's update reuses these fakes
            real_logits, real_aux = (out.float() for out in D_train(diff_augment(real, policy)))
            fake_logits, fake_aux = (out.float() for out in D_train(diff_augment(fake.detach(), policy)))
            if acgan:
                loss_D = acgan_discriminator_loss(real_logits, fake_logits, real_aux, fake_aux, real_labels,
                                                  fake_labels, config["class_of_fakes"])
            else:  # --three_optimizers: the GAN loss alone (and a zero gradient for the Q head, for DDP)
                info = unused(real_aux, fake_aux) if three else info_loss(fake_aux, z, config)
                loss_D = gan_discriminator_loss(real_logits, fake_logits) + info
        optimizers["D"].zero_grad(set_to_none=True)
        loss_D.backward()
        optimizers["D"].step()

        # (2) Update G: the updated, frozen D should call its fakes real and see their class or codes
        D.requires_grad_(False)
        with autocast:
            fake_logits_G, fake_aux_G = (out.float() for out in D_judge(diff_augment(fake, policy)))
            if acgan:
                loss_G = acgan_generator_loss(fake_logits_G, fake_aux_G, fake_labels, config["class_weight"])
            else:
                loss_info = info_loss(fake_aux_G, z, config)
                loss_G = gan_generator_loss(fake_logits_G) + (0 if three else loss_info)
        optimizers["G"].zero_grad(set_to_none=True)
        loss_G.backward()
        optimizers["G"].step()
        D.requires_grad_(True)
        # (3) --three_optimizers: G and the Q head on the information term alone, from fakes of the moved G
        if three:
            with autocast:
                fake_logits_Q, fake_aux_G = (out.float() for out in D_train(diff_augment(G_train(z), policy)))
                loss_info = info_loss(fake_aux_G, z, config)  # logged, and acc_code, from this update
            optimizers["Q"].zero_grad(set_to_none=True)
            (loss_info + unused(fake_logits_Q)).backward()
            optimizers["Q"].step()
        if ema:
            update_ema(ema["G"], G, min(config["ema_decay"], (1 + step) / (10 + step)))  # short warm-up
        step, timed = step + 1, timed + 1
        heads = (dict(acc_real=class_accuracy(real_aux, real_labels), acc_fake=class_accuracy(fake_aux_G, fake_labels))
                 if acgan else dict(loss_info=loss_info, acc_code=code_accuracy(fake_aux_G, z, config)))
        D_x, D_G_z1, D_G_z2 = (torch.sigmoid(logits) for logits in (real_logits, fake_logits, fake_logits_G))
        accumulate(window, loss_D=loss_D, loss_G=loss_G, D_x=D_x, D_G_z1=D_G_z1, D_G_z2=D_G_z2, **heads)

        is_log, is_sample, is_ckpt = (step % config[k] == 0 or step == config["max_iters"] for k in INTERVALS)
        if is_log:
            check_finite(window, step, config)
            if master:
                write_log_row(log_path, step, window, time.perf_counter() - t0, timed, config)
            window, t0, timed = {}, time.perf_counter(), 0
        if ema and (is_sample or is_ckpt):  # the averaged weights need batch-norm statistics of their own
            update_bn(bn_inputs.to(device), ema["G"])
        if is_sample and master:
            G.eval()  # the grid: the classes 0, 1, 2, ... in reading order (ACGAN)
            save_grid(generate(ema or models, fixed_z), f"{out_dir}/samples/step_{step:06d}.png", nrow=6)
            G.train()
        if is_ckpt:
            save_checkpoint(config, step, state, data_gen, window, master)
    if ddp:
        del G_train, D_train  # DDP reducers must go before their process group, or exit can abort
        torch.distributed.destroy_process_group()
# -----------------------------------------------------------------------------
# Run plumbing, the same in every model script (tests/test_shared_helpers.py keeps it so)
INTERVALS = ("log_interval", "sample_interval", "ckpt_interval")
RESUMABLE = {"max_iters", "lr", "log_interval", "sample_interval", "ckpt_interval", "device", "dtype", "compile",
             "out_dir", "resume", "eval_images"}  # what a resumed run may change; the rest is the checkpoint's

def number(cast, low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a finite cast(text) from low to high, each end included unless open."""
    def parse(text):
        value = cast(text)
        above, below = (value > low if low_open else value >= low), (value < high if high_open else value <= high)
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text} is outside {'[('[low_open]}{low}, {high}{'])'[high_open]}")
        return value
    return parse

FRACTION = number(float, 0, 1, high_open=True)  # [0, 1)

def parse_run_flags(p, argv, defaults, batch_size, max_iters):
    """Add the flags every script has and parse; a resumed run passes its checkpoint's config as the defaults."""
    p.error = fail  # one line, not the usage
    p.add_argument("--dataset", default="mnist5k", help="folder under --data_dir holding train.npy / test.npy")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default=f"out/{SCRIPT}", help="checkpoint, samples, logs and curves go here")
    p.add_argument("--batch_size", type=number(int, 1, 65536), default=batch_size, help="images per step")
    p.add_argument("--max_iters", type=number(int, 1), default=max_iters, help="training iterations")
    p.add_argument("--log_interval", type=number(int, 1), default=100, help="iterations between log.jsonl rows")
    p.add_argument("--sample_interval", type=number(int, 1), default=1000, help="iterations between grids")
    p.add_argument("--ckpt_interval", type=number(int, 1), default=1000, help="iterations between checkpoints")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bfloat16 on CUDA, and on a CPU where a timed trial finds it faster")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT", help="continue from CKPT or --out_dir/ckpt.pt")
    p.set_defaults(**(defaults or {}))
    return p.parse_args(argv)

def parse_config(get_args, argv):
    """The flags as a dict, and the checkpoint to resume (None for a new run): its config becomes the parser's
    defaults and the flags are parsed again, so typed flags win."""
    args = get_args(argv)
    if not args.resume:
        return vars(args), None
    path = os.path.join(args.out_dir, "ckpt.pt") if args.resume == "auto" else args.resume
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        check_format(ckpt)
    except Exception as e:  # torch raises several types for a missing, torn or foreign file
        fail(f"--resume: cannot read checkpoint {path}: {str(e).splitlines()[0]}")
    config = vars(get_args(argv, ckpt["config"]))
    fixed = sorted(k for k, v in ckpt["config"].items() if k not in RESUMABLE and config[k] != v)
    if fixed:
        fail(f"--resume: --{fixed[0]} cannot change in a resumed run (the checkpoint has {ckpt['config'][fixed[0]]!r})")
    return config, ckpt

def check_format(ckpt):
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"this is not a format-{CHECKPOINT_FORMAT} {SCRIPT} checkpoint (an older {SCRIPT}.py or "
                         f"another script wrote it): start a new run, or use the version that wrote it")

def setup_distributed(config):
    """(device, rank, world size); under torchrun (WORLD_SIZE > 1) also joins the process group."""
    rank, world, name = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), config["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name, int(os.environ["LOCAL_RANK"])) if world > 1 and name == "cuda" else torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config["batch_size"] % world:
        fail(f"--batch_size {config['batch_size']} is not divisible by the {world} processes")
    return device, rank, world

def train_data(config, device):
    """The training images (and labels) on the device, to draw batches by index; sets config["channels"]."""
    try:
        images, labels = load_images(config["data_dir"], config["dataset"], "train", config["img_size"])
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if not len(images):
        fail(f"the train split of '{config['dataset']}' in {config['data_dir']} holds no images")
    config["channels"] = images.shape[1]
    return images.to(device), None if labels is None else labels.to(device)

def cpu_computes_bfloat16():
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX): only there is bfloat16 worth a trial."""
    return torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                     or torch.cpu._is_amx_tile_supported())

def time_trial(step, device, dtype):
    """Milliseconds of step() under autocast in dtype: the fastest of three calls after a warm-up call."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        step()
        return round(1000 * min(timeit.repeat(step, number=1, repeat=3)), 2)

def choose_precision(config, device, trial_step):
    """The autocast context of config["precision"]. --dtype auto: bfloat16 on CUDA where supported; on a CPU only
    where trial_step (a forward and backward of copies of the networks) runs >10% faster in it than in float32, as a
    CPU reporting avx512_bf16 can run it slower. A resumed run keeps its choice unless --dtype names one."""
    if config["dtype"] != "auto" or "precision" not in config:
        config["precision"], config["dtype_trial_ms"] = config["dtype"], {}
        if config["dtype"] == "auto" and device.type == "cpu" and cpu_computes_bfloat16():
            ms = config["dtype_trial_ms"] = {d: time_trial(trial_step, device, d) for d in ("float32", "bfloat16")}
            config["precision"] = "bfloat16" if ms["bfloat16"] * 1.1 < ms["float32"] else "float32"
        elif config["dtype"] == "auto":
            config["precision"] = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        if torch.distributed.is_initialized():  # every rank takes rank 0's choice
            choice = [config["precision"]]
            torch.distributed.broadcast_object_list(choice, src=0)
            config["precision"] = choice[0]
    print(f"--dtype {config['dtype']}: {config['precision']}" + (f" (trial step, ms: {config['dtype_trial_ms']})"
                                                                    if config["dtype_trial_ms"] else ""))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bfloat16")

def fixed_randn(seed, *shape):
    """Noise from a generator of its own, leaving the training stream untouched (grids, statistics, trials)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

def restore(ckpt, config, state, data_gen, device):
    """Load a checkpoint into the run's {group: {name: object}} -> (step, log window); a new run: (0, {})."""
    if ckpt is None:
        return 0, {}
    for group, objects in state.items():
        for name, obj in objects.items():
            obj.load_state_dict(ckpt[group][name])
    for group in (g for optimizer in state["optimizers"].values() for g in optimizer.param_groups):
        group["lr"] = config["lr"] * group.get("lr_scale", 1)  # --lr may change on resume
    if not torch.distributed.is_initialized():  # the saved streams are rank 0's; other ranks keep their own seeds
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["step"], dict(ckpt["log_window"])

def tensors_in(obj):
    if torch.is_tensor(obj):
        yield obj
    for item in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []:
        yield from tensors_in(item)

def check_finite(state, step, config):
    """Stop when a float anywhere in `state` is not finite on any process (the ranks agree, so none waits forever)."""
    finite = torch.tensor(float(all(t.isfinite().all() for t in tensors_in(state) if t.is_floating_point())),
                          device="cuda" if torch.cuda.is_initialized() else "cpu")  # NCCL reduces CUDA tensors only
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not finite.item():
        fail(f"non-finite loss or weights by step {step}; the last good checkpoint in {config['out_dir']} is kept; "
             f"try a lower --lr")

def save_checkpoint(config, step, state, data_gen, window, master, filename="ckpt.pt"):
    """Check everything about to be saved, on every process, then write a temporary file and rename it: a kill or a
    full disk mid-save never leaves a torn checkpoint."""
    ckpt = {"script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step, "log_window": window,
            **{group: {name: obj.state_dict() for name, obj in objects.items()} for group, objects in state.items()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_initialized() else {})}}
    check_finite(ckpt, step, config)
    path = os.path.join(config["out_dir"], filename)
    try:
        if master:
            buffer = io.BytesIO()  # serialised first: torch.save reports a full disk as a RuntimeError, open() clearly
            torch.save(ckpt, buffer)
            with open(path + ".tmp", "wb") as f:
                f.write(buffer.getbuffer())
            os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        fail(f"cannot save {path} ({e.strerror or e}); the previous checkpoint is kept")

def prepare_out_dir(config, step):
    """samples/, config.json, and log.jsonl holding the rows up to `step` (none for a new run)."""
    out_dir, log_path = config["out_dir"], os.path.join(config["out_dir"], "log.jsonl")
    try:
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        rows = open(log_path).readlines() if os.path.exists(log_path) else []
        with open(log_path, "w") as f:
            f.writelines(row for row in rows if row.endswith("\n") and json.loads(row)["step"] <= step)
    except OSError as e:
        fail(f"cannot write to --out_dir {out_dir}: {e.strerror or e}")
    return log_path

@torch.no_grad()
def accumulate(window, **values):
    """Add each value's mean to the log window's running sums, and count the step."""
    for name, value in values.items():
        window[name] = window.get(name, 0) + value.detach().float().mean()
    window["steps"] = window.get("steps", 0) + 1

def write_log_row(log_path, step, window, seconds, timed_steps, config):
    """Append the window's means to log.jsonl and print them, with the speed and the time left."""
    row = {"step": step, **{k: float(v) / window["steps"] for k, v in window.items() if k != "steps"},
           "ms_per_step": 1000 * seconds / timed_steps, "images_per_s": timed_steps * config["batch_size"] / seconds}
    if torch.cuda.is_initialized():
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(log_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    left = int(row["ms_per_step"] * (config["max_iters"] - step) / 1000)
    print(f"step {step}/{config['max_iters']} | " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")
          + f" | {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left", flush=True)

def save_grid(images, path, nrow=6, padding=2):
    """images in [0, 1] (N x C x H x W) -> one RGB PNG, nrow to a row with black padding: the picture torchvision's
    save_image writes, without importing torchvision (about 2 s of every run's start)."""
    from PIL import Image
    n, c, h, w = images.shape
    cols = min(nrow, n)
    grid = images.new_zeros(3 if c == 1 else c, -(-n // cols) * (h + padding) + padding, cols * (w + padding) + padding)
    for k, image in enumerate(images):
        top, left = padding + k // cols * (h + padding), padding + k % cols * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()).save(path)

def fail(message):
    print(f"{SCRIPT}.py: error: {message}", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    main()
