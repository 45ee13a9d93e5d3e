"""One typed checkpoint record, read around nowhere (issue 47, item 5): its file format is derived from its
fields (a new field is one edit), no module outside it reads a checkpoint's keys, and files written by
earlier versions keep loading."""
import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch

from fcmae.storage.checkpoint_record import TrainingCheckpoint, read_for_inspection, read_for_resume
from fcmae.storage.checkpoint_record import RunPosition
from fcmae.storage.checkpoint_record import RunPosition
from fcmae.export.exporter import export
from fcmae.pretrain import run

from test_pretrain import make_cfg

ROOT = Path(__file__).resolve().parents[2]
OLD_RUN = ROOT / "tests" / "fixtures" / "run-written-by-8c7d94e"  # written by main at 8c7d94e (2026-12-03)
OLD_OVERRIDES = ["model.name=custom_tiny", "model.depths=[1,1,1,1]", "model.dims=[8,16,32,64]",
                 "model.decoder_embed_dim=16", "trainer.ckpt_every=1"]


def test_a_field_added_to_the_record_is_written_and_read_back_without_another_edit():
    """What the closing note shows as a diff: one line in the dataclass. Here a subclass adds it."""
    @dataclasses.dataclass
    class WithMore(TrainingCheckpoint):
        host: str | None = None  # a made-up field

    rec = WithMore(model={"w": torch.ones(2)}, optimizer={"state": {}}, loop=RunPosition(step=5), host="node7",
                   task={"best": {"top1": 1.0}})
    disk = rec.to_dict()
    assert disk["host"] == "node7" and disk["step"] == 5 and disk["best"] == {"top1": 1.0}
    back = WithMore.from_dict(disk)
    assert back.host == "node7" and back.task == {"best": {"top1": 1.0}} and back.step == 5
    old = {k: v for k, v in disk.items() if k != "host"}  # a file from before the field: its default
    assert WithMore.from_dict(old).host is None and "host" not in WithMore.from_dict(old).task


# Keys a checkpoint holds; reading one of them by subscript or .get() outside the record (and outside the
# storage layer, which checks a file's required keys generically) is reading around it.
RECORD_KEYS = sorted({f.name for f in dataclasses.fields(TrainingCheckpoint)} - {"loop", "task"}
                     | {f.name for f in dataclasses.fields(RunPosition)} | {"model_ema", "classes", "best"})
_KEYS = "|".join(RECORD_KEYS)
RAW_READ = re.compile(rf"""(\[|\.get\()\s*["']({_KEYS})["']|["']({_KEYS})["']\s+(not\s+)?in\b""")
# Files whose such reads are not of checkpoints: JSON-lines logs and the resume record (loggers, the
# checkpoint store), a shard folder's index, a weights file's own keys (the converter's "model" / "state_dict" unwrap).
NOT_CHECKPOINTS = {"fcmae/loggers.py", "fcmae/data/shards.py", "fcmae/storage/checkpoint_store.py", "fcmae/run/resume.py",
                   "fcmae/export/convert.py", "fcmae/engine/loop.py", "fcmae/engine/step_log.py"}
ALLOWED = {"fcmae/storage/checkpoint_record.py", "fcmae/storage/checkpoint.py",
           "fcmae/storage/checkpoint_write.py"}


def test_no_module_outside_the_record_reads_a_checkpoint_s_keys():
    found = []
    for path in sorted((ROOT / "fcmae").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if RAW_READ.search(code) and not (rel in NOT_CHECKPOINTS and _not_a_checkpoint(rel, code)):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "read these through fcmae.storage.checkpoint_record:\n" + "\n".join(found)


def _not_a_checkpoint(rel: str, code: str) -> bool:
    """The known non-checkpoint reads of NOT_CHECKPOINTS' files (anything else there still fails)."""
    return {"fcmae/loggers.py": "record", "fcmae/storage/checkpoint_store.py": "record",
            "fcmae/run/resume.py": "record", "fcmae/export/convert.py": "obj[key]",
            "fcmae/engine/loop.py": "metrics", "fcmae/engine/step_log.py": "metrics",
            "fcmae/data/shards.py": "index"}[rel] in code


def test_the_raw_read_pattern_catches_what_it_is_for():
    assert RAW_READ.search('cfg = ck["config"]') and RAW_READ.search('obj.get("model_ema")')
    assert RAW_READ.search("if 'pixel_type' in obj")
    assert not RAW_READ.search('record.setting("data.mean")')


def test_a_run_written_by_an_earlier_main_loads_resumes_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir)
    ck = run_dir / "checkpoints" / "checkpoint-0000002.pt"
    rec = read_for_resume(ck, expect_step=2)
    assert rec.step == 2 and rec.world() == (1, 4) and rec.setting("model.dims") == [8, 16, 32, 64]
    assert read_for_inspection(run_dir).record.step == 2
    assert run(make_cfg(*OLD_OVERRIDES, "trainer.max_steps=3"), run_dir).step == 3
    assert read_for_inspection(run_dir).step == 3
    out = export(run_dir, "fcmae", tmp_path / "whole.safetensors", log=lambda *_: None)
    assert out.is_file()


def test_both_reads_verify_the_same_way(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir)
    ck = run_dir / "checkpoints" / "checkpoint-0000002.pt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.write_bytes(bytes(data))
    from fcmae.storage.checkpoint import CheckpointDamaged
    with pytest.raises(CheckpointDamaged, match="checksum mismatch"):
        read_for_resume(ck)
    with pytest.raises(CheckpointDamaged, match="checksum mismatch"):
        read_for_inspection(ck)  # the file named directly, as fcmae-export FILE names it
