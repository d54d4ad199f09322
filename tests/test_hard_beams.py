"""Hard test beams (S-shapes, halos, hollow beams, long tails), core emittances and the rms-moment term."""

import math

import numpy as np
import pytest
import torch

import models
import sim
from psr.data.scanfile import read_scan
from psr.data.synthetic import SyntheticBeam
from psr.training.moments import moment_mismatch, moments, projection_kurtosis, projection_mean_abs, without_background

P0C = 60e6


def normalized(beam: torch.Tensor, emit: float, beta: float, alpha: float):
    """The x plane's normalized coordinates (u, v) of particles (N, 6)."""
    u = beam[:, 0] / math.sqrt(emit * beta)
    return u, beam[:, 1] / math.sqrt(emit / beta) + alpha * u


def test_core_emittance_of_a_gaussian_is_the_truncated_gaussians():
    """For a 2D Gaussian the amplitude J is exponential (mean 2): the 90 % core keeps J <= a = 2 ln 10
    and its rms emittance is 1 - (1 - f) / f * a / 2 = 0.744 times the whole beam's (any Twiss)."""
    particles = SyntheticBeam(emittance_x=2e-8, beta_x=7.0, alpha_x=-1.3).sample(400_000, seed=3)
    beam = sim.ParticleBeam(particles, P0C)
    f, a = 0.9, 2 * math.log(10)
    ratio = (beam.core_emittance("x", f) / beam.emittance("x")).item()
    assert ratio == pytest.approx(1 - (1 - f) / f * a / 2, abs=3e-3)
    assert beam.core_emittance("x", 1.0).item() == pytest.approx(beam.emittance("x").item(), rel=1e-12)
    weighted = sim.ParticleBeam(torch.cat([particles, 100 + particles]), P0C,
                                weights=torch.cat([torch.ones(len(particles)), torch.zeros(len(particles))]))
    assert weighted.core_emittance("x", f).item() == pytest.approx(beam.core_emittance("x", f).item(), rel=1e-9)
    with pytest.raises(ValueError, match="fraction"):
        beam.core_emittance("x", 0.0)


def test_a_halo_moves_the_rms_emittance_and_hardly_the_core():
    """5 % of the particles 3x wider: rms emittance (0.95 + 0.05 * 9) = 1.4x the core's Gaussian, while
    the 90 % core emittance changes by less than a quarter of that (the halo's 5 % are mostly outside it)."""
    core = sim.ParticleBeam(SyntheticBeam(emittance_x=1e-8).sample(200_000, seed=1), P0C)
    halo = sim.ParticleBeam(SyntheticBeam(emittance_x=1e-8, halo_fraction=0.05, halo_scale=3.0).sample(200_000, seed=1), P0C)
    assert (halo.emittance("x") / core.emittance("x")).item() == pytest.approx(0.95 + 0.05 * 9, rel=0.02)
    assert (halo.core_emittance("x") / core.core_emittance("x")).item() == pytest.approx(1.0, abs=0.1)


def test_hard_beam_shapes_are_what_they_say():
    """S-shape: v - s u^3 is the Gaussian core; px tail: skewed px; hollow: no particle near the axis."""
    emit, beta, alpha = 1e-8, 5.0, 1.0
    plain = SyntheticBeam(emittance_x=emit, beta_x=beta, alpha_x=alpha).sample(20_000, seed=2)
    s = SyntheticBeam(emittance_x=emit, beta_x=beta, alpha_x=alpha, s_shape_x=0.2).sample(20_000, seed=2)
    u0, v0 = normalized(plain, emit, beta, alpha)
    u, v = normalized(s, emit, beta, alpha)
    torch.testing.assert_close(u, u0)
    torch.testing.assert_close(v - 0.2 * u**3, v0)
    tail = SyntheticBeam(emittance_x=emit, beta_x=beta, px_tail=0.3).sample(50_000, seed=2)
    skew = ((tail[:, 1] - tail[:, 1].mean()) ** 3).mean() / tail[:, 1].std() ** 3
    assert skew > 1.0 and abs(tail[:, 1].mean()) < 0.05 * tail[:, 1].std()
    ring = SyntheticBeam(emittance_x=emit, beta_x=beta, emittance_y=emit, beta_y=beta, hollow=1.5).sample(20_000)
    radius = torch.hypot(ring[:, 0] / math.sqrt(emit * beta), ring[:, 2] / math.sqrt(emit * beta))
    assert radius.min() >= 1.5
    with pytest.raises(ValueError, match="halo_fraction"):
        SyntheticBeam(halo_fraction=1.5)


