"""Particle beams in Bmad phase-space coordinates and their statistics."""

import math

import torch

from .species import get_species, relativistic_factors

PLANES = {"x": (0, 1), "y": (2, 3), "z": (4, 5)}
_KEEP = object()  # with_particles: keep the beam's weights


class ParticleBeam:
    """A bunch of macro-particles.

    particles: tensor (..., N, 6) of (x [m], px, y [m], py, z [m], pz) in Bmad coordinates.
    p0c: reference momentum [eV] (a number; a tensor of the settings shape after an RF cavity whose
    voltage is scanned). species: "electron", "positron" or "proton".
    charge: bunch charge [C]; only its magnitude is used (the particles' sign comes from the species).
    weights: optional survival of each particle in [0, 1], (..., N) broadcasting against the particles
    (an `Aperture` sets it; lost particles keep their coordinates with weight 0). None: all survive.
    Moments (`mean`, `cov`, emittances) are weighted: they describe the surviving particles.
    """

    def __init__(self, particles: torch.Tensor, p0c: float, species="electron", charge: float = 0.0,
                 weights: torch.Tensor | None = None):
        particles = torch.as_tensor(particles)
        if particles.ndim < 2 or particles.shape[-1] != 6:
            raise ValueError(f"particles must have shape (..., N, 6), got {tuple(particles.shape)}")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=particles.dtype, device=particles.device)
            try:
                torch.broadcast_shapes(weights.shape, particles.shape[:-1])
            except RuntimeError:
                raise ValueError(f"weights {tuple(weights.shape)} do not broadcast against particles "
                                 f"{tuple(particles.shape)} (they need shape (..., N))") from None
            if weights.ndim == 0 or weights.shape[-1] != particles.shape[-2]:
                raise ValueError(f"weights must have shape (..., N) with N = {particles.shape[-2]}, got {tuple(weights.shape)}")
        if torch.is_tensor(p0c) and p0c.numel() == 1 and not p0c.requires_grad:
            p0c = p0c.item()
        if not bool(torch.all(torch.as_tensor(p0c) > 0)):
            raise ValueError(f"p0c must be positive, got {p0c}")
        if not math.isfinite(charge):
            raise ValueError(f"charge must be a finite number of coulombs, got {charge}")
        self.particles = particles
        self.p0c = p0c if torch.is_tensor(p0c) else float(p0c)
        self.species = get_species(species)
        self.charge = abs(float(charge))
        self.weights = weights

    def with_particles(self, particles: torch.Tensor, p0c=None, weights=_KEEP) -> "ParticleBeam":
        """The same species and charge with new particles (and a new reference momentum p0c [eV]);
        the weights stay unless `weights` is given (None: all particles survive)."""
        weights = self.weights if weights is _KEEP else weights
        return ParticleBeam(particles, self.p0c if p0c is None else p0c, self.species, self.charge, weights)

    def surviving_fraction(self) -> torch.Tensor:
        """Mean survival weight (...): the fraction of the particles that survived (1 without weights)."""
        if self.weights is None:
            return torch.ones(self.particles.shape[:-2], dtype=self.particles.dtype, device=self.particles.device)
        return self.weights.expand(torch.broadcast_shapes(self.weights.shape, self.particles.shape[:-1])).mean(-1)

    def _unit_weights(self) -> torch.Tensor:
        """Weights normalized to unit sum, (..., N, 1) (NaN when nothing survives)."""
        return (self.weights * (1 / self.weights.sum(-1, keepdim=True))).unsqueeze(-1)

    @property
    def n_particles(self) -> int:
        return self.particles.shape[-2]

    @property
    def relativistic_gamma(self) -> float:
        return relativistic_factors(self.p0c, self.species)[0]

    @property
    def relativistic_beta(self) -> float:
        return relativistic_factors(self.p0c, self.species)[1]

    def mean(self) -> torch.Tensor:
        """Centroid (..., 6) (weighted by survival)."""
        if self.weights is not None:
            return (self._unit_weights() * self.particles).sum(dim=-2)
        return self.particles.mean(dim=-2)

    def cov(self) -> torch.Tensor:
        """Covariance matrix (..., 6, 6) (population: 1/N, or weights normalized to unit sum)."""
        centred = self.particles - self.mean().unsqueeze(-2)
        if self.weights is not None:
            return (centred * self._unit_weights()).transpose(-1, -2) @ centred
        return centred.transpose(-1, -2) @ centred / self.n_particles

    def emittance(self, plane: str = "x", normalized: bool = False) -> torch.Tensor:
        """Rms emittance of "x", "y", "z" [m], "4d" [m^2] or "6d" [m^3]: sqrt(det) of the covariance block.

        normalized=True multiplies by (beta*gamma) per plane.
        """
        cov = self.cov()
        if plane in PLANES:
            i, j = PLANES[plane]
            block = cov[..., [i, j], :][..., :, [i, j]]
            n_planes = 1
        elif plane == "4d":
            block, n_planes = cov[..., :4, :4], 2
        elif plane == "6d":
            block, n_planes = cov, 3
        else:
            raise ValueError(f"unknown plane {plane!r}; use x, y, z, 4d or 6d")
        emit = torch.linalg.det(block).clamp(min=0).sqrt()
        if normalized:
            gamma, beta = relativistic_factors(self.p0c, self.species)
            emit = emit * torch.as_tensor(beta * gamma, dtype=emit.dtype) ** n_planes
        return emit

    def core_emittance(self, plane: str = "x", fraction: float = 0.9, normalized: bool = False) -> torch.Tensor:
        """Rms emittance [m] of the core of plane "x", "y" or "z": the `fraction` of the particles (by
        weight) with the smallest Courant-Snyder amplitude J = w^T S^-1 w, w the plane's centred
        coordinates and S their covariance (of the whole beam). Tails and halos barely move it."""
        if plane not in PLANES:
            raise ValueError(f"unknown plane {plane!r}; use x, y or z")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        i, j = PLANES[plane]
        centred = self.particles[..., [i, j]] - self.mean()[..., [i, j]].unsqueeze(-2)
        cov = self.cov()[..., [i, j], :][..., :, [i, j]]
        weights = self._unit_weights() if self.weights is not None else torch.full_like(centred[..., :1], 1 / self.n_particles)
        amplitude = (centred @ torch.linalg.pinv(cov) * centred).sum(-1)  # (..., N)
        order = amplitude.argsort(-1)
        sorted_weights = weights.squeeze(-1).gather(-1, order)
        inside = (sorted_weights.cumsum(-1) - sorted_weights) < fraction  # the smallest amplitudes up to `fraction`
        core_weights = torch.zeros_like(sorted_weights).scatter(-1, order, sorted_weights * inside)
        core = ParticleBeam(self.particles, self.p0c, self.species, weights=core_weights)
        return core.emittance(plane, normalized=normalized)

    def twiss(self, plane: str = "x") -> dict[str, torch.Tensor]:
        """Twiss beta [m], alpha and geometric emittance [m] of plane "x" or "y" (or "z")."""
        if plane not in PLANES:
            raise ValueError(f"unknown plane {plane!r}; use x, y or z")
        i, j = PLANES[plane]
        cov = self.cov()
        emit = self.emittance(plane)
        return {
            "beta": cov[..., i, i] / emit,
            "alpha": -cov[..., i, j] / emit,
            "emittance": emit,
        }

    def __repr__(self) -> str:
        return (
            f"ParticleBeam(shape={tuple(self.particles.shape)}, p0c={self.p0c} eV, "
            f"species={self.species.name}, charge={self.charge:.3g} C"
            + (")" if self.weights is None else f", weights={tuple(self.weights.shape)})")
        )
