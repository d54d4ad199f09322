"""Ensembles: members with different seeds, their mean and spread, and the spread shrinking when the
scan has more settings (an under-determined 2-setting scan against a 7-setting one), and which emittances a scan
cannot determine at all."""

import json

import h5py
import numpy as np
import pytest
import yaml

from psr.cli import main
from psr.outputs.ensemble_summary import summarize_ensemble
from psr.training.ensemble import member_arguments
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam

LATTICE = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
    {"type": "Drift", "name": "D1", "length": 2.0},
    {"type": "Screen", "name": "YAG", "resolution": [80, 80], "pixel_size": [1e-4, 1e-4]},
]
SCANS = {"few": [-5.0, 10.0], "many": list(np.linspace(-8.0, 16.0, 7))}


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory):
    """Three-member ensembles of MLP fits (400 steps, 2000 particles) of a 2-setting and a 7-setting scan."""
    folder = tmp_path_factory.mktemp("ensemble")
    (folder / "lattice.yaml").write_text(yaml.safe_dump(LATTICE))
    beam = SyntheticBeam(emittance_x=1.7e-8, beta_x=6.0, alpha_x=1.5, emittance_y=1.3e-8, beta_y=4.0, alpha_y=-1.0,
                         nonlinear_xy=0.5)
    summaries = {}
    for tag, k1 in SCANS.items():
        scan = simulate(str(folder / f"{tag}.h5"), str(folder / "lattice.yaml"), {"Q1.k1": k1}, p0c=60e6, beam=beam,
                        n_particles=50_000, seed=2)
        main(["ensemble", "--members", "3", "--name", tag, "--config", "configs/quad_scan_4d.yaml",
              f"--data.path={scan}", "--data.val_every=0", "--data.steps_per_epoch=100", "--trainer.max_epochs=4",
              "--model.generator.init_args.n_particles=2000", f"--trainer.logger.init_args.save_dir={folder}",
              "--trainer.enable_progress_bar=false"])
        summaries[tag] = folder / "quad_scan_4d" / tag
    return summaries


def test_ensemble_writes_members_summary_and_plots(ensembles):
    folder = ensembles["many"]
    for i in range(3):
        assert (folder / f"member_{i}" / "beam.h5").exists()
    summary = json.loads((folder / "ensemble_emittances.json").read_text())
    row = summary["emittances"]["norm_emit_x"]
    assert len(row["members"]) == 3 and len(set(row["members"])) == 3  # different seeds, different fits
    assert row["mean"] == pytest.approx(np.mean(row["members"]))
    assert row["std"] == pytest.approx(np.std(row["members"], ddof=1))
    assert abs(row["mean_relative_error"]) < 0.1, row  # a determined scan: the members agree with the truth
    k = 4.303 * (4 / 3) ** 0.5  # 3 members: the 95 % prediction band is mean +- t(0.975, 2 dof) sqrt(1 + 1/3) std
    assert row["band_95"] == pytest.approx([row["mean"] - k * row["std"], row["mean"] + k * row["std"]], rel=1e-4)
    assert row["truth_in_band_95"] == (row["band_95"][0] <= row["true"] <= row["band_95"][1])
    for key, error in (("norm_emit_x", 0.0025), ("norm_emit_y_core90", 0.01)):  # METHOD_ERROR, in quadrature
        one = summary["emittances"][key]
        half = 2 * np.hypot(one["std"], error * one["mean"])
        assert one["method_error"] == error
        assert one["band_2std_with_method"] == pytest.approx([one["mean"] - half, one["mean"] + half], rel=1e-9)
        assert one["truth_in_band_with_method"] == (abs(one["mean"] - one["true"]) <= half)
    entropy = summary["entropy_nats"]
    # a single-quadrupole scan leaves one x-y coupling undetermined (README), so the 4D entropy of these small fits
    # scatters by ~0.4-0.6 nat (std of 3 members: 0.36 before profile_nodes, 0.54 with; the 2-setting scan 0.88)
    assert len(entropy["members"]) == 3 and entropy["std"] < 1.0, entropy
    with h5py.File(folder / "ensemble_projections.h5") as handle:
        assert handle["images/YAG/mean"].shape == (7, 80, 80)
        assert np.allclose(handle["images/YAG/mean"][...].sum((-1, -2)), 1.0, atol=5e-3)  # a few tail particles may fall off the 8 mm screen
        assert set(handle["projections"]) >= {"x-px", "y-py", "x-y"}
        assert (handle["projections/x-px/std"][...] >= 0).all()
    for name in ("ensemble_marginals.png", "ensemble_phase_space.png", "ensemble_profiles_YAG.png"):
        assert (folder / name).stat().st_size > 10_000, name


