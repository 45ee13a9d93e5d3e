"""The Slurm path against a real scheduler: a one-node cluster brought up by
launch/local_slurm.sh, jobs submitted by ``fcmae-pretrain -m launcher=slurm`` (Hydra's
submitit launcher), CPU tasks joined by gloo.

Cluster tests are marked ``slurm``; they skip (with the reason) where the cluster cannot start
(not root, packages missing) unless FCMAE_REQUIRE_SLURM=1, as in CI, where that fails instead.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fcmae.storage.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "local_slurm.sh"
STEPS = 12
# atto at 64 px, 2 images per task, a run of STEPS steps; the same config for every job here.
TINY = [
    "trainer.device=cpu", "data.img_size=64", "data.batch_size=2", "data.num_workers=0",
    "data.synthetic_images=64", "model.decoder_embed_dim=32", "schedule.warmup_steps=0", "optim.lr=1e-3",
    "trainer.epochs=4", "trainer.log_every=1", "trainer.progress=log", "model.mask_ratio=0.5",
    "trainer.vis_every=1000",
]
SLURM = ["launcher=slurm", "launcher.partition=local", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1",
         "launcher.mem_gb=1", "launcher.timeout_min=10"]


# ---------------------------------------------------------------- no cluster needed

def test_submitit_setup_failure_is_loud_not_a_silent_single_process_run(monkeypatch):
    import submitit

    from fcmae import distributed

    class Broken:
        master_port = 45000

        def export(self, **kwargs):
            raise KeyError("SLURM_STEP_NODELIST")

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: None)  # "inside a submitit job"
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", Broken)
    with pytest.raises(RuntimeError, match=r"Slurm job 77 \(2 tasks\).*SLURM_STEP_NODELIST.*independent"):
        distributed.init_distributed("cpu")


def test_a_requeued_attempt_rendezvous_on_another_port_every_task_alike(monkeypatch):
    import submitit

    from fcmae import distributed

    class Env:  # submitit's port for job 77, whatever the attempt
        def __init__(self):
            self.master_port = 45000

        def export(self, **kwargs):
            os.environ["MASTER_PORT"] = str(self.master_port)

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")  # recorded as it was (unset), restored so after the test ...
        monkeypatch.delenv(key)  # ... then unset for it
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: None)
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", Env)
    ports = []
    for restarts in ("", "0", "1", "2"):
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        monkeypatch.delenv("MASTER_PORT", raising=False)
        distributed._export_submitit_env()
        ports.append(int(os.environ["MASTER_PORT"]))
    assert ports[0] == ports[1] == 45000  # the first attempt keeps submitit's port
    assert len(set(ports[1:])) == 3 and all(20000 <= p <= 60000 for p in ports)
    monkeypatch.setenv("MASTER_PORT", "31337")  # a port the user set is theirs, requeued or not
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", lambda: type("E", (Env,), {"export": lambda self, **k: None})())
    distributed._export_submitit_env()
    assert os.environ["MASTER_PORT"] == "31337"


def test_a_task_outside_the_group_is_refused(monkeypatch):
    from fcmae import distributed
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("RANK", "0")  # set by hand: the submitit export is skipped
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="2 tasks but WORLD_SIZE=1"):
        distributed.init_distributed("cpu")


def test_a_warning_due_before_the_job_starts_is_refused():
    from hydra import compose, initialize_config_dir

    from fcmae.config import ConfigError
    from fcmae.run.validation import validate
    from fcmae.pretrain import CONFIG_PATH
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        cfg = compose("pretrain", overrides=["launcher=slurm", "launcher.timeout_min=1"])
    with pytest.raises(ConfigError, match=r"launcher.signal_delay_s=120 must be .* shorter than launcher.timeout_min"):
        validate(cfg)


# ---------------------------------------------------------------- the local cluster

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    # A short path: munged's socket path must stay under 108 characters.
    folder = Path(tempfile.mkdtemp(prefix="fcmae-slurm-", dir="/tmp"))
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "OMP_NUM_THREADS": "1",
           "FCMAE_SLURMCTLD_PORT": str(_free_port()), "FCMAE_SLURMD_PORT": str(_free_port())}
    up = subprocess.run(["bash", str(SCRIPT), "up", str(folder)], env=env, capture_output=True, text=True,
                        timeout=180)
    if up.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "down", str(folder)], env=env, capture_output=True, timeout=120)
        reason = (up.stderr.strip().splitlines() or ["local_slurm.sh up failed"])[-1]
        if os.environ.get("FCMAE_REQUIRE_SLURM") == "1":
            pytest.fail(f"FCMAE_REQUIRE_SLURM=1 but the local Slurm cluster did not start: {reason}")
        pytest.skip(f"no local Slurm cluster: {reason}")
    try:
        yield env
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "down", str(folder)], env=env, capture_output=True,
                              text=True, timeout=180)
        assert down.returncode == 0, down.stderr
        shutil.rmtree(folder, ignore_errors=True)


def _slurm(env, *args) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60, check=True).stdout


def _submit(env, sweep_dir: Path, *overrides) -> subprocess.Popen:
    """``fcmae-pretrain -m launcher=slurm ...``; Hydra's launcher waits for the job(s) to end.
    ``overrides`` replace the same keys of SLURM and TINY."""
    keys = {o.split("=", 1)[0] for o in overrides}
    base = [o for o in SLURM + TINY if o.split("=", 1)[0] not in keys]
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(sweep_dir.parent / f"{sweep_dir.name}.client.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "fcmae.pretrain", "-m", *base, f"hydra.sweep.dir={sweep_dir}", *overrides],
        cwd=sweep_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def _job_logs(sweep_dir: Path, env=None) -> str:
    parts = []
    for path in sorted(sweep_dir.glob(".submitit/*/*_log.*")) + sorted(sweep_dir.parent.glob("*.client.log")):
        # a requeued job appends to its first attempt's log: the tail shows the last attempt
        parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    if env is not None:  # the scheduler's view of every job, for a job that never started or exited at once
        show = subprocess.run(["scontrol", "show", "job"], env=env, capture_output=True, text=True, timeout=60)
        parts.append("--- scontrol show job\n" + show.stdout + show.stderr)
        for daemon in ("slurmd", "slurmctld"):
            path = Path(env["SLURM_CONF"]).parent / "log" / f"{daemon}.log"
            if path.is_file():
                parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(parts)


FAILED_STATES = {"FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _finish(env, proc: subprocess.Popen, sweep_dir: Path, timeout: float = 400) -> None:
    """Wait for the submission to return. Without accounting, submitit cannot see a job that
    failed outside Python (it waits for a result file), so the scheduler's state is watched too."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        states = {_job_field(env, jid, "JobState") for jid in _job_ids(sweep_dir)} if (sweep_dir / ".submitit").is_dir() else set()
        if states & FAILED_STATES or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the Slurm job(s) ended {states} or did not finish in {timeout} s\n{_job_logs(sweep_dir, env)}")
        time.sleep(1)
    assert proc.returncode == 0, _job_logs(sweep_dir, env)


