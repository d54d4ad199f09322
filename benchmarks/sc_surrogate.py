"""Space-charge surrogate vs particle-in-cell (issue 13), in one run: time per training step and accuracy.

- Time: one training step (forward and backward of the image mismatch over the training settings) of
  configs/sc_quad_scan.yaml with PIC in every step (16^3 grid, kicks every 0.25 m), of configs/sc_quad_scan_surrogate.yaml
  (data/sc_section.pt in place of Q1 and D1, corrected by PIC), of variants of it, and of configs/sc_quad_scan.yaml as
  shipped (PIC kicks every 100 steps, held between: model.space_charge_every), and with the Gaussian ellipsoid's field
  (solver: gaussian) in place of PIC; same generator, same particles; mean of
  --steps steps.
- Accuracy: on the held-out beams (every fifth) of data/sc_section.pairs.h5 (a synthetic range of beams) and of
  data/sc_section.visited.pairs.h5 (beams fits visit, perturbed), each where made (reference: PIC with 32^3,
  0.1 m and compensate: true, as the example's data), the rms sizes and emittances after the section from the surrogate and
  from the fit config's own PIC settings.

    python benchmarks/sc_surrogate.py [--steps 10] [--threads 2]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import sim
from psr.cli import fit_cli
from psr.data.pairs import read_pairs
from psr.training.surrogate import emittances, rms

ROOT = Path(__file__).resolve().parents[1]


# the surrogate config with Q1 and D1 replaced by linear space charge alone (no network, no weights file)
LINEAR = ["--model.replace", "[{elements: [Q1, D1], element: {type: SectionMap, name: SC, inputs: [Q1.k1], "
          "reference_rms: [3.0e-4, 1.0e-4, 3.0e-4, 1.0e-4, 1.0e-3, 1.0e-3], hidden_layers: 0, "
          "space_charge: {charge: 1.0e-11, max_step: 0.2}}}]"]
# the same with the first-order effect of the field's nonlinear part (SectionMap born: true; still no network)
BORN = [LINEAR[0], LINEAR[1].replace("max_step: 0.2}", "max_step: 0.2}, born: true")]


def step_time(config: str, steps: int, extra: list[str] = ()) -> float:
    """Mean time of one training step [s] after one untimed step, over `steps` steps; with PIC every k steps (a
    surrogate's `correct`, or `model.space_charge_every`), over whole cycles of k steps (each holds one PIC pass)."""
    cli = fit_cli(["--config", str(ROOT / config), f"--data.path={ROOT / 'data/sc_quad_scan.h5'}", *extra], run=False)
    model, data = cli.model, cli.datamodule
    data.setup("fit")
    model.configure_scan(data.scan)
    batch = next(iter(data.train_dataloader()))
    every = max([getattr(e, "every", 0) for e in model.lattice.elements] + [getattr(model.lattice.space_charge, "every", 0)])
    cycles = -(-steps // every) if every else 0
    times = []
    for _ in range(1 + (cycles * every if every else steps)):
        model.zero_grad()
        start = time.perf_counter()
        model.on_train_batch_start(batch, 0)
        model._loss(batch).backward()
        model.on_train_batch_end(None, batch, 0)
        times.append(time.perf_counter() - start)
    return statistics.fmean(times[1:])


def held_out_errors(pairs_path: Path) -> dict:
    pairs = read_pairs(pairs_path)
    index = np.arange(4, pairs.beams_in.shape[0], 5)
    beams_in = torch.as_tensor(pairs.beams_in[index])
    reference = torch.as_tensor(pairs.beams_out[index], dtype=torch.float64)
    k1 = torch.as_tensor(pairs.settings[index, 0], dtype=torch.float32)
    from models import SectionMap
    from models.elements import read_spec

    _, spec = read_spec(ROOT / "data/sc_section.pt")
    surrogate = SectionMap("SC", weights=str(ROOT / "data/sc_section.pt"), **spec)
    species = sim.get_species(pairs.species)
    with torch.no_grad():
        predicted = surrogate.track(beams_in, pairs.p0c, species, {"Q1_k1": k1})[0].double()
        pic = sim.Lattice.from_list(pairs.lattice, space_charge=sim.SpaceCharge(grid_shape=(16, 16, 16), max_step=0.25))
        pic3 = sim.Lattice.from_list(pairs.lattice, space_charge=sim.SpaceCharge(grid_shape=(16, 16, 16), max_step=0.25,
                                                                                 extent=3.0))
        pic3c = sim.Lattice.from_list(pairs.lattice, space_charge=sim.SpaceCharge(grid_shape=(16, 16, 16), max_step=0.25,
                                                                                  extent=3.0, compensate=True))
        # the nonlinear field of the rms-equivalent Gaussian ellipsoid, kicks every 0.25 m as the fit's PIC (no grid)
        gauss = sim.Lattice.from_list(pairs.lattice, space_charge=sim.GaussianSpaceCharge(max_step=0.25))
        fit_pic, fit_pic3, fit_pic3c, gaussian = (
            torch.stack([lattice(sim.ParticleBeam(beams_in[i].double(), p0c=pairs.p0c, species=species, charge=pairs.charge),
                                 {"Q1.k1": k1[i].double()}).beam.particles for i in range(len(index))])
            for lattice in (pic, pic3, pic3c, gauss))
        first_order = surrogate.physical(sim.ParticleBeam(beams_in.double(), p0c=pairs.p0c, species=species),
                                         {"Q1.k1": k1.double()}).beam.particles
        rows = [("surrogate", predicted), ("PIC 16^3, 0.25 m", fit_pic), ("PIC 16^3, 0.25 m, extent 3", fit_pic3),
                ("PIC 16^3, 0.25 m, extent 3, compensated (the fit's)", fit_pic3c),
                ("no space charge", first_order)]
        # linear space charge alone (sim.LinearSpaceCharge as 6x6 maps, kicks every 0.2 m; no network, no grid), and
        # with the first-order effect of the field's nonlinear part (born: true)
        for position, (name, born) in enumerate((("linear space charge", False), ("linear space charge + first-order "
                                                 "nonlinear kicks (born: true)", True)), start=1):
            section = SectionMap("SC", pairs.lattice, spec["reference_rms"], inputs=spec["inputs"], hidden_layers=0,
                                 space_charge={"charge": pairs.charge, "max_step": 0.2}, born=born).double()
            rows.insert(position, (name, section.track(beams_in.double(), pairs.p0c, species, {"Q1_k1": k1.double()})[0]))
        rows.insert(3, ("Gaussian ellipsoid field, 0.25 m", gaussian))
    out = {}
    for name, beams in rows:
        r = (rms(beams) / rms(reference) - 1)[:, [0, 2]].abs()
        m = (rms(beams) / rms(reference) - 1)[:, [1, 3]].abs()
        e = (emittances(beams) / emittances(reference) - 1)[:, :2].abs()
        out[name] = {"rms_max": r.max().item(), "rms_median": r.median().item(), "rms_p90": r.quantile(0.9).item(),
                     "momentum_median": m.median().item(), "momentum_p90": m.quantile(0.9).item(),
                     "emit_max": e.max().item(), "emit_median": e.median().item(), "emit_p90": e.quantile(0.9).item()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    # PIC in every step at the surrogate config's particle count (both configs ship with 40k)
    shipped = yaml.safe_load(open(ROOT / "configs/sc_quad_scan_surrogate.yaml"))["model"]
    n = shipped["generator"]["init_args"]["n_particles"]
    pic = step_time("configs/sc_quad_scan.yaml", options.steps, [f"--model.generator.init_args.n_particles={n}",
                                                                 "--model.space_charge_every=1"])  # PIC in every step
    corrected = step_time("configs/sc_quad_scan_surrogate.yaml", options.steps)
    plain = [{k: v for k, v in entry.items() if k != "correct"} for entry in shipped["replace"]]
    surrogate = step_time("configs/sc_quad_scan_surrogate.yaml", options.steps, ["--model.replace", json.dumps(plain)])
    linear = step_time("configs/sc_quad_scan_surrogate.yaml", options.steps, LINEAR)
    born = step_time("configs/sc_quad_scan_surrogate.yaml", options.steps, BORN)
    every = shipped["replace"][0].get("correct", {}).get("every")
    # the section's untrained first-order map (no space charge, no weights file) with the same correction
    first_order = [{"elements": ["Q1", "D1"], "element": {"type": "SectionMap", "name": "SC", "inputs": ["Q1.k1"],
                                                          "reference_rms": [1.0] * 6, "hidden_layers": 0},
                    "correct": shipped["replace"][0].get("correct")}]
    untrained = step_time("configs/sc_quad_scan_surrogate.yaml", options.steps, ["--model.replace", json.dumps(first_order)])
    every_k = ["--model.space_charge_every", str(every), f"--model.generator.init_args.n_particles={n}"]
    lagged = step_time("configs/sc_quad_scan.yaml", options.steps, every_k)
    gaussian = step_time("configs/sc_quad_scan.yaml", options.steps, [f"--model.generator.init_args.n_particles={n}",
                                                                      "--model.space_charge={solver: gaussian, max_step: 0.25}",
                                                                      "--model.space_charge_every=1"])
    print(f"time per training step ({options.threads} threads, {n} particles): PIC {1e3 * pic:.0f} ms; the shipped "
          f"surrogate config (corrected by PIC every {every} steps) {1e3 * corrected:.0f} ms, {pic / corrected:.1f}x faster; "
          f"the surrogate alone {1e3 * surrogate:.0f} ms, {pic / surrogate:.1f}x; linear space charge alone "
          f"{1e3 * linear:.0f} ms, {pic / linear:.1f}x; with first-order nonlinear kicks (born: true) {1e3 * born:.0f} ms, "
          f"{pic / born:.1f}x; the untrained first-order map with the same correction "
          f"{1e3 * untrained:.0f} ms, {pic / untrained:.1f}x; PIC kicks every {every} steps, held "
          f"between (model.space_charge_every) {1e3 * lagged:.0f} ms, {pic / lagged:.1f}x; the Gaussian ellipsoid's "
          f"field in every step (solver: gaussian) {1e3 * gaussian:.0f} ms, {pic / gaussian:.1f}x")
    for name in ("sc_section.pairs", "sc_section.visited.pairs"):
        pairs = ROOT / f"data/{name}.h5"
        if not pairs.is_file():
            print(f"{pairs} missing: psr simulate-pairs --config data/{name}.yaml (its accuracy skipped)")
            continue
        for model, row in held_out_errors(pairs).items():
            print(f"{name} held-out beams, {model} vs the pairs' PIC: rms sizes x, y |error| median "
                  f"{100 * row['rms_median']:.2f} %, 90 % {100 * row['rms_p90']:.2f} %, max {100 * row['rms_max']:.2f} % "
                  f"(px, py median {100 * row['momentum_median']:.2f} %, 90 % {100 * row['momentum_p90']:.2f} %); "
                  f"emittances median {100 * row['emit_median']:.2f} %, 90 % {100 * row['emit_p90']:.2f} %, max "
                  f"{100 * row['emit_max']:.2f} %")


if __name__ == "__main__":
    main()
