"""Surrogates: `psr simulate-pairs` (reference physics into a pairs file), `psr surrogate` (a neural element
trained on it, weights exported) and `model.replace` (a fit that tracks a section with the element)."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import sim
from models import SectionMap
from psr.cli import main
from psr.data.pairs import read_pairs
from psr.data.scanfile import read_scan
from psr.data.simulate import simulate
from psr.data.simulate_pairs import simulate_pairs
from psr.data.synthetic import SyntheticBeam
from psr.training.surrogate import rms

SECTION = """- {type: Quadrupole, name: Q1, length: 0.1, k1: 0.0}
- {type: Drift, name: D1, length: 1.0}
"""
NONLINEAR = """- {type: Sextupole, name: S1, length: 0.2, k2: 0.0}
- {type: Drift, name: D1, length: 1.0}
"""
RANGES = {"emittance_x": [5e-9, 2e-8], "emittance_y": [5e-9, 2e-8], "alpha_x": [-1.0, 1.0], "beta_x": [2.0, 8.0]}


@pytest.fixture(scope="module")
def linear_pairs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "section.yaml").write_text(SECTION)
    return simulate_pairs(str(folder / "pairs.h5"), str(folder / "section.yaml"), p0c=60e6, n_beams=6, n_particles=400,
                          beam_ranges=RANGES, settings={"Q1.k1": [-5.0, 5.0]}, seed=2)


def test_pairs_hold_the_reference_physics(linear_pairs):
    pairs = read_pairs(linear_pairs)
    assert pairs.beams_in.shape == pairs.beams_out.shape == (6, 400, 6) and pairs.setting_names == ["Q1.k1"]
    assert ((-5 <= pairs.settings) & (pairs.settings <= 5)).all() and len(np.unique(pairs.settings)) == 6
    lattice = sim.Lattice.from_list(pairs.lattice).double()
    beams_in = torch.as_tensor(pairs.beams_in, dtype=torch.float64)
    out = lattice(sim.ParticleBeam(beams_in, p0c=60e6), {"Q1.k1": torch.as_tensor(pairs.settings[:, 0])[:, None]})
    expected = out.beam.particles.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # beam m at its own setting m
    assert np.allclose(pairs.beams_out, expected.numpy(), rtol=1e-5, atol=1e-10)
    sizes = rms(beams_in)[:, 0]
    assert sizes.max() / sizes.min() > 1.2  # the input beams differ (drawn from the documented ranges)


def _run_bad(args, tmp_path, capfd, words):
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert done.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"psr {args[0]}: error: ") and all(w in lines[0] for w in words), lines
    assert set(tmp_path.rglob("*")) == before


def test_pairs_whose_beams_do_not_match_their_settings(linear_pairs, tmp_path, capfd):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(Path(linear_pairs).read_bytes())
    with h5py.File(bad, "r+") as handle:
        settings = handle["settings"][:4]
        del handle["settings"]
        handle.create_dataset("settings", data=settings).attrs["names"] = ["Q1.k1"]
    args = ["surrogate", "--model.element={type: SectionMap, name: SC}", f"--model.weights={tmp_path / 'w.pt'}",
            f"--data.path={bad}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    _run_bad(args, tmp_path, capfd, ["bad.h5", "/settings", "6 beams", "one row of settings per beam"])
    with h5py.File(bad, "r+") as handle:
        del handle["settings"]
        handle.create_dataset("settings", data=np.zeros((6, 1))).attrs["names"] = ["Q1.k1"]
        del handle["beams_out"]
        handle.create_dataset("beams_out", data=np.zeros((6, 300, 6), dtype=np.float32))
    _run_bad(args, tmp_path, capfd, ["bad.h5", "/beams_out", "particle by particle"])
    _run_bad(["simulate-pairs", f"--output={tmp_path / 'p.h5'}", f"--lattice={tmp_path / 'none.yaml'}", "--p0c=6e7"],
             tmp_path, capfd, ["none.yaml", "no such file"])


def test_surrogate_learns_a_nonlinear_section(tmp_path, one_thread):
    """A sextupole and a drift: `psr surrogate` trains a SectionMap that tracks held-out beams far better than
    the section's first-order map, and exports a weights file a lattice can load."""
    (tmp_path / "section.yaml").write_text(NONLINEAR)
    path = simulate_pairs(str(tmp_path / "pairs.h5"), str(tmp_path / "section.yaml"), p0c=60e6, n_beams=20,
                          n_particles=1000, beam={"beta_y": 10.0}, beam_ranges=RANGES,
                          settings={"S1.k2": [500.0, 1500.0]}, seed=3)
    main(["surrogate", "--model.element={type: SectionMap, name: SC, hidden_width: 32, hidden_layers: 2}",
          f"--model.weights={tmp_path / 'sc.pt'}", "--model.lr=3e-3", f"--data.path={path}", "--data.val_every=5",
          "--data.beams_per_batch=4", "--data.particles_per_beam=1000", "--data.steps_per_epoch=100",
          "--trainer.max_epochs=10", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
          "--trainer.enable_progress_bar=false"])
    run = next((tmp_path / "runs").glob("surrogate/version_*"))
    summary = json.loads((run / "surrogate.json").read_text())
    assert (run / "moments.png").is_file() and (run / "sc.pt").is_file() and (tmp_path / "sc.pt").is_file()
    pairs = read_pairs(path)
    held = np.arange(4, 20, 5)
    beams_in = torch.as_tensor(pairs.beams_in[held], dtype=torch.float64)
    reference = rms(torch.as_tensor(pairs.beams_out[held], dtype=torch.float64))
    untrained = SectionMap("SC", pairs.lattice, [1e-3] * 6, inputs=["S1.k2"]).double()
    k2 = torch.as_tensor(pairs.settings[held, 0])
    first_order = untrained.track(beams_in, 60e6, sim.get_species("electron"), {"S1_k2": k2})[0]
    before = (rms(first_order) / reference - 1).abs().max(0).values
    after = summary["rms_relative_error_max"]
    assert before[1] > 0.05  # the sextupole matters in px
    for i, key in enumerate(("x", "px", "y", "py")):
        assert after[key] < max(before[i].item() / 3, 0.02), (key, after[key], before[i].item())
    trained = SectionMap("SC", pairs.lattice, weights=str(tmp_path / "sc.pt"), **{
        k: v for k, v in json.loads(json.dumps(torch.load(tmp_path / "sc.pt", weights_only=True)["spec"])).items()
        if k != "section"})
    assert trained.hidden == (32, 2)


