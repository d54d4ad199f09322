"""Maximum entropy on beams 0.5x, 1x and 2x the shipped example's size (issue 11).

For each size factor s, the shipped example's beam (data/quad_scan_4d.simulate.yaml) with every
rms size times s (emittances times s^2) is scanned at 17 quadrupole settings onto a 150 x 150 px
screen of 0.225 s mm pixels (s = 2: the issue's 0.45 mm), then fitted with the shipped
configs/quad_scan_4d_maxent.yaml with only --data.path changed. Prints the emittance errors, the
wall time and whether every particle of the written beam has forward momentum.

    python benchmarks/maxent_scales.py [--scales 0.5 1 2] [--config configs/quad_scan_4d_maxent.yaml] [--folder DIR]

The scans and run folders go to a temporary folder (kept, its path printed) unless --folder is given.
Each fit runs with one torch thread (--threads): on a shared 2-core machine two OpenMP threads stall
each other (measured here under a load of ~8: 200 steps took 39 s with one thread and over 8 minutes
with two). Wall time, the fit's CPU time and the load average are printed.

Measured (2 shared cores, load average ~9 from other jobs, three fits at once; shipped config of
commit f25a92a): 0.5x: x +0.4 %, y +1.4 %, 4D +1.7 %, 149 s CPU (807 s wall); 1x: x -3.0 %,
y -1.1 %, 4D -4.2 %, 146 s CPU (799 s wall); 2x: x -1.7 %, y +0.1 %, 4D -1.7 %, 128 s CPU (361 s
wall); every particle physical. The config before `prior: auto` (flat prior, hand-set scale
[1e-3, 1e-4, 1e-3, 1e-4], stop where D is met) on the 2x scan: x +6.6 %, y +4.1 %, 4D +10.7 %.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = np.linspace(-10.0, 20.0, 17).tolist()


def make_scan(folder: Path, s: float) -> Path:
    """Simulate the scaled scan into folder/scan_<s>x.h5 and return its path."""
    template = yaml.safe_load((ROOT / "data/quad_scan_4d.simulate.yaml").read_text())
    lattice = yaml.safe_load((ROOT / template["lattice"]).read_text())
    screen = next(e for e in lattice if e["type"] == "Screen")
    screen["resolution"], screen["pixel_size"] = [150, 150], [0.225e-3 * s] * 2
    (folder / f"lattice_{s}x.yaml").write_text(yaml.safe_dump(lattice))
    beam = template["beam"]["init_args"]
    for key in ("emittance_x", "emittance_y"):
        beam[key] *= s**2
    template.update(output=str(folder / f"scan_{s}x.h5"), lattice=str(folder / f"lattice_{s}x.yaml"),
                    settings={"Q1.k1": SETTINGS})
    config = folder / f"scan_{s}x.simulate.yaml"
    config.write_text(yaml.safe_dump(template))
    subprocess.run([sys.executable, "-m", "psr.cli", "simulate", "--config", str(config)], check=True,
                   cwd=folder, stdout=subprocess.DEVNULL)
    return Path(template["output"])


def forward_momentum_ok(beam_file: Path) -> tuple[int, int]:
    """(particles, particles without forward momentum or not finite) of a written openPMD beam."""
    from beamphysics import ParticleGroup

    group = ParticleGroup(str(beam_file))
    p = np.stack([group.px, group.py, group.pz])
    bad = (~np.isfinite(p).all(0)) | (group.pz <= 0)
    return group.n_particle, int(bad.sum())


def fit(folder: Path, scan: Path, config: Path, threads: int) -> dict:
    """Run `psr fit --config <config> --data.path <scan>` in folder; emittance rows, wall and CPU time."""
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-m", "psr.cli", "fit", "--config", str(config), f"--data.path={scan}",
                           "--trainer.enable_progress_bar=false"], cwd=folder, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "Tip:" not in line]
    if done.returncode:
        return {"wall_s": wall, "cpu_s": cpu, "error": lines[-1] if lines else f"exit code {done.returncode}"}
    run = folder / re.search(r"run folder: (\S+)", done.stdout).group(1)
    prior = next((line for line in lines if line.startswith("model.prior: auto")), "")
    rows = json.loads((run / "emittances.json").read_text())
    n, bad = forward_momentum_ok(run / "beam.h5")
    return {"wall_s": wall, "cpu_s": cpu, "rows": rows, "particles": n, "unphysical": bad, "prior": prior, "run": str(run)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--config", default=str(ROOT / "configs/quad_scan_4d_maxent.yaml"))
    parser.add_argument("--folder", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per fit (OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="maxent_scales_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"folder: {folder}; config: {args.config}; load average at start: {os.getloadavg()[0]:.2f}")
    for s in args.scales:
        scan = make_scan(folder, s)
        result = fit(folder, scan, Path(args.config).resolve(), args.threads)
        load = os.getloadavg()[0]
        if "error" in result:
            print(f"{s:g}x: FAILED after {result['wall_s']:.0f} s (CPU {result['cpu_s']:.0f} s): {result['error']}")
            continue
        errors = ", ".join(f"{key[10:]} {100 * row['relative_error']:+.1f} %" for key, row in result["rows"].items()
                           if key.startswith("norm_emit") and "relative_error" in row)
        entropy = result["rows"].get("entropy_nats", {})
        print(f"{s:g}x: {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU (load {load:.1f}); emittance errors {errors}; entropy "
              f"{entropy.get('reconstructed', float('nan')):.2f} nats (truth {entropy.get('true', float('nan')):.2f}); "
              f"{result['unphysical']} of {result['particles']} particles unphysical; {result['run']}")
        if result["prior"]:
            print(f"    {result['prior']}")


if __name__ == "__main__":
    main()
