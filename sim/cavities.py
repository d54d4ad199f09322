"""RF structures: the transverse deflecting cavity (TDC) and the accelerating RF cavity.

Phase convention (both): a particle at z sees the RF phase phi + k z / beta, k = 2 pi f / c, beta its
speed (it arrives z / (beta c) earlier than the reference); `phase` [rad] is the reference's phase.
"""

import math

import torch

from .element import LinearElement, eye_like, may_be_nonzero
from .magnets import drift_map, tilted
from .species import SPEED_OF_LIGHT, get_species
from .tracking import drift_kick_drift, exact_drift, per_particle, reference, stack


def _particle_beta(pz, p0c, mass):
    momentum = (1 + pz) * p0c
    return momentum / torch.sqrt(momentum**2 + mass**2)


class TransverseDeflectingCavity(LinearElement):
    """Transverse deflecting cavity: `length` [m], `voltage` [V], `frequency` [Hz], `phase` [rad],
    `tilt` [rad], misalignment `x_offset`, `y_offset` [m].

    Kick in the element frame, a = -q V / p0c (q the species' charge in e):
    px += a sin(phase + k z / beta), and by Panofsky-Wenzel the energy change
    dE = a p0c k x cos(phase + k z / beta) (z rescaled by beta_new / beta_old: time is kept).
    Streak direction: an electron bunch at phase 0 and V > 0 has its head (z > 0) kicked towards +x
    (towards +y with tilt = pi/2); positrons and protons the other way.
    kick_drift (default): exact drift L/2n, kick of V/n, ... over `num_steps` (one step is
    Cheetah's drift_kick_drift). linear: the first-order map about the reference particle, with
    the zeroth-order kick a sin(phase) kept as an offset.
    """

    parameters_defaults = {"length": 0.0, "voltage": 0.0, "frequency": 0.0, "phase": 0.0, "tilt": 0.0,
                           "x_offset": 0.0, "y_offset": 0.0}
    tracking_methods = ("kick_drift", "linear")
    non_negative = ("length", "frequency")
    sliced_parameters = ("length", "voltage")
    affine = True

    def is_matrix(self, overrides, like):
        """Linear tracking at phase 0 has no zeroth-order kick: then the TDC is its matrix alone."""
        if self.tracking != "linear":
            return False
        p = self.parameter_values(overrides, like)
        return self.offsets(p) is None and not may_be_nonzero(p["phase"])

    def _strength(self, p, p0c, species):
        """a = -q V / p0c (...) and the wave number k [1/m]."""
        charge = get_species(species).charge_e
        return -charge * p["voltage"] / p0c, 2 * math.pi * p["frequency"] / SPEED_OF_LIGHT

    def transfer_map(self, p0c, species, like, overrides=None):
        p = self.parameter_values(overrides, like)
        p0c_t, e0, _ = reference(p0c, species, like)
        a, k = self._strength(p, p0c_t, species)
        g = a * k * torch.cos(p["phase"]) * e0 / p0c_t  # a k cos(phase) / beta0
        half = drift_map(0.5 * p["length"], p0c, species, like)
        kick = eye_like(g.shape, like)
        kick[..., 1, 4] = g
        kick[..., 5, 0] = g
        return tilted(half @ kick @ half, p["tilt"], like)

    def track(self, particles, p0c, species, overrides=None):
        """kick_drift in the lab frame: the exact drift does not care about the frame, so only the kick
        is rotated by the tilt (and sees the offsets); the linear method goes through the element frame."""
        if self.tracking == "linear":
            return super().track(particles, p0c, species, overrides)
        p = self.parameter_values(overrides, particles)
        p0c_t, _, mass = reference(p0c, species, particles)
        a, k = self._strength(p, p0c_t, species)
        length, a, k, phase, ref = (per_particle(v) for v in (p["length"], a, k, p["phase"], p0c_t))
        cos_t, sin_t = per_particle(torch.cos(p["tilt"])), per_particle(torch.sin(p["tilt"]))
        dx, dy = per_particle(p["x_offset"]), per_particle(p["y_offset"])

        a_step = a / self.num_steps  # each of the num_steps kicks gives 1/num_steps of the voltage

        def kick(c, step):
            x, px, y, py, z, pz = c
            beta = _particle_beta(pz, ref, mass)
            rf = phase + k * z / beta
            deflection = a_step * torch.sin(rf)
            px, py = px + deflection * cos_t, py + deflection * sin_t
            x_element = (x - dx) * cos_t + (y - dy) * sin_t
            old_momentum = (1 + pz) * ref
            old_energy = torch.sqrt(old_momentum**2 + mass**2)
            gain = a_step * ref * k * x_element * torch.cos(rf)  # [eV]
            energy = old_energy + gain
            momentum = torch.sqrt(energy**2 - mass**2)
            # pz += dP / p0c with dP = (E_new^2 - E_old^2) / (P_new + P_old): no 1 + pz round-off in float32
            pz = pz + gain * (2 * old_energy + gain) / ((momentum + old_momentum) * ref)
            z = z * (momentum / energy) / beta
            return x, px, y, py, z, pz

        drift = lambda c, s: exact_drift(c, s, ref, mass)  # noqa: E731
        return stack(drift_kick_drift(particles.unbind(-1), length, self.num_steps, drift, kick)), p0c

    def track_body(self, coords, p, p0c, species):
        """The linear method in the element frame."""
        p0c, _, mass = reference(p0c, species, coords[0])
        a, k = self._strength(p, p0c, species)
        length, a, k, phase, p0c = (per_particle(v) for v in (p["length"], a, k, p["phase"], p0c))
        return self._track_linear(coords, p, length, a, phase, p0c, species)

    def _track_linear(self, coords, p, length, a, phase, p0c, species):
        """Element-frame linear map plus the zeroth-order kick a sin(phase) (drifting L/2 after it)."""
        m = self.transfer_map(p0c.squeeze(-1), species, coords[0], {**p, "tilt": torch.zeros_like(p["tilt"])})
        particles = stack(coords) @ m.transpose(-1, -2)
        x, px, y, py, z, pz = particles.unbind(-1)
        offset = a * torch.sin(phase)
        return x + 0.5 * length * offset, px + offset, y, py, z, pz


