"""Conditional beams (DESIGN.md "Conditional beams"): scan files with upstream settings, the conditional beam
model, a synthetic injector, a fit that learns the beam as a function of the upstream settings, and
`psr predict` from the trained run."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

import sim
from models import ConditionalMLPBeam
from psr.cli import main
from psr.data.emittances import PLANES_4D, emittance_table
from psr.data.scanfile import ScanFileError, read_scan, validate_scan, write_scan
from psr.data.simulate import simulate, upstream_scan_settings
from psr.data.synthetic import SyntheticInjector

LATTICE = """- {type: Quadrupole, name: Q1, length: 0.1, k1: 0.0}
- {type: Drift, name: D1, length: 2.0}
- {type: Screen, name: YAG, resolution: [40, 40], pixel_size: [2.5e-4, 2.5e-4], psf_sigma: [1.0e-4, 1.0e-4]}
"""
SOLENOID = [0.9, 0.95, 1.0, 1.05, 1.1]
SPOT = [0.7, 0.85, 1.0, 1.15, 1.3]
QUADS = [-10.0, -7.5, -5.0, -2.5, 0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5]


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("conditional")
    (folder / "lattice.yaml").write_text(LATTICE)
    return simulate(str(folder / "scan.h5"), str(folder / "lattice.yaml"),
                    {"GUN.solenoid": SOLENOID, "LASER.spot": SPOT, "Q1.k1": QUADS}, p0c=60e6,
                    beam=SyntheticInjector(), n_particles=40_000, seed=3, upstream=["GUN.solenoid", "LASER.spot"],
                    lattice_rows_per_upstream=3, truth_particles=500)


def test_staggered_settings():
    """Each upstream setting gets 3 of the 12 quadrupole settings, spread over the range and shifted by one from
    one upstream setting to the next, so the whole scan covers every quadrupole setting."""
    names, table = upstream_scan_settings({"A.a": [1.0, 2.0], "B.b": [5.0, 6.0, 7.0], "Q1.k1": QUADS},
                                          ["A.a", "B.b"], 3, grid=False)
    assert names == ["A.a", "B.b", "Q1.k1"] and table.shape == (18, 3)
    assert table[:3, 2].tolist() == [-10.0, 0.0, 10.0] and table[3:6, 2].tolist() == [-7.5, 2.5, 12.5]
    assert table[::3, :2].tolist() == [[a, b] for a in (1.0, 2.0) for b in (5.0, 6.0, 7.0)]


def test_scan_file_upstream_contract(scan_path, tmp_path):
    """The /settings attribute upstream round-trips; the images at every setting are the injector's beam at that
    setting's upstream values tracked through the lattice; the stored truth is that beam's emittance table."""
    scan = read_scan(scan_path)
    assert scan.upstream == ["GUN.solenoid", "LASER.spot"] and scan.ground_truth is None
    assert scan.settings.shape == (75, 3) and len(scan.upstream_truth["settings"]) == 25
    lattice = sim.Lattice.from_list(scan.lattice).double()
    row = 37
    point = dict(zip(scan.upstream, scan.settings[row, :2]))
    particles = SyntheticInjector().at(point).sample(40_000, seed=3)
    image = lattice(sim.ParticleBeam(particles, p0c=60e6), {"Q1.k1": torch.tensor([scan.settings[row, 2]])}).images["YAG"]
    assert np.allclose(scan.screens["YAG"].images[row], image[0].numpy(), atol=1e-6)
    g = np.flatnonzero(np.isclose(scan.upstream_truth["settings"], scan.settings[row, :2]).all(1))[0]
    truth = emittance_table(particles.numpy(), 60e6, "electron", PLANES_4D)
    assert scan.upstream_truth["emittances"]["norm_emit_x"][g] == pytest.approx(truth["norm_emit_x"], rel=1e-9)
    # the beam does change with the upstream settings: emittances over the grid span more than a factor 2
    x = scan.upstream_truth["emittances"]["norm_emit_x"]
    assert x.max() / x.min() > 2
    copy = write_scan(tmp_path / "copy.h5", scan)
    again = read_scan(copy)
    assert again.upstream == scan.upstream
    assert np.allclose(again.upstream_truth["emittances"]["norm_emit_y"], scan.upstream_truth["emittances"]["norm_emit_y"])


def test_scan_file_upstream_errors(scan_path):
    """A setting that names no lattice element stays an error unless it is listed as upstream; an upstream name
    must be a column and must not name an element of the lattice."""
    scan = read_scan(scan_path)
    scan.upstream = ["GUN.solenoid"]
    with pytest.raises(ScanFileError, match="LASER.spot.*upstream"):
        validate_scan(scan, "f.h5")
    scan.upstream = ["GUN.solenoid", "LASER.spot", "GUN.phase"]
    with pytest.raises(ScanFileError, match="GUN.phase.*not a column"):
        validate_scan(scan, "f.h5")
    scan.upstream, scan.setting_names = ["GUN.solenoid", "Q1.k1"], ["GUN.solenoid", "Q1.k1", "LASER.spot"]
    scan.upstream_truth = None
    with pytest.raises(ScanFileError, match="Q1 is an element of the lattice"):
        validate_scan(scan, "f.h5")


def test_conditional_model_tracks_each_beam_at_its_settings():
    """The model's beams at G conditions, tracked in one call with G lattice settings, give the images of each
    beam tracked alone at its setting; the inputs are normalized to the training range."""
    torch.manual_seed(0)
    model = ConditionalMLPBeam(n_particles=500, hidden_width=16, condition_width=8)
    with pytest.raises(RuntimeError, match="no inputs yet"):
        model()
    model.configure_conditions(["A.a", "B.b"], [0.9, 100.0], [1.1, 300.0])
    conditions = torch.tensor([[0.9, 100.0], [1.0, 200.0], [1.1, 300.0]])
    assert torch.allclose(model.normalize(conditions), torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]))
    with torch.no_grad():
        for p in model.shape.parameters():  # make the conditions matter
            p.normal_(0, 0.3)
    particles = model(conditions)
    assert particles.shape == (3, 500, 6) and (particles[..., 4:] == 0).all()
    assert not torch.allclose(particles[0], particles[2])
    assert torch.allclose(model(), model(model.centre_conditions())[0])
    lattice = sim.Lattice.from_list(yaml.safe_load(LATTICE))
    k = torch.tensor([-5.0, 0.0, 5.0])
    together = lattice(sim.ParticleBeam(particles, p0c=60e6), {"Q1.k1": k}).images["YAG"]
    for g in range(3):
        alone = lattice(sim.ParticleBeam(particles[g], p0c=60e6), {"Q1.k1": k[g:g + 1]}).images["YAG"][0]
        assert torch.allclose(together[g], alone, atol=1e-6)
    particles.sum().backward()
    assert model.shape.weight.grad is not None and model.embedding[0].weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def trained_run(scan_path, tmp_path_factory):
    """A short conditional fit of the test scan (every 4th upstream setting held out)."""
    folder = tmp_path_factory.mktemp("runs")
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 6, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(folder), "name": "cond"}}},
        "model": {"generator": {"class_path": "models.ConditionalMLPBeam",
                                "init_args": {"n_particles": 2000, "hidden_width": 32, "scale": 1e-3, "resample": True}},
                  "lr": 0.01, "moment_weight": 1.0},  # as configs/conditional_injector.yaml
        "data": {"path": str(scan_path), "val_every": 4, "steps_per_epoch": 100},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(folder / "config.yaml")])
    return folder / "cond" / "version_0"


def test_conditional_fit_learns_the_beam_at_held_out_upstream_settings(trained_run):
    """At upstream settings whose images were held out, the learned beam's emittances are those of the true beam,
    and the held-out images are reproduced about as well as the training images."""
    report = json.loads((trained_run / "emittances.json").read_text())
    held = [p for p in report["points"] if p["held_out"]]
    assert len(report["points"]) == 25 and len(held) == 6
    for key in ("norm_emit_x", "norm_emit_y"):
        errors = [abs(p["emittances"][key]["relative_error"]) for p in held]
        assert np.mean(errors) < 0.08 and max(errors) < 0.15, (key, errors)
    assert len(list((trained_run / "beams").glob("upstream_*.h5"))) == 25
    for name in ("images_YAG.png", "emittances.png", "phase_space.png", "beam.h5", "predicted_images.h5"):
        assert (trained_run / name).is_file(), name
    import csv

    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")][-5:]
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")][-1]
    assert val < 1.5 * np.mean(train), (val, train)


def test_predict_from_the_run(trained_run, scan_path, tmp_path, capfd):
    """`psr predict` at a table of settings writes one openPMD beam per row and every image; at the scan's own
    settings the images are the run's predicted images; outside the training range it warns."""
    scan = read_scan(scan_path)
    rows = [0, 10, 40]
    table = tmp_path / "table.csv"
    lines = ["LASER.spot,Q1.k1,GUN.solenoid"] + [f"{scan.settings[r, 1]},{scan.settings[r, 2]},{scan.settings[r, 0]}"
                                                  for r in rows]
    table.write_text("\n".join(lines + ["1.4,0.0,1.0"]) + "\n")
    main(["predict", "--run", str(trained_run), "--settings", str(table), "--output", str(tmp_path / "out"),
          "--n_particles", "2000"])
    err = capfd.readouterr().err
    assert "LASER.spot = 1.4" in err and "[0.7, 1.3]" in err and "warning" in err
    assert sorted(p.name for p in (tmp_path / "out").glob("row_*.h5")) == [f"row_{i}.h5" for i in range(4)]
    with h5py.File(tmp_path / "out" / "images.h5") as handle, h5py.File(trained_run / "predicted_images.h5") as fitted:
        predicted = handle["screens/YAG"][()]
        assert predicted.shape == (4, 40, 40)
        for i, r in enumerate(rows):  # the model's own 2000 base samples, as in the run's report: the same images
            difference = np.abs(predicted[i] - fitted["YAG"][r]).sum()
            assert difference < 1e-3, (r, difference)
    from beamphysics import ParticleGroup

    group = ParticleGroup(str(tmp_path / "out" / "row_3.h5"))
    assert len(group) == 2000
    main(["predict", "--run", str(trained_run), "--settings", str(table), "--output", str(tmp_path / "own")])
    capfd.readouterr()
    with h5py.File(tmp_path / "own" / "images.h5") as own, h5py.File(tmp_path / "out" / "images.h5") as counted:
        np.testing.assert_array_equal(own["screens/YAG"][()], counted["screens/YAG"][()])  # by default its own 2000


