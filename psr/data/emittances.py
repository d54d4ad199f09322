"""Normalized rms and core emittances of a particle set: the table every report and truth uses."""

import numpy as np
import torch

import sim

PLANES_4D = ("x", "y")
PLANES_6D = ("x", "y", "z")
CORE_FRACTION = 0.9  # the core emittances' share of the particles


def emittance_table(particles: np.ndarray, p0c: float, species: str, planes) -> dict[str, float]:
    """Normalized rms emittances [m] of the given planes (and the 4D/6D ones), and of each plane's
    90 % core (`sim.ParticleBeam.core_emittance`: the 90 % of particles of smallest amplitude)."""
    beam = sim.ParticleBeam(torch.as_tensor(particles, dtype=torch.float64), p0c=p0c, species=species)
    table = {f"norm_emit_{p}": beam.emittance(p, normalized=True).item() for p in planes}
    table.update({f"norm_emit_{p}_core90": beam.core_emittance(p, CORE_FRACTION, normalized=True).item() for p in planes})
    table["norm_emit_4d"] = beam.emittance("4d", normalized=True).item()
    if "z" in planes:
        table["norm_emit_6d"] = beam.emittance("6d", normalized=True).item()
    return table
