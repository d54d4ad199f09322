"""`model.init_from`: a fit starts from an earlier fit's generator (psr.training.warm_start)."""

import pytest
import torch

from psr.cli import fit_cli, main

FIT = ["--config", "configs/quad_scan_4d.yaml", "--data.steps_per_epoch=60", "--trainer.max_epochs=1", "--model.warmup_steps=5",
       "--model.generator.init_args.n_particles=1000", "--trainer.enable_progress_bar=false"]


def first_loss(args: list[str]) -> float:
    """The image loss of a configured fit's model before any step."""
    cli = fit_cli(args, run=False)
    cli.datamodule.setup("fit")
    cli.model.configure_scan(cli.datamodule.scan)
    with torch.no_grad():
        return float(cli.model._loss(next(iter(cli.datamodule.train_dataloader()))))


@pytest.fixture(scope="module")
def earlier_fit(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    fit_cli(["fit", *FIT, f"--trainer.logger.init_args.save_dir={runs}"])
    return runs / "quad_scan_4d" / "version_0"


def test_a_warm_start_begins_where_the_earlier_fit_ended(earlier_fit, tmp_path):
    checkpoint = torch.load(earlier_fit / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    cold = first_loss([*FIT, "--seed_everything=1"])
    ended = first_loss([*FIT, "--seed_everything=1", "--model.init_from", str(earlier_fit / "checkpoints" / "last.ckpt")])
    # with twice the particles (its own base samples) and from the run folder
    cli = fit_cli([*FIT, "--seed_everything=1", "--model.generator.init_args.n_particles=2000",
                   "--model.init_from", str(earlier_fit)], run=False)
    weights = cli.model.generator.state_dict()
    assert all(torch.equal(weights[k], checkpoint[f"generator.{k}"]) for k in weights if k != "base_samples")
    assert weights["base_samples"].shape[0] == 2000
    warm_2000 = first_loss([*FIT, "--seed_everything=1", "--model.generator.init_args.n_particles=2000",
                            "--model.init_from", str(earlier_fit)])
    # a generator with an option the earlier fit had off (tail_skip: a zero-initialized map) is the same function
    with_tail_skip = first_loss([*FIT, "--seed_everything=1", "--model.generator.init_args.tail_skip=true",
                                 "--model.init_from", str(earlier_fit)])
    assert with_tail_skip == pytest.approx(ended, rel=1e-5)
    # 60 steps took the loss well below a fresh network's; the warm start starts there (other draws: close)
    assert ended < 0.2 * cold and warm_2000 < 0.2 * cold and abs(warm_2000 / ended - 1) < 0.15, (cold, ended, warm_2000)


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "other_width", "auto_prior"])
def test_a_bad_warm_start_is_one_line_and_no_run_folder(earlier_fit, tmp_path, capsys, case):
    source = {"missing": tmp_path / "nowhere.ckpt", "not_a_checkpoint": tmp_path / "text.ckpt"}.get(case, earlier_fit)
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    extra = {"other_width": ["--model.generator.init_args.hidden_width=16"],
             "auto_prior": ["--config", "configs/quad_scan_4d_maxent.yaml"]}.get(case, [])
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *FIT, *extra, f"--trainer.logger.init_args.save_dir={runs}", "--model.init_from", str(source)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "model.init_from" in err and not runs.exists(), err
    expected = {"missing": "no checkpoint", "not_a_checkpoint": "is not a checkpoint", "other_width": "has shape",
                "auto_prior": "model.prior auto"}[case]
    assert expected in err, err


def test_a_warm_started_run_loads_and_resumes_without_its_source(earlier_fit, tmp_path):
    """psr predict (load_trained) and --ckpt_path last take the generator from the run's own checkpoint: the
    warm start's source is not read again, so it may be gone."""
    import shutil

    from psr.training.trained import load_trained

    source = shutil.copytree(earlier_fit, tmp_path / "source")
    runs = tmp_path / "runs"
    fit_cli(["fit", *FIT, "--data.steps_per_epoch=5", f"--trainer.logger.init_args.save_dir={runs}",
             "--model.init_from", str(source)])
    shutil.rmtree(source)
    run = runs / "quad_scan_4d" / "version_0"
    model, _ = load_trained(run)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(v, saved[f"generator.{k}"]) for k, v in model.generator.state_dict().items())
    cli = fit_cli(["fit", *FIT, "--data.steps_per_epoch=5", "--trainer.max_epochs=2",
                   f"--trainer.logger.init_args.save_dir={runs}", "--model.init_from", str(source), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 10 and cli.trainer.log_dir == str(run)