@pytest.mark.parametrize("case", ["unknown-setting", "no-model", "missing-upstream"])
def test_predict_bad_input(case, trained_run, tmp_path, capfd):
    table = tmp_path / "table.csv"
    run = trained_run
    if case == "unknown-setting":
        table.write_text("GUN.solenoid,LASER.spot,Q7.k1\n1.0,1.0,2.0\n")
        words = ["Q7.k1", "not a setting this model knows"]
    elif case == "missing-upstream":
        table.write_text("GUN.solenoid,Q1.k1\n1.0,2.0\n")
        words = ["LASER.spot", "upstream"]
    else:
        table.write_text("GUN.solenoid,LASER.spot\n1.0,1.0\n")
        run = tmp_path / "empty_run"
        run.mkdir()
        (run / "config.yaml").write_text((trained_run / "config.yaml").read_text())
        words = ["holds no trained model"]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--run", str(run), "--settings", str(table), "--output", str(tmp_path / "out")])
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("psr predict: error: "), lines
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["plain-generator", "conditional-without-upstream"])
def test_fit_generator_and_file_must_agree(case, scan_path, tmp_path, capfd):
    """A plain generator cannot fit a file whose beam changes with upstream settings, and a conditional one needs
    them: one line each, no run folder."""
    if case == "plain-generator":
        data, generator, words = scan_path, "models.MLPBeamGenerator", ["upstream settings", "conditional"]
    else:
        data = Path(__file__).resolve().parents[1] / "data" / "quad_scan_4d.h5"
        generator, words = "models.ConditionalMLPBeam", ["lists no upstream settings"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--seed_everything=0", f"--data.path={data}", f"--model.generator={generator}", "--trainer.max_epochs=1",
              f"--trainer.logger.save_dir={tmp_path / 'runs'}", "--trainer.logger=CSVLogger"])
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("psr fit: error: "), lines
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "runs").exists()


def test_ensemble_spread_at_each_upstream_setting():
    """Conditional ensembles: at each upstream setting the members' mean, sample std and +-2 std band, and whether
    the band holds the truth."""
    from psr.outputs.ensemble_summary import upstream_spread

    def points(values):
        return [{"upstream": {"A.a": float(g)}, "held_out": g == 1,
                 "emittances": {"norm_emit_x": {"reconstructed": v, "true": 1.0}}} for g, v in enumerate(values)]

    rows = upstream_spread([points([1.0, 1.10]), points([1.02, 1.12]), points([0.98, 1.14])])
    first, second = rows[0]["emittances"]["norm_emit_x"], rows[1]["emittances"]["norm_emit_x"]
    assert first["mean"] == pytest.approx(1.0) and first["std"] == pytest.approx(0.02)
    assert first["truth_in_band"] and not second["truth_in_band"]  # 1.12 +- 0.04 misses 1.0
    assert second["band_2std"] == pytest.approx([1.08, 1.16]) and rows[1]["held_out"]
