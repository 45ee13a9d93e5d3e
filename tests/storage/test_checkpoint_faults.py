"""Nothing lost when the disk misbehaves: a damaged newest checkpoint, a full disk, durable writes."""
import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fcmae.storage.checkpoint import CheckpointWriteError, load_checkpoint
from fcmae.storage.checkpoint_record import read_for_inspection
from fcmae.storage.checkpoint_store import CheckpointManager
from fcmae.storage.weights_file import CheckpointError
from fcmae.pretrain import run
from fcmae.errors import UserError

from test_pretrain import make_cfg, params

CKPT = ["trainer.ckpt_every=1", "trainer.keep_checkpoints=2"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _numbered(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*.pt"))


def test_truncated_newest_checkpoint_resumes_from_the_older_one_exactly(tmp_path, caplog):
    run(make_cfg(*CKPT, "trainer.max_steps=4"), tmp_path / "straight")
    damaged = tmp_path / "damaged"
    run(make_cfg(*CKPT, "trainer.max_steps=3"), damaged)
    assert _numbered(damaged) == ["checkpoint-0000002.pt", "checkpoint-0000003.pt"]
    assert os.readlink(damaged / "checkpoints/last.pt") == "checkpoint-0000003.pt"  # a pointer, not a 2nd name
    _truncate(damaged / "checkpoints/checkpoint-0000003.pt")

    with caplog.at_level("WARNING", logger="fcmae"):
        state = run(make_cfg(*CKPT, "trainer.max_steps=4"), damaged)  # the same command
    assert state.step == 4
    assert "checkpoint-0000003.pt is damaged" in caplog.text and "truncated" in caplog.text
    assert (damaged / "checkpoints/checkpoint-0000003.pt.damaged").is_file()  # kept, renamed, not retried
    a, b = params(tmp_path / "straight"), params(damaged)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    run(make_cfg(*CKPT, "trainer.max_steps=2"), tmp_path)
    for p in (tmp_path / "checkpoints").glob("checkpoint-*.pt"):
        _truncate(p)
    with pytest.raises(CheckpointError) as info:
        run(make_cfg(*CKPT, "trainer.max_steps=3"), tmp_path)
    msg = str(info.value)
    assert "no checkpoint" in msg and "checkpoint-0000002.pt" in msg and "checkpoint-0000001.pt" in msg
    assert "resume=never" in msg


def test_a_flipped_byte_is_caught_by_the_checksum_and_export_takes_the_older(tmp_path):
    run(make_cfg(*CKPT, "trainer.max_steps=2"), tmp_path)
    newest = tmp_path / "checkpoints/checkpoint-0000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a zip may still load with a flipped tensor byte; the CRC may not
    newest.write_bytes(bytes(data))
    found = read_for_inspection(tmp_path); src = found.source; ck = found.record.to_dict()  # what fcmae-export, init_from and eval_only use
    assert src.name == "checkpoint-0000001.pt" and ck["step"] == 1
    found = read_for_inspection(tmp_path / "checkpoints" / "last.pt"); src = found.source  # the pointer resolves the same way
    assert src.name == "checkpoint-0000001.pt"


def _tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def test_disk_full_while_writing_stops_cleanly_and_resumes_exactly(tmp_path, monkeypatch):
    """One checkpoint fits, two do not: the second save fails with ENOSPC (a real small tmpfs
    where we may mount one, else an injected error), leaving no temporary file and the first
    checkpoint intact; after space is freed the same command ends where an unfaulted run does."""
    overrides = ["trainer.ckpt_every=1", "trainer.keep_checkpoints=1", "trainer.max_steps=3"]
    run(make_cfg(*overrides), tmp_path / "straight")
    size = (tmp_path / "straight/checkpoints/checkpoint-0000003.pt").stat().st_size
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, int(size * 1.6 / 2**20) + 1)
    try:
        if not mounted:  # inject: the second numbered checkpoint's write fails
            import fcmae.storage.checkpoint_write as ck
            real = ck._ChecksumWriter.write
            writes = {"saves": 0}

            def failing_write(self, data):
                if self.bytes == 0:
                    writes["saves"] += 1
                if writes["saves"] == 2 and self.bytes > size // 2:
                    self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    raise self.error
                return real(self, data)
            monkeypatch.setattr(ck._ChecksumWriter, "write", failing_write)
        with pytest.raises(CheckpointWriteError) as info:
            run(make_cfg(*overrides), disk / "run")
        msg = str(info.value)
        assert issubclass(CheckpointWriteError, UserError)  # the app prints it as one line, no traceback
        assert "No space left on device" in msg and "checkpoint-0000002.pt" in msg
        assert "MiB" in msg and "checkpoint-0000001.pt (step 1)" in msg and "run the same command again" in msg
        ckdir = disk / "run/checkpoints"
        assert not list(ckdir.glob(".*.tmp")), "the partial file must be removed"
        assert load_checkpoint(ckdir / "checkpoint-0000001.pt")["step"] == 1
        if mounted:
            subprocess.run(["mount", "-o", f"remount,size={int(size * 3 / 2**20) + 2}m", str(disk)], check=True)
        else:
            monkeypatch.undo()
        run(make_cfg(*overrides), disk / "run")
        a, b = params(tmp_path / "straight"), params(disk / "run")
        for k in a:
            assert torch.equal(a[k], b[k]), k
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_rotation_peaks_at_keep_files_and_never_leaves_none(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    seen = []
    real_save = torch.save

    def spy(obj, f, *a, **k):  # how many numbered files exist while the next one is written
        seen.append(len(list((tmp_path / "checkpoints").glob("checkpoint-*.pt"))))
        return real_save(obj, f, *a, **k)

    state = {"model": {"w": torch.zeros(10)}, "optimizer": {}, "epoch": 0, "batch_in_epoch": 0}
    torch_save, torch.save = torch.save, spy
    try:
        for step in range(1, 5):
            mgr.save({**state, "step": step}, step)
    finally:
        torch.save = torch_save
    assert seen == [0, 1, 1, 1]  # the file being written makes 2 = keep at the peak
    assert _numbered(tmp_path) == ["checkpoint-0000003.pt", "checkpoint-0000004.pt"]
    mode = (tmp_path / "checkpoints/checkpoint-0000004.pt").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
