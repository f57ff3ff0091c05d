"""Speed of each training script against a plain PyTorch loop, and quality of each default run.

Speed (the default): each case runs the real script in a subprocess and reads its steady-state
ms/step from log.jsonl (the second log row: the first --steps iterations are warm-up). Beside it,
in the same run, bench.py times its own plain reference loop on the same networks, built by the
script's build_models: float32, contiguous tensors, a fresh G forward for every update, no
augmentation, no EMA, the loop a student would write from pytorch/examples. The speed-up is the
ratio of the two, taken from one run on one machine, so it does not depend on the machine's speed.
Rounds alternate the cases so that a change of load hits all of them.

    python bench.py                        # every case, current device
    python bench.py --only dcgan --rounds 3
    python bench.py --quality              # train each default run, evaluate it, one table
    python bench.py --fid --fid_n 1000     # evaluate.py against python -m pytorch_fid, same folders

The script is timed twice: with the plain loop's work (`--augment none --ema_decay 0`, what
the ratio compares) and as it runs by default (augmentation and EMA on), under --dtype float32
and --dtype auto.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.abspath(__file__))

# (name, script, flags): the configurations users run most
CASES = [
    ("dcgan 32px b128", "dcgan.py", ["--img_size", "32", "--batch_size", "128"]),
    ("dcgan 64px b64", "dcgan.py", ["--img_size", "64", "--batch_size", "64", "--ngf", "64", "--ndf", "64"]),
    ("wgan-gp 32px b32", "wgan.py", ["--batch_size", "32"]),
    ("cgan 32px b64", "cgan.py", ["--batch_size", "64"]),
    ("srgan 64px b16", "srgan.py", ["--batch_size", "16"]),
]
# the flags that make a script do the plain loop's work: its training aids off
NO_AIDS = ["--augment", "none", "--ema_decay", "0"]
SAME_WORK = {"dcgan.py": NO_AIDS, "wgan.py": NO_AIDS, "cgan.py": NO_AIDS, "srgan.py": ["--ema_decay", "0"]}


def machine():
    """The machine that made a table: the GPU, or the CPU model with its bfloat16 and AMX flags."""
    import torch
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}"
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    flags = " ".join(shown) or "no avx512/amx"
    return f"CPU {model}, {os.cpu_count()} cores, flags: {flags}, torch {torch.__version__}"


def matmul_peak(dtype_name, repeats=5):
    """GFLOP/s of a large square matmul in dtype: the machine's attainable peak for that precision."""
    import torch
    device, dtype = "cuda" if torch.cuda.is_available() else "cpu", getattr(torch, dtype_name)
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# -----------------------------------------------------------------------------
# The plain reference loops: what a student writes, with the script's own networks


def load_script(script, config):
    """The script module, its training images as uint8 N x C x H x W, and its networks built from `config`."""
    sys.path.insert(0, REPO)
    module = __import__(script[:-3])
    images, _ = module.load_images(config["data_dir"], config["dataset"], "train", config.get("img_size") or 64)
    config["channels"] = images.shape[1]
    return module, images, module.build_models(config)


def timed(step, steps, warmup):
    """(ms per step, FLOPs of one step as torch.utils.flop_counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    except RuntimeError:  # its module tracker breaks torch.autograd.grad (the gradient penalty): not counted
        flops = float("nan")
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - t0) / steps, flops


def plain_dcgan(config, steps, warmup):
    """pytorch/examples' DCGAN loop: D on real and on fresh fakes, then G on another fresh batch."""
    import torch
    import torch.nn.functional as F
    _, images, models = load_script("dcgan.py", config)
    G, D = models["G"], models["D"]
    opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    batch, nz = config["batch_size"], config["nz"]

    def step():
        real = images[torch.randint(0, len(images), (batch,))].float().div(127.5).sub(1)
        fake = G(torch.randn(batch, nz))
        loss_D = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()
        opt_D.zero_grad()
        loss_D.backward()
        opt_D.step()
        loss_G = F.softplus(-D(G(torch.randn(batch, nz)))).mean()
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()

    return timed(step, steps, warmup)