def test_ensemble_says_which_emittances_the_scan_cannot_determine(ensembles):
    """Two settings give each plane two of the three equations its second moments need: those emittances are
    reported not determined whatever the members' spread (measured: y members +55 / +57 / +57 % off the truth,
    spread 0.6 %, which the spread test alone called determined); seven settings determine x and y, and a single
    quadrupole never the 4D emittance (README "Hard beams")."""
    few, many = (json.loads((ensembles[t] / "ensemble_emittances.json").read_text()) for t in ("few", "many"))
    print("\nrelative std of the emittances (few -> many settings):",
          {k: (round(few["emittances"][k]["relative_std"], 4), round(many["emittances"][k]["relative_std"], 4))
           for k in few["emittances"]},
          "mean projection spread:", few["mean_projection_spread"], "->", many["mean_projection_spread"])
    for key in ("norm_emit_x", "norm_emit_y", "norm_emit_x_core90", "norm_emit_y_core90", "norm_emit_4d"):
        assert few["emittances"][key]["determined_by_scan"] is False and few["emittances"][key]["determined"] is False
        assert many["emittances"][key]["determined_by_scan"] is (key != "norm_emit_4d"), key
    for key in ("norm_emit_x", "norm_emit_y"):  # the determined ones land on the truth
        assert abs(many["emittances"][key]["mean_relative_error"]) < 0.05, many["emittances"][key]
    member = json.loads((ensembles["many"] / "member_0" / "emittances.json").read_text())
    assert member["norm_emit_x"]["determined_by_scan"] is True and member["norm_emit_4d"]["determined_by_scan"] is False
    assert many["mean_projection_spread"] < few["mean_projection_spread"]