def test_replace_routes_scan_settings_to_the_section(tmp_path, one_thread):
    """model.replace: an untrained SectionMap in place of Q1 and D1 makes the physical lattice's images (its map
    starts as theirs) from the scan's own Q1.k1 column; weights trained for another section are refused."""
    from psr.training.reconstruction import PhaseSpaceReconstruction
    from models import MLPBeamGenerator

    (tmp_path / "lattice.yaml").write_text(SECTION + "- {type: Screen, name: YAG, resolution: [32, 32], "
                                           "pixel_size: [2.0e-4, 2.0e-4]}\n")
    scan = read_scan(simulate(str(tmp_path / "scan.h5"), str(tmp_path / "lattice.yaml"), {"Q1.k1": [-4.0, 0.0, 4.0]},
                              p0c=60e6, beam=SyntheticBeam(), n_particles=1000, seed=0))
    section = [dict(item) for item in scan.lattice[:2]]
    SectionMap("SC", section, [1e-3] * 6, inputs=["Q1.k1"]).save_weights(tmp_path / "sc.pt")
    replace = [{"elements": ["Q1", "D1"], "element": {"type": "SectionMap", "name": "SC", "weights": str(tmp_path / "sc.pt")}}]
    torch.manual_seed(0)
    plain = PhaseSpaceReconstruction(MLPBeamGenerator(n_particles=2000))
    with_map = PhaseSpaceReconstruction(MLPBeamGenerator(n_particles=2000), replace=replace)
    with_map.generator.load_state_dict(plain.generator.state_dict())
    plain.configure_scan(scan)
    with_map.configure_scan(scan)
    assert with_map.setting_routes == {"Q1.k1": "SC.Q1_k1"} and [e.name for e in with_map.lattice.elements] == ["SC", "YAG"]
    settings = torch.as_tensor(scan.settings, dtype=torch.float32)
    with torch.no_grad():
        a, b = plain.predict_images(settings)["YAG"], with_map.predict_images(settings)["YAG"]
    assert torch.allclose(a, b, atol=1e-6)
    # the element is fixed physics in the fit: a training step moves the beam, not the element's weights
    weights = [p.detach().clone() for p in with_map.lattice.parameters()]
    assert weights and not any(p.requires_grad for p in with_map.lattice.parameters())
    optimizer = torch.optim.Adam(with_map.parameters(), lr=0.1)
    with_map.predict_images(settings)["YAG"].pow(2).sum().backward()
    optimizer.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, with_map.lattice.parameters()))
    assert any(p.grad is not None for p in with_map.generator.parameters())
    longer = [dict(section[0]), {**section[1], "length": 2.0}]
    SectionMap("SC", longer, [1e-3] * 6, inputs=["Q1.k1"]).save_weights(tmp_path / "other.pt")
    other = [{"elements": ["Q1", "D1"], "element": {"type": "SectionMap", "weights": str(tmp_path / "other.pt")}}]
    with pytest.raises(ValueError, match="trained for another element or section.*section"):
        PhaseSpaceReconstruction(MLPBeamGenerator(n_particles=200), replace=other).configure_scan(scan)


