"""The loop's parts, each on its own (fcmae/engine/): what ranks agree on after a step, the
checkpoint cadence and its refusal of non-finite weights, what a step reports; and the loop's
shape (a step reads top to bottom, no method over ~50 lines). The whole loop is exercised by the
app tests (test_pretrain, test_run_dir_integrity, ...)."""
import ast
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fcmae.distributed import DistInfo
from fcmae.engine import DataQualityError, LoopSettings, LoopState, NonFiniteLoss, RunParts, Task
from fcmae.engine.checkpointing import Checkpointing
from fcmae.engine.step_log import StepLog
from fcmae.engine.step_sync import StepSync
from fcmae.storage.files import DiskWriteError


def settings(**kw) -> LoopSettings:
    base = dict(total_steps=20, stop_step=20, steps_per_epoch=10, accum=2, base_lr=1e-3, min_lr=0.0,
                warmup_steps=0, batch_size=4, precision="fp32", clip_grad=None, log_every=5, ckpt_every=4,
                max_bad_fraction=0.1, progress="log")
    return LoopSettings(**{**base, **kw})


# ------------------------------------------------------------------ StepSync

def test_step_sync_counts_bad_files_into_the_state_and_enforces_the_limit():
    sync, st = StepSync(DistInfo(), max_bad_fraction=0.1), LoopState(seen_images=200)
    sync.bad_local = 20
    sync.after_step(st)
    assert (st.bad_images, sync.bad_local) == (20, 0)
    sync.check_data_quality(st)  # 20 of 200 = the limit itself: allowed
    sync.bad_local = 1
    sync.after_step(st)
    with pytest.raises(DataQualityError, match=r"21 of 200 images were unreadable .*data.max_bad_fraction=0.1"):
        sync.check_data_quality(st)
    # below 100 images seen, the limit is taken of 100 (a few bad files early do not stop a run)
    small = LoopState(seen_images=10, bad_images=10)
    sync.check_data_quality(small)


def test_step_sync_agrees_on_the_caught_signal_only_while_the_loop_trains():
    sync = StepSync(DistInfo(), 0.1)
    sync.agree_to_stop(True)
    assert sync.stop_signal is None  # before the loop's guard: nothing to stop
    guard = SimpleNamespace(signum=None)
    sync.start(guard)
    sync.after_step(LoopState())
    assert sync.stop_signal is None
    guard.signum = signal.SIGUSR1
    assert sync.signalled
    sync.after_step(LoopState())
    assert sync.stop_signal == signal.SIGUSR1
    other = StepSync(DistInfo(), 0.1)
    other.start(SimpleNamespace(signum=None))
    other.agree_to_stop(True)  # another rank caught it: this one stops too, as if by SIGTERM
    assert other.stop_signal == signal.SIGTERM


def test_a_refused_write_stops_at_once_alone_and_at_the_next_collective_under_ddp():
    def refuse():
        raise DiskWriteError("no space left (ENOSPC)")

    with pytest.raises(DiskWriteError, match="ENOSPC"):
        StepSync(DistInfo(), 0.1).write_output(refuse)
    ddp = StepSync(DistInfo(world_size=2), 0.1)
    ddp.write_output(refuse)  # held until every rank meets
    assert "ENOSPC" in str(ddp.write_failure)
    with pytest.raises(DiskWriteError, match="ENOSPC"):
        StepSync.raise_write_failure(ddp.write_failure)
    with pytest.raises(DiskWriteError, match="rank 0 could not write"):
        StepSync.raise_write_failure(None)  # what the other ranks raise


# ------------------------------------------------------------------ Checkpointing

class Saved:
    def __init__(self):
        self.calls = []

    def save(self, state, step):
        self.calls.append(("numbered", step, state))
        return Path(f"checkpoint-{step:07d}.pt")

    def save_as(self, state, name):
        self.calls.append((name, state["step"], state))
        return Path(name)


