"""A surrogate corrected by PIC now and then (models.corrected.CorrectedSection, model.replace's `correct`), and
PIC kicks held between refreshes (models.lagged.LaggedSpaceCharge, model.space_charge_every)."""

import json
import re

import pytest
import torch
import yaml

import sim
from models.corrected import CorrectedSection
from psr.cli import fit_cli, main
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam
from psr.training.replace import replace_sections

SECTION = [{"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0}, {"type": "Drift", "name": "D1", "length": 1.5}]
RMS = [3.0e-4, 1.0e-4, 3.0e-4, 1.0e-4, 1.0e-3, 1.0e-3]
# an untrained SectionMap is the section's first-order map: no space charge at all (the worst surrogate)
FIRST_ORDER = {"type": "SectionMap", "section": SECTION, "inputs": ["Q1.k1"], "reference_rms": RMS, "hidden_layers": 0}
PIC = {"grid_shape": [16, 16, 16], "max_step": 0.25, "extent": 3.0, "compensate": True}
SPECIES = sim.get_species("electron")


def corrected(every: int) -> CorrectedSection:
    return CorrectedSection("SC", FIRST_ORDER, SECTION, PIC, charge=1e-11, every=every).double()


def test_corrected_section_is_the_reference_at_each_refresh_and_moves_with_the_surrogate_between():
    element = corrected(every=3)
    x = torch.randn(4000, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.tensor(RMS).double()
    k1 = {"Q1_k1": torch.tensor([-12.0, 0.0, 12.0], dtype=torch.float64)}
    reference = element.track_reference(x, 5e6, SPECIES, k1)
    plain = element.surrogate.track(x, 5e6, SPECIES, k1)[0]
    size = lambda p: p[..., [0, 2]].std(-2)  # noqa: E731
    assert ((size(reference) / size(plain) - 1).abs() > 0.05).any()  # space charge matters here: the test can fail
    out = element.track(x.requires_grad_(), 5e6, SPECIES, k1)[0]
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-15)  # a refresh: the reference exactly
    (gradient,) = torch.autograd.grad(out[..., 0].sum(), x)  # the surrogate's gradient: d x_out / d x = R11 + ...
    (surrogate_gradient,) = torch.autograd.grad(element.surrogate.track(x, 5e6, SPECIES, k1)[0][..., 0].sum(), x)
    torch.testing.assert_close(gradient, surrogate_gradient)
    x2 = (1.2 * x).detach()  # between refreshes: the surrogate's change plus the held correction
    for _ in range(2):
        out2 = element.track(x2, 5e6, SPECIES, k1)[0]
        expected = element.surrogate.track(x2, 5e6, SPECIES, k1)[0] + (reference - plain)
        torch.testing.assert_close(out2, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(element.track(x2, 5e6, SPECIES, k1)[0], element.track_reference(x2, 5e6, SPECIES, k1))
    element.eval()  # outside training: the reference
    torch.testing.assert_close(element.track(x2, 5e6, SPECIES, k1)[0], element.track_reference(x2, 5e6, SPECIES, k1))


def test_a_replaced_section_is_linearized_by_its_first_order_physics():
    """The scan-determination check and the auto prior linearize the lattice about the reference particle with
    space charge off. Through the shipped surrogate config's corrected SectionMap (its scan settings routed to
    the map) the first-order screen maps are then those of the PIC config's lattice, and the report says what it
    says for PIC (x, y determined; the 4D emittance not); before, the probe particles went through PIC with the
    bunch's charge under the scan's unrouted names, and every emittance was reported not determined."""
    from psr.outputs.scan_determination import scan_determines
    from psr.training.prior import screen_maps

    maps, determined = {}, {}
    for config in ("configs/sc_quad_scan.yaml", "configs/sc_quad_scan_surrogate.yaml"):
        model, data = (cli := fit_cli(["--config", config], run=False)).model, cli.datamodule
        data.setup("fit")
        model.configure_scan(data.scan)
        names = model.lattice_setting_names()
        maps[config] = screen_maps(model.lattice, names, data.settings.double(), data.scan.p0c, data.scan.species, 4)
        taken = {name: torch.ones(len(data.settings), dtype=torch.bool) for name in data.scan.screens}
        determined[config] = scan_determines(model.lattice, names, data.settings.double(), taken, data.scan.p0c,
                                             data.scan.species, 4)
    pic, surrogate = maps.values()
    assert "Q1.k1" not in names and any(name.startswith("SC.") for name in names)  # routed to the map
    torch.testing.assert_close(surrogate["YAG"][1], pic["YAG"][1], rtol=1e-9, atol=1e-12)
    assert pic["YAG"][1][:, 0, 0].std() > 0.1 * pic["YAG"][1][:, 0, 0].abs().mean()  # the settings matter
    assert determined["configs/sc_quad_scan_surrogate.yaml"] == determined["configs/sc_quad_scan.yaml"]
    assert determined["configs/sc_quad_scan.yaml"]["norm_emit_x"] and not determined["configs/sc_quad_scan.yaml"]["norm_emit_4d"]


def test_correct_is_checked():
    from models import ConditionalMLPBeam, NormalizingFlowBeam
    from psr.training.reconstruction import PhaseSpaceReconstruction

    entry = [{"elements": ["Q1", "D1"], "element": {"type": "SectionMap", "name": "SC"},
              "correct": {"every": 5, "space_charge": PIC}}]
    with pytest.raises(ValueError, match=r"replace\[0\].correct .* same particles every step .*ConditionalMLPBeam with resample"):
        PhaseSpaceReconstruction(ConditionalMLPBeam(n_particles=100, resample=True), replace=entry)
    PhaseSpaceReconstruction(NormalizingFlowBeam(n_particles=100, n_dim=4), replace=entry)  # fixed base samples: accepted
    items = [dict(e) for e in SECTION] + [{"type": "Screen", "name": "YAG", "resolution": [8, 8], "pixel_size": [1e-4, 1e-4]}]
    entry = {"elements": ["Q1", "D1"], "element": {k: v for k, v in FIRST_ORDER.items() if k != "section"}}
    replaced, routes = replace_sections(items, [{**entry, "correct": {"every": 5, "space_charge": PIC}}], ["Q1.k1"], 1e-11)
    assert replaced[0]["type"] == "CorrectedSection" and replaced[0]["every"] == 5 and routes == {"Q1.k1": "Q1.Q1_k1"}
    bad = [({"every": 0, "space_charge": PIC}, 1e-11, r"correct.every must be a whole number of training steps >= 1"),
           ({"every": 5}, 1e-11, r"correct must be \{every: "),
           ({"every": 5, "space_charge": {"grid": [8, 8, 8]}}, 1e-11, r"correct.space_charge: unknown key\(s\) \['grid'\]"),
           ({"every": 5, "space_charge": PIC}, 0.0, "bunch charge is 0")]
    for correct, charge, message in bad:
        with pytest.raises(ValueError, match=message):
            replace_sections(items, [{**entry, "correct": correct}], ["Q1.k1"], charge)


@pytest.fixture(scope="module")
def scan_sc(tmp_path_factory):
    shipped = yaml.safe_load(open("data/sc_quad_scan.simulate.yaml"))
    folder = tmp_path_factory.mktemp("scan_corrected")
    items = sim.lattice.load_lattice_text(open("data/sc_quad_scan.lattice.yaml").read())
    items[-1].update(resolution=[64, 64], pixel_size=[1.9e-4, 1.9e-4])
    (folder / "lattice.yaml").write_text(yaml.safe_dump(items))
    return simulate(str(folder / "scan.h5"), str(folder / "lattice.yaml"), shipped["settings"], p0c=float(shipped["p0c"]),
                    beam=SyntheticBeam(**shipped["beam"]["init_args"]), charge=shipped["charge"], n_particles=20_000,
                    space_charge=PIC, seed=3)


def test_a_surrogate_without_space_charge_corrected_by_pic_fits_as_pic_does(scan_sc, tmp_path):
    """The worst surrogate (no space charge: such fits land 25-40 % off) corrected every 5 steps lands where PIC does."""
    replace = [{"elements": ["Q1", "D1"], "element": {"type": "SectionMap", "name": "SC", "inputs": ["Q1.k1"],
                                                      "reference_rms": RMS, "hidden_layers": 0},
                "correct": {"every": 5, "space_charge": PIC}}]
    cli = fit_cli(args=[
        "fit", "--config", "configs/sc_quad_scan.yaml", f"--data.path={scan_sc}", "--data.steps_per_epoch=40",
        "--trainer.max_epochs=7", "--model.generator.init_args.n_particles=4000", "--model.space_charge=null",
        f"--model.replace={json.dumps(replace)}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false"])
    rows = json.loads(open(f"{cli.trainer.log_dir}/emittances.json").read())
    print(json.dumps(rows, indent=1))
    for plane in ("x", "y"):
        assert abs(rows[f"norm_emit_{plane}"]["relative_error"]) < 0.08, rows
        # the end-of-fit check tracks the section with its PIC (outside training): the 16^3 model's own small error
        assert abs(rows["surrogate_check"]["size_change"][plane]) < 0.05
    assert rows["surrogate_check"]["model"] == "corrected surrogate: its PIC"


def test_a_bad_correct_ends_the_fit_with_one_line(scan_sc, tmp_path, capsys):
    for correct, message in [({"every": 0, "space_charge": PIC}, "correct.every must be a whole number of training steps"),
                             ({"every": 5, "space_charge": {**PIC, "grid": 8}}, r"correct.space_charge: unknown key")]:
        replace = [{"elements": ["Q1", "D1"], "element": {"type": "SectionMap", "name": "SC", "inputs": ["Q1.k1"],
                                                          "reference_rms": RMS, "hidden_layers": 0}, "correct": correct}]
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", "configs/sc_quad_scan.yaml", f"--data.path={scan_sc}", "--model.space_charge=null",
                  f"--model.replace={json.dumps(replace)}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and "model.replace[0].correct" in lines[0], lines
        assert re.search(message, lines[0]), lines
        assert not list(tmp_path.rglob("version_*"))


def test_lagged_kicks_are_pic_at_each_refresh_and_held_per_particle_between():
    """models.lagged.LaggedSpaceCharge: PIC's kick at a refresh step, that kick again (per particle) until the next,
    no gradient through it, PIC outside a training step."""
    from models.lagged import LaggedSpaceCharge

    pic = sim.SpaceCharge(**PIC)
    lagged = LaggedSpaceCharge.lagging(pic, every=3)
    x = torch.randn(4000, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * torch.tensor(RMS).double()
    kick = lambda sc, p: sc.kick(p, 5e6, "electron", 1e-11, 0.25)  # noqa: E731
    reference = kick(pic, x)
    assert (reference - x)[..., 1].abs().max() > 0  # the kick is there: the test can fail
    lagged.start_step()  # a refresh step
    out = kick(lagged, x.clone().requires_grad_())
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-18)
    x_grad = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(kick(lagged, x_grad)[..., 1].sum(), x_grad)  # a second call in the step: PIC too
    torch.testing.assert_close(gradient[..., 1], torch.ones(4000, dtype=torch.float64))  # identity: no graph through it
    assert gradient[..., [0, 2, 3, 4, 5]].abs().max() == 0
    lagged.end_step()
    x2 = 1.2 * x
    for _ in range(2):  # steps 2 and 3: the first call's kick held
        lagged.start_step()
        torch.testing.assert_close(kick(lagged, x2), x2 + (reference - x), rtol=1e-12, atol=1e-18)
        lagged.end_step()
        assert not torch.allclose(kick(lagged, x2), x2 + (reference - x))  # outside a step: PIC of x2
    lagged.start_step()  # step 4: a refresh
    torch.testing.assert_close(kick(lagged, x2), kick(pic, x2), rtol=1e-12, atol=1e-18)
    with pytest.raises(ValueError, match="every must be a whole number"):
        LaggedSpaceCharge(0, **PIC)


def test_lagged_field_is_pic_at_each_refresh_and_interpolated_at_fresh_particles_between():
    """hold field (fresh particles every step): PIC's kick at a refresh; between refreshes the held grid's field at
    the new particles (the grid moved with their mean), 5.7 % rms off PIC on them (two draws' PIC noise on 16^3 cells)
    and the refresh's field until the next refresh; no gradient."""
    from models.lagged import LaggedSpaceCharge

    pic = sim.SpaceCharge(**PIC)
    lagged = LaggedSpaceCharge.lagging(pic, every=3, hold="field")
    draw = torch.Generator().manual_seed(1)
    beam = lambda: torch.randn(20000, 6, generator=draw, dtype=torch.float64) * torch.tensor(RMS).double()  # noqa: E731
    kick = lambda sc, p: sc.kick(p, 5e6, "electron", 1e-11, 0.25)  # noqa: E731
    dp = lambda a, b: (a - b)[..., 1]  # noqa: E731
    off = lambda a, b: (a.square().mean() / b.square().mean()).sqrt()  # noqa: E731
    x, x2 = beam(), beam() + 1e-4  # x2: a fresh draw, the bunch moved by 100 um
    lagged.start_step()  # a refresh
    torch.testing.assert_close(kick(lagged, x), kick(pic, x), rtol=1e-12, atol=1e-18)
    lagged.end_step()
    lagged.start_step()
    x_grad = x2.clone().requires_grad_()
    held = kick(lagged, x_grad)
    (gradient,) = torch.autograd.grad(held[..., 1].sum(), x_grad)
    lagged.end_step()
    torch.testing.assert_close(gradient[..., 1], torch.ones(20000, dtype=torch.float64))  # no graph through the kick
    assert gradient[..., [0, 2, 3, 4, 5]].abs().max() == 0
    error = off(dp(held.detach(), kick(pic, x2)), dp(kick(pic, x2), x2))
    print(f"held field at fresh particles: {100 * error:.2f} % rms off PIC on them")
    assert 0 < error < 0.08, error
    x3 = beam() * 0.8  # a bunch 20 % smaller in x, y, z: its own field 1 / 0.8^2 stronger at the same place
    lagged.start_step()  # step 3: the refresh's field still (in the core 0.8 / (1 / 0.8^2) = 0.51 of PIC's)
    assert off(dp(kick(lagged, x3), x3), dp(kick(pic, x3), x3)) < 0.75
    lagged.end_step()
    lagged.start_step()  # step 4: a refresh
    torch.testing.assert_close(kick(lagged, x3), kick(pic, x3), rtol=1e-12, atol=1e-18)
    with pytest.raises(ValueError, match="hold field needs the PIC solver"):
        LaggedSpaceCharge(2, solver=sim.GaussianSpaceCharge(max_step=0.25), hold="field")


def test_space_charge_every_lands_where_pic_does(scan_sc, tmp_path):
    """The sc fit with kicks refreshed every 5 steps lands within 8 % (as PIC in every step)."""
    cli = fit_cli(args=[
        "fit", "--config", "configs/sc_quad_scan.yaml", f"--data.path={scan_sc}", "--data.steps_per_epoch=40",
        "--trainer.max_epochs=7", "--model.generator.init_args.n_particles=4000", f"--model.space_charge={json.dumps(PIC)}",
        "--model.space_charge_every=5", f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    rows = json.loads(open(f"{cli.trainer.log_dir}/emittances.json").read())
    print(json.dumps(rows, indent=1))
    for plane in ("x", "y"):
        assert abs(rows[f"norm_emit_{plane}"]["relative_error"]) < 0.08, rows


def test_a_bad_space_charge_every_ends_the_fit_with_one_line(scan_sc, tmp_path, capsys):
    from models import ConditionalMLPBeam
    from psr.training.reconstruction import PhaseSpaceReconstruction

    with pytest.raises(ValueError, match=r"space_charge_every 5 holds a correction per particle .* with resample; "
                                         r"with the PIC solver it holds the field grid instead"):
        PhaseSpaceReconstruction(ConditionalMLPBeam(n_particles=100, resample=True),
                                 space_charge={"solver": "gaussian", "max_step": 0.25}, space_charge_every=5)
    PhaseSpaceReconstruction(ConditionalMLPBeam(n_particles=100, resample=True), space_charge=PIC, space_charge_every=5)
    PhaseSpaceReconstruction(ConditionalMLPBeam(n_particles=100, resample=True), space_charge=None, space_charge_every=5)
    for extra, message in [(["--model.space_charge_every=0"], "model.space_charge_every must be a whole number"),
                           (["--model.space_charge_every=2.5"], "model.space_charge_every")]:
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", "configs/sc_quad_scan.yaml", f"--data.path={scan_sc}", *extra,
                  f"--trainer.logger.init_args.save_dir={tmp_path}"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and re.search(message, lines[0]), lines
        assert not list(tmp_path.rglob("version_*"))