def test_moment_mismatch_sees_a_faint_wide_halo_the_l1_loss_barely_sees():
    """A core and the same core with 5 % of its intensity spread into a 3x wider halo (peak about
    0.5 % of the core's): the l1 distance is 0.1 (the halo's share moved), but the second moments
    differ by 0.05 * (9 - 1) = 40 %, which the moment term reports; identical images give 0; the
    moments are those of the pixel grid (a Gaussian's centroid and variance)."""
    y, x = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")

    def gauss(sx, sy):
        image = torch.exp(-((x - 62.0) ** 2 / (2 * sx**2) + (y - 65.0) ** 2 / (2 * sy**2)))
        return image / image.sum()

    core, halo = gauss(3.0, 2.0), 0.95 * gauss(3.0, 2.0) + 0.05 * gauss(9.0, 6.0)
    centre, (xx, yy, xy) = moments(core[None])
    cx, cy = centre[0]
    assert (cx.item(), cy.item()) == pytest.approx((62.0, 65.0), abs=1e-6)
    assert (xx.item(), yy.item(), xy.item()) == pytest.approx((9.0, 4.0, 0.0), abs=1e-4)
    l1 = (halo - core).abs().sum().item()
    assert l1 < 0.11
    mismatch = moment_mismatch(core[None], halo[None]).item()
    assert mismatch == pytest.approx(0.4 / 1.4 + 0.4 / 1.4, rel=0.02)  # relative to the measured (halo) moments
    assert moment_mismatch(halo[None], halo[None]).item() == pytest.approx(0.0, abs=1e-6)
    shifted = torch.roll(core, 2, dims=-1)
    assert moment_mismatch(shifted[None], core[None]).item() == pytest.approx(2 / 3, rel=1e-3)
    assert moment_mismatch(shifted[None], core[None], centroids=False).item() == pytest.approx(0.0, abs=1e-5)


def test_background_cut_keeps_a_beam_whose_tails_reach_the_frame():
    """A noise-free screen image of 50k particles of a Gaussian (sigma 14 px on 100 px) whose tails light a
    tenth of the frame, as a wide beam's do at the strong settings of the shipped 4D example: the frame's few
    lit pixels are beam, not background, so the cut keeps the rms size² to 0.1 % (the frame's plain mean
    + 5 std cut 4 % off it). That pixel noise is still cut: tests/test_auto_prior.py."""
    generator = torch.Generator().manual_seed(0)
    screen = sim.Screen(name="S", resolution=(100, 100), pixel_size=(1e-4, 1e-4))
    xy = 1.4e-3 * torch.randn(50_000, 2, generator=generator, dtype=torch.float64)
    clean = screen.image_xy(xy[:, 0], xy[:, 1])[None]
    frame = torch.ones(100, 100, dtype=torch.bool)
    frame[2:-2, 2:-2] = False
    assert (clean[0][frame] > 0).float().mean() > 0.05  # the tails reach the frame
    _, (xx, yy, _) = moments(clean)
    _, (xx_cut, yy_cut, _) = moments(without_background(clean))
    assert (xx_cut / xx).item() == pytest.approx(1.0, abs=1e-3) and (yy_cut / yy).item() == pytest.approx(1.0, abs=1e-3)
    border = clean[0][frame]
    old_cut = torch.where(clean > border.mean() + 5 * border.std(), clean, torch.zeros_like(clean))
    assert (moments(old_cut)[1][0] / xx).item() < 0.97  # what the frame's plain mean and std did


def test_kurtosis_term_sees_the_shape_of_the_tails_at_equal_rms():
    """Projection kurtosis m4 / m2^2: 3 for a Gaussian, 9 / 5 for a uniform profile. A uniform x profile
    of the Gaussian's variance (half-width sqrt(3) sigma) has the same second moments, so the plain
    moment term is ~0 while the kurtosis term adds |1.8 - 3| / 3 = 0.4 (x only; y is the same)."""
    y, x = torch.meshgrid(torch.arange(256.0, dtype=torch.float64), torch.arange(256.0, dtype=torch.float64),
                          indexing="ij")
    sigma, sy = 12.0, 8.0
    gaussian_y = torch.exp(-((y - 120.0) ** 2) / (2 * sy**2))
    gauss = torch.exp(-((x - 130.0) ** 2) / (2 * sigma**2)) * gaussian_y
    box = torch.sigmoid(4 * (math.sqrt(3) * sigma - (x - 130.0).abs())) * gaussian_y  # soft edge: a pixel grid
    kx, ky = projection_kurtosis(torch.stack([gauss, box]))
    assert kx[0].item() == pytest.approx(3.0, rel=1e-4) and ky.tolist() == pytest.approx([3.0, 3.0], rel=1e-4)
    assert kx[1].item() == pytest.approx(1.8, rel=0.01)
    plain = moment_mismatch(box[None], gauss[None]).item()
    with_kurtosis = moment_mismatch(box[None], gauss[None], kurtosis=True).item()
    assert plain < 0.02
    assert with_kurtosis - plain == pytest.approx((3.0 - kx[1].item()) / 3.0, rel=1e-3)
    assert with_kurtosis == pytest.approx(0.4, abs=0.02)
    assert moment_mismatch(box[None], box[None], kurtosis=True).item() == pytest.approx(0.0, abs=1e-9)
    from psr.training.reconstruction import PhaseSpaceReconstruction
    with pytest.raises(ValueError, match="moment_kurtosis .* needs model.moment_weight > 0"):
        PhaseSpaceReconstruction(models.MLPBeamGenerator(n_particles=100), moment_kurtosis=True)


