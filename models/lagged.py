"""Space-charge kicks taken by particle-in-cell every k training steps and held per particle in between.

A fit's step tracks the beam through the lattice's elements sliced as for PIC space charge, but only every
`every`-th step computes the kicks (`sim.SpaceCharge`, without gradient); the steps between give each particle
the momentum kick it got at that step's slice the last time (the same particles step after step: a generator
with fixed base samples):

    p_after = p_before + dp_i,    dp_i = [PIC kick of slice i] at the last refresh step,

so the forward model is PIC's exactly at each refresh and, between refreshes, off by how much the kicks changed
with the beam since, which vanishes as the fit converges. The optics between the kicks stay exact (the lattice's
own maps, with their gradient); the kicks carry none (defect correction, as `models.corrected`). The fit lands
where PIC fits the images at about the cost of tracking without space charge. Outside a training step
(validation, reports, `psr predict`) every kick is PIC's.
"""

import torch

import sim


class LaggedSpaceCharge(sim.SpaceCharge):
    """`sim.SpaceCharge` (same config) whose kicks in training are refreshed every `every` steps (>= 1); solver:
    another space-charge model whose kicks are held instead of PIC's (e.g. `sim.GaussianSpaceCharge`)."""

    def __init__(self, every: int, solver=None, **config):
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"LaggedSpaceCharge: every must be a whole number of training steps >= 1, got {every!r}")
        super().__init__(**{**config, "checkpoint": False})  # no graph through the kicks: nothing to checkpoint
        self.every = every
        self.solver = solver
        self.active = False  # within a training step (`start_step` .. `end_step`)
        self._steps = 0  # training steps started
        self._calls = 0  # kicks asked for in this step
        self._kicks: dict = {}  # (call index, particle shape) -> momentum kicks (..., N, 6) of the last refresh

    @classmethod
    def lagging(cls, space_charge: sim.SpaceCharge, every: int) -> "LaggedSpaceCharge":
        """The lagged version of a `sim.SpaceCharge` (or of another solver with `kick` and `max_step`)."""
        if not isinstance(space_charge, sim.SpaceCharge):
            return cls(every, solver=space_charge, max_step=space_charge.max_step)
        return cls(every, grid_shape=space_charge.grid_shape, max_step=space_charge.max_step,
                   extent=space_charge.extent, compensate=space_charge.compensate)

    def __repr__(self) -> str:
        return f"LaggedSpaceCharge(every={self.every}, {self.solver or super().__repr__()})"

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
        if held is None:
            with torch.no_grad():
                before = particles.detach()
                held = self._kicks[key] = self._kick(before, p0c, species, charge, length) - before
        return particles + held

    def _kick(self, particles, p0c, species, charge, length):
        if self.solver is not None:
            return self.solver.kick(particles, p0c, species, charge, length)
        return super().kick(particles, p0c, species, charge, length)
