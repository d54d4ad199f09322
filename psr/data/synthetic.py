"""Synthetic ground-truth beams for making example and test data."""

import math

import torch


class SyntheticBeam:
    """A non-Gaussian test beam: Gaussian core with given Twiss, then a nonlinear x-y correlation.

    emittance_x/y: geometric rms emittances of the Gaussian core [m]; beta [m] and alpha per plane.
    nonlinear_xy: x += nonlinear_xy * sigma_x * ((y/sigma_y)^2 - 1), a curved (banana) x-y shape.
    nonlinear_pxy: py += nonlinear_pxy * sigma_py * ((x/sigma_x)^2 - 1).
    sigma_z [m], sigma_pz: longitudinal Gaussian sizes (0 for a 4D beam); chirp: pz += chirp * z [1/m].
    chirp_curvature: pz += chirp_curvature * sigma_pz * ((z/sigma_z)^2 - 1) (RF curvature).
    nonlinear_xz: x += nonlinear_xz * sigma_x * ((z/sigma_z)^2 - 1), a transverse offset growing
    towards head and tail (a curved x-z shape); tilt_yz: y += tilt_yz * z (a head-tail tilt).
    offset: centroid (6 values), default 0.

    Hard beams (tails decide their rms emittances), each in the core's normalized coordinates (u, v) of
    a plane (x = sqrt(emit beta) u, px = sqrt(emit / beta) (v - alpha u)), applied before the
    correlations above:
    s_shape_x, s_shape_y: v += s * u^3, an S-shaped phase space (third-order term, as spherical
    aberration gives); halo_fraction, halo_scale: that fraction of the particles (drawn at random) has
    its transverse (u, v) of both planes `halo_scale` times larger (a Gaussian halo); hollow: the
    transverse position (u_x, u_y) moved outwards by `hollow` along its radius (a ring of that radius,
    in core rms units); px_tail: v_x += px_tail * (exp(v_x) - e^0.5), a long one-sided tail in px.
    """

    def __init__(
        self,
        emittance_x: float = 1e-8, beta_x: float = 5.0, alpha_x: float = 0.0,
        emittance_y: float = 1e-8, beta_y: float = 5.0, alpha_y: float = 0.0,
        nonlinear_xy: float = 0.0, nonlinear_pxy: float = 0.0,
        sigma_z: float = 0.0, sigma_pz: float = 0.0, chirp: float = 0.0,
        chirp_curvature: float = 0.0, nonlinear_xz: float = 0.0, tilt_yz: float = 0.0,
        offset: list[float] | None = None,
        s_shape_x: float = 0.0, s_shape_y: float = 0.0, halo_fraction: float = 0.0, halo_scale: float = 1.0,
        hollow: float = 0.0, px_tail: float = 0.0,
    ):
        for key, value in (("emittance_x", emittance_x), ("emittance_y", emittance_y),
                           ("beta_x", beta_x), ("beta_y", beta_y)):
            if not value > 0:
                raise ValueError(f"{key} must be positive, got {value}")
        if sigma_z < 0 or sigma_pz < 0:
            raise ValueError("sigma_z and sigma_pz must be >= 0")
        self.twiss = ((emittance_x, beta_x, alpha_x), (emittance_y, beta_y, alpha_y))
        self.nonlinear_xy, self.nonlinear_pxy = nonlinear_xy, nonlinear_pxy
        self.sigma_z, self.sigma_pz, self.chirp = sigma_z, sigma_pz, chirp
        self.chirp_curvature, self.nonlinear_xz, self.tilt_yz = chirp_curvature, nonlinear_xz, tilt_yz
        if sigma_z == 0 and (chirp_curvature or nonlinear_xz):
            raise ValueError("chirp_curvature and nonlinear_xz need sigma_z > 0")
        if not 0 <= halo_fraction < 1 or halo_scale <= 0 or hollow < 0:
            raise ValueError("halo_fraction must be in [0, 1), halo_scale > 0 and hollow >= 0")
        self.s_shape = (s_shape_x, s_shape_y)
        self.halo_fraction, self.halo_scale, self.hollow, self.px_tail = halo_fraction, halo_scale, hollow, px_tail
        self.offset = torch.tensor(offset if offset is not None else [0.0] * 6, dtype=torch.float64)
        if self.offset.shape != (6,):
            raise ValueError(f"offset needs 6 values, got {offset}")

    def sample(self, n_particles: int, seed: int = 0) -> torch.Tensor:
        """Particles (N, 6) float64 in Bmad coordinates."""
        generator = torch.Generator().manual_seed(seed)
        normal = torch.randn(n_particles, 6, generator=generator, dtype=torch.float64)
        particles = torch.zeros_like(normal)
        normal = self._shape(normal, generator)
        for plane, (emit, beta, alpha) in enumerate(self.twiss):
            u, v = normal[:, 2 * plane], normal[:, 2 * plane + 1]
            particles[:, 2 * plane] = math.sqrt(emit * beta) * u
            particles[:, 2 * plane + 1] = math.sqrt(emit / beta) * (v - alpha * u)
        particles[:, 4] = self.sigma_z * normal[:, 4]
        particles[:, 5] = self.sigma_pz * normal[:, 5] + self.chirp * particles[:, 4]
        sx, sy = particles[:, 0].std(), particles[:, 2].std()
        spy = particles[:, 3].std()
        x_core = particles[:, 0].clone()
        particles[:, 0] += self.nonlinear_xy * sx * ((particles[:, 2] / sy) ** 2 - 1)
        particles[:, 3] += self.nonlinear_pxy * spy * ((x_core / sx) ** 2 - 1)
        if self.sigma_z > 0:
            z2 = (particles[:, 4] / self.sigma_z) ** 2 - 1
            particles[:, 5] += self.chirp_curvature * self.sigma_pz * z2
            particles[:, 0] += self.nonlinear_xz * sx * z2
            particles[:, 2] += self.tilt_yz * particles[:, 4]
        return particles + self.offset

    def _shape(self, normal: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The hard-beam terms on the normalized transverse coordinates (u_x, v_x, u_y, v_y) = columns 0-3."""
        normal = normal.clone()
        if self.hollow:
            radius = normal[:, [0, 2]].norm(dim=-1, keepdim=True)
            normal[:, [0, 2]] *= (radius + self.hollow) / radius
        for plane, s in enumerate(self.s_shape):
            if s:
                normal[:, 2 * plane + 1] += s * normal[:, 2 * plane] ** 3
        if self.px_tail:
            normal[:, 1] += self.px_tail * (torch.exp(normal[:, 1]) - math.exp(0.5))
        if self.halo_fraction:
            halo = torch.rand(normal.shape[0], generator=generator, dtype=normal.dtype) < self.halo_fraction
            normal[halo, :4] *= self.halo_scale
        return normal


class SyntheticInjector:
    """A synthetic injector: the beam depends smoothly but nonlinearly on two upstream settings.

    solenoid: name of the gun-solenoid setting (relative strength, nominal 1); spot: name of the laser-spot
    setting (rms spot size relative to nominal 1). With s = (solenoid - 1) / 0.1 and r = spot:
        emittance_x = emittance * r * (1 + 0.5 s^2)            (thermal ~ spot; compensated at s = 0)
        emittance_y = 0.8 emittance * r * (1 + 0.3 (s - 0.4)^2)
        beta_x = 5 exp(0.5 s) sqrt(r) [m], alpha_x = 1.2 tanh(1.5 s) + 0.4
        beta_y = 4 exp(-0.4 s) [m],        alpha_y = -0.8 + 0.6 s^2
        s_shape_x = 0.12 r^2               (spherical aberration of the larger spot: an S-shaped x-px)
        nonlinear_xy = 0.3 s               (a curved x-y correlation that changes sign with s)
    emittance: the geometric rms emittance [m] at the nominal point. `at(settings)` gives the
    `SyntheticBeam` at {solenoid: value, spot: value}.
    """

    def __init__(self, solenoid: str = "GUN.solenoid", spot: str = "LASER.spot", emittance: float = 1.2e-8):
        if not emittance > 0:
            raise ValueError(f"emittance must be positive, got {emittance}")
        self.solenoid, self.spot, self.emittance = solenoid, spot, emittance

    @property
    def setting_names(self) -> list[str]:
        return [self.solenoid, self.spot]

    def at(self, settings: dict[str, float]) -> SyntheticBeam:
        missing = [n for n in self.setting_names if n not in settings]
        if missing:
            raise ValueError(f"the injector needs the upstream setting(s) {missing}; given {sorted(settings)}")
        s, r = (float(settings[self.solenoid]) - 1.0) / 0.1, float(settings[self.spot])
        if not r > 0:
            raise ValueError(f"{self.spot} is a relative spot size and must be positive, got {r}")
        return SyntheticBeam(
            emittance_x=self.emittance * r * (1 + 0.5 * s**2), beta_x=5.0 * math.exp(0.5 * s) * math.sqrt(r),
            alpha_x=1.2 * math.tanh(1.5 * s) + 0.4,
            emittance_y=0.8 * self.emittance * r * (1 + 0.3 * (s - 0.4) ** 2), beta_y=4.0 * math.exp(-0.4 * s),
            alpha_y=-0.8 + 0.6 * s**2, s_shape_x=0.12 * r**2, nonlinear_xy=0.3 * s)
