"""Peak memory of training against the size of the data set: the disk-backed latent cache should keep it flat.

    python benchmarks/data_rss.py                        # 2,000 and 20,000 images, a markdown table
    python benchmarks/data_rss.py --sizes 500 5000 --threads 2 --workers 2

Each size gets a shapes folder (32x32, generated once into --work and reused), then one `train.py` run of
configs/tiny.yaml at 32 px with training.cache_latents=true for 20 steps of each stage, in a subprocess whose
peak RSS comes from the kernel (wait4's ru_maxrss, Linux). The run indexes the folder, trains the VAE, caches
every image's latents and trains the U-Net, so the peak covers all of it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shapes_folder(work: Path, n: int) -> Path:
    folder = work / f"shapes-{n}"
    if not (folder / "recipe.json").is_file() and not any(folder.glob("*.png")):
        subprocess.run([sys.executable, "-m", "diffusion.data", "shapes", str(folder), "--num", str(n), "--size", "32"],
                       cwd=ROOT, check=True)
    return folder


def peak_rss_mib(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one command, run to completion."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {child.returncode}; see {log}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def train_command(data: Path, out: Path, steps: int, workers: int) -> list[str]:
    return [
        sys.executable, "train.py", "--config", "configs/tiny.yaml", "--overwrite",
        f"data.path={data}", f"output_dir={out}", "data.resolution=32", "data.shapes.generate=false",
        f"data.num_workers={workers}", "training.cache_latents=true",
        f"training.max_steps={steps}", f"vae_training.max_steps={steps}",
        f"training.checkpoint_every={steps}", f"vae_training.checkpoint_every={steps}",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="data set sizes (default 2000 20000)")
    p.add_argument("--steps", type=int, default=20, help="steps of each stage (default 20)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (default 1)")
    p.add_argument("--workers", type=int, default=0, help="data.num_workers (default 0)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "data_rss", help="data and runs go here")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        data = shapes_folder(args.work, n)
        out = args.work / f"run-{n}"
        rss, wall = peak_rss_mib(train_command(data, out, args.steps, args.workers), env, args.work / f"run-{n}.log")
        rows.append((n, rss, wall))
        print(f"{n} images: peak RSS {rss:,.0f} MiB, {wall:.0f} s", file=sys.stderr)
    print(f"configs/tiny.yaml at 32 px, training.cache_latents=true, {args.steps} steps of each stage, "
          f"{args.threads} thread(s), data.num_workers={args.workers}\n")
    print("| images | peak RSS | wall time |")
    print("|---|---|---|")
    for n, rss, wall in rows:
        print(f"| {n:,} | {rss:,.0f} MiB | {wall:.0f} s |")
    print(f"| difference | {rows[-1][1] - rows[0][1]:+,.0f} MiB | |")


if __name__ == "__main__":
    main()
