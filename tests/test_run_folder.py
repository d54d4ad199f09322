"""Two fits started at once get two run folders (psr.training.run_folder.reserve_run_folder)."""

from lightning.pytorch.loggers import CSVLogger

from psr.training.run_folder import reserve_run_folder


def test_two_loggers_started_together_get_different_folders(tmp_path):
    (tmp_path / "exp" / "version_3").mkdir(parents=True)
    first, second = CSVLogger(tmp_path, name="exp"), CSVLogger(tmp_path, name="exp")
    # what Lightning alone does: both list the folder before either writes, so both take version_4
    assert CSVLogger(tmp_path, name="exp").version == CSVLogger(tmp_path, name="exp").version == 4
    reserve_run_folder(first)
    reserve_run_folder(second)
    assert (first.version, second.version) == (4, 5)
    assert first.log_dir != second.log_dir
    assert (tmp_path / "exp" / "version_4").is_dir() and (tmp_path / "exp" / "version_5").is_dir()


def test_a_folder_made_by_another_process_in_between_is_skipped(tmp_path, monkeypatch):
    logger = CSVLogger(tmp_path, name="exp")
    real_mkdir = type(tmp_path).mkdir
    made = []

    def mkdir_after_a_rival(self, *args, **kwargs):  # another fit makes version_0 just before this one does
        if self.name == "version_0" and not made:
            made.append(real_mkdir(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", mkdir_after_a_rival)
    reserve_run_folder(logger)
    assert logger.version == 1


def test_a_version_from_the_config_is_kept(tmp_path):
    logger = CSVLogger(tmp_path, name="exp", version="member_2")
    reserve_run_folder(logger)
    assert logger.version == "member_2" and not (tmp_path / "exp").exists()
