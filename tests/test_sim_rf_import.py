"""RF cavity (energy gain, reference momentum, adiabatic damping) and the cheetah.Segment import."""

import math

import pytest
import torch

import sim

from test_sim_maps import cheetah, cheetah_species, total_energy
from test_sim_tracking import T, cheetah_track, particles

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
MASS = sim.get_species("electron").mass_eV


def energy(p0c):
    return math.sqrt(p0c**2 + MASS**2)


@pytest.mark.parametrize("phase", [0.0, 0.3, -1.0])
@pytest.mark.parametrize("num_steps", [1, 5])
def test_reference_gains_voltage_cos_phase_like_cheetah(phase, num_steps):
    p0c, voltage = 5e6, 3e6
    cavity = sim.RFCavity("C", length=0.5, voltage=voltage, frequency=1.3e9, phase=phase, num_steps=num_steps)
    out = sim.Lattice([cavity])(sim.ParticleBeam(particles(n=10), p0c)).beam
    assert energy(out.p0c) - energy(p0c) == pytest.approx(voltage * math.cos(phase), rel=1e-12)
    theirs = cheetah.Cavity(length=T(0.5), voltage=T(voltage), frequency=T(1.3e9), phase=T(math.degrees(phase)),
                            dtype=F64)
    beam = cheetah.ParticleBeam(torch.zeros(1, 7, dtype=F64), energy=total_energy(p0c, "electron"),
                                species=cheetah_species("electron"), dtype=F64)
    assert energy(out.p0c) == pytest.approx(theirs.track(beam).energy.item(), rel=1e-12)
    # protons gain the same energy at phase 0 (positive voltage accelerates any species on crest)
    proton = sim.Lattice([cavity])(sim.ParticleBeam(particles(n=10), 1e9, "proton")).beam
    mass_p = sim.get_species("proton").mass_eV
    assert math.hypot(proton.p0c, mass_p) - math.hypot(1e9, mass_p) == pytest.approx(voltage * math.cos(phase), rel=1e-12)


def test_energy_chirp_of_a_thin_cavity_is_closed_form():
    """Zero length: a particle at z with pz = 0 ends at E = E0 + V cos(phase + k z / beta)."""
    p0c, voltage, phase, freq = 5e6, 3e6, 0.4, 1.3e9
    z = torch.linspace(-3e-3, 3e-3, 7, dtype=F64)
    bmad = torch.zeros(7, 6, dtype=F64)
    bmad[:, 4] = z
    out = sim.Lattice([sim.RFCavity("C", voltage=voltage, frequency=freq, phase=phase)])(sim.ParticleBeam(bmad, p0c)).beam
    beta = p0c / energy(p0c)
    k = 2 * math.pi * freq / 299_792_458.0
    e_new = energy(p0c) + voltage * torch.cos(phase + k * z / beta)
    p_new = torch.sqrt(e_new**2 - MASS**2)
    torch.testing.assert_close(out.particles[:, 5], p_new / out.p0c - 1, atol=1e-14, rtol=0)
    torch.testing.assert_close(out.particles[:, 4], z * (p_new / e_new) / beta, atol=1e-15, rtol=0)
    assert out.particles[0, 5] > out.particles[-1, 5]  # phase > 0: the tail (z < 0) is nearer the crest and gains more


def test_adiabatic_damping_keeps_the_normalized_emittance():
    bmad = particles(n=4000, scale=(1e-3, 1e-4, 1e-3, 1e-4, 1e-5, 1e-5))
    beam = sim.ParticleBeam(bmad, 5e6)
    out = sim.Lattice([sim.RFCavity("C", length=1.0, voltage=20e6, frequency=1.3e9, num_steps=20)])(beam).beam
    assert out.p0c > 4 * beam.p0c
    for plane in ("x", "y"):
        assert out.emittance(plane).item() < 0.3 * beam.emittance(plane).item()  # geometric emittance damps ...
        assert out.emittance(plane, normalized=True).item() == pytest.approx(
            beam.emittance(plane, normalized=True).item(), rel=1e-3)  # ... the normalized one is kept