def test_summary_rejects_members_of_different_scans(ensembles, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(ensembles["few"] / "member_0", mixed / "member_0")
    shutil.copytree(ensembles["many"] / "member_1", mixed / "member_1")
    with pytest.raises(ValueError, match="different scan files"):
        summarize_ensemble([mixed / "member_0", mixed / "member_1"], mixed)
    with pytest.raises(FileNotFoundError, match="beam.h5"):
        (mixed / "member_1" / "beam.h5").unlink()
        summarize_ensemble([mixed / "member_0", mixed / "member_1"], mixed)


def test_members_with_space_charge_get_the_space_charge_method_error(ensembles, tmp_path):
    """Members whose reports carry a space-charge model check (PIC) or a surrogate check are fits with space
    charge: their x, y emittances get METHOD_ERROR_SPACE_CHARGE (0.65 % for rms emittances), the others
    METHOD_ERROR (0.25 %); the summary says which."""
    import shutil

    members = []
    for i in range(2):
        member = tmp_path / f"member_{i}"
        shutil.copytree(ensembles["many"] / f"member_{i}", member)
        report = json.loads((member / "emittances.json").read_text())
        report["surrogate_check"] = {}  # a surrogate fit's check (no PIC bias to correct)
        (member / "emittances.json").write_text(json.dumps(report))
        members.append(member)
    summary = json.loads((summarize_ensemble(members, tmp_path) / "ensemble_emittances.json").read_text())
    assert summary["space_charge"] is True
    assert summary["emittances"]["norm_emit_x"]["method_error"] == 0.0065
    assert summary["emittances"]["norm_emit_x_core90"]["method_error"] == 0.01
    plain = json.loads((ensembles["many"] / "ensemble_emittances.json").read_text())
    assert plain["space_charge"] is False and plain["emittances"]["norm_emit_x"]["method_error"] == 0.0025


def test_member_arguments_set_both_seeds():
    args = member_arguments(["--config", "c.yaml"], 7, "ens/member_2")
    assert args[:4] == ["fit", "--model.calibration_start=random", "--config", "c.yaml"]  # a config may override it
    assert "--seed_everything=7" in args and "--model.generator.init_args.seed=7" in args
    assert "--trainer.logger.init_args.version=ens/member_2" in args


def test_ensemble_needs_two_members(capsys):
    with pytest.raises(SystemExit) as done:
        main(["ensemble", "--members", "1", "--config", "configs/quad_scan_4d.yaml"])
    assert done.value.code == 2
    assert "at least 2 members" in capsys.readouterr().err


def test_members_in_parallel_processes(ensembles, tmp_path):
    """--parallel 2: the first member runs in this process, the others as `psr fit` processes."""
    scan = ensembles["few"].parent.parent / "few.h5"
    main(["ensemble", "--members", "3", "--parallel", "2", "--name", "par", "--config", "configs/quad_scan_4d.yaml",
          f"--data.path={scan}", "--data.val_every=0", "--data.steps_per_epoch=20", "--trainer.max_epochs=2",
          "--model.generator.init_args.n_particles=1000", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.enable_progress_bar=false"])
    summary = json.loads((tmp_path / "quad_scan_4d" / "par" / "ensemble_emittances.json").read_text())
    assert summary["members"] == 3
    assert len(set(summary["emittances"]["norm_emit_y"]["members"])) == 3


def test_the_method_band_holds_a_bias_the_members_share_up_to_the_methods_measured_error():
    """Members that agree with each other but share a bias (the 4D family's px tail x core: -1.8 % +- 0.6 % std)
    miss the truth with +-2 std; band_2std_with_method adds the method's error on hard beams (1 % for cores, 0.25 %
    for rms emittances) in quadrature and holds it. The same shared bias on an rms emittance, which the method
    gets to 0.25 %, is still a miss: the band is not widened by a blanket margin."""
    from psr.outputs.ensemble_summary import add_method_error

    core = {"mean": 0.982, "std": 0.006, "true": 1.0}
    add_method_error("norm_emit_x_core90", core)
    assert not (core["mean"] - 2 * core["std"] <= 1.0 <= core["mean"] + 2 * core["std"])
    assert core["truth_in_band_with_method"] and core["band_2std_with_method"][0] == pytest.approx(0.982 - 2 * np.hypot(0.006, 0.00982))
    rms = {"mean": 0.982, "std": 0.006, "true": 1.0}
    add_method_error("norm_emit_x", rms)
    assert not rms["truth_in_band_with_method"]
    # with space charge in the fit: the space-charge family's strong S rms x, -0.86 % +- 0.24 % std over six seeds
    # (stop 41), misses with the no-charge error and holds with the space-charge family's 0.65 %; a shared 2 % does not
    strong_s = {"mean": 0.9914, "std": 0.0024, "true": 1.0}
    add_method_error("norm_emit_x", strong_s)
    assert not strong_s["truth_in_band_with_method"]
    add_method_error("norm_emit_x", strong_s, space_charge=True)
    assert strong_s["method_error"] == 0.0065 and strong_s["truth_in_band_with_method"]
    shared = {"mean": 0.98, "std": 0.0024, "true": 1.0}
    add_method_error("norm_emit_x", shared, space_charge=True)
    assert not shared["truth_in_band_with_method"]
    longitudinal = {"mean": 0.982, "std": 0.006, "true": 1.0}
    add_method_error("norm_emit_z", longitudinal)  # measured on x and y only
    assert "band_2std_with_method" not in longitudinal


def test_band_95_holds_one_more_draw_95_percent_of_the_time():
    """The Student-t prediction band of M members holds a further draw of their distribution (here: the truth, when
    the members scatter around it) 95 % of the time; +-2 std holds it 78 % (M = 3) and 88 % (M = 6) of the time."""
    from psr.outputs.ensemble_summary import prediction_factor

    rng = np.random.default_rng(0)
    assert prediction_factor(3) == pytest.approx(4.303 * (4 / 3) ** 0.5, rel=1e-3)
    assert prediction_factor(1000) == pytest.approx(1.96, rel=2e-3)
    for members, two_std in ((3, 0.78), (6, 0.88)):
        draws = rng.normal(size=(40_000, members + 1))  # members, then the truth
        mean, std = draws[:, :-1].mean(1), draws[:, :-1].std(1, ddof=1)
        distance = np.abs(draws[:, -1] - mean) / std
        assert np.mean(distance <= prediction_factor(members)) == pytest.approx(0.95, abs=0.005)
        assert np.mean(distance <= 2) == pytest.approx(two_std, abs=0.01)
    with pytest.raises(ValueError, match="at least 2 members"):
        prediction_factor(1)
