"""How closely a surrogate of the space-charge section can match its PIC pairs (issue 13, "held-out within 1 %"):

1. The reference's own convergence. Each input beam of a pairs file is tracked again through the pairs' section
   with PIC at other particle counts and grids: its particles plus (k - 1) times as many drawn around them (a
   narrow Gaussian kernel, `--kernel` of the beam's covariance: the same bunch, the same charge, sampled by more
   macro-particles; the draws shrunk towards the mean so that the bunch keeps its covariance). The x, y emittances after the section of the original particles are compared with the
   pairs' stored ones: what the stored output owes to the particle count (PIC's grid noise) and to the grid.
2. What the SectionMap's form can reach at best. Per beam, the least-squares best map of the output particles on
   a polynomial basis of the input's normalized coordinates (an oracle: its coefficients are fitted to that very
   beam, which no network that computes them from the bunch can beat), against the stored outputs and against
   the finest reference of 1. Besides polynomials, the shipped basis plus Gaussian field shapes of where each
   particle is (tracked linearly) at the entrance, the middle and the end of the section's drift.

    python benchmarks/sc_pairs_convergence.py data/sc_section.visited.pairs.h5 [--beams 8] [--threads 2]
    python benchmarks/sc_pairs_convergence.py data/sc_section.visited.pairs.h5 --oracle-only --beams 1000
        (2. alone, against the stored outputs: every held-out beam in about a second each)

Reports medians and 90th percentiles over the beams and the x, y planes of |emittance / reference - 1|.
"""

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

import sim
from models.elements import cubic_basis, field_shape_basis, gaussian_field_shapes, polynomial_basis
from psr.data.lattices import build_lattice
from psr.data.pairs import read_pairs


def emittances(particles: np.ndarray) -> np.ndarray:
    """(2,) geometric rms emittances [m] of the x and y planes of particles (N, 6)."""
    cov = np.cov(particles.T, bias=True)
    return np.array([np.sqrt(max(np.linalg.det(cov[i:i + 2, i:i + 2]), 0.0)) for i in (0, 2)])


def monomials(u: np.ndarray, columns: list[int], degree: int) -> np.ndarray:
    """(N, F): 1 and every monomial of degree 1..degree of u's `columns`."""
    features = [np.ones(len(u))]
    for d in range(1, degree + 1):
        features += [np.prod(u[:, list(c)], 1) for c in itertools.combinations_with_replacement(columns, d)]
    return np.stack(features, 1)


def field_shapes(positions: np.ndarray) -> np.ndarray:
    """(N, 7) Gaussian field shapes (models.elements.gaussian_field_shapes) of positions (N, 3) [x, y, z] in units
    of their rms: linear in the core, falling off as 1/r outside, as the field of a bunch does."""
    u = (positions - positions.mean(0)) / positions.std(0).clip(1e-30)
    return gaussian_field_shapes(torch.as_tensor(u)).numpy()


def bases(u: np.ndarray, stations: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Bases of normalized input coordinates u (N, 6), each with a constant: the SectionMap's ("cubic_positions":
    linear in all six, positions to third order; "field_shapes": that and Gaussian field shapes of the positions;
    "cubic": every monomial up to third order of x, px, y, py, z, and pz),
    higher orders, and the shipped basis plus Gaussian field shapes (`field_shapes`) of the positions
    (N, 3) at `stations` along the section's linear trajectory (the field where the particle is when kicked)."""
    positions, five = [0, 2, 4], [0, 1, 2, 3, 4]
    linear = monomials(u, list(range(6)), 1)
    one = np.ones((len(u), 1))
    shipped = np.concatenate([one, polynomial_basis(torch.as_tensor(u)).numpy()], 1)
    return {"cubic_positions (shipped)": shipped,
            "field_shapes": np.concatenate([one, field_shape_basis(torch.as_tensor(u)).numpy()], 1),
            "cubic": np.concatenate([one, cubic_basis(torch.as_tensor(u)).numpy()], 1),
            "quintic_positions": np.concatenate([linear, monomials(u, positions, 5)[:, 4:]], 1),
            "quintic": np.concatenate([monomials(u, five, 5), u[:, 5:]], 1),
            f"shipped + field shapes at {len(stations)} stations": np.concatenate(
                [shipped] + [field_shapes(s) for s in stations], 1)}


def linear_stations(items: list[dict], inputs: np.ndarray, settings: dict, p0c: float, species: str,
                    fractions=(0.0, 0.5, 1.0)) -> list[np.ndarray]:
    """Positions (N, 3) [x, y, z] of the input particles tracked without space charge through the section to the
    given fractions of its last element (a drift): where each particle is when the bunch's field kicks it."""
    out = []
    for fraction in fractions:
        cut = [dict(e) for e in items]
        cut[-1]["length"] = max(fraction * cut[-1]["length"], 1e-9)
        section = build_lattice(cut, Path("."), None).double()
        with torch.no_grad():
            beam = section(sim.ParticleBeam(torch.as_tensor(inputs), p0c=p0c, species=species), settings).beam
        out.append(beam.particles.numpy()[:, [0, 2, 4]])
    return out


