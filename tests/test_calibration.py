"""Calibration of the machine with the beam (DESIGN.md "Calibration"): a simulated machine that differs from
its model, the corrections' algebra, the fit of the corrections through the lattice, and a full fit."""

import json

import numpy as np
import pytest
import torch

import sim
from psr.data.calibration import apply_corrections, parse_corrections
from psr.data.synthetic import SyntheticBeam
from psr.training.calibration import Calibration
from psr.training.reconstruction import image_loss

LATTICE = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
    {"type": "Drift", "name": "D1", "length": 1.0},
    {"type": "Quadrupole", "name": "Q2", "length": 0.1, "k1": 0.0},
    {"type": "Drift", "name": "D2", "length": 2.0},
    {"type": "Screen", "name": "YAG", "resolution": [64, 64], "pixel_size": [2.5e-4, 2.5e-4]},
]
MACHINE = {"Q1.k1": {"kind": "scale", "value": 0.93}, "Q2.x_offset": {"kind": "offset", "value": 5e-4},
           "YAG.center": {"kind": "offset", "value": [3e-4, -1e-4]}}
GRID = np.array([(a, b) for a in (-6.0, -3.0, 0.0, 3.0, 6.0) for b in (-6.0, -3.0, 0.0, 3.0, 6.0)])


@pytest.fixture(scope="module")
def beam():
    particles = SyntheticBeam(emittance_x=1.7e-8, beta_x=6.0, alpha_x=1.5, emittance_y=1.3e-8, beta_y=4.0,
                              alpha_y=-1.0).sample(4000, seed=3)
    return sim.ParticleBeam(particles.double(), p0c=60e6)


def settings(dtype=torch.float64):
    return {"Q1.k1": torch.tensor(GRID[:, 0], dtype=dtype), "Q2.k1": torch.tensor(GRID[:, 1], dtype=dtype)}


def test_machine_corrections_are_the_corrected_lattice(beam, one_thread):
    """Scale of a scanned column, offsets of stored parameters: the same images as a lattice that holds the
    corrected values itself."""
    lattice = sim.Lattice.from_list(LATTICE).double()
    corrections = parse_corrections(MACHINE, lattice, ["Q1.k1", "Q2.k1"], where="machine", value_key="value",
                                    extra_keys=())
    values = apply_corrections(settings(), lattice, corrections, [torch.as_tensor(c.value0) for c in corrections])
    images = lattice(beam, values).images["YAG"]
    items = [dict(item) for item in LATTICE]
    items[2]["x_offset"] = 5e-4
    items[4]["center"] = [3e-4, -1e-4]
    direct = sim.Lattice.from_list(items).double()
    plain = settings()
    expected = direct(beam, {"Q1.k1": 0.93 * plain["Q1.k1"], "Q2.k1": plain["Q2.k1"]}).images["YAG"]
    assert torch.allclose(images, expected, atol=1e-12)
    # and the corrections move the beam: the nominal lattice's images differ
    nominal = lattice(beam, plain).images["YAG"]
    assert image_loss(nominal, expected, "l1") > 0.2


def test_prior_penalty_closed_form():
    lattice = sim.Lattice.from_list(LATTICE)
    calibration = Calibration({"Q1.k1": {"kind": "scale", "init": 1.0, "prior_sigma": 0.05},
                               "YAG.center": {"kind": "offset", "init": [0, 0], "prior_sigma": [1e-3, 2e-3]}},
                              prior_weight=0.1)
    calibration.bind(lattice, ["Q1.k1", "Q2.k1"], GRID)
    with torch.no_grad():
        calibration.theta["Q1:k1"].fill_(0.4)  # step = prior_sigma: value 1 + 0.05 * 0.4
        calibration.theta["YAG:center"].copy_(torch.tensor([1.0, -0.5]))  # steps: the larger sigma, 2 mm
    values = calibration.values()
    assert values[0].item() == pytest.approx(1.02, rel=1e-6)
    assert values[1].tolist() == pytest.approx([2e-3, -1e-3], rel=1e-6)
    z2 = 0.4**2 + (2e-3 / 1e-3) ** 2 + (1e-3 / 2e-3) ** 2
    assert calibration.prior_penalty().item() == pytest.approx(0.1 * 0.5 * z2, rel=1e-5)
    report = calibration.report()
    assert report["YAG.center"]["kind"] == "offset" and report["YAG.center"]["init"] == [0.0, 0.0]
    assert report["Q1.k1"]["value"] == pytest.approx(1.02, rel=1e-6)