def plain_wgan_gp(config, steps, warmup):
    """Gulrajani et al.'s Algorithm 1 as usually written: n_critic critic updates with the penalty, then G."""
    import torch
    module, images, models = load_script("wgan.py", config)
    module.resolve_mode_defaults(config)
    G, D = models["G"], models["D"]
    opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    batch, nz = config["batch_size"], config["nz"]

    def step():
        for _ in range(config["n_critic"]):
            real = images[torch.randint(0, len(images), (batch,))].float().div(127.5).sub(1)
            with torch.no_grad():
                fake = G(torch.randn(batch, nz))
            eps = torch.rand(batch, 1, 1, 1)
            x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
            penalty = (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()
            loss_D = D(fake).mean() - D(real).mean() + config["gp_weight"] * penalty
            opt_D.zero_grad()
            loss_D.backward()
            opt_D.step()
        loss_G = -D(G(torch.randn(batch, nz))).mean()
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()

    return timed(step, steps, warmup)


def plain_srgan(config, steps, warmup):
    """The super-resolution GAN's loop: D on real and on G(low), then G on adversarial + reconstruction loss."""
    import torch
    import torch.nn.functional as F
    module, images, models = load_script("srgan.py", config)
    G, D = models["G"], models["D"]
    opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    batch = config["batch_size"]

    def step():
        truth = images[torch.randint(0, len(images), (batch,))].float().div(255)
        low = module.degrade(truth, config) * 2 - 1
        truth = truth * 2 - 1
        loss_D = F.softplus(-D(truth)).mean() + F.softplus(D(G(low).detach())).mean()
        opt_D.zero_grad()
        loss_D.backward()
        opt_D.step()
        fake = G(low)
        loss_G = config["recon_weight"] * F.l1_loss(fake, truth) + config["adv_weight"] * F.softplus(-D(fake)).mean()
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()

    return timed(step, steps, warmup)


def plain_cgan(config, steps, warmup):
    """ACGAN as usually written (Odena et al.): D's source and class losses on real and fresh fakes, then G's."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, REPO)
    module = __import__("cgan")
    train_labels = module.load_images(config["data_dir"], config["dataset"], "train", 32)[1]
    labels, names = module.class_labels(config, train_labels)
    config["n_classes"] = len(names)
    _, images, models = load_script("cgan.py", config)
    G, D = models["G"], models["D"]
    opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    batch, nz, classes = config["batch_size"], config["nz"], config["n_classes"]

    def step():
        idx = torch.randint(0, len(images), (batch,))
        real, real_y, fake_y = images[idx].float().div(127.5).sub(1), labels[idx], torch.randint(0, classes, (batch,))
        fake = G(module.g_input(torch.randn(batch, nz), fake_y, classes))
        (source_r, class_r), (source_f, class_f) = D(real), D(fake.detach())
        loss_D = (F.softplus(-source_r).mean() + F.softplus(source_f).mean() + F.cross_entropy(class_r, real_y)
                  + F.cross_entropy(class_f, fake_y))
        opt_D.zero_grad()
        loss_D.backward()
        opt_D.step()
        fake_y = torch.randint(0, classes, (batch,))
        source_f, class_f = D(G(module.g_input(torch.randn(batch, nz), fake_y, classes)))
        loss_G = F.softplus(-source_f).mean() + F.cross_entropy(class_f, fake_y)
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()

    return timed(step, steps, warmup)


PLAIN_LOOPS = {"dcgan.py": plain_dcgan, "wgan.py": plain_wgan_gp, "cgan.py": plain_cgan, "srgan.py": plain_srgan}


def time_plain(script, flags, steps):
    """ms/step of the plain loop, in a fresh process like the script's."""
    out = subprocess.run([sys.executable, __file__, "--plain", script, "--steps", str(steps), "--", *flags],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    ms, flops = out.stdout.split()[-2:]
    return {"ms_per_step": float(ms), "flops": float(flops)}


def time_script(script, flags, steps, device, compile_):
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, script, *flags, "--out_dir", out_dir, "--device", device,
               "--max_iters", str(2 * steps), "--log_interval", str(steps),
               "--sample_interval", "1000000", "--ckpt_interval", "1000000"]
        cmd += ["--compile"] if compile_ else []
        with tempfile.TemporaryFile("w+") as stderr:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
            _, status, usage = os.wait4(proc.pid, 0)  # the resource usage of this child alone
            stderr.seek(0)
            if os.waitstatus_to_exitcode(status) != 0:
                return {"error": (stderr.read().strip().splitlines() or ["failed"])[-1]}
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            row = [r for r in map(json.loads, f) if "ms_per_step" in r][-1]  # not a test-metric row
        with open(os.path.join(out_dir, "config.json")) as f:
            precision = json.load(f)["precision"]
    peak = row.get("peak_mem_mb")
    return {"ms_per_step": row["ms_per_step"], "precision": precision,
            "peak": f"{peak:.0f}" if peak else f"{usage.ru_maxrss / 1024:.0f} RSS"}


def bench_speed(args):
    cases = [c for c in CASES if args.only in c[0]]
    variants = [("plain loop (fp32)", None),
                ("script, same work, fp32", ["SAME_WORK", "--dtype", "float32"]),
                ("script, same work, auto", ["SAME_WORK", "--dtype", "auto"]),
                ("script, default, auto", ["--dtype", "auto"])]
    times = {(c[0], v[0]): [] for c in cases for v in variants}
    peaks, flops, precisions = {}, {}, {}
    import torch
    sys.path.insert(0, REPO)
    native_bf16 = torch.cuda.is_available() or __import__("dcgan").cpu_computes_bfloat16()  # else emulated: no peak
    peak_gflops = {"float32": matmul_peak("float32"),
                   "bfloat16": matmul_peak("bfloat16") if native_bf16 else float("nan")}
    for _ in range(args.rounds):
        for name, script, flags in cases:
            for label, extra in variants:
                if extra is None:
                    r = time_plain(script, flags, args.steps)
                    flops[name] = r.get("flops", float("nan"))
                else:
                    extra = [f for flag in extra for f in (SAME_WORK[script] if flag == "SAME_WORK" else [flag])]
                    r = time_script(script, flags + extra, args.steps, args.device, args.compile)
                    peaks[(name, label)] = r.get("peak", "-")
                    precisions[(name, label)] = r.get("precision", "float32")
                if "error" in r:
                    print(f"{name} / {label}: error: {r['error']}", file=sys.stderr)
                    continue
                times[(name, label)].append(r["ms_per_step"])
    print(f"# {time.strftime('%Y-%m-%d')}, {machine()}; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"# {args.rounds} rounds of {args.steps} timed steps, median ms/step; a large matmul reaches "
          f"{peak_gflops['float32']:.0f} GFLOP/s in float32, {peak_gflops['bfloat16']:.0f} in bfloat16 "
          f"(the peaks below)")
    print(f"{'case':18s} {'variant':26s} {'ms/step':>9s} {'vs plain':>9s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} "
          f"{'of peak':>8s} {'precision':>9s} {'peak MB':>10s}")
    for name, _, _ in cases:
        plain = statistics.median(times[(name, variants[0][0])] or [float("nan")])
        for label, _ in variants:
            ms = statistics.median(times[(name, label)] or [float("nan")])
            rate = flops.get(name, float("nan")) / ms / 1e6  # the plain loop's FLOPs: the same work
            peak = peak_gflops[precisions.get((name, label), "float32")]  # the peak of the precision the run used
            print(f"{name:18s} {label:26s} {ms:9.1f} {plain / ms:8.2f}x {flops.get(name, float('nan')) / 1e9:10.2f} "
                  f"{rate:8.1f} {rate / peak:7.0%} {precisions.get((name, label), 'float32'):>9s} "
                  f"{peaks.get((name, label), '-'):>10s}", flush=True)


# -----------------------------------------------------------------------------
# FID: `python evaluate.py --real A --fake B` against `python -m pytorch_fid A B`


def write_fid_folders(root, n):
    """n test digits as 'real' and n train digits shifted by one pixel as 'fake', 28x28 PNGs: two
    different sets, so FID is a real distance."""
    import numpy as np
    from PIL import Image
    sets = {"real": np.load(os.path.join(REPO, "data", "mnist5k", "test.npy"))[:n],
            "fake": np.roll(np.load(os.path.join(REPO, "data", "mnist5k", "train.npy"))[:n], 1, axis=2)}
    for name, images in sets.items():
        os.makedirs(os.path.join(root, name))
        for i, image in enumerate(images):
            Image.fromarray(image[..., 0]).save(os.path.join(root, name, f"{i:05d}.png"))
    return os.path.join(root, "real"), os.path.join(root, "fake")


def timed_run(cmd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench.py: {' '.join(cmd[1:3])} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return wall, proc.stdout


def bench_fid(args):
    """Wall time of both commands on the same folders, rounds alternating; the FIDs must agree."""
    with tempfile.TemporaryDirectory() as root:
        real, fake = write_fid_folders(root, args.fid_n)
        report = os.path.join(root, "evaluate.json")
        commands = {
            "python -m pytorch_fid A B": lambda: [sys.executable, "-m", "pytorch_fid", real, fake],
            # a fresh cache each round: the real images' features are computed, not read back
            "python evaluate.py --real A --fake B": lambda: [
                sys.executable, "evaluate.py", "--real", real, "--fake", fake, "--json", report,
                "--cache_dir", tempfile.mkdtemp(dir=root)],
            "  the same, real features cached": lambda: [sys.executable, "evaluate.py", "--real", real, "--fake", fake,
                                                         "--json", report, "--cache_dir", os.path.join(root, "cache")],
        }
        timed_run(commands["  the same, real features cached"]())  # fills that cache
        walls, fids = {name: [] for name in commands}, {}
        for _ in range(args.rounds):
            for name, command in commands.items():
                wall, stdout = timed_run(command())
                walls[name].append(wall)
                if "pytorch_fid" in name:
                    fids[name] = float(stdout.split("FID:")[1])
                else:
                    with open(report) as f:
                        fids[name] = json.load(f)["metrics"]["fid"]
    reference = statistics.median(walls["python -m pytorch_fid A B"])
    print(f"# {time.strftime('%Y-%m-%d')}, {machine()}, {args.fid_n:,} + {args.fid_n:,} "
          f"28x28 PNGs, median wall time of {args.rounds} rounds (load average at the end: {os.getloadavg()[0]:.1f})")
    for name in commands:
        wall = statistics.median(walls[name])
        print(f"{name:38s} {wall:7.1f} s  {reference / wall:5.2f}x  FID {fids[name]:.5f}", flush=True)
    ours, theirs = fids["python evaluate.py --real A --fake B"], fids["python -m pytorch_fid A B"]
    if abs(ours - theirs) > 1e-3 * abs(theirs):
        sys.exit(f"bench.py: the FIDs differ: evaluate.py {ours:.6f}, pytorch-fid {theirs:.6f}")


# -----------------------------------------------------------------------------
# Quality: each default run, trained and evaluated as a user would

QUALITY_RUNS = [  # (name, the command a user runs)
    ("dcgan", ["dcgan.py"]),
    ("wgan", ["wgan.py"]),
    ("cgan", ["cgan.py"]),
    ("srgan", ["srgan.py"]),
    ("vae", ["vae.py"]),
    ("vae dlogistic", ["vae.py", "--arch", "conv", "--img_size", "28", "--depth", "2", "--latent_dim", "64",
                       "--recon", "dlogistic", "--mixture", "3", "--flow", "iaf", "--lr", "2e-3", "--max_iters", "5000"]),
]


def shown(value):
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def bench_quality(args):
    """Train each default run as a user would, evaluate it with evaluate.py --n 1000, one table."""
    results = []
    for name, command in QUALITY_RUNS:
        if args.only and name not in args.only.split(","):
            continue
        out_dir = os.path.join(args.quality_dir, name.replace(" ", "_"))
        t0 = time.perf_counter()
        train = subprocess.run([sys.executable, *command, "--out_dir", out_dir], cwd=REPO, capture_output=True,
                               text=True)
        minutes = (time.perf_counter() - t0) / 60
        if train.returncode != 0:
            print(f"{name}: training failed: {(train.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        report = os.path.join(out_dir, "evaluate.json")
        ev = subprocess.run([sys.executable, "evaluate.py", "--ckpt", os.path.join(out_dir, "ckpt.pt"), "--n", "1000",
                             "--json", report], cwd=REPO, capture_output=True, text=True)
        if ev.returncode != 0:
            print(f"{name}: evaluation failed: {(ev.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        with open(report) as f:
            metrics = json.load(f)["metrics"]
        results.append((name, " ".join(command), minutes, metrics))
        print(f"{name}: {minutes:.1f} min, " + ", ".join(f"{k} {shown(v)}" for k, v in metrics.items()), flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}; "
          f"each default run, then `evaluate.py --ckpt <run>/ckpt.pt --n 1000` against the test split\n")
    print("| run | command | training wall time | metrics |")
    print("|---|---|---|---|")
    for name, command, minutes, metrics in results:
        listed = ", ".join(f"{k} {shown(v)}" for k, v in metrics.items())
        print(f"| {name} | `python {command}` | {minutes:.1f} min | {listed} |")


def main():
    p = argparse.ArgumentParser(
        description="Benchmark training speed against a plain loop, or the quality of the default runs.")
    p.add_argument("--only", default="",
                   help="speed: the cases whose name contains this text; --quality: a comma list of run names")
    p.add_argument("--steps", type=int, default=20, help="timed iterations per case (after as many warm-up ones)")
    p.add_argument("--rounds", type=int, default=2, help="times each case is measured, alternating with the others")
    p.add_argument("--device", default="auto", help="device passed to each script")
    p.add_argument("--compile", action="store_true", help="pass --compile to the training scripts")
    p.add_argument("--quality", action="store_true",
                   help="train each default run, then evaluate it with evaluate.py --n 1000")
    p.add_argument("--quality_dir", default="out/bench_quality", help="where --quality's runs go")
    p.add_argument("--fid", action="store_true", help="time python evaluate.py --real A --fake B against "
                                                      "python -m pytorch_fid A B on the same PNG folders")
    p.add_argument("--fid_n", type=int, default=1000, help="--fid: images in each folder (at most 1,000)")
    p.add_argument("--plain", metavar="SCRIPT", help=argparse.SUPPRESS)  # internal: time the plain loop of SCRIPT
    p.add_argument("flags", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain:
        sys.path.insert(0, REPO)
        config = vars(__import__(args.plain[:-3]).get_args(args.flags))  # the script's defaults and the case's flags
        ms, flops = PLAIN_LOOPS[args.plain](config, args.steps, warmup=args.steps)
        print(f"{ms:.3f} {flops}")
    elif args.quality:
        bench_quality(args)
    elif args.fid:
        bench_fid(args)
    else:
        bench_speed(args)


if __name__ == "__main__":
    main()
