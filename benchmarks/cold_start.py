"""Cold start of sample.py: the wall time from the command to its first PNG, and where it goes.

    python benchmarks/cold_start.py                          # the quick-start model, 5 runs of each kind
    python benchmarks/cold_start.py --model runs/shapes/model --runs 9 -- --steps 20

Every run is a fresh interpreter, as a user's command is. Two kinds of run alternate, so that noise
from other jobs on the machine hits both alike:

- `python sample.py --model M --prompt P --out TMP`, timed from outside: the figure a user sees with
  `time`, interpreter start and exit included;
- the same call made through sample.generate_files() with its phases timed inside the process:
  imports (everything sample.py imports at its top), model load (load_model), generation (text
  encoding, denoising, VAE decode; Pipeline.generate), PNG write (save_images), and the rest
  (arguments, interpreter start and exit: the wall time less the phases).

Prints the median of each, the CPU and the load average, and checks that every run wrote the same PNG bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("imports", "load", "generate", "png", "rest")

# Runs in the child: sample.py's own code path, with its phases timed.
DRIVER = r"""
import gc, json, sys, time
start = time.perf_counter()
gc.disable()  # as sample.py does when it runs as a command
import sample
phases = {"imports": time.perf_counter() - start}

def timed(name, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
    return wrapper

from diffusion.pipeline import Pipeline
sample.load_model = timed("load", sample.load_model)
sample.save_images = timed("png", sample.save_images)
Pipeline.generate = timed("generate", Pipeline.generate)
assert sample.main(sys.argv[2:]) == 0  # through run_main, which turns the collector back on
with open(sys.argv[1], "w") as f:
    json.dump(phases, f)
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def run(cmd: list[str], out: Path) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, sha256 of the PNG) of one command that writes one PNG into `out`.

    CPU time (user + system, from the kernel: wait4, Linux) is what the command did, whatever else the
    machine ran; wall time also counts the waits for a core that other jobs held.
    """
    log = out.with_suffix(".log")
    with open(log, "wb") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text(errors='replace')[-2000:]}")
    pngs = sorted(out.glob("*.png"))
    if len(pngs) != 1:
        raise SystemExit(f"expected one PNG in {out}, found {len(pngs)}: {' '.join(cmd)}")
    return wall, usage.ru_utime + usage.ru_stime, hashlib.sha256(pngs[0].read_bytes()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/shapes/model")
    p.add_argument("--prompt", default="a red circle in the top left")
    p.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    p.add_argument("sample_args", nargs="*", help="more sample.py flags, after --")
    args = p.parse_args()
    flags = ["--model", args.model, "--prompt", args.prompt, *args.sample_args]

    walls, cpus, phases, hashes = [], [], [], set()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"plain-{i}"
            wall, cpu, digest = run([sys.executable, "sample.py", *flags, "--out", str(out)], out)
            walls.append(wall)
            cpus.append(cpu)
            hashes.add(digest)

            out, record = Path(tmp) / f"phases-{i}", Path(tmp) / f"phases-{i}.json"
            wall, _, digest = run([sys.executable, "-c", DRIVER, str(record), *flags, "--out", str(out)], out)
            timed = json.loads(record.read_text())
            timed["rest"] = wall - sum(timed.values())
            phases.append(timed)
            hashes.add(digest)
            print(f"run {i + 1}: sample.py {walls[-1]:.2f} s (CPU {cpus[-1]:.2f} s); timed run {wall:.2f} s = "
                  + ", ".join(f"{k} {timed.get(k, 0.0):.2f}" for k in PHASES), flush=True)

    print(f"\n{cpu_name()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after")
    print(f"sample.py {' '.join(flags)}: median {statistics.median(walls):.2f} s wall over {args.runs} runs "
          f"(min {min(walls):.2f}, max {max(walls):.2f}); median CPU time {statistics.median(cpus):.2f} s")
    print("median of the timed runs: " + ", ".join(f"{k} {statistics.median(t.get(k, 0.0) for t in phases):.2f} s" for k in PHASES))
    print("every run wrote the same PNG" if len(hashes) == 1 else f"the runs wrote {len(hashes)} different PNGs")


if __name__ == "__main__":
    main()
