"""The command line: every option documented, and dry runs end to end (no database)."""

import pytest

from loader import __main__ as cli

OPTIONS = {
    "generate": ["--months", "--format", "--out", "--force", "--data-dir", "--seed", "--scale"],
    "train": ["--source", "--train-month", "--label-threshold", "--model-dir", "--model-name",
              "--database-url", "--url", "--token", "--dry-run"],
    "backfill": ["--start", "--until", "--cash-feedback", "--missing-feedback", "--delay",
                 "--delay-median", "--delay-sigma", "--batch-size", "--retrain", "--no-progress",
                 "--stream", "--data-dir", "--database-url", "--url", "--token"],
    "live": ["--speed", "--tick", "--until", "--cash-feedback"],
    "run": ["--live-from", "--speed", "--until"],
}


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """--data-dir exports DATA_DIR; keep that from leaking into other tests."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATASOURCE_URL", raising=False)


@pytest.mark.parametrize("command", list(OPTIONS))
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in OPTIONS[command]:
        assert option in text, option
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, action.option_strings  # nothing undocumented


def test_generate_then_backfill_dry_run(tmp_path, capsys):
    data = tmp_path / "data"
    cli.main(["generate", "--data-dir", str(data), "--scale", "0.002", "--months", "1-2",
              "--format", "csv"])
    out = capsys.readouterr().out
    assert "yellow_tripdata_2020-01.csv" in out and "12,810 trips" in out
    src = data / "taxi" / "synthetic-seed0-scale0.002"
    cli.main(["backfill", "--data-dir", str(data), "--source", str(src), "--until", "2020-03-01",
              "--dry-run", "--no-progress", "--cash-feedback", "none"])
    out = capsys.readouterr().out
    assert "trained on 2020-01" in out and "dry run" in out
    assert "2020-01 " in out and "2020-02 " in out
    assert (data / "models" / "taxi-high-tip" / "model.json").exists()


def test_default_command_backfills_then_goes_live(tmp_path, capsys):
    cli.main(["--data-dir", str(tmp_path), "--scale", "0.001", "--stream", "--dry-run",
              "--no-progress", "--speed", "1e9", "--tick", "0.01", "--until", "2020-04-01"])
    out = capsys.readouterr().out
    backfill, live = out.split("live: ", 1)
    assert "2020-02 " in backfill and "2020-03 " not in backfill
    assert "2020-03 " in live


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["backfill", "--data-dir", str(tmp_path), "--dry-run",
                  "--source", str(tmp_path / "yellow_tripdata_2020-01.parquet")])
    assert "file not found" in str(exc.value.code)
