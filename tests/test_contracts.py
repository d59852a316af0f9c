"""The typed readers of a run's record and a dataset's manifest: one loader
each, the file left as written, and errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoptalk.models.files import sha256_file
from shoptalk.trainer.dataset_folder import (
    DatasetError,
    load_manifest,
    read_shard,
    read_split,
    shard_files,
)
from shoptalk.trainer.run_record import RunFolder, RunRecordError, run_folders


def test_run_record_is_read_typed_and_left_as_written(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "runs" / "r-1")
    with pytest.raises(RunRecordError, match=r"has no record\.json: it is not a training run"):
        run.load_record()
    assert run.read_record() == {} and not run.is_complete()
    record = {"status": "complete", "developer": "alice", "repo": "/r", "extra": [1, 2]}
    run.write_record(record)
    written = run.record_file.read_bytes()
    loaded = run.load_record()
    # No run_id and no purpose: the folder's name, and the team's purpose.
    assert (loaded.run_id, loaded.status, loaded.purpose) == ("r-1", "complete", "org")
    assert (loaded.developer, loaded.repo, loaded.complete) == ("alice", "/r", True)
    assert loaded.data == record and run.read_record() == record and run.is_complete()
    run.write_record(run.read_record())
    assert run.record_file.read_bytes() == written
    run.record_file.write_text("{not json")
    with pytest.raises(RunRecordError, match=r"record.json is not valid JSON .*damaged"):
        run.load_record()
    assert run.read_record() == {} and not run.is_complete()
    run.record_file.write_text("[1]")
    with pytest.raises(RunRecordError, match="holds no run record"):
        run.load_record()


def test_run_folder_owns_the_export_paths(tmp_path: Path) -> None:
    assert run_folders(tmp_path / "runs") == []
    run = RunFolder(tmp_path / "runs" / "r-2")
    run.export_dir.mkdir(parents=True)
    for name in ("model-q8_0.gguf", "model-f16.gguf", "adapter-f16.gguf", ".model-x.partial"):
        (run.export_dir / name).write_bytes(b"GGUF")
    assert [p.name for p in run.exported_models()] == ["model-f16.gguf", "model-q8_0.gguf"]
    assert [p.name for p in run.exported_adapters()] == ["adapter-f16.gguf"]
    (tmp_path / "runs" / "notes.txt").write_text("not a run")
    assert run_folders(tmp_path / "runs") == [run]


def test_dataset_manifest_has_one_loader(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(DatasetError, match=rf"no mined dataset of {repo} .*shoptalk mine --repo"):
        load_manifest(tmp_path / "dataset", repo)
    (tmp_path / "dataset").mkdir()
    file = tmp_path / "dataset" / "manifest.json"
    data = {
        "repo": str(repo),
        "head": "abc",
        "cutoff": "2025-07-13T00:00:00Z",
        "commit_range": {"mined_commits": 42},
        "authors": {"alice-1": {"names": ["Alice"]}},
    }
    file.write_text(json.dumps(data, indent=2))
    manifest = load_manifest(tmp_path / "dataset")
    assert manifest.sha256 == sha256_file(file) and manifest.data == data
    assert (manifest.repo, manifest.head, manifest.cutoff) == (str(repo), "abc", data["cutoff"])
    assert manifest.mined_commits == 42 and manifest.authors == data["authors"]
    file.write_text("{}")
    empty = load_manifest(tmp_path / "dataset")
    assert (empty.repo, empty.cutoff, empty.mined_commits, empty.authors) == (None, None, None, {})
    file.write_text("{")
    with pytest.raises(DatasetError, match=r"not valid JSON.*mine the repository again"):
        load_manifest(tmp_path / "dataset")


def test_shards_are_read_by_split_and_damage_names_the_line(tmp_path: Path) -> None:
    for name, lines in (
        ("completion.train.jsonl", ['{"id": "c1"}', "", '{"id": "c2"}']),
        ("module_lookup.train.jsonl", ['{"id": "m1"}']),
        ("completion.test.jsonl", ['{"id": "t1"}']),
        ("notes.jsonl", ['{"id": "x"}']),
    ):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    assert [(k, s) for k, s, _ in shard_files(tmp_path)] == [
        ("completion", "test"),
        ("completion", "train"),
        ("module_lookup", "train"),
    ]
    assert [r["id"] for r in read_split(tmp_path, "train")] == ["c1", "c2", "m1"]
    assert read_shard(tmp_path / "missing.train.jsonl") == []
    (tmp_path / "completion.test.jsonl").write_text('{"id": "t1"}\n{"id": \n')
    with pytest.raises(DatasetError, match=r"completion.test.jsonl:2 is not valid JSON"):
        read_shard(tmp_path / "completion.test.jsonl")