class RFCavity(LinearElement):
    """Accelerating cavity: `length` [m], `voltage` [V], `frequency` [Hz], `phase` [rad].

    The reference particle gains |q| V cos(phase) [eV] whatever the species' charge sign (phase 0
    is on crest); a particle at z gains |q| V cos(phase + k z / beta). The reference momentum p0c
    changes with it, so px, py shrink by p0c_old / p0c_new (adiabatic damping) and pz is measured
    against the new reference. Tracking kick_drift only: `num_steps` energy kicks between exact
    drifts (the acceleration spread along the cavity); no transverse RF focusing.
    """

    parameters_defaults = {"length": 0.0, "voltage": 0.0, "frequency": 0.0, "phase": 0.0}
    tracking_methods = ("kick_drift",)
    non_negative = ("length", "frequency")
    sliced_parameters = ("length", "voltage")

    def track(self, particles, p0c, species, overrides=None):
        p = self.parameter_values(overrides, particles)
        p0c, e0, mass = reference(p0c, species, particles)
        gain = abs(get_species(species).charge_e) * p["voltage"] / self.num_steps  # per step [eV]
        k = 2 * math.pi * p["frequency"] / SPEED_OF_LIGHT
        step = per_particle(p["length"] / self.num_steps)
        phase, k, gain = per_particle(p["phase"]), per_particle(k), per_particle(gain)
        coords = particles.unbind(-1)
        ref = per_particle(p0c)
        for index in range(self.num_steps):
            coords = exact_drift(coords, 0.5 * step, ref, mass)
            x, px, y, py, z, pz = coords
            beta = _particle_beta(pz, ref, mass)
            energy = torch.sqrt(((1 + pz) * ref) ** 2 + mass**2) + gain * torch.cos(phase + k * z / beta)
            new_ref = torch.sqrt((torch.sqrt(ref**2 + mass**2) + gain * torch.cos(phase)) ** 2 - mass**2)
            momentum = torch.sqrt(energy**2 - mass**2)
            coords = (x, px * ref / new_ref, y, py * ref / new_ref, z * (momentum / energy) / beta, momentum / new_ref - 1)
            ref = new_ref
            coords = exact_drift(coords, 0.5 * step, ref, mass)
        return stack(coords), ref.squeeze(-1)

    def is_matrix(self, overrides, like):
        return False  # it changes the reference momentum
