"""The run log: what RunWriter writes, read_runs reads back — old layouts, newer schemas and damaged
files included, each unreadable file reported by path and reason, never skipped in silence."""

from __future__ import annotations

import json

import pytest

from harness import store
from harness.report import render_reports
from harness.schema import SCHEMA_VERSION
from tests import reportdata as rd


def _run(tmp_path):
    records = rd.cpu_records(rd.CPU_RUN)
    rd.write_run(tmp_path, records, not_on_host=("big__H100__default__vllm",))
    return records


def test_writer_and_reader_agree(tmp_path):
    records = _run(tmp_path)
    log = store.read_runs([tmp_path])
    assert log.problems == []
    [run] = log.runs
    assert [c.cell_id for c in run.cells] == [r.cell_id for r in records] + ["big__H100__default__vllm"]
    for cell, record in zip(run.cells, records):
        assert cell.status == "ran" and cell.record == record
        assert cell.path == store.record_path(tmp_path, rd.CPU_RUN, record.cell_id)
    manifest = json.loads((tmp_path / rd.CPU_RUN / store.MANIFEST).read_text())
    assert manifest["cells"][0]["record"] == f"{rd.CPU_RUN}/{records[0].cell_id}/record.json"
    assert run.cells[-1].status == "not_on_host" and run.cells[-1].record is None
    assert not run.interrupted


def test_reused_cells_point_at_the_original_record(tmp_path):
    records = _run(tmp_path)
    first = store.recorded_keys(tmp_path)[records[0].key]
    manifest = store.read_runs([tmp_path]).runs[0].manifest.model_copy(update={"run_id": rd.CPU_RUN_2, "cells": []})
    writer = store.RunWriter(tmp_path, manifest)
    writer.reused(records[0].cell_id, records[0].key, "ok", first[0])
    writer.finish()
    log = store.read_runs([tmp_path])
    reused = log.runs[1].cells[0]
    assert reused.status == "reused" and reused.path == first[0] and reused.record == records[0]
    assert len(log.records()) == len(records)  # each record once


def test_schema_1_manifests_named_the_folder(tmp_path):
    records = _run(tmp_path)
    path = tmp_path / rd.CPU_RUN / store.MANIFEST
    data = json.loads(path.read_text())
    data["schema_version"] = 1
    for entry in data["cells"]:
        if entry["record"]:
            entry["record"] = entry["record"].removesuffix("/record.json")  # as the 0.1 runner wrote it
    path.write_text(json.dumps(data))
    log = store.read_runs([tmp_path])
    assert log.problems == []
    assert [c.record for c in log.runs[0].cells if c.record] == records


def test_newer_and_damaged_files_are_reported_not_dropped(tmp_path, capsys):
    records = _run(tmp_path)
    newer = store.record_path(tmp_path, rd.CPU_RUN, records[0].cell_id)
    data = json.loads(newer.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    newer.write_text(json.dumps(data))
    damaged = store.record_path(tmp_path, rd.CPU_RUN, records[1].cell_id)
    damaged.write_text('{"run_id": ')
    wrong = store.record_path(tmp_path, rd.CPU_RUN, records[2].cell_id)
    data = json.loads(wrong.read_text())
    data["timings"]["spawn_to_ready_s"] = "slow"
    wrong.write_text(json.dumps(data))
    unreadable = store.record_path(tmp_path, rd.CPU_RUN, records[3].cell_id)
    unreadable.unlink()
    unreadable.mkdir()  # a folder where the record should be
    log = store.read_runs([tmp_path])
    reasons = {p.path: p.reason for p in log.problems}
    v = SCHEMA_VERSION
    assert reasons[newer] == (
        f"written by a newer harness (schema {v + 1}, this one reads up to {v}); upgrade the harness to read it"
    )
    assert reasons[damaged].startswith("damaged: not valid JSON (Expecting value: line 1")
    assert reasons[wrong].startswith("damaged: timings.spawn_to_ready_s: Input should be a valid number")
    assert reasons[unreadable] == "cannot read: Is a directory"
    assert len(reasons) == 4 and len([c for c in log.runs[0].cells if c.record]) == len(records) - 4
    with pytest.raises(ValueError, match="newer harness"):
        store.read_record(newer)
    # the report says so: a warning line each, and a count on the index page
    lines = []
    render_reports(tmp_path, tmp_path / "reports", warn=lines.append)
    assert len(lines) == 4 and all(line.startswith("warning: skipped") for line in lines)
    assert "**4 file(s) could not be read**" in (tmp_path / "reports" / "README.md").read_text()


def test_a_killed_run_is_marked_interrupted(tmp_path):
    records = rd.cpu_records(rd.CPU_RUN)
    manifest = store.read_runs([tmp_path]).runs  # empty
    assert manifest == []
    writer = store.RunWriter(
        tmp_path,
        rd.RunManifest(
            run_id=rd.CPU_RUN,
            matrix_path="m",
            matrix_sha256="0",
            started_at=records[0].started_at,
            host=records[0].host,
        ),
    )
    writer.ran(records[0])  # and then the harness was killed: no finish()
    [run] = store.read_runs([tmp_path]).runs
    assert run.interrupted and run.cells[0].record == records[0]
    render_reports(tmp_path, tmp_path / "reports")
    assert "⚠️ interrupted" in (tmp_path / "reports" / "README.md").read_text()


def test_publish_copies_records_and_never_removes(tmp_path):
    records = _run(tmp_path / "results")
    published = tmp_path / "published"
    written = store.publish(store.read_runs([tmp_path / "results"]), published)
    assert store.record_path(published, rd.CPU_RUN, records[0].cell_id) in written
    again = store.read_runs([published])
    assert [c.record for c in again.runs[0].cells if c.record] == records and again.problems == []
    assert store.publish(store.read_runs([tmp_path / "results"]), published) == []  # nothing new
    # a run only the published copy has is read from there, marked as published
    both = store.read_runs([tmp_path / "empty", published])
    assert both.runs[0].published


def test_store_file_stays_inside_the_run(tmp_path):
    writer = store.RunWriter(
        tmp_path, rd.RunManifest(run_id="r", matrix_path="m", matrix_sha256="0", started_at="x", host=rd.cpu_host())
    )
    assert writer.store_file("cell/engine.log", b"hello\n").read_text() == "hello\n"
    with pytest.raises(ValueError):
        writer.store_file("../escape.log", b"x")
