"""Nothing blocks a stop (#40 cases 8-10): a read that hangs (a FIFO among the images stands in for a
stalled network mount) is a clear error after a bound, a stop signal is honoured while the loader
waits, a second signal escalates, and workers neither outlive the main process nor keep its lock.
The waits are bounded polls on the process's state (blocked opening a FIFO), never fixed sleeps."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fcmae.engine.read_watch import HungRead
from fcmae.engine.signals import PreemptionGuard
from fcmae.pretrain import run
from fcmae.storage.run_lock import RunLock

from test_pretrain import make_cfg

ROOT = Path(__file__).resolve().parents[2]


def _fifo_folder(root: Path, n: int = 8) -> Path:
    """One real image (the start-up check reads the first) and FIFOs: opening one for reading blocks
    until a writer comes, and none will."""
    from PIL import Image
    root.mkdir(parents=True)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(root / "0.png")
    for i in range(1, n):
        os.mkfifo(root / f"{i}.png")
    return root


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                out += _tree(int(child))
    except OSError:
        pass
    return out


def _wait_until_blocked_on_a_fifo(proc, bound_s: float = 120) -> int:
    """The pid (the main process or a worker) blocked opening a FIFO, within ``bound_s``."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        for pid in _tree(proc.pid):
            try:
                if Path(f"/proc/{pid}/wchan").read_text().strip() in ("wait_for_partner", "fifo_open"):
                    return pid
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError("the run never blocked on the FIFO")


def _start(tmp_path, root: Path, workers: int, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "fcmae.pretrain", "data.source=folder", f"data.root={root}", "data.img_size=64",
         "data.batch_size=4", f"data.num_workers={workers}", "model.decoder_embed_dim=32", "trainer.max_steps=4",
         "trainer.progress=log", f"hydra.run.dir={tmp_path / 'run'}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_batch_that_never_arrives_is_a_hung_read_naming_the_files(tmp_path):
    root = _fifo_folder(tmp_path / "imgs")
    started = time.monotonic()
    with pytest.raises(HungRead, match=r"no batch arrived in 2 s \(data.read_timeout\).*imgs/[1-7]\.png") as info:
        run(make_cfg("data.source=folder", f"data.root={root}", "data.read_timeout=2", "trainer.max_steps=2"),
            tmp_path / "run")
    assert time.monotonic() - started < 60
    assert "Checkpoint of step 0" in str(info.value) and "run the same command to resume" in str(info.value)


def test_a_second_signal_escalates_whatever_the_first_was():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGUSR1)  # a Slurm warning: a clean stop, later
        assert guard.signum == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # then the scheduler's kill: now


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_is_honoured_while_a_read_hangs(tmp_path, workers):
    proc = _start(tmp_path, _fifo_folder(tmp_path / "imgs"), workers, "data.read_timeout=0")
    _wait_until_blocked_on_a_fifo(proc)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)  # before: ignored for as long as the read hung
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGTERM was not honoured within 60 s while a read hung")
    assert proc.returncode == 128 + signal.SIGTERM, (out + err)[-3000:]
    assert "caught SIGTERM while waiting for a batch" in out + err


@pytest.mark.slow
def test_workers_die_with_the_main_process_and_never_keep_its_lock(tmp_path):
    proc = _start(tmp_path, _fifo_folder(tmp_path / "imgs"), 2, "data.read_timeout=0")
    worker = _wait_until_blocked_on_a_fifo(proc)
    assert worker != proc.pid
    proc.kill()  # kill -9: no handler runs
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{worker}").exists() and Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z" \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists() or Path(f"/proc/{worker}/stat").read_text().split()[2] == "Z"
    with RunLock(tmp_path / "run"):  # before: "in use by another run", naming the dead pid
        pass
