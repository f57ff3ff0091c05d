"""Throughput and memory of each training script, and of FID feature extraction.

Each training case runs the real script in a subprocess for 2 x --steps
iterations on the embedded MNIST sample and reads the steady-state ms/step and
images/s from its log.jsonl: the second log row, so the first --steps
iterations (compilation, cudnn autotuning) are warm-up. Peak memory is
the CUDA allocator's peak on a GPU, the process's max resident set on a CPU.

    python bench.py                        # every case, current device
    python bench.py --only dcgan --steps 50 --device cuda --compile
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.abspath(__file__))

# (name, script, flags): the configurations users run most
CASES = [
    ("dcgan 32px b64", "dcgan.py", ["--img_size", "32", "--batch_size", "64"]),
    ("dcgan 32px b128", "dcgan.py", ["--img_size", "32", "--batch_size", "128"]),
    ("dcgan 64px b64", "dcgan.py", ["--img_size", "64", "--batch_size", "64", "--ngf", "64", "--ndf", "64"]),
    ("dcgan 64px b128", "dcgan.py", ["--img_size", "64", "--batch_size", "128", "--ngf", "64", "--ndf", "64"]),
    ("wgan-gp 32px b64", "wgan.py", ["--img_size", "32", "--batch_size", "64"]),
    ("vae mlp b64", "vae.py", ["--batch_size", "64"]),
    ("vae conv 64px b64", "vae.py", ["--arch", "conv", "--img_size", "64", "--batch_size", "64"]),
    ("srgan 64px b32", "srgan.py", ["--batch_size", "32"]),
    ("acgan 32px b64", "cgan.py", ["--batch_size", "64"]),
]


def bench_training(script, flags, steps, device, compile_):
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, script, *flags, "--out_dir", out_dir, "--device", device,
               "--max_iters", str(2 * steps), "--log_interval", str(steps),
               "--sample_interval", "1000000", "--ckpt_interval", "1000000"]
        cmd += ["--compile"] if compile_ else []
        with tempfile.TemporaryFile("w+") as stderr:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
            _, status, usage = os.wait4(proc.pid, 0)  # the resource usage of this child alone
            proc.returncode = os.waitstatus_to_exitcode(status)
            stderr.seek(0)
            if proc.returncode != 0:
                return {"error": (stderr.read().strip().splitlines() or ["failed"])[-1]}
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        row = rows[-1]
        peak = row.get("peak_mem_mb")
        if peak is None:
            peak = f"{usage.ru_maxrss / 1024:.0f} (RSS)"
        else:
            peak = f"{peak:.0f}"
        return {"ms_per_step": row["ms_per_step"], "images_per_s": row["images_per_s"], "peak_mem_mb": peak}


def bench_fid_features(n, batch_size, device):
    import torch
    sys.path.insert(0, REPO)
    import evaluate
    model = evaluate.load_inception(None, torch.device(device))
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    evaluate.inception_features(images[:batch_size], model, batch_size, torch.device(device))  # warm-up
    t0 = time.perf_counter()
    evaluate.inception_features(images, model, batch_size, torch.device(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"images_per_s": n / dt, "ms_per_step": 1000 * dt / max(1, n // batch_size), "peak_mem_mb": "-"}


def main():
    p = argparse.ArgumentParser(description="Benchmark training and evaluation throughput.")
    p.add_argument("--only", default="", help="run only the cases whose name contains this text")
    p.add_argument("--steps", type=int, default=20, help="timed iterations per training case (after as many warm-up ones)")
    p.add_argument("--device", default="auto", help="device passed to each script")
    p.add_argument("--compile", action="store_true", help="pass --compile to the training scripts")
    p.add_argument("--fid_images", type=int, default=200, help="images for the FID feature-extraction case (0 skips it)")
    args = p.parse_args()

    print(f"{'case':24s} {'ms/step':>9s} {'images/s':>10s} {'peak MB':>12s}")
    for name, script, flags in CASES:
        if args.only not in name:
            continue
        if not os.path.exists(os.path.join(REPO, script)):
            continue
        r = bench_training(script, flags, args.steps, args.device, args.compile)
        if "error" in r:
            print(f"{name:24s} error: {r['error']}")
        else:
            print(f"{name:24s} {r['ms_per_step']:9.1f} {r['images_per_s']:10.0f} {r['peak_mem_mb']:>12s}", flush=True)
    if args.fid_images and args.only in "fid inception features":
        import torch
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            r = bench_fid_features(args.fid_images, 50, device)
            print(f"{'fid features (299px)':24s} {r['ms_per_step']:9.1f} {r['images_per_s']:10.1f} {'-':>12s}")
        except SystemExit as e:
            print(f"{'fid features (299px)':24s} unavailable: {e}")


if __name__ == "__main__":
    main()
