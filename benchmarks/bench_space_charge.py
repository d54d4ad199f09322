"""psr vs Cheetah 0.8.4 SpaceChargeKick: speed and accuracy of 3D space charge, in one process.

Same beam for both: a cold uniformly charged ellipsoid (5 MeV electrons, 1 nC, rms 1 x 1 x 1 mm,
converted exactly to Cheetah's coordinates), whose expansion in a drift is known from the 3D
envelope equations (tests/space_charge_analytic.py).

1. One kick, 100,000 particles, 32^3 grid, forward + backward (gradient of a loss of the kicked
   particles with respect to the incoming ones).
2. A 1 m drift with 10 kicks (half drift, kick, half drift), forward + backward, and the error of
   each code's rms sizes against the envelope equations.
3. psr's convergence with grid size, particle count and number of kicks.

Cheetah 0.8.4's kick repels only for one sign of the particle charges; both signs are run and the
one that repels is reported. Run on an idle machine: timings on two shared cores are meaningless.

    python benchmarks/bench_space_charge.py [--dtype float32|float64] [--repeat 5]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import cheetah
import numpy as np
import torch
from cheetah.utils import bmadx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import sim  # noqa: E402
from space_charge_analytic import sample_uniform_ellipsoid, uniform_ellipsoid_rms  # noqa: E402

P0C, CHARGE, SIGMA, LENGTH = 5e6, 1e-9, (1e-3, 1e-3, 1e-3), 1.0
MASS = sim.get_species("electron").mass_eV


def timed(fn, repeat: int) -> float:
    """Median wall time [s] of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cheetah_beam(bmad: torch.Tensor, charge_sign: float) -> cheetah.ParticleBeam:
    species = cheetah.Species("electron")
    coords, energy = bmadx.bmad_to_cheetah_coords(bmad, torch.tensor(P0C, dtype=bmad.dtype), torch.tensor(MASS, dtype=bmad.dtype))
    charges = torch.full((bmad.shape[0],), charge_sign * CHARGE / bmad.shape[0], dtype=bmad.dtype)
    return cheetah.ParticleBeam(coords, energy=energy, particle_charges=charges, species=species, dtype=bmad.dtype)


def cheetah_drift(n_kicks: int, dtype) -> cheetah.Segment:
    step = torch.tensor(LENGTH / n_kicks, dtype=dtype)
    elements = []
    for _ in range(n_kicks):
        elements += [cheetah.Drift(step / 2, dtype=dtype), cheetah.SpaceChargeKick(step, dtype=dtype),
                     cheetah.Drift(step / 2, dtype=dtype)]
    return cheetah.Segment(elements)


def cheetah_rms(beam: cheetah.ParticleBeam) -> np.ndarray:
    bmad, _ = bmadx.cheetah_to_bmad_coords(beam.particles, beam.energy, torch.tensor(MASS, dtype=beam.particles.dtype))
    return bmad[:, [0, 2, 4]].std(0).detach().numpy()


def psr_drift(n_kicks: int, grid=(32, 32, 32), compensate: bool = False) -> sim.Lattice:
    return sim.Lattice.from_list([{"type": "Drift", "name": "D", "length": LENGTH}],
                                 space_charge=sim.SpaceCharge(grid, LENGTH / n_kicks, compensate=compensate))


