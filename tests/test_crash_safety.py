"""Crash-safe `psr fit`: kill -9 at any moment and resume to the same result; divergence guard; atomic,
complete outputs (unphysical particles dropped, a nominal charge for a charge-0 scan)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from psr.cli import fit_cli, main
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam

LATTICE = [{"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
           {"type": "Drift", "name": "D1", "length": 2.0},
           {"type": "Screen", "name": "YAG", "resolution": [32, 32], "pixel_size": [3e-4, 3e-4]}]
STEPS_PER_EPOCH, EPOCHS, EVERY = 60, 2, 10


def make_scan(folder: Path, charge: float) -> Path:
    (folder / "lattice.yaml").write_text(yaml.safe_dump(LATTICE))
    beam = SyntheticBeam(emittance_x=1.7e-8, beta_x=6.0, alpha_x=1.5, emittance_y=1.3e-8, beta_y=4.0, alpha_y=-1.0)
    return simulate(str(folder / "scan.h5"), str(folder / "lattice.yaml"), {"Q1.k1": list(np.linspace(-10, 20, 6))},
                    p0c=60e6, beam=beam, n_particles=2000, charge=charge, seed=3)


def make_config(folder: Path, scan: Path, runs: Path) -> Path:
    """A maximum-entropy flow fit that draws fresh particles every step (so the random state matters)
    with a PenaltySchedule (whose state must resume too); a checkpoint every EVERY steps."""
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": EPOCHS, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "psr.training.PenaltySchedule",
                                   "init_args": {"threshold": 1e-6, "steps_per_stage": 25, "eval_particles": 1500}}],
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(runs), "name": "crash"}}},
        "model": {"generator": {"class_path": "models.NormalizingFlowBeam",
                                "init_args": {"n_particles": 1000, "n_dim": 4, "coupling": "affine", "n_layers": 2,
                                              "hidden_width": 16, "resample": True,
                                              "scale": [3e-4, 1e-4, 3e-4, 1e-4]}},
                  "prior": {"class_path": "models.GaussianBeam",  # ~3x the beam: no runaway entropy
                            "init_args": {"n_dim": 4, "scale": [1e-3, 3e-4, 1e-3, 3e-4]}},
                  "entropy_penalty": 20.0, "lr": 0.005, "warmup_steps": 10},
        "data": {"path": str(scan), "val_every": 2, "steps_per_epoch": STEPS_PER_EPOCH},
        "checkpoint": {"every_n_train_steps": EVERY},
    }
    path = folder / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash")
    return folder, make_config(folder, make_scan(folder, 1e-10), folder / "runs")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process


def fit_command(config: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "psr.cli", "fit", "--config", str(config), *extra]


def kill_when(command: list[str], appears, log: Path, timeout: float = 120.0) -> str:
    """Run `command`, SIGKILL it the moment `appears()` returns true; its output until then."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        start = time.monotonic()
        try:
            while not appears():
                assert process.poll() is None, "the fit ended before it could be killed"
                assert time.monotonic() - start < timeout
                time.sleep(0.005)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    return log.read_text()


