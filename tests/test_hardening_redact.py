"""A matrix config's `env` values named as secrets are masked in the engine log and the record,
wherever they appear, not only after `token=` and the like. The engine is the scripted stand-in:
the real one does not print its environment."""

from __future__ import annotations

from test_hardening_disk import cpu_run

from harness import store

SECRET = "s3cr3t-value-0123"


def test_config_env_secrets_never_reach_the_log_or_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    results = tmp_path / "results"
    run = cpu_run(tmp_path, results, f"MY_SERVICE_TOKEN: {SECRET}, STANDIN_SAY: 'connected with {SECRET}'")
    manifest = run.run(run.matrix.cells)
    assert [e.outcome for e in manifest.cells] == ["ok"]
    folder = (results / manifest.cells[0].record).parent
    log = (folder / store.ENGINE_LOG).read_text()
    assert "connected with ***" in log and SECRET not in log
    assert SECRET not in (folder / store.RECORD).read_text()