def test_moment_start_fits_the_images_alone_first():
    """moment_start 0.5 of 200 steps: the training mismatch is the image loss alone up to step 100, the
    moment term then rises linearly to its weight by step 120 (a tenth of the steps); validation always
    has the full term (its loss stays comparable over the fit). Bad values: one line."""
    from types import SimpleNamespace

    from psr.training.reconstruction import PhaseSpaceReconstruction, image_loss
    y, x = torch.meshgrid(torch.arange(64.0, dtype=torch.float64), torch.arange(64.0, dtype=torch.float64), indexing="ij")
    core = torch.exp(-((x - 30.0) ** 2 + (y - 32.0) ** 2) / (2 * 4.0**2))
    halo = 0.95 * core / core.sum() + 0.05 * torch.exp(-((x - 30.0) ** 2 + (y - 32.0) ** 2) / (2 * 12.0**2)) / (
        2 * math.pi * 144.0)
    predicted, measured = (core / core.sum())[None], (halo / halo.sum())[None]
    model = PhaseSpaceReconstruction(models.MLPBeamGenerator(n_particles=10, n_dim=4), moment_weight=0.3,
                                     moment_start=0.5)
    model.centred = set()
    model._trainer = SimpleNamespace(estimated_stepping_batches=200, global_step=0)
    images_only = image_loss(predicted, measured, "l1").item()
    moments_only = moment_mismatch(predicted, measured).item()
    assert moments_only > 0.3  # the halo's rms sizes
    model.train()
    for step, share in [(0, 0.0), (100, 0.0), (110, 0.5), (120, 1.0), (199, 1.0)]:
        model._trainer.global_step = step
        total = model.screen_mismatch("S", predicted, measured).item()
        assert total == pytest.approx(images_only + share * 0.3 * moments_only, rel=1e-6), step
    model.eval()
    model._trainer.global_step = 0
    assert model.screen_mismatch("S", predicted, measured).item() == pytest.approx(images_only + 0.3 * moments_only, rel=1e-6)
    for bad in (1.0, -0.1, True, "half"):
        with pytest.raises(ValueError, match="model.moment_start must be a fraction"):
            PhaseSpaceReconstruction(models.MLPBeamGenerator(n_particles=10, n_dim=4), moment_weight=0.3, moment_start=bad)


def test_plane_profiles_start_as_the_plain_generator_and_can_open_a_hole():
    """plane_profiles adds nothing at the start (zero output map); with a learned radius R(0) > 0 the
    directions of one base plane put every particle outside radius R(0): a ring a continuous map of the
    Gaussian base cannot make (it must leave the particles near the axis inside)."""
    torch.manual_seed(5)
    plain = models.MLPBeamGenerator(n_particles=4000, tail_skip=True, seed=3)
    torch.manual_seed(5)
    planes = models.MLPBeamGenerator(n_particles=4000, tail_skip=True, seed=3, plane_profiles=True)
    torch.testing.assert_close(planes(), plain())
    with torch.no_grad():
        for layer in (planes.network[-1], planes.skip):
            layer.weight.zero_()
            layer.bias.zero_()
        radius = planes.plane_radial[0]
        radius[-1].weight.zero_()
        radius[-1].bias.fill_(math.log(math.expm1(1.5)))  # softplus^-1(1.5): every radius 1.5 (a thin ring)
        planes.plane.weight.copy_(torch.eye(4)[[0, 2, 1, 3]].T)  # the plane's (q0, q1) -> (x, y)
        planes.plane_basis.weight.copy_(torch.eye(4))
    particles = planes()
    radii = torch.hypot(particles[:, 0], particles[:, 2]) / 1e-3
    torch.testing.assert_close(radii, torch.full_like(radii, 1.5))
    with pytest.raises(ValueError, match="n_dim"):
        models.MLPBeamGenerator(n_dim=5, plane_profiles=True)