def test_scanned_voltage_gives_a_reference_momentum_per_setting():
    lattice = sim.Lattice([
        sim.RFCavity("C", length=0.2, frequency=1.3e9), sim.Drift("D", length=1.0),
        sim.Screen("S", resolution=(32, 32), pixel_size=(2e-4, 2e-4)),
    ])
    voltage = T([0.0, 5e6, 10e6])
    out = lattice(sim.ParticleBeam(particles(n=200, scale=(1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4)), 5e6),
                  {"C.voltage": voltage})
    assert out.images["S"].shape == (3, 32, 32)
    gained = torch.sqrt(out.beam.p0c**2 + MASS**2) - energy(5e6)
    torch.testing.assert_close(gained, voltage, rtol=1e-12, atol=1e-6)
    # the divergence shrinks with the energy, so the spot after the drift does too
    sizes = out.beam.particles[..., 0].std(dim=-1)
    assert sizes[0] > sizes[1] > sizes[2]


def cheetah_segment():
    """Cheetah's linear maps act on (tau, delta), psr's on (z, pz): they differ at second order, so the
    elements that have it track with drift_kick_drift (the linear maps are compared in test_sim_maps)."""
    misalignment = T([3e-4, -2e-4])
    dkd = "drift_kick_drift"
    return cheetah.Segment([
        cheetah.Drift(T(0.3), name="D0", tracking_method=dkd, dtype=F64),
        cheetah.Sextupole(length=T(0.1), k2=T(0.0), name="S1", dtype=F64),  # second_order: psr kick_drift
        cheetah.Quadrupole(T(0.1), k1=T(12.0), tilt=T(0.1), misalignment=misalignment, name="Q1", tracking_method=dkd,
                           dtype=F64),
        cheetah.Marker(name="M1"),
        cheetah.Segment([cheetah.Drift(T(0.5), name="D1", tracking_method=dkd, dtype=F64),
                         cheetah.Solenoid(T(0.2), k=T(1.5), name="SOL", dtype=F64)], name="inner"),
        cheetah.Quadrupole(T(0.1), k1=T(-8.0), name="Q2", tracking_method="drift_kick_drift", dtype=F64),
        cheetah.TransverseDeflectingCavity(length=T(0.1), voltage=T(1e5), frequency=T(2.856e9), phase=T(0.02),
                                           tilt=T(math.pi / 2), name="TDC", dtype=F64),
        cheetah.Dipole(length=T(0.4), angle=T(0.25), dipole_e1=T(0.05), dipole_e2=T(0.1), name="B1",
                       tracking_method=dkd, dtype=F64),
        cheetah.RBend(length=T(0.3), angle=T(-0.1), name="B2", tracking_method=dkd, dtype=F64),
        cheetah.Drift(T(0.4), name="D2", tracking_method=dkd, dtype=F64),
    ])


def test_import_from_cheetah_tracks_like_cheetah():
    segment = cheetah_segment()
    lattice = sim.Lattice.from_cheetah(segment)
    assert [e.name for e in lattice.elements] == ["D0", "S1", "Q1", "D1", "SOL", "Q2", "TDC", "B1", "B2", "D2"]
    assert lattice["Q2"].tracking == "chromatic" and lattice["TDC"].phase.item() == pytest.approx(0.04 * math.pi)
    assert lattice["SOL"].ks.item() == 3.0 and lattice["Q1"].x_offset.item() == 3e-4
    bmad = particles(n=300, scale=(1e-4, 1e-5, 1e-4, 1e-5, 1e-4, 1e-4))
    ours = lattice(sim.ParticleBeam(bmad, 5e6)).beam.particles
    theirs = cheetah_track(segment, bmad, 5e6, "electron")
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    # and the converted lattice is an ordinary lattice file
    again = sim.Lattice.from_list(lattice.to_list())
    torch.testing.assert_close(again(sim.ParticleBeam(bmad, 5e6)).beam.particles, ours, atol=0, rtol=0)


def test_import_screen_and_errors():
    screen = cheetah.Screen(resolution=(64, 48), pixel_size=T([1e-5, 2e-5]), binning=2, misalignment=T([1e-4, 0.0]),
                            name="SCR", dtype=F64)
    lattice = sim.Lattice.from_cheetah(cheetah.Segment([cheetah.Drift(T(1.0), name="D"), screen]))
    converted = lattice["SCR"]
    assert converted.resolution == (32, 24)
    torch.testing.assert_close(converted.pixel_size, T([2e-5, 4e-5]))
    torch.testing.assert_close(converted.center, T([1e-4, 0.0]))
    with pytest.raises(ValueError, match="cheetah Undulator U: no psr equivalent"):
        sim.Lattice.from_cheetah(cheetah.Segment([cheetah.Undulator(length=T(1.0), name="U")]))
    with pytest.warns(UserWarning, match="without transverse RF focusing"):
        sim.Lattice.from_cheetah(cheetah.Segment([cheetah.Cavity(length=T(0.5), voltage=T(1e6), name="C")]))
