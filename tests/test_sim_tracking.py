"""Particle tracking (kick_drift, chromatic), misalignments and the deflecting cavity: against
Cheetah 0.8.4's drift_kick_drift in float64, symplecticity, convergence to the linear maps, signs."""

import math

import pytest
import torch

import sim

from test_sim_maps import BEAMS, J6, cheetah, cheetah_species  # noqa: F401

bmadx = pytest.importorskip("cheetah.utils.bmadx")

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def T(value):
    return torch.tensor(value, dtype=F64)


def particles(n=500, seed=0, scale=(1e-3, 1e-3, 2e-3, 2e-3, 1e-3, 1e-2), dtype=F64):
    """Large amplitudes and a 1 % energy spread: the nonlinear terms matter at 1e-10."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g, dtype=F64) * torch.tensor(scale, dtype=F64)).to(dtype)


def cheetah_track(element, bmad, p0c, species):
    """Track Bmad-coordinate particles through a Cheetah element (exact coordinate conversion)."""
    s = cheetah_species(species)
    coords, energy = bmadx.bmad_to_cheetah_coords(bmad, T(p0c), s.mass_eV)
    out = element.track(cheetah.ParticleBeam(coords, energy=energy, species=s, dtype=F64))
    back, _ = bmadx.cheetah_to_bmad_coords(out.particles, out.energy, s.mass_eV)
    return back


def psr_track(element, bmad, p0c, species, settings=None):
    return sim.Lattice([element])(sim.ParticleBeam(bmad, p0c, species), settings).beam.particles


def cheetah_kwargs(kwargs):
    out = {}
    for key, value in kwargs.items():
        if key in ("e1", "e2"):
            out["dipole_" + key] = T(value)
        elif key == "x_offset":
            out["misalignment"] = T([value, kwargs.get("y_offset", 0.0)])
        elif key == "y_offset":
            continue
        elif key == "phase":
            out[key] = T(value / (2 * math.pi))  # Cheetah's TDC phase is in turns
        else:
            out[key] = T(value)
    return out


CASES = [  # (psr element type, tracking, psr keyword arguments, cheetah class)
    ("Drift", "kick_drift", dict(length=1.3), cheetah.Drift),
    ("Quadrupole", "chromatic", dict(length=0.2, k1=12.0), cheetah.Quadrupole),
    ("Quadrupole", "chromatic", dict(length=0.3, k1=-40.0, tilt=0.3, x_offset=1e-3, y_offset=-2e-3), cheetah.Quadrupole),
    ("Quadrupole", "chromatic", dict(length=0.2, k1=0.0), cheetah.Quadrupole),
    ("Dipole", "kick_drift", dict(length=0.5, angle=0.2), cheetah.Dipole),
    ("Dipole", "kick_drift", dict(length=0.5, angle=-0.35, e1=0.1, e2=-0.35), cheetah.Dipole),
    ("Dipole", "kick_drift", dict(length=0.8, angle=1.2, e1=0.6, e2=0.6), cheetah.Dipole),
    ("Dipole", "kick_drift", dict(length=0.3, angle=0.3, e1=0.05, e2=0.07, tilt=0.3, fringe_integral=0.5, gap=0.02),
     cheetah.Dipole),
    ("TransverseDeflectingCavity", "kick_drift", dict(length=0.2, voltage=2e5, frequency=2.856e9, phase=0.1),
     cheetah.TransverseDeflectingCavity),
    ("TransverseDeflectingCavity", "kick_drift",
     dict(length=0.1, voltage=-1e5, frequency=1.3e9, phase=-0.4, tilt=math.pi / 2, x_offset=1e-4, y_offset=2e-4),
     cheetah.TransverseDeflectingCavity),
]


@pytest.mark.parametrize("p0c, species", BEAMS)
@pytest.mark.parametrize("kind, tracking, kwargs, cheetah_class", CASES)
def test_tracking_matches_cheetah(p0c, species, kind, tracking, kwargs, cheetah_class):
    kwargs = dict(kwargs)
    if kind == "TransverseDeflectingCavity" and species == "proton":
        kwargs["voltage"] *= 100  # a visible streak at 1.5 GeV/c
    bmad = particles()
    ours = psr_track(sim.ELEMENT_TYPES[kind]("E", tracking=tracking, **kwargs), bmad, p0c, species)
    theirs = cheetah_track(cheetah_class(**cheetah_kwargs(kwargs), tracking_method="drift_kick_drift", dtype=F64),
                           bmad, p0c, species)
    assert (ours - bmad).abs().max() > 1e-4  # the element does something
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("p0c, species", BEAMS)
def test_misaligned_linear_quadrupole_matches_cheetah(p0c, species):
    kwargs = dict(length=0.2, k1=15.0, tilt=0.2, x_offset=1.5e-3, y_offset=-0.5e-3)
    bmad = particles(scale=(1e-4, 1e-5, 1e-4, 1e-5, 1e-5, 1e-5))
    ours = psr_track(sim.Quadrupole("Q", **kwargs), bmad, p0c, species)
    s = cheetah_species(species)
    coords, energy = bmadx.bmad_to_cheetah_coords(bmad, T(p0c), s.mass_eV)
    out = cheetah.Quadrupole(**cheetah_kwargs(kwargs), dtype=F64).track(
        cheetah.ParticleBeam(coords, energy=energy, species=s, dtype=F64))
    theirs, _ = bmadx.cheetah_to_bmad_coords(out.particles, out.energy, s.mass_eV)
    # the offset steers the beam: thin-lens kick of the centroid, in the magnet frame (k1 L d_x, -k1 L d_y)
    c, s_ = math.cos(0.2), math.sin(0.2)
    dx, dy = 1.5e-3 * c - 0.5e-3 * s_, -1.5e-3 * s_ - 0.5e-3 * c
    kick_x, kick_y = 15.0 * 0.2 * dx, -15.0 * 0.2 * dy
    assert ours[:, 1].mean() == pytest.approx(kick_x * c - kick_y * s_, rel=0.2)
    torch.testing.assert_close(ours[:, :4], theirs[:, :4], atol=1e-10, rtol=0)


def jacobian(element, p0c, species, point):
    return torch.autograd.functional.jacobian(lambda v: element.track(v[None], p0c, species)[0][0], point)


SYMPLECTIC = [
    sim.Drift("D", length=1.0, tracking="kick_drift"),
    sim.Quadrupole("Q", length=0.2, k1=10.0, tracking="kick_drift", num_steps=3),
    sim.Quadrupole("Q", length=0.2, k1=-10.0, tilt=0.4, x_offset=1e-3, tracking="chromatic"),
    sim.Sextupole("S", length=0.2, k2=300.0, num_steps=3),
    sim.Dipole("B", length=0.5, angle=0.3, e1=0.1, e2=0.2, tracking="kick_drift"),
    sim.Dipole("B", length=0.5, angle=0.3, k1=2.0, tracking="kick_drift", num_steps=4),
    sim.TransverseDeflectingCavity("T", length=0.2, voltage=1e6, frequency=3e9, phase=0.2),
    sim.TransverseDeflectingCavity("T", length=0.2, voltage=1e6, frequency=3e9, phase=0.2, tracking="linear"),
]


@pytest.mark.parametrize("element", SYMPLECTIC, ids=lambda e: f"{type(e).__name__}-{e.tracking}")
def test_tracking_is_symplectic_and_conserves_volume(element):
    point = T([1e-3, 2e-3, -1e-3, 1e-3, 2e-3, 1e-2])
    for p0c in (5e6, 0.5e6):
        m = jacobian(element, p0c, "electron", point)
        assert (m.T @ J6() @ m - J6()).abs().max() < 1e-12
        assert torch.linalg.det(m).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("element", [
    sim.Drift("D", length=1.0, tracking="kick_drift"),
    sim.Quadrupole("Q", length=0.2, k1=10.0, tilt=0.3, tracking="kick_drift", num_steps=200),
    sim.Quadrupole("Q", length=0.2, k1=-30.0, tracking="chromatic"),
    sim.Dipole("B", length=0.5, angle=0.3, e1=0.1, e2=0.2, tilt=0.2, fringe_integral=0.4, gap=0.03, tracking="kick_drift"),
    sim.Dipole("B", length=0.5, angle=0.3, k1=2.0, tracking="kick_drift", num_steps=200),
    sim.Sextupole("S", length=0.2, k2=300.0),
    sim.TransverseDeflectingCavity("T", length=0.2, voltage=1e6, frequency=3e9, phase=0.0, tilt=0.3),
], ids=lambda e: f"{type(e).__name__}-{e.tracking}")
def test_tracking_converges_to_the_linear_map_for_small_amplitudes(element):
    p0c = 2e6
    linear = type(element)("L", tracking="linear",
                           **{k: getattr(element, k) for k in element.parameters_defaults})
    m_linear = linear.transfer_map(p0c, "electron", torch.zeros((), dtype=F64))
    m_track = jacobian(element, p0c, "electron", torch.zeros(6, dtype=F64))
    # at the reference orbit the Jacobian of the tracking is the linear map (to O(1/num_steps^2))
    torch.testing.assert_close(m_track, m_linear, atol=2e-5, rtol=0)
    for amplitude in (1e-5, 1e-7):  # the tracked deviation from the linear map shrinks as amplitude^2
        bmad = particles(n=50, scale=(amplitude,) * 6)
        deviation = (element.track(bmad, p0c, "electron")[0] - linear.track(bmad, p0c, "electron")[0]).abs().max()
        assert deviation < 5e-5 * amplitude + 1e3 * amplitude**2


def test_kick_drift_quadrupole_converges_to_the_chromatic_map_at_second_order():
    # small angles: the chromatic map is paraxial, the kick-drift's exact drift is not
    bmad = particles(scale=(1e-3, 1e-5, 1e-3, 1e-5, 1e-3, 1e-2))
    exact = psr_track(sim.Quadrupole("Q", length=0.3, k1=20.0, tracking="chromatic"), bmad, 5e6, "electron")
    errors = [(psr_track(sim.Quadrupole("Q", length=0.3, k1=20.0, tracking="kick_drift", num_steps=n), bmad, 5e6,
                         "electron") - exact)[:, :4].abs().max().item() for n in (4, 8, 16)]
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.05)
    assert errors[1] / errors[2] == pytest.approx(4.0, rel=0.05)


def test_sextupole_matches_cheetah_second_order_map_at_small_amplitude():
    bmad = particles(n=200, scale=(2e-4, 1e-5, 2e-4, 1e-5, 1e-5, 1e-5))
    ours = psr_track(sim.Sextupole("S", length=0.2, k2=800.0, num_steps=400), bmad, 5e6, "electron")
    theirs = cheetah_track(cheetah.Sextupole(length=T(0.2), k2=T(800.0), tracking_method="second_order", dtype=F64),
                           bmad, 5e6, "electron")
    nonlinear = (ours[:, 1] - psr_track(sim.Sextupole("S", length=0.2, tracking="linear"), bmad, 5e6, "electron")[:, 1])
    assert nonlinear.abs().max() > 1e-6  # the sextupole kick is there ...
    # ... and agrees with the second-order map up to third-order terms (k2 L^2 x ~ 1e-2 of it)
    torch.testing.assert_close(ours[:, :4], theirs[:, :4], atol=1e-2 * nonlinear.abs().max().item(), rtol=0)
    # Bmad's sign: k2 > 0 kicks a particle at +x (y = 0) towards -x
    x_only = torch.zeros(1, 6, dtype=F64)
    x_only[0, 0] = 1e-3
    assert psr_track(sim.Sextupole("S", length=0.2, k2=800.0), x_only, 5e6, "electron")[0, 1] < 0


@pytest.mark.parametrize("species, sign", [("electron", 1.0), ("positron", -1.0), ("proton", -1.0)])
@pytest.mark.parametrize("tilt, plane", [(0.0, 1), (math.pi / 2, 3)])
def test_deflector_streak_direction(species, sign, tilt, plane):
    """V > 0 at phase 0: the head (z > 0) of an electron bunch goes to +x (+y with tilt pi/2)."""
    head = torch.zeros(2, 6, dtype=F64)
    head[0, 4], head[1, 4] = 1e-3, -1e-3
    element = sim.TransverseDeflectingCavity("T", length=0.1, voltage=1e6, frequency=3e9, tilt=tilt)
    out = psr_track(element, head, 1e9 if species == "proton" else 10e6, species)
    assert sign * out[0, plane] > 0 and sign * out[1, plane] < 0
    other = 3 if plane == 1 else 1
    assert out[:, other].abs().max() < 1e-12


def test_dipole_kick_drift_sign_positive_angle_sends_higher_momentum_outward():
    bmad = torch.zeros(2, 6, dtype=F64)
    bmad[0, 5], bmad[1, 5] = 1e-2, -1e-2
    out = psr_track(sim.Dipole("B", length=0.5, angle=0.3, tracking="kick_drift"), bmad, 5e6, "electron")
    assert out[0, 0] > 0 and out[1, 0] < 0


def test_scanned_parameters_broadcast_in_every_method():
    bmad = particles(n=100)
    settings = {"T.voltage": T([0.0, 1e5, 2e5]), "Q.k1": T([1.0, 5.0, 9.0]), "B.angle": T([0.0, 0.1, 0.2]),
                "Q.x_offset": T([0.0, 1e-3, -1e-3])}
    lattice = sim.Lattice([
        sim.Quadrupole("Q", length=0.1, tracking="chromatic"), sim.Drift("D", length=0.5, tracking="kick_drift"),
        sim.TransverseDeflectingCavity("T", length=0.1, frequency=3e9), sim.Dipole("B", length=0.3, tracking="kick_drift"),
    ])
    together = lattice(sim.ParticleBeam(bmad, 5e6), settings).beam.particles
    assert together.shape == (3, 100, 6)
    for k in range(3):
        one = lattice(sim.ParticleBeam(bmad, 5e6), {key: value[k] for key, value in settings.items()}).beam.particles
        torch.testing.assert_close(together[k], one, atol=1e-15, rtol=0)


def test_gradients_through_nonlinear_tracking():
    bmad = particles(n=20)
    lattice = sim.Lattice([
        sim.Quadrupole("Q", length=0.1, tracking="kick_drift", num_steps=2),
        sim.TransverseDeflectingCavity("T", length=0.1, frequency=3e9),
        sim.Dipole("B", length=0.3, angle=0.2, tracking="kick_drift"), sim.Sextupole("S", length=0.1),
    ])

    def final(k1, voltage, angle, k2, offset, p):
        settings = {"Q.k1": k1, "T.voltage": voltage, "B.angle": angle, "S.k2": k2, "Q.x_offset": offset}
        return lattice(sim.ParticleBeam(p, 5e6), settings).beam.particles

    inputs = (T(3.0), T(1e5), T(0.2), T(50.0), T(1e-3), bmad)
    inputs = tuple(v.clone().requires_grad_() for v in inputs)
    assert torch.autograd.gradcheck(final, inputs, eps=1e-7, atol=1e-6, rtol=1e-5)


def test_float32_tracking_agrees_with_float64():
    lattice = sim.Lattice([
        sim.Quadrupole("Q", length=0.1, k1=5.0, tracking="chromatic"), sim.Drift("D", length=1.0, tracking="kick_drift"),
        sim.TransverseDeflectingCavity("T", length=0.1, voltage=1e5, frequency=3e9),
        sim.Dipole("B", length=0.3, angle=0.2, tracking="kick_drift"),
    ])
    bmad = particles(n=100)
    f64 = lattice(sim.ParticleBeam(bmad, 5e6)).beam.particles
    f32 = lattice(sim.ParticleBeam(bmad.float(), 5e6)).beam.particles
    assert f32.dtype == torch.float32
    # float32 resolves 1 + pz and the 0.3 m path of the bend to ~1e-7 (a bunch's z to ~0.1 micron)
    torch.testing.assert_close(f32.double(), f64, atol=2e-7, rtol=1e-5)


def test_lattice_mixes_matrices_and_tracking_like_element_by_element():
    elements = [sim.Quadrupole("Q1", length=0.1, k1=5.0), sim.Drift("D1", length=0.5),
                sim.Sextupole("S", length=0.1, k2=100.0), sim.Quadrupole("Q2", length=0.1, k1=-5.0, x_offset=1e-3),
                sim.Drift("D2", length=0.5)]
    bmad = particles(n=100)
    whole = sim.Lattice(elements)(sim.ParticleBeam(bmad, 5e6)).beam.particles
    p = bmad
    for element in elements:
        p, _ = element.track(p, 5e6, "electron")
    torch.testing.assert_close(whole, p, atol=1e-15, rtol=1e-13)


@pytest.mark.parametrize("phase", [0.0, 0.3])
def test_linear_deflector_is_fused_into_the_matrix_only_at_zero_phase(phase):
    tdc = sim.TransverseDeflectingCavity("T", length=0.2, voltage=1e6, frequency=3e9, phase=phase, tilt=0.3,
                                         tracking="linear")
    assert tdc.is_matrix(None, torch.zeros((), dtype=F64)) == (phase == 0.0)
    bmad = particles(n=50)
    whole = sim.Lattice([tdc, sim.Drift("D", length=1.0)])(sim.ParticleBeam(bmad, 5e6)).beam.particles
    step, _ = tdc.track(bmad, 5e6, "electron")
    step, _ = sim.Drift("D", length=1.0).track(step, 5e6, "electron")
    torch.testing.assert_close(whole, step, atol=1e-15, rtol=0)
    if phase:  # the zeroth-order kick a sin(phase) is kept: the centroid is deflected
        assert whole[:, 1].mean() == pytest.approx(1e6 / 5e6 * math.sin(phase) * math.cos(0.3), rel=0.05)


def test_bad_tracking_settings():
    with pytest.raises(ValueError, match="unknown tracking 'exact'; known: linear, chromatic, kick_drift"):
        sim.Quadrupole("Q", tracking="exact")
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        sim.Sextupole("S", num_steps=0)
    with pytest.raises(ValueError, match="Solenoid S: unknown tracking 'kick_drift'; known: linear"):
        sim.Lattice.from_list([{"type": "Solenoid", "name": "S", "tracking": "kick_drift"}])
    items = [{"type": "Quadrupole", "name": "Q", "length": 0.1, "tracking": "kick_drift", "num_steps": 4}]
    again = sim.Lattice.from_list(sim.Lattice.from_list(items).to_list())
    assert again["Q"].tracking == "kick_drift" and again["Q"].num_steps == 4