def test_resample_draws_fresh_standard_normal_base_samples_in_training_only():
    """resample: each training call with gradient maps fresh N(0, 1) base samples (mean 0, covariance 1 within
    their sampling error), the same stream from the same seed (reproducible, the same in every process of a
    distributed fit); evaluation, calls without gradient and a generator without resample give the fixed
    samples, so the report's beam is the fit's own."""
    torch.manual_seed(2)
    fixed = models.MLPBeamGenerator(n_particles=20_000, seed=4, longitudinal=[1e-3, 1e-3])
    torch.manual_seed(2)
    fresh = models.MLPBeamGenerator(n_particles=20_000, seed=4, longitudinal=[1e-3, 1e-3], resample=True)
    torch.manual_seed(2)
    again = models.MLPBeamGenerator(n_particles=20_000, seed=4, longitudinal=[1e-3, 1e-3], resample=True)
    with torch.no_grad():  # the identity map of the base samples: particles = 1 mm x base
        for generator in (fresh, again):
            generator.network[-1].weight.zero_()
            generator.network[-1].bias.zero_()
            generator.skip.weight.copy_(torch.eye(4))
            generator.skip.bias.zero_()
    first, second = fresh(), fresh()
    assert first.shape == second.shape == (20_000, 6)
    assert not torch.allclose(first, second)
    assert not torch.allclose(first[:, :4], fresh.base_samples[:, :4] * 1e-3)
    torch.manual_seed(99)  # whatever the global generator does: the stream is the generator's own
    torch.testing.assert_close(again(), first)
    torch.testing.assert_close(again(), second)
    for particles in (first, second):
        base = (particles / 1e-3).double()
        assert base.mean(0).abs().max() < 4 / math.sqrt(20_000)
        assert (torch.cov(base.T) - torch.eye(6, dtype=torch.float64)).abs().max() < 0.05
    fresh.eval()
    torch.testing.assert_close(fresh()[:, :4], fresh.base_samples[:, :4] * 1e-3)
    fresh.train()
    with torch.no_grad():
        torch.testing.assert_close(fresh()[:, :4], fresh.base_samples[:, :4] * 1e-3)
    torch.testing.assert_close(fixed.train()(), fixed())


def test_quasi_random_base_samples_are_normal_and_hold_the_moments_of_long_tails():
    """Scrambled Sobol points made normal: mean 0, unit covariance, and the variance of x + 0.5 x^3 (an S-shaped
    projection, dominated by the far tail) over 20 scrambles of 20k points scatters under 1 % where pseudo-random
    draws scatter more than 2 % (measured 0.5 % and 4.0 %); a generator with quasi_random and resample draws a
    fresh scramble at each training call."""
    from models.generator import draw_base_samples

    def tail_variance(base):
        return (base[:, 0] + 0.5 * base[:, 0] ** 3).double().var().item()

    quasi = [draw_base_samples(20_000, 4, seed, quasi_random=True) for seed in range(20)]
    plain = [draw_base_samples(20_000, 4, seed) for seed in range(20)]
    for base in quasi[:3]:
        assert base.mean(0).abs().max() < 0.005
        assert (torch.cov(base.T.double()) - torch.eye(4, dtype=torch.float64)).abs().max() < 0.01
    truth = 1 + 3 + 15 / 4  # E[(x + x^3 / 2)^2] = E[x^2] + E[x^4] + E[x^6] / 4 of a standard normal x
    quasi_scatter = np.std([tail_variance(b) for b in quasi]) / truth
    plain_scatter = np.std([tail_variance(b) for b in plain]) / truth
    assert abs(np.mean([tail_variance(b) for b in quasi]) / truth - 1) < 0.01
    assert quasi_scatter < 0.01 and plain_scatter > 0.02, (quasi_scatter, plain_scatter)
    generator = models.MLPBeamGenerator(n_particles=4096, seed=3, resample=True, quasi_random=True)
    torch.testing.assert_close(generator.base_samples, draw_base_samples(4096, 4, 3, quasi_random=True))
    first, second = generator(), generator()
    assert not torch.allclose(first, second)
    generator.eval()
    torch.testing.assert_close(generator(), generator())