def loss_of(particles: torch.Tensor) -> torch.Tensor:
    return particles[..., 1].square().mean() + particles[..., 3].square().mean() + particles[..., 5].square().mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--particles", type=int, default=100_000)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    bmad = torch.as_tensor(sample_uniform_ellipsoid(args.particles, SIGMA, seed=0)).to(dtype)
    expected = uniform_ellipsoid_rms([LENGTH], SIGMA, CHARGE, P0C, MASS)[0]
    print(f"torch {torch.__version__}, cheetah {cheetah.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.particles} particles; envelope equations after {LENGTH} m: rms {expected * 1e3} mm")

    # Which sign of Cheetah's particle charges repels (the beam grows)?
    grows = {}
    for sign in (1.0, -1.0):
        out = cheetah_drift(10, dtype).track(cheetah_beam(bmad, sign))
        grows[sign] = float(cheetah_rms(out)[0])
    sign = max(grows, key=grows.get)
    print(f"Cheetah: rms x after the drift {grows[1.0] * 1e3:.4f} mm with positive charges, "
          f"{grows[-1.0] * 1e3:.4f} mm with negative ones; using sign {sign:+.0f}")

    # 1. one kick, forward + backward
    sc = sim.SpaceCharge((32, 32, 32))
    kick = cheetah.SpaceChargeKick(torch.tensor(0.1, dtype=dtype), dtype=dtype)

    def psr_kick():
        x = bmad.clone().requires_grad_(True)
        loss_of(sc.kick(x, P0C, "electron", CHARGE, 0.1)).backward()

    def cheetah_kick():
        beam = cheetah_beam(bmad, sign)
        beam.particles.requires_grad_(True)
        loss_of(kick.track(beam).particles).backward()

    t_psr, t_cheetah = timed(psr_kick, args.repeat), timed(cheetah_kick, args.repeat)
    print(f"\n1. one kick, 32^3, forward + backward: psr {t_psr * 1e3:.0f} ms, Cheetah {t_cheetah * 1e3:.0f} ms, "
          f"Cheetah/psr = {t_cheetah / t_psr:.1f}x")

    # 2. 1 m drift, 10 kicks, forward + backward, and accuracy
    lattice, segment = psr_drift(10), cheetah_drift(10, dtype)

    def psr_line():
        x = bmad.clone().requires_grad_(True)
        out = lattice(sim.ParticleBeam(x, P0C, "electron", CHARGE)).beam.particles
        loss_of(out).backward()
        return out

    def cheetah_line():
        beam = cheetah_beam(bmad, sign)
        beam.particles.requires_grad_(True)
        out = segment.track(beam)
        loss_of(out.particles).backward()
        return out

    t_psr, t_cheetah = timed(psr_line, args.repeat), timed(cheetah_line, args.repeat)
    err_psr = psr_line()[:, [0, 2, 4]].std(0).detach().numpy() / expected - 1
    err_cheetah = cheetah_rms(cheetah_line()) / expected - 1
    print(f"2. 1 m drift, 10 kicks, forward + backward: psr {t_psr * 1e3:.0f} ms, Cheetah {t_cheetah * 1e3:.0f} ms, "
          f"Cheetah/psr = {t_cheetah / t_psr:.1f}x")
    print(f"   rms error vs envelope equations (x, y, z): psr {np.round(err_psr * 100, 2)} %, "
          f"Cheetah {np.round(err_cheetah * 100, 2)} %")

    # 3. convergence (psr, float64)
    print("\n3. psr convergence (float64; rms error in % of x, y, z after 1 m)")
    for label, n, grid, kicks in [("grid 16^3", 400_000, (16,) * 3, 20), ("grid 32^3", 400_000, (32,) * 3, 20),
                                  ("grid 64^3", 400_000, (64,) * 3, 20), ("N 25k", 25_000, (32,) * 3, 20),
                                  ("N 100k", 100_000, (32,) * 3, 20), ("kicks 5", 400_000, (32,) * 3, 5),
                                  ("kicks 10", 400_000, (32,) * 3, 10), ("kicks 40", 400_000, (32,) * 3, 40),
                                  ("16^3 comp", 400_000, (16,) * 3, 20), ("32^3 comp", 400_000, (32,) * 3, 20)]:
        x = torch.as_tensor(sample_uniform_ellipsoid(n, SIGMA, seed=1))
        with torch.no_grad():  # "comp": SpaceCharge(compensate=True), the grid's smoothing undone
            out = psr_drift(kicks, grid, "comp" in label)(sim.ParticleBeam(x, P0C, "electron", CHARGE)).beam.particles
        err = out[:, [0, 2, 4]].std(0).numpy() / expected - 1
        print(f"   {label:10s} (N {n:>6d}, grid {grid[0]:>2d}^3, {kicks:>2d} kicks): {np.round(err * 100, 3)}")


if __name__ == "__main__":
    main()
