"""Cost of an aperture: the 20-setting quadrupole scan of benchmarks/bench_tracking.py (100,000
particles, 10 elements, 256 x 256 screen, float32, forward + backward with respect to the particles
and the scanned k1) without an aperture, with a hard elliptical aperture after the scanned
quadrupole, and with the same aperture's smooth edge (its x_max also trained). Prints the median
of the repeats and the surviving fraction.

    python benchmarks/bench_aperture.py [--particles 100000] [--repeats 7]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sim  # noqa: E402

P0C = 50e6
LINE = [("Quadrupole", "Q1", 0.1, 9.0), ("Drift", "D1", 0.6, None), ("Quadrupole", "Q2", 0.1, -9.0),
        ("Drift", "D2", 0.6, None), ("Quadrupole", "Q3", 0.1, 9.0), ("Drift", "D3", 0.6, None),
        ("Quadrupole", "Q4", 0.1, -9.0), ("Drift", "D4", 0.6, None), ("Quadrupole", "Q5", 0.1, 5.0),
        ("Drift", "D5", 1.5, None)]
APERTURE = {"type": "Aperture", "name": "A1", "shape": "elliptical", "x_max": 0.8e-3, "y_max": 0.6e-3}


def lattice(aperture: dict | None) -> sim.Lattice:
    items = [{"type": t, "name": n, "length": length, **({} if k1 is None else {"k1": k1})} for t, n, length, k1 in LINE]
    if aperture is not None:
        items.insert(7, aperture)  # after the scanned Q4: the survivors differ per setting
    items.append({"type": "Screen", "name": "SCR", "resolution": [256, 256], "pixel_size": [2e-5, 2e-5]})
    return sim.Lattice.from_list(items).to(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(42)
    base = torch.randn(args.particles, 6, generator=gen) * torch.tensor([3e-4, 5e-5, 2e-4, 4e-5, 1e-3, 1e-3])
    k1 = torch.linspace(-25.0, 15.0, 20)
    cases = {"no aperture": (None, False), "hard aperture": (APERTURE, False),
             "smooth aperture (edge 10 um, x_max trained)": (dict(APERTURE, edge=1e-5), True)}
    steps, fractions = {}, {}
    for label, (aperture, trained) in cases.items():
        steps[label] = make_step(lattice(aperture), base, k1, trained)
        fractions[label] = steps[label]().beam.surviving_fraction().mean().item()  # warm-up, sets the target
    times = {label: [] for label in cases}
    for _ in range(args.repeats):  # interleaved: a busy machine slows all cases alike
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    for label in cases:
        print(f"{label:45s} {1e3 * statistics.median(times[label]):7.1f} ms  (min {1e3 * min(times[label]):.1f}; "
              f"surviving {fractions[label]:.3f})")


def make_step(line: sim.Lattice, base: torch.Tensor, k1: torch.Tensor, trained: bool):
    """Forward + backward of the scan against a target (the first call's images x 1.1)."""
    target = []

    def step():
        settings = {"Q4.k1": k1.clone().requires_grad_(True)}
        if trained:
            settings["A1.x_max"] = torch.tensor(0.8e-3, requires_grad=True)
        out = line(sim.ParticleBeam(base.clone().requires_grad_(True), P0C), settings)
        ((out.images["SCR"] - (target[0] if target else 0)) ** 2).sum().backward()
        if not target:
            target.append(out.images["SCR"].detach() * 1.1)
        return out

    return step

if __name__ == "__main__":
    main()