def test_profile_knots_start_at_zero_on_quantiles_that_crowd_to_the_tail():
    """profile_knots adds nothing at the start (zero amplitudes: the same beam as without them, the same random
    weights); step k sits at the (1 - 2^-k) quantile of the base radius s = |b|^2 / n_dim, so each step has half
    the particles of the one below it beyond it; and a step moves only the particles near and beyond it: with
    one amplitude set, those 10 step widths inside step k keep their coordinates to 1e-3 of the beam's size; on
    257 interpolation nodes for the network (profile_nodes) the same beam to 1e-3 of its size."""
    torch.manual_seed(5)
    plain = models.MLPBeamGenerator(n_particles=20000, tail_skip=True, seed=3)
    torch.manual_seed(5)
    knotted = models.MLPBeamGenerator(n_particles=20000, tail_skip=True, seed=3, profile_knots=8)
    torch.testing.assert_close(knotted(), plain())
    s = knotted.base_samples.square().mean(-1)
    beyond = (s[:, None] > knotted.knots.centres).double().mean(0)
    torch.testing.assert_close(beyond, 0.5 ** torch.arange(1, 9, dtype=torch.float64), atol=2e-3, rtol=0.0)
    with torch.no_grad():
        knotted.tail.weight.copy_(torch.cat([torch.zeros(4, 4), torch.eye(4)], 1))
        before = knotted()
        knotted.knots.amplitudes[5] = 3.0
        after = knotted()
    centre, width = knotted.knots.centres[5], knotted.knots.widths[5]
    moved = (after - before).abs().amax(-1) / before.std(0).amax()
    assert moved[s < centre - 10 * width].max() < 1e-3
    assert moved[s > centre + 2 * width].min() > 0.1
    on_nodes = models.MLPBeamGenerator(n_particles=20000, tail_skip=True, seed=3, profile_knots=8, profile_nodes=257)
    on_nodes.load_state_dict(knotted.state_dict())  # the network interpolated, the steps on every particle
    with torch.no_grad():
        assert (on_nodes() - after).abs().max() < 1e-3 * after.abs().max()
    for bad in (-1, 17, 2.0, True):
        with pytest.raises(ValueError, match="profile_knots"):
            models.MLPBeamGenerator(tail_skip=True, profile_knots=bad)
    with pytest.raises(ValueError, match="needs tail_skip"):
        models.MLPBeamGenerator(profile_knots=4)


def test_profiles_on_nodes_are_the_network_interpolated():
    """profile_nodes: the radial profiles evaluated on 257 points and interpolated give the same beam as on every
    particle (to ~1e-5 of its size, random weights of rms 0.5), and the gradient in a profile's input is the
    interpolant's slope (the network's derivative to a few % at a node spacing of 8 / 256)."""
    torch.manual_seed(0)
    exact = models.MLPBeamGenerator(n_particles=5000, tail_skip=True, plane_profiles=True, seed=2)
    with torch.no_grad():
        for parameter in exact.parameters():
            parameter.normal_(0.0, 0.5)
    fast = models.MLPBeamGenerator(n_particles=5000, tail_skip=True, plane_profiles=True, seed=2, profile_nodes=257)
    fast.load_state_dict(exact.state_dict())
    reference = exact()
    assert (fast() - reference).abs().max() < 1e-4 * reference.abs().max()
    s = torch.linspace(0.3, 7.0, 50)[:, None].requires_grad_(True)
    with torch.no_grad():
        s_max = torch.tensor([[8.0]])
    profile = exact.radial
    interpolated = models.generator.profile_on_nodes(profile, torch.cat([s, s_max]), 257)[:-1]
    slope, = torch.autograd.grad(interpolated.sum(), s)
    h = 1e-2
    with torch.no_grad():
        difference = (profile(s + h) - profile(s - h)) / (2 * h)
    assert (slope - difference).abs().max() < 0.05 * difference.abs().max(), (slope - difference).abs().max()
    with pytest.raises(ValueError, match="profile_nodes"):
        models.MLPBeamGenerator(profile_nodes=1)


