"""Image mismatch of a finished `psr fit` run, per setting, with many particles (BELLA HTU and any scan file).

Usage: python benchmarks/bella_mismatch.py RUN_FOLDER [RUN_FOLDER ...] [--particles 200000] [--data SCAN.h5]

A fit's logged train_loss / val_loss use its own particle count: with ~10k particles on ~5000 lit pixels
most of that L1 mismatch is the particles' shot noise. This script rebuilds each run from its config.yaml,
loads checkpoints/last.ckpt, draws `--particles` particles from the fitted generator and prints the L1
mismatch (sum |predicted - measured| of unit-sum images; 0 equal, 2 disjoint) of every setting, the mean
over the training and the held-out settings, and the fraction of the beam that passes the lattice's
apertures. --data evaluates on another scan file (the same settings and screen, e.g. without the aperture).
"""

import argparse
import importlib
from pathlib import Path

import numpy as np
import torch
import yaml

from psr.data.datamodule import ScanDataModule
from psr.training.reconstruction import PhaseSpaceReconstruction, image_loss


def build(config: dict) -> PhaseSpaceReconstruction:
    """The model of a run's config.yaml (a generator given by class_path and init_args; no prior module)."""
    spec = config["generator"]
    module, name = spec["class_path"].rsplit(".", 1)
    generator = getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
    return PhaseSpaceReconstruction(generator, **{k: v for k, v in config.items() if k != "generator"})


def evaluate(run: Path, particles: int, data: str | None) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    model, module = build(config["model"]), ScanDataModule(**{**config["data"], **({"path": data} if data else {})})
    module.setup("fit")
    model.configure_scan(module.scan)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    # the generator only: the lattice's buffers (screen geometry, apertures) come from the scan file evaluated
    model.generator.load_state_dict({k.removeprefix("generator."): v for k, v in state.items() if k.startswith("generator.")})
    torch.manual_seed(0)
    with torch.no_grad():
        beam = model.beam(particles)
        everything = module.batch(np.arange(len(module.settings)))
        predicted = model.predict_images(everything["settings"], beam)
        values = {name: everything["settings"][:, i].to(beam.particles.dtype) for i, name in enumerate(model.setting_names)}
        survival = model.lattice(beam, values).beam.surviving_fraction().reshape(-1)
    print(f"{run} ({particles} particles{', data ' + data if data else ''}); emittances in {run / 'emittances.json'}")
    print(" setting   " + "   ".join(f"{name:>10}" for name in model.setting_names) + "   role    L1     passes")
    for screen, images in everything["images"].items():
        loss = torch.stack([image_loss(predicted[screen][i:i + 1], images[i:i + 1], "l1") for i in range(len(images))])
        for i in range(len(images)):
            role = "held out" if i in module.val_index else "train"
            settings = "   ".join(f"{v:10.3f}" for v in everything["settings"][i].tolist())
            print(f"{i:8d}   {settings}   {role:8s} {loss[i]:.3f}  {survival[min(i, len(survival) - 1)]:.3f}")
        print(f"{screen}: mean L1 train {loss[module.train_index].mean():.3f}, held out {loss[module.val_index].mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--particles", type=int, default=200_000)
    parser.add_argument("--data", default=None)
    options = parser.parse_args()
    for run in options.runs:
        evaluate(run, options.particles, options.data)


if __name__ == "__main__":
    main()
