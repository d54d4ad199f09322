"""A clipped quadrupole scan, fitted with and without the aperture in the model.

The shipped example's true beam (data/quad_scan_4d.h5, 16 settings of Q1) meets a straight edge
1 m after Q1 that keeps x < 0.4 mm (74-100 % of the particles survive, depending on k1), then 1 m
more to the screen. An MLP beam (as configs/quad_scan_4d.yaml, plain torch loop, Adam with a
cosine schedule, every second setting held out) is fitted to these images once with the aperture
in the lattice and once without it, and, for reference, to the unclipped images. Prints the image
mismatch (l1 of unit-sum images: train, held out) and the emittance errors against the truth.

    python benchmarks/aperture_fit.py [--particles 10000] [--steps 600]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import sim  # noqa: E402
from psr.data.scanfile import read_scan  # noqa: E402
from psr.outputs.report import emittance_table  # noqa: E402

EDGE = {"type": "Aperture", "name": "EDGE", "shape": "rectangular", "x_max": 1.0, "x_offset": 0.4e-3 - 1.0}


def lattices(screen: dict) -> dict[str, list]:
    quad = {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0}
    half = [{"type": "Drift", "name": "D1a", "length": 1.0}, {"type": "Drift", "name": "D1b", "length": 1.0}]
    return {"clipped": [quad, half[0], EDGE, half[1], screen], "unclipped": [quad, *half, screen]}


def fit(lattice: sim.Lattice, images, k1, p0c, n_particles: int, steps: int):
    """Fitted particles (N, 6) and the l1 mismatch of every setting."""
    torch.manual_seed(0)
    generator = models.MLPBeamGenerator(n_particles=n_particles, n_dim=4, hidden_width=32, hidden_layers=3, scale=1e-3)
    optimizer = torch.optim.Adam(generator.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        predicted = lattice(sim.ParticleBeam(generator(), p0c), {"Q1.k1": k1[::2]}).images["YAG"]
        (predicted - images[::2]).abs().sum((-1, -2)).mean().backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        particles = generator()
        predicted = lattice(sim.ParticleBeam(particles, p0c), {"Q1.k1": k1}).images["YAG"]
    return particles, (predicted - images).abs().sum((-1, -2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scan = read_scan(ROOT / "data/quad_scan_4d.h5")
    screen = next(item for item in scan.lattice if item["type"] == "Screen")
    items = lattices(screen)
    truth = sim.ParticleBeam(torch.as_tensor(scan.ground_truth, dtype=torch.float64), scan.p0c)
    k1 = torch.as_tensor(scan.settings[:, 0])
    true_emittances = emittance_table(scan.ground_truth, scan.p0c, scan.species, ("x", "y"))
    for data, model in (("clipped", "clipped"), ("clipped", "unclipped"), ("unclipped", "unclipped")):
        with torch.no_grad():
            out = sim.Lattice.from_list(items[data]).double()(truth, {"Q1.k1": k1})
        images = out.images["YAG"].float()
        images = images / images.sum((-1, -2), keepdim=True)
        if data == "clipped" and model == "clipped":
            print("surviving fraction per setting:", [round(v, 3) for v in out.beam.surviving_fraction().tolist()])
        start = time.perf_counter()
        particles, mismatch = fit(sim.Lattice.from_list(items[model]), images, k1.float(), scan.p0c,
                                  args.particles, args.steps)
        table = emittance_table(particles.double().numpy(), scan.p0c, scan.species, ("x", "y"))
        errors = ", ".join(f"{key[10:]} {100 * (table[key] / true_emittances[key] - 1):+.1f} %"
                           for key in ("norm_emit_x", "norm_emit_y", "norm_emit_4d"))
        label = f"{data} images, {'aperture in the model' if model == 'clipped' else 'no aperture in the model'}"
        print(f"{label:48s} {time.perf_counter() - start:5.0f} s  l1 train {mismatch[::2].mean():.4f}, "
              f"held out {mismatch[1::2].mean():.4f}; emittance {errors}", flush=True)


if __name__ == "__main__":
    main()
