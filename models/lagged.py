"""Space-charge kicks taken by particle-in-cell every k training steps and held per particle in between.

A fit's step tracks the beam through the lattice's elements sliced as for PIC space charge, but only every
`every`-th step computes the kicks (`sim.SpaceCharge`, without gradient); the steps between give each particle
the momentum kick it got at that step's slice the last time (the same particles step after step: a generator
with fixed base samples):

    p_after = p_before + dp_i,    dp_i = [PIC kick of slice i] at the last refresh step,

(hold "kicks"), so the forward model is PIC's exactly at each refresh and, between refreshes, off by how much the kicks changed
with the beam since, which vanishes as the fit converges. The optics between the kicks stay exact (the lattice's
own maps, with their gradient); the kicks carry none (defect correction, as `models.corrected`). The fit lands
where PIC fits the images at about the cost of tracking without space charge. Outside a training step
(validation, reports, `psr predict`) every kick is PIC's.

hold "field" (for generators that draw fresh particles every step): the refresh keeps each slice's PIC field on
its grid instead, and every step interpolates it at that step's particles, the grid moved with the bunch's mean:

    p_after = p_before + K * E_i(r - <r> + <r>_i),    E_i = [PIC field of slice i on its grid] at the last refresh,

(K the momentum kick per field, r rest-frame positions, <r>_i their mean at the refresh), without gradient (as
the held kicks). It costs a cloud-in-cell gather a kick: 49 ms against PIC's 240 ms (forward and backward) and
2 ms for held kicks, 9 settings of 40k particles, one thread.
"""

import torch

import sim
from sim.space_charge import apply_field


class LaggedSpaceCharge(sim.SpaceCharge):
    """`sim.SpaceCharge` (same config) whose kicks in training are refreshed every `every` steps (>= 1); solver:
    another space-charge model whose kicks are held instead of PIC's (e.g. `sim.GaussianSpaceCharge`). hold:
    "kicks" (each particle's kick: the same particles every step) or "field" (PIC's field grid, interpolated at
    each step's particles: fresh particles every step; PIC only)."""

    def __init__(self, every: int, solver=None, hold: str = "kicks", **config):
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"LaggedSpaceCharge: every must be a whole number of training steps >= 1, got {every!r}")
        if hold not in ("kicks", "field"):
            raise ValueError(f"LaggedSpaceCharge: hold must be kicks or field, got {hold!r}")
        if hold == "field" and solver is not None:
            raise ValueError(f"LaggedSpaceCharge: hold field needs the PIC solver's grid, not {type(solver).__name__}")
        super().__init__(**{**config, "checkpoint": False})  # no graph through the kicks: nothing to checkpoint
        self.every = every
        self.solver = solver
        self.hold = hold
        self.active = False  # within a training step (`start_step` .. `end_step`)
        self._steps = 0  # training steps started
        self._calls = 0  # kicks asked for in this step
        self._kicks: dict = {}  # (call index, particle shape) -> momentum kicks (..., N, 6) of the last refresh

    @classmethod
    def lagging(cls, space_charge: sim.SpaceCharge, every: int, hold: str = "kicks") -> "LaggedSpaceCharge":
        """The lagged version of a `sim.SpaceCharge` (or of another solver with `kick` and `max_step`)."""
        if not isinstance(space_charge, sim.SpaceCharge):
            return cls(every, solver=space_charge, hold=hold, max_step=space_charge.max_step)
        return cls(every, hold=hold, grid_shape=space_charge.grid_shape, max_step=space_charge.max_step,
                   extent=space_charge.extent, compensate=space_charge.compensate)

    def __repr__(self) -> str:
        hold = ", hold=field" if self.hold == "field" else ""
        return f"LaggedSpaceCharge(every={self.every}{hold}, {self.solver or super().__repr__()})"

    def start_step(self) -> None:
        """A training step begins: its kicks are held ones unless it is a refresh step."""
        self.active, self._calls = True, 0
        if self._steps % self.every == 0:
            self._kicks.clear()
        self._steps += 1

    def end_step(self) -> None:
        self.active = False

    def kick(self, particles: torch.Tensor, p0c, species, charge: float, length) -> torch.Tensor:
        if not (self.active and torch.is_grad_enabled()) or charge == 0:
            return self._kick(particles, p0c, species, charge, length)
        key = (self._calls, tuple(particles.shape))
        self._calls += 1
        held = self._kicks.get(key)
        if self.hold == "field":
            return self._field_kick(particles, held, key, p0c, species, charge, length)
        if held is None:
            with torch.no_grad():
                before = particles.detach()
                held = self._kicks[key] = self._kick(before, p0c, species, charge, length) - before
        return particles + held

    def _kick(self, particles, p0c, species, charge, length):
        if self.solver is not None:
            return self.solver.kick(particles, p0c, species, charge, length)
        return super().kick(particles, p0c, species, charge, length)

    def _field_kick(self, particles, held, key, p0c, species, charge, length):
        """The kick of the held field grid of this call (PIC's, solved now at a refresh step), without gradient."""
        batch_shape, n = particles.shape[:-2], particles.shape[-2]
        with torch.no_grad():
            before = particles.detach()
            positions = self.rest_positions(before.reshape(-1, n, 6), p0c, species)
            mean = positions.mean(-2)  # (B, 3): the grid moves with the bunch
            if held is None:
                fields, origin, spacing = self.field_grid(positions, abs(charge))
                held = self._kicks[key] = (fields, origin - mean, spacing)
            fields, offset, spacing = held
            field = self.field_at(fields, offset + mean, spacing, positions).reshape(*batch_shape, n, 3)
            kicks = apply_field(before, field, p0c, species, length) - before
        return particles + kicks