def checkpointing(model, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    parts = RunParts(model=model, raw_model=model, optimizer=opt, scaler=None, loader=None, sampler=None,
                     dist=DistInfo(), ckpt=Saved(), tracker=None, config={"k": 1}, run_dir=Path("."))
    st = LoopState(**kw)
    sync = StepSync(parts.dist, 0.1)
    return Checkpointing(Task(), parts, settings(), st, sync), st, sync


def test_the_checkpoint_cadence():
    ck, st, sync = checkpointing(torch.nn.Linear(2, 2))
    due = []
    for step in range(1, 21):
        st.step = step
        due.append(ck.due())
    # every ckpt_every=4 steps, but not at the stop step 20 (the run's end saves its own)
    assert [s for s, d in zip(range(1, 21), due) if d] == [4, 8, 12, 16]
    st.step = 8
    sync.start(SimpleNamespace(signum=None))
    sync.agree_to_stop(True)
    assert not ck.due()  # stopping: the stop's checkpoint is the one


def test_a_save_holds_the_position_and_a_stop_seen_while_writing_stands():
    ck, st, sync = checkpointing(torch.nn.Linear(2, 2), step=6, epoch=1, batch_in_epoch=4, bad_images=2)
    guard = SimpleNamespace(signum=None)
    sync.start(guard)
    path = ck.save()
    kind, step, state = ck.parts.ckpt.calls[-1]
    assert (kind, step, path) == ("numbered", 6, Path("checkpoint-0000006.pt"))
    assert {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "bad_images", "world_size",
                                  "effective_batch", "config")} == {
        "step": 6, "epoch": 1, "batch_in_epoch": 4, "bad_images": 2, "world_size": 1,
        "effective_batch": 4 * 2 * 1, "config": {"k": 1}}
    assert sync.stop_signal is None and ck.saved_now() == path  # this step's checkpoint is not written twice
    assert len(ck.parts.ckpt.calls) == 1
    guard.signum = signal.SIGTERM  # caught while writing: acted on right after the write
    ck.save("best.pt")
    assert sync.stop_signal == signal.SIGTERM and ck.saved_step == 6


def test_weights_that_are_not_finite_are_never_saved():
    model = torch.nn.Linear(2, 2)
    ck, st, _ = checkpointing(model, step=7)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"after step 7 are not finite \(weight\)") as err:
        ck.save()
    assert ck.parts.ckpt.calls == []
    assert (err.value.step, err.value.blowup_step) == (8, 8)  # the weights feed step 8
    st.blowup_step = 5  # the loss had left its range at step 5: those weights were bad already
    with pytest.raises(NonFiniteLoss) as err:
        ck.save()
    assert (err.value.step, err.value.blowup_step) == (8, 5)


# ------------------------------------------------------------------ StepLog

class Lines:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(dict(record))

    def log(self, record, step):
        self.records.append({"tracker_step": step, **record})


def test_a_log_step_writes_the_global_loss_lr_and_throughput(monkeypatch):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr_scale": 0.5, "lr": 0.5},
                           {"params": [model.bias], "lr_scale": 1.0, "lr": 1.0}], lr=1.0)
    st, metrics, tracker = LoopState(step=5, epoch=0, bad_images=3), Lines(), Lines()
    log = StepLog(settings(), st, DistInfo(), opt, metrics, tracker, StepSync(DistInfo(), 0.1))
    clock = iter([100.0, 102.0])
    monkeypatch.setattr("fcmae.engine.step_log.time.perf_counter", lambda: next(clock))
    log.open()  # t = 100
    log.count_images(64)
    log.step(torch.tensor(3.0), loss=99.0, grad_norm=0.25, lr=1.0)  # t = 102; step 5 = a log step
    log.close()
    record = metrics.records[-1]
    # the loss is the (one-rank) mean of the summed micro-batch losses over accum=2, not the argument
    assert record == {"step": 5, "epoch": 0, "loss": 1.5, "lr": 1.0, "lr_min": 0.5, "lr_max": 1.0,
                      "grad_norm": 0.25, "images_per_s": 32.0, "bad_images": 3}
    assert tracker.records[-1]["tracker_step"] == 5 and tracker.records[-1]["train/loss"] == 1.5
    st.step = 6  # not a log step, no bar: nothing written
    log.step(torch.tensor(3.0), loss=1.0, grad_norm=0.1, lr=1.0)
    assert len(metrics.records) == 1


def test_a_plain_optimizer_reports_one_lr():
    model = torch.nn.Linear(2, 2)
    log = StepLog(settings(), LoopState(), DistInfo(), torch.optim.SGD(model.parameters(), lr=0.1), Lines(),
                  Lines(), StepSync(DistInfo(), 0.1))
    assert log.lr_metrics(0.1) == {"lr": 0.1}


# ------------------------------------------------------------------ the loop's shape

def test_the_loop_reads_in_short_methods():
    """No method of the loop or its parts over ~50 lines, and a step's sequence is named in
    TrainLoop._train_micro_batch (forward/backward, optimizer step, the step's hooks)."""
    engine = Path(__file__).resolve().parents[2] / "fcmae" / "engine"
    long = []
    for path in engine.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 50:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, long
    tree = ast.parse((engine / "loop.py").read_text())
    step = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_train_micro_batch")
    called = [c.func.attr for c in ast.walk(step) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)]
    for part in ("_forward_backward", "_optimizer_step", "_after_step"):
        assert part in called, part


# ------------------------------------------------------------------ reading a step's values one step late