def oracle_errors(inputs: np.ndarray, outputs: np.ndarray, stations: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per basis, |emittance / outputs' - 1| (2,) of the least-squares best map of inputs to outputs."""
    u = (inputs - inputs.mean(0)) / inputs.std(0).clip(1e-30)
    out = {}
    for name, features in bases(u, stations).items():
        coefficients, *_ = np.linalg.lstsq(features, outputs, rcond=None)
        out[name] = np.abs(emittances(features @ coefficients) / emittances(outputs) - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--beams", type=int, default=8, help="the first B held-out beams (every fifth from the fifth)")
    parser.add_argument("--kernel", type=float, default=0.15, help="width of the added particles' kernel [rms]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracle-only", action="store_true", help="only 2., against the stored outputs (no PIC)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = read_pairs(args.pairs)
    items = pairs.lattice
    # (particle factor, grid): the pairs' own (x1, 32^3) is stored; then more particles, a finer and a coarser grid
    references = [] if args.oracle_only else [(10, 32), (40, 32), (40, 64), (1, 16), (10, 16)]
    rng = np.random.default_rng(args.seed)
    held_out = list(range(4, len(pairs.beams_in), 5))[:args.beams]  # as psr surrogate holds them out (val_every 5)
    table = {key: [] for key in references}
    oracle = {"stored": []} if args.oracle_only else {"stored": [], "finest": []}
    for b in held_out:
        inputs, stored = pairs.beams_in[b].astype(np.float64), pairs.beams_out[b].astype(np.float64)
        settings = {name: torch.tensor(pairs.settings[b, i], dtype=torch.float64)
                    for i, name in enumerate(pairs.setting_names)}
        chol = np.linalg.cholesky(np.cov(inputs.T))
        extra = rng.integers(len(inputs), size=(max([f for f, _ in references], default=1) - 1) * len(inputs))
        mean = inputs.mean(0)  # kernel draws shrunk towards the mean: the bunch keeps its covariance
        around = mean + (inputs[extra] - mean + args.kernel * rng.standard_normal((len(extra), 6)) @ chol.T) \
            / np.sqrt(1 + args.kernel ** 2)
        outputs = {}
        for factor, grid in references:
            space = sim.SpaceCharge.from_config({"grid_shape": [grid] * 3, "max_step": 0.1, "compensate": True})
            section = build_lattice(items, Path("."), space).double()
            particles = np.concatenate([inputs, around[:(factor - 1) * len(inputs)]])
            start = time.perf_counter()
            with torch.no_grad():
                bunch = sim.ParticleBeam(torch.as_tensor(particles), p0c=pairs.p0c, species=pairs.species,
                                         charge=pairs.charge)
                out = section(bunch, settings).beam.particles.numpy()[:len(inputs)]
            outputs[(factor, grid)] = out
            table[(factor, grid)].append(emittances(stored) / emittances(out) - 1)
            print(f"beam {b} x{factor} {grid}^3: stored emittances / these - 1 = "
                  f"{np.round(100 * table[(factor, grid)][-1], 2)} % ({time.perf_counter() - start:.1f} s)", flush=True)
        if pairs.lattice[-1].get("type") != "Drift":
            raise SystemExit(f"{args.pairs}: the section's last element is not a drift (the stations cut it)")
        stations = linear_stations(items, inputs, settings, pairs.p0c, pairs.species)
        oracle["stored"].append(oracle_errors(inputs, stored, stations))
        if not args.oracle_only:
            oracle["finest"].append(oracle_errors(inputs, outputs[(40, 64)], stations))
    growth = np.array([emittances(pairs.beams_out[b]) / emittances(pairs.beams_in[b]) - 1 for b in held_out])
    print(f"\n{len(held_out)} held-out beams of {args.pairs}; emittance growth in the section (stored) median "
          f"{100 * np.median(growth):.0f} %, max {100 * growth.max():.0f} %")
    for (factor, grid), rows in table.items():
        e = np.abs(np.array(rows)).ravel()
        print(f"stored (x1, 32^3) against x{factor} particles, {grid}^3: |emittance error| median "
              f"{100 * np.median(e):.2f} %, 90 % {100 * np.quantile(e, 0.9):.2f} %, max {100 * e.max():.2f} %")
    for target, rows in oracle.items():
        for name in rows[0]:
            e = np.array([r[name] for r in rows]).ravel()
            print(f"best map ({name}) of the {'stored outputs' if target == 'stored' else 'x40, 64^3 outputs'}: "
                  f"|emittance error| median {100 * np.median(e):.2f} %, 90 % {100 * np.quantile(e, 0.9):.2f} %")


if __name__ == "__main__":
    main()