# Two beamlines with screens wide enough (24 mm, 19 mm) for the tails: the shipped 4D example's (60 MeV, 2 m
# drift) and the space-charge example's without charge (5 MeV, 1.5 m drift); scans of 12 settings.
def quad_drift_screen(drift: float, pixels: int, pixel_size: float) -> list[dict]:
    """A quadrupole, a drift [m] and a square screen of `pixels` of `pixel_size` [m]."""
    return [{"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
            {"type": "Drift", "name": "D1", "length": drift},
            {"type": "Screen", "name": "YAG", "resolution": [pixels, pixels], "pixel_size": [pixel_size] * 2,
             "psf_sigma": [5e-5, 5e-5]}]


BEAMLINES = {  # lattice, p0c [eV], Q1.k1 settings [1/m^2], the core's Twiss
    "60MeV": (quad_drift_screen(2.0, 96, 2.5e-4), 60e6, np.linspace(-10, 20, 12),
              dict(emittance_x=1.7e-8, beta_x=6.0, alpha_x=1.5, emittance_y=1.3e-8, beta_y=4.0, alpha_y=-1.0)),
    "5MeV": (quad_drift_screen(1.5, 128, 1.5e-4), 5e6, np.linspace(-20, 24, 12),
             dict(emittance_x=2e-8, beta_x=5.0, alpha_x=1.0, emittance_y=1.6e-8, beta_y=4.0, alpha_y=-0.5)),
}
HARD = {"halo": dict(halo_fraction=0.05, halo_scale=3.0), "s_shaped": dict(s_shape_x=0.5, s_shape_y=0.3),
        "hollow": dict(hollow=1.5), "px_tail": dict(px_tail=0.3)}


CASES = [("halo", "60MeV"), ("s_shaped", "60MeV"), ("halo", "5MeV"), ("s_shaped", "5MeV"), ("hollow", "60MeV"),
         ("hollow", "5MeV"), ("px_tail", "60MeV")]


def inside_fraction(particles: torch.Tensor, radius: float) -> float:
    """Share of particles whose (x, y), each in units of its rms size, lies within `radius` of the centre."""
    x, y = (particles[:, i] - particles[:, i].mean() for i in (0, 2))
    return (torch.hypot(x / x.std(), y / y.std()) < radius).double().mean().item()


@pytest.mark.parametrize("beam, beamline", CASES)
def test_default_fit_lands_on_the_rms_and_core_emittances_of_hard_beams(beam, beamline, tmp_path):
    """The shipped 4D config (its defaults: moment term with the projections' mean absolute deviation since stop 40,
    without its kurtosis part since stop 39, tail features, plane profiles; 10k particles and 600 steps here) on a
    halo beam (5 % of the particles 3x wider), an S-shaped beam, a hollow beam (a ring in x-y) and a long px tail:
    rms emittances within 3 %, 90 %-core emittances within 10 % (the cores of these small fits scatter; full size,
    benchmarks/hard_beams.py, the 4D and 5 MeV families, six seeds, 234 of 240 within 3 %, 6.0 % at most). Measured
    here (stop 40): cores halo 60 MeV -7.2 / -2.0 %, S 60 MeV -3.3 / -1.8 %, halo 5 MeV +0.1 / -2.7 %, hollow
    +0.1 / +1.8 % and -0.6 / -1.7 %, px tail -2.8 / -3.4 %; rms all within 0.95 % (stop 39, without the mean
    absolute deviation: -7.5 / -1.5, -4.2 / -2.2, +1.8 / -3.8, +0.3 / +1.4 and -0.8 / -0.8, +0.8 / -2.9 %; S 5 MeV
    x +9.5 %). The S-shaped beam at 5 MeV: core within 20 % (here x +5.7 %; with the kurtosis part y -14 %,
    -8 % with 1600 steps: the strong S's projections have kurtosis up to 20, decided by a few far particles). The
    hollow beam's hole stays empty: under 1 % of the particles inside 0.6 rms, which the true beam leaves empty
    and a fit without plane profiles filled with ~4 %. Before the fixes the halo beam came out ~16 % low (l1 on unit-sum
    images hardly sees a faint wide halo, and the network could not make one), the S-shaped one 5-7 %
    low, and the hollow beam's cores 6-10 % low at full size."""
    import yaml

    from psr.cli import fit_cli
    from psr.data.simulate import simulate

    lattice, p0c, settings, twiss = BEAMLINES[beamline]
    (tmp_path / "lattice.yaml").write_text(yaml.safe_dump(lattice))
    path = simulate(str(tmp_path / "scan.h5"), str(tmp_path / "lattice.yaml"), {"Q1.k1": settings.tolist()},
                    p0c=p0c, beam=SyntheticBeam(**twiss, **HARD[beam]), n_particles=50_000, charge=1e-10, seed=4)
    cli = fit_cli(args=[
        "fit", "--config", "configs/quad_scan_4d.yaml", f"--data.path={path}", "--data.steps_per_epoch=50",
        "--trainer.max_epochs=12", "--model.generator.init_args.n_particles=10000",
        "--model.generator.init_args.scale=[1e-3, 1e-4, 1e-3, 1e-4]" if p0c < 1e7 else "--seed_everything=0",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    rows = __import__("json").loads(open(f"{cli.trainer.log_dir}/emittances.json").read())
    errors = {key: round(100 * rows[key]["relative_error"], 2) for key in
              ("norm_emit_x", "norm_emit_y", "norm_emit_x_core90", "norm_emit_y_core90")}
    print(beam, beamline, errors)  # shown with pytest -s
    assert abs(errors["norm_emit_x"]) < 3 and abs(errors["norm_emit_y"]) < 3, errors
    # the px tail's x core: -8.1 % here with moment_start 0.5, -10.8 % with 0 and the kurtosis part (stop 37; full size
    # -2.0 / -1.2 / -1.6 %, seeds 0-2), +0.8 % without it (stop 39): README "Hard beams"
    core_limit = {("s_shaped", "5MeV"): 20}.get((beam, beamline), 10)
    assert abs(errors["norm_emit_x_core90"]) < core_limit and abs(errors["norm_emit_y_core90"]) < core_limit, errors
    if beam == "hollow":
        with torch.no_grad():
            reconstructed = cli.model.generator().double()
        assert inside_fraction(torch.as_tensor(read_scan(path).ground_truth), 0.6) == 0.0
        inside = inside_fraction(reconstructed, 0.6)
        print("inside 0.6 rms:", inside)
        assert inside < 0.01, errors


def test_fresh_quasi_random_samples_stop_the_fit_copying_the_scans_shot_noise(tmp_path):
    """A scan made with 20k particles carries shot noise; a fit of fixed base samples learns to place its particles
    on it. The shipped 4D config's fresh quasi-random draws (resample, quasi_random) give images nearer the true
    beam's (drawn with 400k particles, another seed; the fits' beams drawn with 200k): measured here l1 0.027
    against 0.041 (seed 1: 0.028 against 0.034); full size, the 4D family 25-47 % (README "Hard beams")."""
    import yaml

    from psr.cli import fit_cli
    from psr.data.simulate import simulate
    from psr.training.reconstruction import image_loss

    lattice, p0c, settings, twiss = BEAMLINES["60MeV"]
    (tmp_path / "lattice.yaml").write_text(yaml.safe_dump(lattice))
    beam, scan = SyntheticBeam(**twiss, s_shape_x=0.2), {"Q1.k1": settings.tolist()}
    path = simulate(str(tmp_path / "scan.h5"), str(tmp_path / "lattice.yaml"), scan, p0c=p0c, beam=beam,
                    n_particles=20_000, charge=1e-10, seed=4)
    clean = read_scan(simulate(str(tmp_path / "clean.h5"), str(tmp_path / "lattice.yaml"), scan, p0c=p0c, beam=beam,
                               n_particles=400_000, charge=1e-10, seed=5))
    truth = torch.as_tensor(clean.screens["YAG"].images).double()
    mismatch = {}
    for name, extra in [("fresh", []), ("fixed", ["--model.generator.init_args.resample=false",
                                                   "--model.generator.init_args.quasi_random=false"])]:
        cli = fit_cli(args=["fit", "--config", "configs/quad_scan_4d.yaml", f"--data.path={path}",
                            "--data.steps_per_epoch=50", "--trainer.max_epochs=12",
                            "--model.generator.init_args.n_particles=10000", f"--trainer.logger.init_args.save_dir={tmp_path}",
                            f"--trainer.logger.init_args.name={name}", "--trainer.enable_progress_bar=false", *extra])
        with torch.no_grad():
            _, images = cli.model.eval().predict_at({"Q1.k1": torch.as_tensor(clean.settings[:, 0])}, n_particles=200_000)
        predicted = images["YAG"].double()
        mismatch[name] = image_loss(predicted / predicted.sum((-2, -1), keepdim=True),
                                    truth / truth.sum((-2, -1), keepdim=True), "l1").item()
    print(mismatch)  # shown with pytest -s
    assert mismatch["fresh"] < 0.9 * mismatch["fixed"], mismatch


def test_report_particles_is_the_beam_of_beam_h5_the_report_and_predict(tmp_path, capsys):
    """model.report_particles N: beam.h5 holds a draw of N (not the generator's own samples), emittances.json is of
    those particles, and `psr predict` gives that beam by default; a bad count ends the fit with one line."""
    import json

    from psr.cli import fit_cli, main
    from psr.data.emittances import PLANES_4D, emittance_table
    from psr.data.openpmd import read_openpmd

    cli = fit_cli(args=["fit", "--config", "configs/quad_scan_4d.yaml", "--data.steps_per_epoch=5", "--trainer.max_epochs=1",
                        "--model.generator.init_args.n_particles=1000", "--model.report_particles=3000",
                        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    run = cli.trainer.log_dir
    beam = read_openpmd(f"{run}/beam.h5").particles
    assert beam.shape == (3000, 6)
    own = cli.model.generator().detach().double().numpy()  # the 1000 samples it trained its validation on
    report = json.loads(open(f"{run}/emittances.json").read())
    scan = read_scan("data/quad_scan_4d.h5")
    table = emittance_table(beam, scan.p0c, scan.species, PLANES_4D)
    assert report["norm_emit_x"]["reconstructed"] == pytest.approx(table["norm_emit_x"], rel=1e-6)
    assert emittance_table(own, scan.p0c, scan.species, PLANES_4D)["norm_emit_x"] != pytest.approx(table["norm_emit_x"], rel=1e-6)
    settings = tmp_path / "table.csv"
    settings.write_text(f"Q1.k1\n{scan.settings[0, 0]}\n")
    main(["predict", "--run", run, "--settings", str(settings), "--output", str(tmp_path / "out")])
    np.testing.assert_allclose(read_openpmd(tmp_path / "out" / "row_0.h5").particles, beam, rtol=1e-6, atol=1e-12)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/quad_scan_4d.yaml", "--model.report_particles=1",
              f"--trainer.logger.init_args.save_dir={tmp_path / 'bad'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "model.report_particles" in lines[0], lines
    assert not list((tmp_path / "bad").rglob("version_*"))


def test_mean_abs_term_sees_the_shape_with_little_of_the_far_particles_noise():
    """E|u - <u>| / rms: sqrt(2 / pi) = 0.798 for a Gaussian, sqrt(3) / 2 = 0.866 for a uniform profile, so the
    mean-abs term sees the box against the Gaussian of equal rms (|0.866 - 0.798| / 0.798 = 0.085, x only). Its
    sampling noise: images of 20 draws of 50k particles of a long-tailed profile (a Gaussian plus a 5 % exponential
    tail of 3 sigma on one side, as the px tail gives at a waist) scatter in kurtosis by 13 % (std), in mean-abs
    ratio by 0.9 %, in rms size^2 by 2.3 %: the kurtosis is what a fit matched to one noisy scan pays for."""
    y, x = torch.meshgrid(torch.arange(256.0, dtype=torch.float64), torch.arange(256.0, dtype=torch.float64),
                          indexing="ij")
    sigma, sy = 12.0, 8.0
    gaussian_y = torch.exp(-((y - 120.0) ** 2) / (2 * sy**2))
    gauss = torch.exp(-((x - 130.0) ** 2) / (2 * sigma**2)) * gaussian_y
    box = torch.sigmoid(4 * (math.sqrt(3) * sigma - (x - 130.0).abs())) * gaussian_y
    ax, ay = projection_mean_abs(torch.stack([gauss, box]))
    assert ax[0].item() == pytest.approx(math.sqrt(2 / math.pi), rel=1e-3)
    assert ax[1].item() == pytest.approx(math.sqrt(3) / 2, rel=0.01) and ay.tolist() == pytest.approx([math.sqrt(2 / math.pi)] * 2, rel=2e-3)
    plain = moment_mismatch(box[None], gauss[None]).item()
    with_mean_abs = moment_mismatch(box[None], gauss[None], mean_abs=True).item()
    assert with_mean_abs - plain == pytest.approx((ax[1] / ax[0] - 1).item(), rel=1e-3)
    assert moment_mismatch(box[None], box[None], mean_abs=True).item() == pytest.approx(0.0, abs=1e-9)

    generator = torch.Generator().manual_seed(3)
    def image(n):  # a 1D profile on 256 pixels (rows alike): Gaussian core, 5 % exponential tail of scale 3 sigma
        core = torch.randn(n, generator=generator, dtype=torch.float64) * 4.0
        tail = torch.empty(n, dtype=torch.float64).exponential_(1 / 12.0, generator=generator)
        u = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.05, tail, core) + 60.0
        return torch.histc(u, bins=256, min=0.0, max=256.0)[None, None, :].expand(1, 4, 256)
    reference = image(4_000_000)
    noisy = torch.cat([image(50_000) for _ in range(20)])
    kurtosis_error = projection_kurtosis(noisy)[0] / projection_kurtosis(reference)[0] - 1
    mean_abs_error = projection_mean_abs(noisy)[0] / projection_mean_abs(reference)[0] - 1
    size_error = moments(noisy)[1][0] / moments(reference)[1][0] - 1
    assert kurtosis_error.std().item() > 5 * mean_abs_error.std().item()
    assert mean_abs_error.std().item() < size_error.std().item()
    from psr.training.reconstruction import PhaseSpaceReconstruction
    with pytest.raises(ValueError, match="moment_mean_abs .* needs model.moment_weight > 0"):
        PhaseSpaceReconstruction(models.MLPBeamGenerator(n_particles=100), moment_mean_abs=True)


def test_measured_moments_are_computed_once_and_give_the_same_mismatch():
    """A fit's measured images are the same every step: their background cut and moments (MeasuredMoments) are
    reused while the images are equal, recomputed when they differ or lack a shape part, and give the mismatch and
    its gradient bit for bit."""
    from psr.training.moments import MeasuredMoments
    generator = torch.Generator().manual_seed(5)
    measured = torch.rand(3, 40, 50, generator=generator) ** 8 + 0.01
    predicted = (torch.rand(3, 40, 50, generator=generator) ** 8).requires_grad_()
    cached = MeasuredMoments(measured, kurtosis=True, mean_abs=True)
    direct = moment_mismatch(predicted, measured, kurtosis=True, mean_abs=True)
    (grad_direct,) = torch.autograd.grad(direct, predicted)
    reused = moment_mismatch(predicted, cached, kurtosis=True, mean_abs=True)
    (grad_reused,) = torch.autograd.grad(reused, predicted)
    assert reused.item() == direct.item() and torch.equal(grad_direct, grad_reused)
    assert cached.matches(measured.clone(), kurtosis=True, mean_abs=False)
    changed = measured.clone()
    changed[1, 20, 25] += 1e-3
    assert not cached.matches(changed, kurtosis=True, mean_abs=True)
    assert not cached.matches(measured[:2], kurtosis=False, mean_abs=False)
    assert not MeasuredMoments(measured).matches(measured, kurtosis=False, mean_abs=True)
