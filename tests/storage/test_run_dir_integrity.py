"""Nothing silently wrong in a run directory (#28): one checkpoint decision per run, damage renamed
only on proof, one run at a time, checkpoints that are good when called good, logs that match them,
and every write whole or refused in one line. Each test is one of the issue's 14 cases."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fcmae.storage.checkpoint as ckmod
from fcmae.storage.checkpoint_store import CheckpointManager
from fcmae.storage.checkpoint import CheckpointUnreadable, load_checkpoint
from fcmae.storage.checkpoint_record import read_for_inspection
from fcmae.config import ConfigError
from fcmae.storage.weights_file import CheckpointError
from fcmae.engine import NonFiniteLoss, Preempted
from fcmae.storage.files import DiskWriteError
from fcmae.pretrain import run
from fcmae.storage.run_lock import RunDirectoryBusy, RunLock

from test_pretrain import make_cfg, metrics, params

EVERY_STEP = ["trainer.ckpt_every=1", "trainer.keep_checkpoints=2"]


def _numbered(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*.pt"))


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = params(a_dir), params(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- 1. one decision under DDP

def _ddp_worker(rank, world, port, run_dir, overrides, fail_rank1_on, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == 1 and fail_rank1_on:
        real_load = torch.load

        def load(f, *a, **k):  # an allocation failure on rank 1 only, reading the newest checkpoint
            if Path(str(f)).name == fail_rank1_on:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
            return real_load(f, *a, **k)
        torch.load = load
    try:
        run(make_cfg(*overrides), run_dir)
        errors.put((rank, None))
    except Exception as exc:
        errors.put((rank, f"{type(exc).__name__}: {exc}"))


def _ddp(run_dir: Path, overrides, fail_rank1_on=None) -> dict:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, run_dir, overrides, fail_rank1_on, errors))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode is not None for p in procs), "a rank hung"
    return dict(errors.get(timeout=5) for _ in procs)


@pytest.mark.slow
def test_ddp_ranks_never_resume_from_different_checkpoints(tmp_path):
    common = ["trainer.device=cpu", "data.batch_size=2", "trainer.ckpt_every=2", "trainer.max_steps=6"]
    assert _ddp(tmp_path / "straight", common) == {0: None, 1: None}
    # The same run stopped after the checkpoint of step 4 (its step-6 checkpoint never written).
    stopped = tmp_path / "stopped"
    subprocess.run(["cp", "-a", str(tmp_path / "straight"), str(stopped)], check=True)
    for name in ("checkpoint-0000006.pt", "checkpoint-0000006.pt.sum"):
        (stopped / "checkpoints" / name).unlink()

    # Rank 1 cannot load the file rank 0 chose: before, it renamed it and trained from an older
    # step next to rank 0; now every rank stops with one error and nothing is renamed.
    results = _ddp(stopped, common, fail_rank1_on="checkpoint-0000004.pt")
    assert results[0] and results[1], results
    assert "rank 1 could not load" in results[1] and "checkpoint-0000004.pt" in results[1]
    assert "could not load" in results[0]
    assert _numbered(stopped) == ["checkpoint-0000004.pt"]
    assert not list((stopped / "checkpoints").glob("*.damaged*"))

    assert _ddp(stopped, common) == {0: None, 1: None}  # the same command, the fault gone
    _assert_same_weights(tmp_path / "straight", stopped)
    assert [m["step"] for m in metrics(stopped)] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 2. damage means damage

def test_an_allocation_error_renames_nothing_and_stops(tmp_path, monkeypatch):
    run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), tmp_path / "straight")
    run_dir = tmp_path / "run"
    run(make_cfg(*EVERY_STEP, "trainer.max_steps=2"), run_dir)
    real_load = torch.load

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(ckmod.torch, "load", no_memory)
    with pytest.raises(CheckpointUnreadable, match="checkpoint-0000002.pt is intact.*nothing was renamed"):
        read_for_inspection(run_dir)  # fcmae-export, eval_only, init_from
    with pytest.raises(CheckpointUnreadable, match="checkpoint-0000002.pt"):
        run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), run_dir)
    monkeypatch.setattr(ckmod.torch, "load", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(CheckpointUnreadable, match="MemoryError"):
        run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), run_dir)
    assert _numbered(run_dir) == ["checkpoint-0000001.pt", "checkpoint-0000002.pt"]
    assert not list((run_dir / "checkpoints").glob("*.damaged*"))

    monkeypatch.setattr(ckmod.torch, "load", real_load)
    assert run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), run_dir).step == 3  # resumed from 2, not 0
    _assert_same_weights(tmp_path / "straight", run_dir)


def test_read_only_commands_skip_damage_without_renaming(tmp_path, caplog):
    run(make_cfg(*EVERY_STEP, "trainer.max_steps=2"), tmp_path)
    (tmp_path / "checkpoints/checkpoint-0000002.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING", logger="fcmae"):
        found = read_for_inspection(tmp_path); src = found.source; ck = found.record.to_dict()
    assert src.name == "checkpoint-0000001.pt" and ck["step"] == 1
    assert "skipping it (left in place" in caplog.text
    assert (tmp_path / "checkpoints/checkpoint-0000002.pt").is_file()


def test_after_no_checkpoint_loads_the_same_command_refuses_to_start_afresh(tmp_path):
    run(make_cfg(*EVERY_STEP, "trainer.max_steps=2"), tmp_path)
    for p in (tmp_path / "checkpoints").glob("checkpoint-*.pt"):
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no checkpoint in .* loads"):
        run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), tmp_path)
    # Before: the same command again (a Slurm requeue) started at step 1 in this directory, silently.
    with pytest.raises(CheckpointError, match="only ones set aside .*resume=never"):
        run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").read_text().strip() or metrics(tmp_path)[-1]["step"] <= 2
    # Starting over is one explicit choice away; the damaged files stay.
    assert run(make_cfg(*EVERY_STEP, "trainer.max_steps=1", "resume=never"), tmp_path).step == 1
    assert len(list((tmp_path / "checkpoints").glob("*.damaged"))) == 2


# ---------------------------------------------------------------- 3. one run per directory

def test_a_second_run_in_the_same_directory_is_refused_naming_the_holder(tmp_path):
    run(make_cfg("trainer.max_steps=1"), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with RunLock(tmp_path):  # another run holds it (flock: another open file, same as another process)
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another run \(host \S+ pid {os.getpid()} since"):
            run(make_cfg("trainer.max_steps=3", "optim.lr=0.3"), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 1
    assert run(make_cfg("trainer.max_steps=2"), tmp_path).step == 2  # released: the next run goes on


def test_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from fcmae.storage.run_lock import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        time.sleep(600)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up of ours runs
        holder.wait()
    RunLock(tmp_path).acquire().release()


# ---------------------------------------------------------------- 4. sidecars that cannot be skipped

@pytest.mark.parametrize("sidecar", ["missing", "empty", "garbage", "a list"])
def test_a_flipped_byte_is_caught_without_a_readable_sum(tmp_path, caplog, sidecar):
    run(make_cfg(*EVERY_STEP, "trainer.max_steps=2"), tmp_path)
    newest = tmp_path / "checkpoints/checkpoint-0000002.pt"
    _flip_a_byte(newest)
    sums = newest.with_name(newest.name + ".sum")
    {"missing": lambda: sums.unlink(), "empty": lambda: sums.write_text(""),
     "garbage": lambda: sums.write_bytes(b"\xff\x00{"), "a list": lambda: sums.write_text("[1]")}[sidecar]()
    with caplog.at_level("WARNING", logger="fcmae"):
        found = read_for_inspection(tmp_path); src = found.source; ck = found.record.to_dict()
    assert src.name == "checkpoint-0000001.pt" and ck["step"] == 1
    assert "checkpoint-0000002.pt is unverified" in caplog.text and "fails its CRC-32" in caplog.text


def test_the_sum_is_durable_before_the_checkpoint_takes_its_name(tmp_path, monkeypatch):
    renames, fsynced = [], set()
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        renames.append((Path(dst).name, Path(dst).with_name(Path(dst).name + ".sum").name in fsynced))
        return real_replace(src, dst)

    def fsync(fd):
        fsynced.add(Path(os.readlink(f"/proc/self/fd/{fd}")).name.removeprefix(".").removesuffix(".tmp"))
        return real_fsync(fd)
    monkeypatch.setattr(ckmod.os, "replace", replace)
    monkeypatch.setattr(ckmod.os, "fsync", fsync)
    CheckpointManager(tmp_path).save({"model": {}, "optimizer": {}, "step": 1, "epoch": 0,
                                            "batch_in_epoch": 0}, 1)
    names = [n for n, _ in renames]
    assert names.index("checkpoint-0000001.pt.sum") < names.index("checkpoint-0000001.pt")
    assert "checkpoint-0000001.pt.sum" in fsynced


# ---------------------------------------------------------------- 5. good means finite

def test_a_blow_up_sets_aside_the_checkpoints_it_fed_and_names_the_last_good_one(tmp_path):
    sane = [*EVERY_STEP, "schedule.warmup_steps=0"]
    run(make_cfg(*sane, "trainer.max_steps=6"), tmp_path / "straight")
    run_dir = tmp_path / "run"
    run(make_cfg(*sane, "trainer.max_steps=3"), run_dir)
    # lr 1e30 from step 4: step 4's update makes the weights ~1e30 (finite, saved), step 5's loss is not.
    with pytest.raises(NonFiniteLoss) as info:
        run(make_cfg(*sane, "trainer.max_steps=6", "optim.lr=1e30"), run_dir)
    msg = str(info.value)
    assert "step 5" in msg and "last good checkpoint is" in msg and "checkpoint-0000003.pt (step 3)" in msg
    assert "checkpoint-0000004.pt" in msg and "set aside" in msg
    assert "trainer.precision=fp32" not in msg  # the run is already fp32
    assert (run_dir / "checkpoints/checkpoint-0000004.pt.diverged").is_file()
    # Before: resuming with a sane lr failed the same way, for good. Now the same command resumes
    # from the last good checkpoint and ends where the run without the blow-up ends.
    assert run(make_cfg(*sane, "trainer.max_steps=6"), run_dir).step == 6
    _assert_same_weights(tmp_path / "straight", run_dir)


def test_a_blow_up_with_no_good_checkpoint_says_how_to_restart(tmp_path):
    bad = [*EVERY_STEP, "schedule.warmup_steps=0", "optim.lr=1e30", "trainer.max_steps=4"]
    with pytest.raises(NonFiniteLoss, match="No checkpoint was taken before the loss left its range.*resume=never"):
        run(make_cfg(*bad), tmp_path)
    assert _numbered(tmp_path) == []
    assert (tmp_path / "checkpoints/checkpoint-0000001.pt.diverged").is_file()
    with pytest.raises(CheckpointError, match="resume=never"):
        run(make_cfg(*EVERY_STEP, "trainer.max_steps=2"), tmp_path)
    assert run(make_cfg(*EVERY_STEP, "trainer.max_steps=2", "resume=never"), tmp_path).step == 2


def test_non_finite_weights_are_never_saved(tmp_path):
    def poison(loop):  # an infinite second moment: the loss stays finite, the state does not
        if loop.state.step == 1:
            next(iter(loop.optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
    with pytest.raises(NonFiniteLoss, match=r"after step 2 are not finite \(optimizer\.\d+\.exp_avg_sq"):
        run(make_cfg(*EVERY_STEP, "trainer.max_steps=3", "trainer.ckpt_every=2"), tmp_path, callbacks=[poison])
    assert _numbered(tmp_path) == []


# ---------------------------------------------------------------- 6. logs that match the checkpoint

def test_metrics_are_trimmed_to_the_checkpoint_resumed_from(tmp_path):
    overrides = ["trainer.ckpt_every=2", "trainer.max_steps=6"]
    run(make_cfg(*overrides), tmp_path / "straight")
    run_dir = tmp_path / "run"
    run(make_cfg(*overrides), run_dir)
    # As a SIGKILL after step 5's log line and before its checkpoint leaves it, plus a torn line.
    for name in ("checkpoint-0000006.pt", "checkpoint-0000006.pt.sum"):
        (run_dir / "checkpoints" / name).unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n" + '{"step": 6, "loss": 0.9')
    (run_dir / "evals.jsonl").write_text(json.dumps({"step": 4, "knn": 1.0}) + "\n"
                                         + json.dumps({"step": 6, "knn": 2.0}) + "\n")

    run(make_cfg(*overrides), run_dir)
    got = metrics(run_dir)  # parses: no torn line glued to the next record
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in got] == [m["loss"] for m in metrics(tmp_path / "straight")]
    assert [json.loads(x)["step"] for x in (run_dir / "evals.jsonl").read_text().splitlines()] == [4]


# ---------------------------------------------------------------- 7 and 14. start-up tidying

def test_stale_temporary_files_go_and_last_pt_follows_the_newest(tmp_path):
    run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), tmp_path)
    ckdir = tmp_path / "checkpoints"
    stale = ckdir / ".checkpoint-0000009.pt.tmp"  # a SIGKILL during a write of a step never written again
    stale.write_bytes(b"\0" * (3 << 20))
    orphan = ckdir / "checkpoint-0000009.pt.sum"  # its sidecar, made before the rename that never came
    orphan.write_text('{"step": 9, "bytes": 1, "crc32": 1}')
    # A kill between the checkpoint's rename and the pointer's update: last.pt one behind.
    (ckdir / "last.pt").unlink()
    os.symlink("checkpoint-0000002.pt", ckdir / "last.pt")

    assert run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), tmp_path).step == 3  # nothing to do
    assert not stale.exists() and not orphan.exists()
    assert os.readlink(ckdir / "last.pt") == "checkpoint-0000003.pt"


# ---------------------------------------------------------------- 8. every write whole or refused

def test_a_full_disk_while_saving_the_image_is_one_error_and_no_empty_png(tmp_path, monkeypatch):
    import fcmae.visualize as vis

    def full_disk(rows, fp, **kw):
        Path(fp).write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(vis, "save_image", full_disk)
    with pytest.raises(DiskWriteError, match="could not write reconstruction image .*No space left on device"):
        run(make_cfg("trainer.max_steps=4", "trainer.vis_every=2", "trainer.ckpt_every=2"), tmp_path)
    assert not list((tmp_path / "reconstructions").glob("*.png"))
    assert not list((tmp_path / "reconstructions").glob(".*.tmp"))
    assert _numbered(tmp_path) == []  # stopped before the checkpoint of that step, as for a full disk there


def test_a_metrics_line_the_disk_refuses_leaves_no_half_record(tmp_path, monkeypatch):
    from fcmae.loggers import MetricsFile
    import fcmae.storage.files as files
    f = MetricsFile(tmp_path)
    f.write({"step": 1, "loss": 1.0})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "write", half_then_full)
    with pytest.raises(DiskWriteError, match="could not write metrics"):
        f.write({"step": 2, "loss": 0.5})
    monkeypatch.undo()
    assert [m["step"] for m in metrics(tmp_path)] == [1]


# ---------------------------------------------------------------- 9. no links, no copies

def test_without_links_last_pt_is_a_text_pointer_not_a_copy(tmp_path, monkeypatch):
    run(make_cfg(*EVERY_STEP, "trainer.max_steps=4"), tmp_path / "straight")

    def refuse(*a, **k):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr(ckmod.os, "symlink", refuse)
    monkeypatch.setattr(ckmod.os, "link", refuse)
    run_dir = tmp_path / "run"
    run(make_cfg(*EVERY_STEP, "trainer.max_steps=3"), run_dir)
    last = run_dir / "checkpoints/last.pt"
    assert not last.is_symlink() and last.read_text().strip() == "checkpoint-0000003.pt"
    assert load_checkpoint(last)["step"] == 3 and read_for_inspection(last).step == 3
    assert run(make_cfg(*EVERY_STEP, "trainer.max_steps=4"), run_dir).step == 4
    assert last.stat().st_size < 100 and _numbered(run_dir) == ["checkpoint-0000003.pt", "checkpoint-0000004.pt"]
    _assert_same_weights(tmp_path / "straight", run_dir)


# ---------------------------------------------------------------- 10. read-only run directories

def _read_only_mount(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_read_only_run_directory_is_one_line_for_the_app_and_for_export(tmp_path):
    disk = tmp_path / "disk"
    if not _read_only_mount(disk):
        pytest.skip("mounting a tmpfs needs root")
    try:
        run(make_cfg("trainer.max_steps=1"), disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
        app = subprocess.run([sys.executable, "-m", "fcmae.pretrain", "data.img_size=64", "trainer.max_steps=2",
                              f"hydra.run.dir={disk / 'run'}"], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env=env)
        assert app.returncode == 1
        assert "is not writable (Read-only file system)" in app.stderr and "hydra.run.dir=" in app.stderr
        assert "Traceback" not in app.stderr and "Unable to configure handler" not in app.stderr
        export = subprocess.run([sys.executable, "-m", "fcmae.export", str(disk / "run")], capture_output=True,
                                text=True, timeout=300, cwd=tmp_path)
        assert export.returncode == 2
        assert "Read-only file system" in export.stderr and "--out" in export.stderr
        assert "Traceback" not in export.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---------------------------------------------------------------- 11. stop as soon as asked

def test_a_stop_signal_caught_during_a_periodic_save_stops_right_after_it(tmp_path, monkeypatch):
    real_save = CheckpointManager.save

    def save_and_get_signalled(self, state, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
        return real_save(self, state, step)
    monkeypatch.setattr(CheckpointManager, "save", save_and_get_signalled)
    with pytest.raises(Preempted) as info:
        run(make_cfg("trainer.max_steps=6", "trainer.ckpt_every=2"), tmp_path)
    assert info.value.step == 2  # before: one more step, and a second full checkpoint (step 3)
    assert _numbered(tmp_path) == ["checkpoint-0000002.pt"]
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


# ---------------------------------------------------------------- 12. datasets name only their own files

@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.tar", "link.tar"])
def test_a_shard_index_may_only_name_files_inside_its_folder(tmp_path, name):
    from fcmae.data.image_io import DataError
    from fcmae.data.shards import FORMAT, ShardImages
    root = tmp_path / "shards"
    root.mkdir()
    (tmp_path / "outside.tar").write_bytes(b"")
    os.symlink(tmp_path / "outside.tar", root / "link.tar")
    index = {"format": FORMAT, "shards": [{"file": name, "members": [[0, 10, "000000000.jpg", 0]]}]}
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="not a file inside"):
        ShardImages(root)


# ---------------------------------------------------------------- 13. values that overflow

@pytest.mark.parametrize("override", ["optim.lr=1e39", "optim.weight_decay=1e40", "optim.blr=inf"])
def test_config_values_that_overflow_float32_are_config_errors(tmp_path, override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}=.* not a finite float32"):
        run(make_cfg(override), tmp_path)


# ---------------------------------------------------------------- #33 item 3: world size on resume

def test_another_world_size_keeps_the_effective_batch_or_says_how():
    from fcmae.storage.checkpoint_record import TrainingCheckpoint
    from fcmae.run.settings import adapt_to_world_size
    assert adapt_to_world_size(1, 8, 2, 2) == 2  # 2 x 2 x 2 = 8
    assert adapt_to_world_size(4, 64, 8, 8) == 1
    with pytest.raises(ConfigError, match=r"effective batch of 8 on 1 process.*resume on 1 process.*data.batch_size"):
        adapt_to_world_size(1, 8, 3, 2)
    # checkpoints from before world_size/effective_batch were saved: read from the config and RNG states
    old = {"model": {}, "optimizer": {}, "step": 3, "epoch": 0, "batch_in_epoch": 3, "rng": [{}, {}],
           "config": {"data": {"batch_size": 4}, "optim": {"effective_batch_size": None}, "trainer": {"accum_iter": 3}}}
    assert TrainingCheckpoint.from_dict(old).world() == (2, 24)


@pytest.mark.slow
def test_resuming_on_two_processes_keeps_the_schedule_and_samples_per_step(tmp_path):
    common = ["trainer.device=cpu", "data.batch_size=2", "trainer.ckpt_every=2", "data.synthetic_images=32"]
    run(make_cfg(*common, "trainer.accum_iter=2", "trainer.max_steps=6"), tmp_path / "straight")
    run_dir = tmp_path / "run"
    run(make_cfg(*common, "trainer.accum_iter=2", "trainer.max_steps=2"), run_dir)
    # the same run continued by 2 processes: accumulation 1 keeps the effective batch 4
    assert _ddp(run_dir, [*common, "trainer.accum_iter=2", "trainer.max_steps=6"]) == {0: None, 1: None}
    got, want = metrics(run_dir), metrics(tmp_path / "straight")
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in got] == pytest.approx([m["lr"] for m in want], rel=1e-9)
    assert [m["epoch"] for m in got] == [m["epoch"] for m in want]
    ck = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert ck["world_size"] == 2 and ck["effective_batch"] == 4
    assert ck["seen_images"] == load_checkpoint(tmp_path / "straight/checkpoints/last.pt")["seen_images"]