def test_emittance_term_of_the_loss(linear_pairs):
    """model.emittance_weight adds the squared relative error of the x and y emittances: 0 for the exact section
    (the untrained map is its first-order physics), ((1/a) - 1)^2 / 2 when the reference's px is a times wider."""
    from psr.training.surrogate import SurrogateTraining

    module = SurrogateTraining({"type": "SectionMap", "name": "SC"}, "unused.pt", emittance_weight=1.0)
    module.configure_pairs(read_pairs(linear_pairs))
    pairs = read_pairs(linear_pairs)
    batch = {"beams_in": torch.as_tensor(pairs.beams_in), "beams_out": torch.as_tensor(pairs.beams_out),
             "settings": torch.as_tensor(pairs.settings)}
    assert module.losses(batch)["emittance"] < 1e-8
    wider = batch["beams_out"].clone()
    mean = wider[..., 1].mean(-1, keepdim=True)
    wider[..., 1] = mean + 1.1 * (wider[..., 1] - mean)
    term = module.losses({**batch, "beams_out": wider})["emittance"]
    assert abs(term - (1 / 1.1 - 1) ** 2 / 2) < 1e-5


def test_whitened_terms_of_the_loss(linear_pairs):
    """model.whiten: the particle term in each plane's normalized phase space. The reference comes out with unit
    covariance per plane; a prediction whose x-plane emittance is (1 + e) times the reference's (its normalized
    momentum stretched) costs e^2 / U whitened (U used coordinates), whatever the plane's x-px correlation r,
    and only e^2 (1 - r^2) / U per rms (nearly nothing for the strongly correlated beams at a section's exit)."""
    from psr.training.surrogate import SurrogateTraining, emittances, normalized, used_coordinates

    pairs = read_pairs(linear_pairs)
    out = torch.as_tensor(pairs.beams_out, dtype=torch.float64)
    used = used_coordinates(torch.as_tensor(pairs.beams_in))
    _, b = normalized(out, out, used, whiten=True)
    for plane in range(b.shape[-1] // 2):
        part = b[..., 2 * plane:2 * plane + 2]
        cov = part.transpose(-1, -2) @ part / part.shape[-2]
        assert torch.allclose(cov, torch.eye(2, dtype=cov.dtype).expand_as(cov), atol=1e-9)
    centred = out - out.mean(-2, keepdim=True)
    size = centred.square().mean(-2).sqrt()
    r = (centred[..., 0] * centred[..., 1]).mean(-1) / (size[..., 0] * size[..., 1])
    across = centred[..., 1] - (r * size[..., 1] / size[..., 0]).unsqueeze(-1) * centred[..., 0]
    e = 0.02
    stretched = out.clone()
    stretched[..., 1] += e * across  # px across its correlation with x: (1 + e) the x emittance
    assert torch.allclose(emittances(stretched)[..., 0] / emittances(out)[..., 0], torch.full_like(r, 1 + e))
    n_used = int(used.sum())
    for whiten, expected in ((True, torch.full_like(r, e ** 2 / n_used)), (False, e ** 2 * (1 - r ** 2) / n_used)):
        a, b = normalized(stretched, out, used, whiten)
        assert torch.allclose((a - b).square().mean((-1, -2)), expected, rtol=1e-6)
    assert (1 - r ** 2).min() < 0.5  # beams correlated at the exit: per rms sees half of it or less
    module = SurrogateTraining({"type": "SectionMap", "name": "SC"}, "unused.pt", whiten=True)
    module.configure_pairs(pairs)
    batch = {"beams_in": torch.as_tensor(pairs.beams_in), "beams_out": torch.as_tensor(pairs.beams_out),
             "settings": torch.as_tensor(pairs.settings)}
    assert module.losses(batch)["particle"] < 1e-8  # the untrained map is the section's first-order physics


def test_pairs_from_beam_files(linear_pairs, tmp_path, capfd):
    """simulate-pairs with beam_files: input beams are particles of the files (unperturbed: exactly, row by row),
    perturbed per plane within exp(+-scale) in rms size; the outputs are the section's physics of those beams;
    two pairs files of one section train together, each holding out its own every val_every-th beam."""
    from psr.data.openpmd import write_openpmd
    from psr.training.surrogate import PairsDataModule

    (tmp_path / "section.yaml").write_text(SECTION)
    sources = []
    for i, beta in enumerate((3.0, 9.0)):
        sources.append(SyntheticBeam(emittance_x=1e-8, emittance_y=1e-8, beta_x=beta).sample(300, seed=i).double())
        write_openpmd(tmp_path / f"beam{i}.h5", sources[-1], p0c=60e6)
    files = [str(tmp_path / "beam0.h5"), str(tmp_path / "beam1.h5")]
    exact = read_pairs(simulate_pairs(str(tmp_path / "exact.h5"), str(tmp_path / "section.yaml"), p0c=60e6, n_beams=4,
                                      n_particles=200, settings={"Q1.k1": [-5.0, 5.0]}, beam_files=files,
                                      perturb={"scale": 0.0, "shear": 0.0}, seed=1))
    rows = {tuple(np.round(r, 6)) for s in sources for r in s.float().numpy().astype(np.float64) * 1e6}
    for beam in exact.beams_in:
        assert len({tuple(np.round(r, 6)) for r in beam.astype(np.float64) * 1e6} - rows) == 0
        assert len(np.unique(beam[:, 0])) == 200  # drawn without replacement
    perturbed = read_pairs(simulate_pairs(str(tmp_path / "perturbed.h5"), str(tmp_path / "section.yaml"), p0c=60e6,
                                          n_beams=6, n_particles=200, settings={"Q1.k1": [-5.0, 5.0]},
                                          beam_files=files, perturb={"scale": 0.2, "shear": 0.0}, seed=2))
    beams_in = torch.as_tensor(perturbed.beams_in, dtype=torch.float64)
    lattice = sim.Lattice.from_list(perturbed.lattice).double()
    out = lattice(sim.ParticleBeam(beams_in, p0c=60e6), {"Q1.k1": torch.as_tensor(perturbed.settings[:, 0])[:, None]})
    expected = out.beam.particles.diagonal(dim1=0, dim2=1).permute(2, 0, 1)
    assert np.allclose(perturbed.beams_out, expected.numpy(), rtol=1e-5, atol=1e-10)
    # every plane's size is a source's size (of the drawn subset) times a factor within exp(+-0.2)
    source_sizes = torch.stack([rms(s) for s in sources])  # (2, 6)
    ratios = rms(beams_in)[:, None, :4] / source_sizes[None, :, :4]
    closest = (ratios.log().abs() - 0.2).clamp(min=0).amax(-1).min(-1).values
    assert (closest < 0.15).all() and (ratios.log().abs() > 0.02).any()  # the draw noise of 200 of 300 particles

    module = PairsDataModule([str(tmp_path / "perturbed.h5"), str(tmp_path / "exact.h5")], val_every=2)
    module.setup()
    assert list(module.val_index) == [1, 3, 5, 7, 9] and module.beams_in.shape == (10, 200, 6)
    other = simulate_pairs(str(tmp_path / "other.h5"), str(tmp_path / "section.yaml"), p0c=50e6, n_beams=2,
                           n_particles=200, settings={"Q1.k1": [-5.0, 5.0]}, beam_files=files, seed=3)
    with pytest.raises(ValueError, match="other.h5: its p0c .* differs from .*perturbed.h5"):
        PairsDataModule([str(tmp_path / "perturbed.h5"), str(other)]).setup()
    _run_bad(["simulate-pairs", f"--output={tmp_path / 'p.h5'}", f"--lattice={tmp_path / 'section.yaml'}",
              "--p0c=6e7", f"--beam_files=[{tmp_path / 'none.h5'}]"], tmp_path, capfd, ["beam_files", "none.h5",
                                                                                         "no such file"])
    _run_bad(["simulate-pairs", f"--output={tmp_path / 'p.h5'}", f"--lattice={tmp_path / 'section.yaml'}",
              "--p0c=6e7", f"--beam_files=[{files[0]}]", "--beam_ranges={beta_x: [1, 2]}"], tmp_path, capfd,
             ["beam_files replaces beam / beam_ranges"])