def test_corrections_fit_through_the_lattice(beam, one_thread):
    """With the true beam fixed, the image mismatch alone finds the machine: gradients of a scale, a magnet
    offset and a screen centre through the tracking and the CIC deposit."""
    torch.manual_seed(0)
    truth = sim.Lattice.from_list(LATTICE)
    corrections = parse_corrections(MACHINE, truth, ["Q1.k1", "Q2.k1"], where="machine", value_key="value",
                                    extra_keys=())
    beam32 = sim.ParticleBeam(beam.particles.float(), p0c=60e6)
    with torch.no_grad():
        measured = truth(beam32, apply_corrections(settings(torch.float32), truth, corrections,
                                                   [torch.as_tensor(c.value0) for c in corrections])).images["YAG"]
    lattice = sim.Lattice.from_list(LATTICE)
    calibration = Calibration({"Q1.k1": {"kind": "scale"}, "Q2.x_offset": {"kind": "offset"},
                               "Q2.y_offset": {"kind": "offset"}, "YAG.center": {"kind": "offset"}})
    calibration.bind(lattice, ["Q1.k1", "Q2.k1"], GRID)
    optimizer = torch.optim.Adam(calibration.parameters(), lr=0.02)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 300, eta_min=2e-4)
    for _ in range(300):
        optimizer.zero_grad()
        loss = image_loss(lattice(beam32, calibration(settings(torch.float32), lattice)).images["YAG"], measured, "l1")
        loss.backward()
        optimizer.step()
        schedule.step()
    scale, x_offset, y_offset, center = (v.detach() for v in calibration.values())
    assert scale.item() == pytest.approx(0.93, abs=0.003)
    assert x_offset.item() == pytest.approx(5e-4, abs=1.5e-5)
    assert abs(y_offset.item()) < 1.5e-5
    assert center.tolist() == pytest.approx([3e-4, -1e-4], abs=1.5e-5)
    assert loss.item() < 0.02


def test_fit_calibrates_the_shipped_machine(tmp_path, one_thread):
    """`psr fit` with model.calibrate on the shipped two-quadrupole scan of a miscalibrated machine (reduced:
    5k particles, 800 steps): calibration.json holds the true machine, the emittances the true beam."""
    from psr.cli import main

    main(["fit", "--config", "configs/two_quad_calibration.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--model.generator.init_args.n_particles=5000", "--trainer.max_epochs=8", "--trainer.enable_progress_bar=false"])
    run = next(tmp_path.glob("two_quad_calibration/version_*"))
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["Q1.k1"]["kind"] == "scale" and calibration["Q1.k1"]["init"] == 1.0
    assert calibration["Q1.k1"]["value"] == pytest.approx(0.93, rel=0.01)
    assert calibration["Q2.x_offset"]["value"] == pytest.approx(5e-4, abs=5e-5)
    assert abs(calibration["Q2.y_offset"]["value"]) < 5e-5
    assert calibration["YAG.center"]["value"] == pytest.approx([3e-4, -1e-4], abs=5e-5)
    emittances = json.loads((run / "emittances.json").read_text())
    for key in ("norm_emit_x", "norm_emit_y"):
        assert abs(emittances[key]["relative_error"]) < 0.03, (key, emittances[key])
