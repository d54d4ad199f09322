"""Reconstruction with 3D space charge in the loop: a smaller copy of configs/sc_quad_scan.yaml."""

import json

import pytest
import torch
import yaml

import sim
from models import MLPBeamGenerator
from psr.cli import fit_cli
from psr.training.reconstruction import PhaseSpaceReconstruction
from psr.data.scanfile import read_scan
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam

SHIPPED = yaml.safe_load(open("data/sc_quad_scan.simulate.yaml"))
TRUTH = SyntheticBeam(**SHIPPED["beam"]["init_args"])
SPACE_CHARGE = {"grid_shape": [16, 16, 16], "max_step": 0.25, "compensate": True}  # as the shipped config


@pytest.fixture(scope="module")
def scan_sc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan_sc")
    items = sim.lattice.load_lattice_text(open("data/sc_quad_scan.lattice.yaml").read())
    items[-1].update(resolution=[64, 64], pixel_size=[1.9e-4, 1.9e-4])
    (folder / "lattice.yaml").write_text(yaml.safe_dump(items))
    return simulate(str(folder / "scan.h5"), str(folder / "lattice.yaml"), SHIPPED["settings"], p0c=float(SHIPPED["p0c"]),
                    beam=TRUTH, charge=SHIPPED["charge"], n_particles=20_000, space_charge=SPACE_CHARGE, seed=3)


def test_space_charge_changes_the_shipped_images_by_more_than_10_percent():
    scan = read_scan("data/sc_quad_scan.h5")
    lattice = sim.Lattice.from_list(scan.lattice).to(torch.float64)
    beam = sim.ParticleBeam(torch.as_tensor(scan.ground_truth), scan.p0c, scan.species, scan.charge)
    k1 = torch.as_tensor(scan.settings[:, 0])
    without = lattice(beam, {"Q1.k1": k1}).beam.particles[..., [0, 2]].std(-2)
    measured = torch.as_tensor(scan.screens["YAG"].images, dtype=torch.float64)
    pixel = scan.screens["YAG"].pixel_size[0]
    coords = (torch.arange(measured.shape[-1], dtype=torch.float64) - (measured.shape[-1] - 1) / 2) * pixel
    px, py = measured.sum(-2), measured.sum(-1)
    rms = [((p * coords**2).sum(-1) / p.sum(-1) - ((p * coords).sum(-1) / p.sum(-1)) ** 2).sqrt() for p in (px, py)]
    with_sc = torch.stack(rms, -1)
    assert ((with_sc / without - 1).abs() > 0.10).any()
    assert ((with_sc / without - 1).abs().amax(-1) > 0.10).sum() >= 6  # at half the settings or more


def test_fit_space_charge_option_is_checked(tmp_path):
    scan = read_scan("data/sc_quad_scan.h5")
    with pytest.raises(ValueError, match=r"model.space_charge: unknown key\(s\) \['grid'\]"):
        PhaseSpaceReconstruction(torch.nn.Identity(), space_charge={"grid": [8, 8, 8]})
    with pytest.raises(ValueError, match="max_step must be a positive length"):
        PhaseSpaceReconstruction(torch.nn.Identity(), space_charge={"max_step": -1.0})
    model = PhaseSpaceReconstruction(torch.nn.Identity(), space_charge=SPACE_CHARGE)
    model.configure_scan(scan)
    assert model.lattice.space_charge.grid_shape == (16, 16, 16)
    with pytest.raises(ValueError, match="longitudinal .* is for n_dim 4"):
        MLPBeamGenerator(n_dim=6, longitudinal=[1e-3, 1e-3])


def fit(scan, tmp_path, space_charge: bool, epochs: int) -> dict:
    cli = fit_cli(args=[
        "fit", "--config", "configs/sc_quad_scan.yaml", f"--data.path={scan}", "--data.steps_per_epoch=40",
        f"--trainer.max_epochs={epochs}", "--model.generator.init_args.n_particles=4000",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ] + (["--model.space_charge_every=1"] if space_charge else ["--model.space_charge=null"]))  # PIC in every step
    return json.loads(open(f"{cli.trainer.log_dir}/emittances.json").read())


def test_fit_with_space_charge_recovers_the_truth_and_without_it_does_not(scan_sc, tmp_path):
    on = fit(scan_sc, tmp_path / "on", True, epochs=7)
    off = fit(scan_sc, tmp_path / "off", False, epochs=3)  # it lands 25-40 % off; a shorter fit suffices to show it
    print(json.dumps({"on": on, "off": off}, indent=1))
    for plane in ("x", "y"):
        assert abs(on[f"norm_emit_{plane}"]["relative_error"]) < 0.08, on
    worst_off = max(abs(off[f"norm_emit_{p}"]["relative_error"]) for p in ("x", "y"))
    assert worst_off > 0.15, off
    # the space-charge model check (16^3 vs 32^3, 0.1 m) of the fit with space charge, none without it
    check = on["space_charge_check"]
    assert check["reference"]["grid_shape"] == [32, 32, 32] and "space_charge_check" not in off
    for plane in ("x", "y"):
        assert abs(check[plane]) < 0.1 and 0 < check["size_change"][plane] < 0.1
        corrected = check["corrected"][f"norm_emit_{plane}_core90"]
        assert corrected["value"] == pytest.approx(on[f"norm_emit_{plane}_core90"]["reconstructed"] / (1 + check[plane]))