def test_step_readback_reads_all_but_the_newest_step_in_order():
    from fcmae.engine.readback import StepReadback
    seen = []
    rb = StepReadback(torch.device("cpu"))
    for step in (1, 2, 3):
        rb.put(step, torch.tensor([step * 1.5, -step]), lambda s, v: seen.append((s, v)))
    rb.ready()
    assert seen == [(1, [1.5, -1.0]), (2, [3.0, -2.0])]  # step 3 (just queued) is not waited for
    rb.drain()
    assert seen[-1] == (3, [4.5, -3.0]) and not rb.pending


def _pretrain_cfg(*overrides):
    from test_pretrain import make_cfg
    return make_cfg("trainer.max_steps=9", "trainer.ckpt_every=100", *overrides)


def test_the_loop_reads_a_step_only_after_queuing_the_next_unless_it_logs_or_saves(tmp_path, monkeypatch):
    """The host waits for a step's values (on a GPU: for the step to finish) only once the next
    step is queued, except at a log step, a checkpoint and the run's end; the numbers it logs
    are the same as when it reads every step at once (log_every=1)."""
    from fcmae.engine.readback import StepReadback
    from fcmae.pretrain import run
    reads, read = [], StepReadback._read

    def spy(item):
        reads.append((item.step, item.on_ready.__self__.state.step))  # (step read, step queued by then)
        read(item)

    monkeypatch.setattr(StepReadback, "_read", staticmethod(spy))
    run(_pretrain_cfg("trainer.log_every=4", "trainer.ckpt_every=6"), tmp_path / "lagged")
    assert [s for s, _ in reads] == list(range(1, 10))  # every step checked, in order
    at_once = {queued for s, queued in reads if s == queued}
    assert at_once == {4, 6, 8, 9}  # log steps 4 and 8, the checkpoint of step 6, the stop step 9
    assert all(queued == s + 1 for s, queued in reads if queued not in at_once)
    monkeypatch.undo()
    run(_pretrain_cfg("trainer.log_every=1", "trainer.ckpt_every=6"), tmp_path / "every")
    from test_pretrain import metrics
    every = {m["step"]: m for m in metrics(tmp_path / "every") if "loss" in m}
    lagged = [m for m in metrics(tmp_path / "lagged") if "loss" in m]
    assert [m["step"] for m in lagged] == [4, 8, 9]
    for m in lagged:
        assert (m["loss"], m["grad_norm"]) == (every[m["step"]]["loss"], every[m["step"]]["grad_norm"])


def test_a_non_finite_loss_between_log_steps_is_caught_a_step_late_and_never_checkpointed(tmp_path):
    from fcmae.storage.checkpoint import load_checkpoint
    from fcmae.pretrain import run

    def poison_after_5(loop):  # step 6's loss is NaN; step 6 neither logs nor saves
        if loop.state.step == 5:
            with torch.no_grad():
                loop.raw_model.pred.bias.fill_(float("nan"))

    with pytest.raises(NonFiniteLoss, match=r"at step 6\b.*last good checkpoint is .*checkpoint-0000004") as err:
        run(_pretrain_cfg("trainer.log_every=10", "trainer.ckpt_every=4"), tmp_path, callbacks=[poison_after_5])
    assert err.value.step == 6
    ck = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*.pt")) == ["checkpoint-0000004.pt"]


def test_a_checkpoint_record_round_trips_and_reads_files_from_before_a_field():
    """One typed record of what a training checkpoint holds (#39): to_dict is the flat dict on disk,
    from_dict gives the same record back (the task's entries kept apart), and a file written before
    ``finished`` existed reads as finished, as the loop always treated it."""
    from fcmae.storage.checkpoint_record import REQUIRED, TrainingCheckpoint
    from fcmae.engine.state import LoopState
    loop = LoopState(step=7, epoch=1, batch_in_epoch=2, bad_images=1, seen_images=56, finished=False,
                     loss_floor=0.5, blowup_step=None)
    rec = TrainingCheckpoint(model={"w": 1}, optimizer={"state": {}}, loop=loop, rng=[{"r": 0}, {"r": 1}],
                             world_size=2, effective_batch=16, config={"data": {"batch_size": 4}},
                             task={"best": {"val/best_top1": 50.0}, "classes": ["a", "b"]})
    flat = rec.to_dict()
    assert set(REQUIRED) <= set(flat) and flat["step"] == 7 and flat["classes"] == ["a", "b"]
    again = TrainingCheckpoint.from_dict(flat)
    assert again.to_dict() == flat and again.task == rec.task and again.loop.to_dict() == loop.to_dict()
    old = {k: v for k, v in flat.items() if k != "finished"}
    assert TrainingCheckpoint.from_dict(old).loop.finished is True
    with pytest.raises(ValueError, match="collide"):
        TrainingCheckpoint(model={}, optimizer={}, loop=loop, task={"step": 3}).to_dict()