def _rank0_log(sweep_dir: Path, job_id: str) -> str:
    return "".join((sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.{ext}").read_text() for ext in ("out", "err"))


def _requeued(log: str) -> bool:
    """Whether a job's log shows submitit's requeue: its "Requeued job" line, or slurmstepd's cancel of the
    step "DUE TO JOB REQUEUE". The line races the requeue itself: Slurm cancels the step as `scontrol
    requeue` runs, and the process can be gone before submitit logs it (the tests check Slurm's Restarts
    count and the resumed run too)."""
    return "Requeued job" in log or "DUE TO JOB REQUEUE" in log


def _job_ids(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir())


def _run_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/config.yaml") if p.parent.name != ".submitit")


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for(predicate, what: str, sweep_dir: Path, proc: subprocess.Popen, timeout: float = 300, env=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the submission ended (rc {proc.returncode}) before {what}\n{_job_logs(sweep_dir, env)}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}\n{_job_logs(sweep_dir, env)}")


def _job_field(env, job_id: str, key: str) -> str:
    fields = _slurm(env, "scontrol", "show", "job", job_id).split()
    return next(f.split("=", 1)[1] for f in fields if f.startswith(key + "="))


def _interrupt_and_requeue(env, sweep_dir: Path, proc: subprocess.Popen, interrupt) -> str:
    """Wait for step 4 of the job's one run, ``interrupt(job_id)``, then release the requeued job."""
    _wait_for(lambda: (d := _run_dirs(sweep_dir)) and (d[0] / "metrics.jsonl").is_file()
              and len(_steps(d[0])) >= 4, "step 4", sweep_dir, proc, env=env)
    (job_id,) = _job_ids(sweep_dir)
    interrupt(job_id)
    # Slurm holds a requeued batch job for about two minutes (reason BeginTime); start it now.
    _wait_for(lambda: _job_field(env, job_id, "Restarts") == "1" and _job_field(env, job_id, "JobState") == "PENDING",
              "the job to be requeued", sweep_dir, proc, timeout=120, env=env)
    _slurm(env, "scontrol", "update", f"jobid={job_id}", "starttime=now")
    return job_id


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """A 2-task job run start to end: the reference for the interrupted ones."""
    sweep = tmp_path_factory.mktemp("slurm-ref") / "sweep"
    _finish(cluster, _submit(cluster, sweep, "launcher.tasks_per_node=2", f"trainer.max_steps={STEPS}"), sweep)
    (run_dir,) = _run_dirs(sweep)
    return run_dir


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    a, b = load_checkpoint(run_dir / "checkpoints" / "last.pt"), load_checkpoint(reference / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slurm
def test_two_tasks_form_one_ddp_group(uninterrupted, tmp_path):
    run_dir = uninterrupted
    assert _steps(run_dir) == list(range(1, STEPS + 1))  # one metrics file, written once per step (rank 0)
    assert not list(run_dir.glob("*rank*"))
    # Two tasks in one group train on the global batch (2 x 2): the first loss, computed before any
    # update, equals a single process's on batch 4. Two independent single-process runs would
    # each see batch 2 and log a different loss.
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "fcmae.pretrain", *TINY, "data.batch_size=4", "trainer.max_steps=1",
                           f"hydra.run.dir={single}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["loss"]  # noqa: E731
    assert abs(first(run_dir) - first(single)) < 1e-5
    logs = "".join(p.read_text() for p in run_dir.parent.glob(".submitit/*/*_log.*"))
    assert "2 process(es) on cpu" in logs  # rank 0 reports the group it joined


@pytest.mark.slurm
def test_scontrol_requeue_checkpoints_and_continues_bit_identical(cluster, uninterrupted, tmp_path):
    sweep = tmp_path / "sweep"
    # With loader workers: Slurm signals every process of the step, workers included; they ignore
    # it and the main process checkpoints (a worker killed by it used to crash the run unsaved).
    proc = _submit(cluster, sweep, "launcher.tasks_per_node=2", f"trainer.max_steps={STEPS}", "data.num_workers=2")
    # An admin's (or the scheduler's) requeue: Slurm sends SIGTERM, then requeues the job itself.
    job_id = _interrupt_and_requeue(cluster, sweep, proc, lambda jid: _slurm(cluster, "scontrol", "requeue", jid))
    _finish(cluster, proc, sweep)
    (run_dir,) = _run_dirs(sweep)
    logs = _rank0_log(sweep, job_id)
    stopped = int(logs.split("caught SIGTERM: checkpoint of step ")[1].split()[0])
    assert 4 <= stopped < STEPS and f"at step {stopped} (epoch" in logs.split("resumed from")[1]
    assert _job_field(cluster, job_id, "Restarts") == "1"
    # The result reaches the client before the job's processes have all exited (loader workers
    # are shut down at the end): Slurm's state follows a few seconds later.
    deadline = time.time() + 60
    while _job_field(cluster, job_id, "JobState") != "COMPLETED" and time.time() < deadline:
        time.sleep(0.5)
    assert _job_field(cluster, job_id, "JobState") == "COMPLETED"
    assert _steps(run_dir) == list(range(1, STEPS + 1))  # no step lost or repeated
    _assert_same_weights(run_dir, uninterrupted)


@pytest.mark.slurm
def test_warning_signal_requeues_through_submitit_bit_identical(cluster, uninterrupted, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _submit(cluster, sweep, "launcher.tasks_per_node=2", f"trainer.max_steps={STEPS}")
    # The job's --signal=USR2@N warning, delivered by hand now rather than by the time limit (the
    # next test waits for the real one): the loop checkpoints, then submitit's handler requeues
    # the job (scontrol requeue) and exits.
    job_id = _interrupt_and_requeue(
        cluster, sweep, proc, lambda jid: _slurm(cluster, "scancel", "--signal=USR2", jid))
    _finish(cluster, proc, sweep)
    (run_dir,) = _run_dirs(sweep)
    logs = _rank0_log(sweep, job_id)
    stopped = int(logs.split("caught SIGUSR2: checkpoint of step ")[1].split()[0])
    assert _requeued(logs), logs[-3000:]  # by submitit's handler, after our checkpoint
    assert 4 <= stopped < STEPS and f"at step {stopped} (epoch" in logs.split("resumed from")[1]
    assert _job_field(cluster, job_id, "Restarts") == "1"
    assert _steps(run_dir) == list(range(1, STEPS + 1))
    _assert_same_weights(run_dir, uninterrupted)


@pytest.mark.slow
@pytest.mark.slurm
def test_time_limit_warning_checkpoints_and_the_requeued_job_resumes(cluster, tmp_path):
    """Slurm's own time-limit warning (--signal=USR2@90) makes the run checkpoint and requeue; the
    requeued job resumes from that step and trains on. The job starts with a 10-minute limit; once
    the run has logged a step (the app's handler exists), the test cuts the limit to 2 minutes as an
    admin would, so the warning is due at once and Slurm sends it at its next periodic time-limit
    check (about 30 s; Slurm may send it up to 60 s early, man sbatch --signal, which is why it is
    not due before the handler exists). The run is far longer than the test waits: no step budget
    has to outlast the warning on a fast machine. The requeued job is cancelled once it has trained
    past the checkpoint (a resumed run is checked to the end, bit for bit, by the two tests above)."""
    steps = 100_000  # never reached: the test ends the job
    sweep = tmp_path / "sweep"
    proc = _submit(cluster, sweep, "launcher.tasks_per_node=1", "launcher.timeout_min=10",
                   "launcher.signal_delay_s=90", f"trainer.max_steps={steps}", "trainer.ckpt_every=100000")
    try:
        _wait_for(lambda: (d := _run_dirs(sweep)) and (d[0] / "metrics.jsonl").is_file() and len(_steps(d[0])) >= 2,
                  "step 2", sweep, proc)
        (job_id,) = _job_ids(sweep)
        _slurm(cluster, "scontrol", "update", f"jobid={job_id}", "timelimit=2")
        _wait_for(lambda: _job_field(cluster, job_id, "Restarts") == "1" and _job_field(cluster, job_id, "JobState") == "PENDING",
                  "the time-limit warning and the requeue", sweep, proc, timeout=150)
        _slurm(cluster, "scontrol", "update", f"jobid={job_id}", "timelimit=10", "starttime=now")
        (run_dir,) = _run_dirs(sweep)
        logs = lambda: _rank0_log(sweep, job_id)  # noqa: E731
        nudged = [time.time()]

        def resumed() -> bool:
            # Slurm may hold a requeued job (a begin time set again when the old step finished tearing down,
            # or a hold on a loaded 2-core node): while it is pending, ask again for it to start now
            if time.time() - nudged[0] > 15 and _job_field(cluster, job_id, "JobState") == "PENDING":
                subprocess.run(["scontrol", "release", job_id], env=cluster, capture_output=True, timeout=60)
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], env=cluster,
                               capture_output=True, timeout=60)
                nudged[0] = time.time()
            return "resumed from" in logs()
        _wait_for(resumed, "the requeued job to resume", sweep, proc, env=cluster)
        stopped = int(logs().split("caught SIGUSR2: checkpoint of step ")[1].split()[0])
        _wait_for(lambda: _steps(run_dir)[-1] >= stopped + 3, "three steps after the resume", sweep, proc)
    finally:
        for jid in _job_ids(sweep) if (sweep / ".submitit").is_dir() else []:
            subprocess.run(["scancel", jid], env=cluster, capture_output=True, timeout=60)
        proc.kill()
        proc.wait(timeout=60)
    text = logs()
    assert "Caught signal SIGUSR2" in text and _requeued(text), text[-3000:]
    assert 2 <= stopped and f"at step {stopped} (epoch" in text.split("resumed from")[1]
    seen = _steps(run_dir)
    assert seen == list(range(1, len(seen) + 1))  # no step lost or repeated across the requeue
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] >= stopped


@pytest.mark.slurm
def test_mask_ratio_sweep_one_job_and_directory_per_value(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _submit(cluster, sweep, "launcher.tasks_per_node=1", "trainer.max_steps=2",
                   "model.mask_ratio=0.4,0.6,0.75")
    _finish(cluster, proc, sweep)
    tasks = [j for j in _job_ids(sweep) if "_" in j]
    assert len(tasks) == 3 and len({t.split("_")[0] for t in tasks}) == 1  # one job array, a task per value
    runs = _run_dirs(sweep)
    assert len(runs) == 3
    ratios = set()
    for run_dir in runs:
        ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        assert ckpt["step"] == 2
        ratios.add(ckpt["config"]["model"]["mask_ratio"])
    assert ratios == {0.4, 0.6, 0.75}
