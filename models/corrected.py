"""A surrogate corrected by its physics now and then: fast steps, the reference physics' fixed point.

`CorrectedSection` tracks a section with a trained neural element (e.g. a `SectionMap` of its space charge)
plus a per-particle correction delta = reference(x) - surrogate(x), taken with the section's own physics
(particle-in-cell space charge) on the beam of every `every`-th training step and held until the next:

    x_out = surrogate(x) + delta,    delta = [reference(x_k) - surrogate(x_k)] at the last refresh step k,

without gradient through delta (defect correction, as in space mapping). The fit's gradient is the
surrogate's; the forward model is the reference's exactly at each refresh and, between refreshes, off by the
surrogate's error in how the output *changes* with the beam, which vanishes as the fit converges. So a fit
converges where the reference physics fits the images, not where the surrogate is wrong, at the cost of one
reference pass without gradient every `every` steps. It needs the same particles step after step (a generator
with fixed base samples, as `models.MLPBeamGenerator`; `psr fit` refuses one that resamples). Outside training (validation, reports, `psr predict`)
the section is tracked by its reference physics.
"""

import torch
from torch import nn

import sim
from models.elements import NEURAL_ELEMENT_TYPES, first_order_active, section_setting_key


class CorrectedSection(nn.Module):
    """surrogate: the neural element's lattice entry (type SectionMap, weights, ...); section: the lattice
    entries it replaces; space_charge: the reference's `sim.SpaceCharge` config {grid_shape, max_step, extent,
    compensate}; charge: the bunch charge [C] of the reference's kicks; every: steps between refreshes (>= 1)."""

    def __init__(self, name: str, surrogate: dict, section: list[dict], space_charge: dict, charge: float,
                 every: int = 20, base_dir: str | None = None):
        super().__init__()
        where = f"CorrectedSection {name}"
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"{where}: every must be a whole number of steps >= 1, got {every!r}")
        if not (isinstance(charge, (int, float)) and charge != 0):
            raise ValueError(f"{where}: charge must be the bunch's charge in coulombs (not 0), got {charge!r}")
        entry = dict(surrogate)
        kind = entry.pop("type", None)
        if kind != "SectionMap":
            raise ValueError(f"{where}: surrogate must be a SectionMap entry, got type {kind!r}")
        self.name, self.every, self.charge = name, every, float(charge)
        self.entry = {"surrogate": dict(surrogate), "section": [dict(e) for e in section],
                      "space_charge": dict(space_charge), "charge": float(charge), "every": every}
        self.surrogate = NEURAL_ELEMENT_TYPES[kind](**{**entry, "name": name, "base_dir": base_dir})
        kicks = sim.SpaceCharge.from_config(space_charge, f"{where}: space_charge")
        if kicks is None:
            raise ValueError(f"{where}: space_charge must be a PIC config {{grid_shape, max_step, ...}}, got null")
        try:
            self.reference = sim.Lattice.from_list([dict(e) for e in section], space_charge=kicks)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: section: {err}") from None
        self.parameters_defaults = self.surrogate.parameters_defaults
        self._deltas: dict = {}  # (input shape, setting names) -> [delta (..., N, 6), steps since it was taken]

    def parameter_values(self, overrides, like):
        return self.surrogate.parameter_values(overrides, like)

    def to_dict(self) -> dict:
        return {"type": "CorrectedSection", "name": self.name, **self.entry}

    def track_reference(self, particles: torch.Tensor, p0c, species, overrides: dict | None = None) -> torch.Tensor:
        """The section's particles (..., N, 6) out of its reference physics."""
        p = self.surrogate.parameter_values(overrides, particles)
        settings = {k: p[section_setting_key(k)] for k in self.surrogate.inputs}
        beam = sim.ParticleBeam(particles, p0c=p0c, species=species, charge=self.charge)
        return self.reference(beam, settings).beam.particles

    def track(self, particles: torch.Tensor, p0c, species, overrides: dict | None = None):
        if first_order_active():  # linearizing with space charge off: the surrogate's first-order physics
            return self.surrogate.track(particles, p0c, species, overrides)
        if not (self.training and torch.is_grad_enabled()):
            return self.track_reference(particles, p0c, species, overrides), p0c
        out, p0c_out = self.surrogate.track(particles, p0c, species, overrides)
        key = (tuple(particles.shape), tuple(sorted(overrides or {})))  # one per batch of a fit (its settings barely move)
        held = self._deltas.get(key)
        if held is None or held[1] >= self.every or held[0].shape != out.shape:
            with torch.no_grad():
                delta = self.track_reference(particles.detach(), p0c, species, overrides) - out.detach()
            held = self._deltas[key] = [delta, 0]
        held[1] += 1
        return out + held[0], p0c_out