def resume(config: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(fit_command(config, "--ckpt_path", "last"), capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def emittances(run: Path) -> dict:
    rows = json.loads((run / "emittances.json").read_text())
    return {k: v["reconstructed"] for k, v in rows.items() if isinstance(v, dict) and "reconstructed" in v}


def step_checkpoints(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return [int(p.stem.split("step=")[1]) for p in folder.glob("epoch=*-step=*.ckpt")] if folder.is_dir() else []


OUTPUTS = ("beam.h5", "emittances.json", "images_YAG.png", "phase_space.png", "predicted_images.h5")


def assert_clean(run: Path, outputs=OUTPUTS + ("loss.png",)) -> None:
    """Every output there and non-empty; no temporary file of a killed writer left."""
    files = [p for p in run.rglob("*") if p.is_file()]
    assert not [p.name for p in files if p.name.endswith(".tmp")]
    assert not [p.name for p in files if p.stat().st_size == 0]
    for name in outputs:
        assert (run / name).is_file(), name


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted fit (in this process, one thread like the killed ones)."""
    folder, config = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = fit_cli(["fit", "--config", str(config), f"--trainer.logger.init_args.save_dir={folder / 'reference'}"])
    finally:
        torch.set_num_threads(threads)
    return emittances(Path(cli.trainer.log_dir))


def test_kill_at_any_moment_then_resume_gives_the_uninterrupted_result(setup, reference):
    """kill -9 in the first epoch, again in the second, again while the report is written; each time
    `--ckpt_path last` continues the same run folder; the end result equals the uninterrupted fit's."""
    folder, config = setup
    experiment = folder / "runs" / "crash"
    run = experiment / "version_0"
    kill_when(fit_command(config), lambda: (run / "checkpoints" / "last.ckpt").exists(), folder / "1.log")
    resume_command = fit_command(config, "--ckpt_path", "last")
    output = kill_when(resume_command, lambda: any(s > STEPS_PER_EPOCH + EVERY for s in step_checkpoints(run)),
                       folder / "2.log")
    assert "epoch 0)" in output  # the first kill was in the first epoch
    assert not (run / "beam.h5").exists()
    output = kill_when(resume_command, lambda: any(p.name.startswith((".beam.h5.", "beam.h5")) for p in run.iterdir()),
                       folder / "3.log")
    assert "epoch 1)" in output  # the second kill was in the second epoch
    assert not (run / "loss.png").exists()  # the third while the report was written (loss.png comes last)
    result = resume(config)
    assert f"resuming {run} from {run / 'checkpoints' / 'last.ckpt'}" in result.stdout
    assert sorted(p.name for p in experiment.iterdir()) == ["version_0"]  # always the same run folder
    assert_clean(run)
    got = emittances(run)
    for key, value in reference.items():
        assert abs(got[key] / value - 1) < 1e-6, (key, got[key], value)
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    logged = [int(line.split(",")[header.index("step")]) for line in lines[1:]
              if line.split(",")[header.index("train_loss")]]
    assert logged == sorted(set(logged)) and logged[0] < STEPS_PER_EPOCH < logged[-1]  # one history, no repeats


def test_resume_last_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quad_scan_4d.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--ckpt_path", "last"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("psr fit: error: nothing to resume (ckpt_path last): no run of experiment 'quad_scan_4d' "
                          "has a checkpoint")


def small_fit(scan: Path, runs: Path, *extra) -> list[str]:
    return ["fit", "--config", "configs/quad_scan_4d.yaml", f"--data.path={scan}", "--data.steps_per_epoch=20",
            "--trainer.max_epochs=2", "--model.generator.init_args.n_particles=1000",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={runs}", *extra]


def run_main(capsys, args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err.strip()


def test_learning_rate_that_throws_the_beam_off_the_screens_stops_with_a_report(setup, tmp_path, capsys, one_thread):
    folder, _ = setup
    code, out, err = run_main(capsys, small_fit(folder / "scan.h5", tmp_path, "--model.lr=1000",
                                                "--model.warmup_steps=10000", "--checkpoint.every_n_train_steps=1"))
    run = tmp_path / "quad_scan_4d" / "version_0"
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "the beam has left every screen" in err and "likely cause: the learning rate is too large" in err, err
    assert f"the report is written from the last good checkpoint {run / 'checkpoints' / 'last.ckpt'}" in err, err
    stopped, good = int(err.split("step ")[1].split(":")[0]), int(err.split("(step ")[1].rstrip(")"))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == good < stopped
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert_clean(run, OUTPUTS)  # (no loss.png: nothing was logged in the few steps)
    rows = json.loads((run / "emittances.json").read_text())
    assert np.isfinite(rows["norm_emit_x"]["reconstructed"]) and "norm_emit_x" in out


def test_nan_loss_stops_at_once_and_reports_from_the_last_good_checkpoint(setup, tmp_path, capsys, one_thread,
                                                                            monkeypatch):
    from psr.training.reconstruction import PhaseSpaceReconstruction

    folder, _ = setup
    plain = PhaseSpaceReconstruction.training_step

    def poisoned(self, batch, batch_idx):  # a NaN from step 26 on
        loss = plain(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 25 else loss

    monkeypatch.setattr(PhaseSpaceReconstruction, "training_step", poisoned)
    code, out, err = run_main(capsys, small_fit(folder / "scan.h5", tmp_path, "--checkpoint.every_n_train_steps=10"))
    run = tmp_path / "quad_scan_4d" / "version_0"
    assert code == 2 and len(err.splitlines()) == 1, err
    lr = yaml.safe_load(open("configs/quad_scan_4d.yaml"))["model"]["lr"]  # the shipped config's
    assert err.startswith("psr fit: error: step 26: the loss is nan; likely cause: the learning rate is too large "
                          f"(model.lr={lr:g}"), err
    assert err.endswith(f"the report is written from the last good checkpoint {run / 'checkpoints' / 'last.ckpt'} "
                        "(step 20)"), err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 20
    assert_clean(run)


def test_no_training_step_writes_no_report(setup, tmp_path, capsys):
    folder, _ = setup
    code, out, err = run_main(capsys, small_fit(folder / "scan.h5", tmp_path, "--trainer.limit_train_batches=0"))
    assert code == 2 and err.startswith("psr fit: error: no optimizer step was made"), err
    assert not (tmp_path / "quad_scan_4d" / "version_0" / "beam.h5").exists()


class FixedBeam(torch.nn.Module):
    """A 'generator' that returns given particles (N, 6)."""

    n_dim = 4

    def __init__(self, particles: torch.Tensor):
        super().__init__()
        self.register_buffer("particles", particles)

    def forward(self, n_particles=None):
        return self.particles


@pytest.mark.parametrize("charge", [0.0, 1e-10])
def test_report_drops_unphysical_particles_and_gives_a_charge_0_scan_a_nominal_charge(tmp_path, charge):
    from beamphysics import ParticleGroup

    from psr.data.datamodule import ScanDataModule
    from psr.outputs.report import format_emittances, report_notes, write_report
    from psr.training.reconstruction import PhaseSpaceReconstruction

    scan = make_scan(tmp_path, charge)
    data = ScanDataModule(str(scan))
    data.setup()
    generator = torch.Generator().manual_seed(1)
    good = torch.zeros(4000, 6, dtype=torch.float64)
    sizes = torch.tensor([1e-3, 1e-4, 8e-4, 2e-4], dtype=torch.float64)
    good[:, :4] = torch.randn(4000, 4, generator=generator, dtype=torch.float64) * sizes
    good[:, 1] += 0.05 * good[:, 0] / 1e-3 * 1e-4  # an x-px correlation
    bad = torch.zeros(5, 6, dtype=torch.float64)
    bad[:3, 1] = 2.0  # |px| > 1 + pz: no forward momentum
    bad[3:, 0] = float("nan")
    model = PhaseSpaceReconstruction(FixedBeam(torch.cat([good[:2000], bad, good[2000:]]).float()))
    model.configure_scan(data.scan)
    rows = write_report(model, data, tmp_path / "run")

    assert rows["dropped_particles"] == {"count": 5, "fraction": pytest.approx(5 / 4005)}
    # 3 training settings (of 6) fix x and y; one quadrupole not the 4D emittance
    assert [rows[k]["determined_by_scan"] for k in ("norm_emit_x", "norm_emit_y_core90", "norm_emit_4d")] == [True, True, False]
    assert "not determined by this scan" in format_emittances(rows).splitlines()[-2]  # the 4D row, before the entropy
    notes = report_notes(rows)
    assert "dropped 5 unphysical particle(s)" in notes[0]
    saved = json.loads((tmp_path / "run" / "emittances.json").read_text())
    assert saved["dropped_particles"]["count"] == 5
    # the known answer: eps_n = (p0c / mc^2) sqrt(det cov(x, px)) of the 4000 physical particles (psr's
    # covariance divides by N, beamphysics' by N - 1)
    x, px = good.float().double()[:, 0].numpy(), good.float().double()[:, 1].numpy()
    beta_gamma = 60e6 / 510998.95
    expected = beta_gamma * np.sqrt(np.linalg.det(np.cov(x, px, bias=True)))
    assert rows["norm_emit_x"]["reconstructed"] == pytest.approx(expected, rel=1e-6)
    group = ParticleGroup(str(tmp_path / "run" / "beam.h5"))
    assert len(group) == 4000
    # beamphysics' weighted statistics exist (all-zero weights of a charge-0 file would give NaN)
    assert group["norm_emit_x"] == pytest.approx(beta_gamma * np.sqrt(np.linalg.det(np.cov(x, px))), rel=1e-6)
    import h5py

    with h5py.File(tmp_path / "run" / "beam.h5") as handle:
        assert handle.attrs["psr_nominal_charge"] == (charge == 0)
    if charge == 0:
        assert saved["nominal_charge_C"] == 1e-12 and group.charge == pytest.approx(1e-12)
        assert "nominal charge of 1 pC" in notes[1]
    else:
        assert "nominal_charge_C" not in saved and group.charge == pytest.approx(charge)


def test_a_failing_determination_check_never_costs_the_report(tmp_path, monkeypatch):
    from psr.data.datamodule import ScanDataModule
    from psr.outputs import report
    from psr.training.reconstruction import PhaseSpaceReconstruction

    def broken(*args, **kwargs):
        raise KeyError("no map")

    monkeypatch.setattr(report, "scan_determines", broken)
    data = ScanDataModule(str(make_scan(tmp_path, 0.0)))
    data.setup()
    particles = torch.randn(2000, 6, generator=torch.Generator().manual_seed(2)) * 1e-4
    model = PhaseSpaceReconstruction(FixedBeam(particles))
    model.configure_scan(data.scan)
    report.write_report(model, data, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "emittances.json").read_text())
    assert saved["determined_by_scan_failed"] == "KeyError: 'no map'"
    assert "determined_by_scan" not in saved["norm_emit_x"] and (tmp_path / "run" / "beam.h5").exists()
