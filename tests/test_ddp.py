"""One reconstruction split over processes (Lightning's ddp strategy, gloo on CPU): every process makes
the same beam and tracks its share of the settings; the fit must equal the single-process fit."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from models import MLPBeamGenerator, NormalizingFlowBeam
from psr.data.datamodule import ScanDataModule
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam
from psr.training.reconstruction import PhaseSpaceReconstruction

LATTICE = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
    {"type": "Drift", "name": "D1", "length": 2.0},
    {"type": "Screen", "name": "YAG", "resolution": [40, 40], "pixel_size": [2e-4, 2e-4]},
]
BEAM = SyntheticBeam(emittance_x=1.7e-8, beta_x=6.0, alpha_x=1.5, emittance_y=1.3e-8, beta_y=4.0, alpha_y=-1.0)
PSR = str(Path(sys.executable).with_name("psr"))  # the console script (Lightning relaunches sys.argv)
DDP = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "lattice.yaml").write_text(yaml.safe_dump(LATTICE))
    return {n: simulate(str(folder / f"scan_{n}.h5"), str(folder / "lattice.yaml"),
                        {"Q1.k1": list(np.linspace(-8.0, 16.0, n))}, p0c=60e6, beam=BEAM, n_particles=20_000, seed=2)
            for n in (7, 2)}


def test_shares_of_the_processes_add_up_to_the_whole_batch(scans):
    """Process r of W tracks settings r, r + W, ...; the shares' losses and gradients add up to the whole
    batch's (also with more processes than settings: empty shares are 0 with a 0 gradient)."""
    data = ScanDataModule(str(scans[7]), val_every=0)
    data.setup()
    batch = data.batch(data.train_index)
    model = PhaseSpaceReconstruction(MLPBeamGenerator(n_particles=2000))
    model.configure_scan(data.scan)
    full = model._loss(batch)
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    tracked, predict = [], model.predict_images
    model.predict_images = lambda settings, *args, **kwargs: tracked.append(len(settings)) or predict(settings, *args, **kwargs)
    for world in (2, 3, 9):
        model.zero_grad()
        tracked.clear()
        total = 0.0
        for rank in range(world):
            model._trainer = SimpleNamespace(global_rank=rank, world_size=world)
            share = model._loss(batch, share=True)
            share.backward()
            total += share.item()
        assert tracked == [len(range(r, 7, world)) for r in range(world) if r < 7], (world, tracked)
        assert total == pytest.approx(full.item(), rel=1e-6)
        for got, want in zip((p.grad for p in model.parameters()), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_resampled_flow_particles_do_not_depend_on_the_global_generator():
    """Every process of a distributed fit must draw the same fresh particles: the flow's stream is seeded
    by its `seed`, whatever the global torch generator did before."""
    flows = [NormalizingFlowBeam(n_particles=300, n_dim=4, n_layers=1, hidden_width=8, resample=True,
                                 coupling="affine", seed=4) for _ in range(2)]
    flows[1].load_state_dict(flows[0].state_dict())
    draws = []
    for global_seed, flow in zip((1, 2), flows):
        torch.manual_seed(global_seed)
        draws.append(torch.cat([flow(), flow()]))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    assert not torch.equal(draws[0][:300], draws[0][300:])  # still fresh particles at every call


def fit(command, config, scan, folder, version, *extra):
    """Run `psr fit` for 20 steps as its own process(es); (metrics rows, emittances.json, wall time [s])."""
    args = [*command, "fit", "--config", str(config), f"--data.path={scan}", "--data.steps_per_epoch=10",
            "--trainer.max_steps=20", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu", "--model.generator.init_args.n_particles=2000",
            f"--trainer.logger.init_args.save_dir={folder}", "--trainer.logger.init_args.name=fit",
            f"--trainer.logger.init_args.version={version}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    run = Path(folder) / "fit" / version
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return rows, json.loads((run / "emittances.json").read_text()), done.stdout


def column(rows, name):
    """{step: value} of one logged metric."""
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}


def assert_same_fit(single, distributed, metrics, rtol=1e-5):
    for name in metrics:
        a, b = column(single[0], name), column(distributed[0], name)
        assert a.keys() == b.keys() and a, (name, sorted(a), sorted(b))
        worst = max(abs(b[k] - a[k]) / max(abs(a[k]), 1e-12) for k in a)
        print(f"{name}: {len(a)} values, max relative difference {worst:.2e}")
        assert worst < rtol, (name, a, b)
    emittances = {key: row for key, row in single[1].items() if isinstance(row, dict) and "reconstructed" in row}
    assert {"norm_emit_x", "norm_emit_y", "norm_emit_4d"} <= emittances.keys()
    for key, row in emittances.items():
        other = distributed[1][key]["reconstructed"]
        difference = abs(other - row["reconstructed"]) / abs(row["reconstructed"])
        print(f"{key}: single {row['reconstructed']:.6e}, distributed {other:.6e}, relative difference {difference:.1e}")
        assert difference < 10 * rtol, (key, row, other)


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 GPUs"))])
def test_two_processes_reproduce_the_single_process_fit(scans, tmp_path, accelerator):
    """7 settings, every second held out: 4 training settings (2 per process), 3 validation settings
    (2 and 1). The console script `psr` is relaunched by Lightning for the second process."""
    config, device = "configs/quad_scan_4d.yaml", f"--trainer.accelerator={accelerator}"
    single = fit([sys.executable, "-m", "psr.cli"], config, scans[7], tmp_path, "single", device)
    distributed = fit([PSR], config, scans[7], tmp_path, "ddp", *DDP, device, "--trainer.devices=2")
    assert len(column(single[0], "train_loss")) == 20
    assert_same_fit(single, distributed, ["train_loss", "val_loss"])
    assert "run folder" in distributed[2] and distributed[2].count("norm_emit_x ") == 1  # one report


def test_more_processes_than_settings_max_entropy(scans, tmp_path):
    """A maximum-entropy fit (flow beam drawing fresh particles every step, penalty doubled every 10 steps
    on the mismatch of an evaluation beam) of a 2-setting scan on 3 processes: one of them has no
    setting; the entropy term, the same in every process, must count once. In float64 the two fits
    agree to rounding (float32 rounding differences grow over a fit: see benchmarks/bench_ddp.py)."""
    config = yaml.safe_load(Path("configs/quad_scan_4d_maxent.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"].update(threshold=1e-3, steps_per_stage=10, eval_particles=3000)
    config["model"]["generator"]["init_args"].update(n_layers=2, hidden_width=16)
    path = tmp_path / "maxent.yaml"
    path.write_text(yaml.safe_dump(config))
    extra = ["--data.val_every=0", "--trainer.precision=64-true"]  # float64: equal to rounding
    single = fit([sys.executable, "-m", "psr.cli"], path, scans[2], tmp_path, "single", *extra)
    distributed = fit([sys.executable, "-m", "psr.cli"], path, scans[2], tmp_path, "ddp", *extra, *DDP,
                      "--trainer.devices=3")
    assert column(single[0], "penalty")[19] == 2 * column(single[0], "penalty")[0]  # the first stage ended
    assert_same_fit(single, distributed, ["train_loss", "train_objective", "entropy", "penalty", "stage_mismatch"],
                    rtol=1e-10)


def test_ensemble_members_as_separate_jobs(scans, tmp_path, capsys):
    """`psr ensemble --member_index I` (one task of an array job each; member 1 itself on 2 processes, the
    console script relaunched by Lightning) and `psr ensemble --summarize` summarize the members with
    seeds 0 and 1; the distributed member equals the same member fitted in one process."""
    from psr.cli import main

    common = ["--config", "configs/quad_scan_4d.yaml", f"--data.path={scans[7]}", "--data.steps_per_epoch=10",
              "--trainer.max_steps=20", "--model.generator.init_args.n_particles=2000", "--trainer.accelerator=cpu",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    main(["ensemble", "--member_index", "0", "--name", "jobs", *common])
    main(["ensemble", "--member_index", "1", "--name", "single", *common])
    done = subprocess.run([PSR, "ensemble", "--member_index", "1", "--name", "jobs", *common, *DDP,
                           "--trainer.devices=2"], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ensemble member 1:") == 1, done.stdout  # printed by rank 0 only
    folder = tmp_path / "quad_scan_4d"
    main(["ensemble", "--summarize", str(folder / "jobs")])
    assert "ensemble of 2" in capsys.readouterr().out
    summary = json.loads((folder / "jobs" / "ensemble_emittances.json").read_text())
    members = [json.loads((folder / run / "emittances.json").read_text())
               for run in ("jobs/member_0", "single/member_1")]
    for key, row in summary["emittances"].items():
        expected = [m[key]["reconstructed"] for m in members]
        print(key, "summary", row["members"], "single-process members", expected)
        assert expected[0] != expected[1]  # seeds 0 and 1
        np.testing.assert_allclose(row["members"], expected, rtol=1e-4)


def test_ensemble_job_errors(tmp_path, capsys):
    from psr.cli import main

    (tmp_path / "member_0").mkdir()
    (tmp_path / "member_2").mkdir()
    for args, message in ((["--summarize", str(tmp_path)], "no member folder(s) member_1"),
                          (["--summarize", str(tmp_path / "nothing")], "no such ensemble folder"),
                          (["--member_index", "0", "--config", "configs/quad_scan_4d.yaml"], "needs --name"),
                          (["--member_index", "0", "--members", "3", "--name", "e"], "do not apply")):
        with pytest.raises(SystemExit) as exit_info:
            main(["ensemble", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, args
