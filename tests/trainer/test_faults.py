"""Real faults in real trainer processes: kills anywhere in the save window, a SIGTERM right after a save, an older
attempt writing late after a newer one started, and a FineTuneJob deleted and created again under the same name.

Faults land at chosen points of a save through faults/sitecustomize.py (it wraps fsync, rename and rmtree in the
trainer subprocess and signals the process at the n-th event); the trainer has no test hooks of its own.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trainer_assets as assets
from kubetune_trainer import checkpoint
from kubetune_trainer.config import RunIdentity, TrainerConfig
from kubetune_trainer.errors import PermanentError, Stopped
from kubetune_trainer.progress import Progress
from kubetune_trainer.train import Run, run

pytestmark = pytest.mark.trainer

FAULTS = Path(__file__).parent / "faults"
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)/")
SAVED = re.compile(r"checkpoint step (\d+) saved to")


def trainer_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "kubetune_trainer", "--config", str(config)]


def faulty_env(root: Path, log: Path, faults: list[dict[str, Any]]) -> dict[str, str]:
    env = assets.worker_env(KUBETUNE_TEST_FAULTS=json.dumps({"root": str(root), "log": str(log), "faults": faults}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH", "")) if p)
    return env


def events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def tree(*roots: Path, skip: str | None = None) -> dict[str, tuple[int, int, int]]:
    """Every file under the roots: (inode, size, mtime) by path, except under directories named `skip`."""
    found = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not (skip and skip in p.parts):
                st = p.stat()
                found[str(p)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


# LoRA dropout on (the RNG state must come back), a checkpoint every 2 steps and only the newest kept: every save
# ends by deleting the previous one, so a fault anywhere in it must still leave one valid checkpoint. The loss is
# logged every step: a log interval cut by a stop and resume averages only the steps after the resume.
CHAOS: dict[str, Any] = {
    "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
    "training": {"maxSteps": 120, "logEverySteps": 1, "learningRate": 5e-3},
    "checkpoint": {"everySteps": 2, "keepLast": 1},
}


@pytest.mark.slow
def test_kills_anywhere_in_the_save_window_lose_no_checkpoint(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path
) -> None:
    """20 faults, each in a new process resuming from the last: 10 SIGKILLs at a random point of a save (while DCP
    writes, at the rename, during rotation) and 10 SIGTERMs while a checkpoint is being written followed by a
    SIGKILL at the k-th directory rename or deletion after it (k = 1..10: the grace period ending at every point of
    the stop). Every process must resume from the newest checkpoint any earlier one saved; no checkpoint may ever
    be found damaged; the final weights and loss history must equal an uninterrupted run's, bit for bit."""
    env = assets.worker_env()
    ref, cut = tmp_path / "reference", tmp_path / "chaos"
    ref_cfg = assets.write_config(ref, assets.trainer_config(ref, llama_dir, train_jsonl, **CHAOS))
    cut_cfg = assets.write_config(cut, assets.trainer_config(cut, llama_dir, train_jsonl, **CHAOS))
    root = cut / "ckpt"

    # A first checkpoint to resume from: stopped by a SIGTERM while its second checkpoint is written.
    first = subprocess.run(
        trainer_cmd(cut_cfg),
        env=faulty_env(root, cut / "faults-0.log", [{"on": "write", "nth": 9, "signal": "TERM"}]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 143, first.stderr[-3000:]
    known = max(int(s) for s in SAVED.findall(first.stderr))

    rng = random.Random(20261127)
    ks = list(range(1, 11))
    rng.shuffle(ks)
    trials: list[list[dict[str, Any]]] = [
        [{"on": "write", "nth": rng.randint(1, 16), "signal": "TERM"}, {"on": "after-term", "nth": k, "signal": "KILL"}]
        for k in ks
    ] + [[{"on": "event", "nth": rng.randint(1, 36), "signal": "KILL"}] for _ in range(10)]
    rng.shuffle(trials)
    previous: list[dict[str, Any]] = [{"on": "write", "nth": 9, "signal": "TERM"}]
    for i, faults in enumerate(trials, start=1):
        log = cut / f"faults-{i}.log"
        done = subprocess.run(
            trainer_cmd(cut_cfg), env=faulty_env(root, log, faults), capture_output=True, text=True, timeout=300
        )
        what = f"fault {i} {faults}: exit {done.returncode}\n{done.stderr[-2500:]}"
        assert done.returncode in (-signal.SIGKILL, 143), what
        assert "is not valid" not in done.stderr, what
        resumed = RESUMED.search(done.stderr)
        start = int(resumed.group(2)) if resumed else 0
        assert start >= known, f"fault {i - 1} {previous} lost the checkpoint of step {known}: {what}"
        known = max(known, start, *(int(s) for s in SAVED.findall(done.stderr)))
        previous = faults
        assert any("signal" in e for e in events(log)), f"no fault fired: {what}"

    reference = subprocess.run(trainer_cmd(ref_cfg), env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    last = subprocess.run(trainer_cmd(cut_cfg), env=env, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    a, b = assets.adapter_tensors(ref / "out"), assets.adapter_tensors(cut / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert assets.losses_by_step(cut / "out") == assets.losses_by_step(ref / "out")


def test_sigterm_right_after_a_save_does_not_save_again(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    cfg = assets.write_config(
        tmp_path,
        assets.trainer_config(
            tmp_path, llama_dir, train_jsonl, training={"maxSteps": 40}, checkpoint={"everySteps": 4, "keepLast": 2}
        ),
    )
    log = tmp_path / "faults.log"
    faults = [{"on": "rename", "nth": 2, "signal": "TERM"}]  # just after step 8's checkpoint is in place
    done = subprocess.run(
        trainer_cmd(cfg), env=faulty_env(tmp_path / "ckpt", log, faults), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 143, done.stderr[-3000:]
    assert "stopped by SIGTERM; checkpoint saved at step 8 " in done.stderr
    seen = events(log)
    signalled = next(i for i, e in enumerate(seen) if "signal" in e)
    # Nothing was written after the SIGTERM, and the checkpoint in place is the one renamed in before it.
    assert [e for e in seen[signalled:] if e.get("op") == "fsync"] == []
    placed = seen[signalled - 1]
    assert placed["op"] == "rename" and Path(placed["path"]).name.startswith("step-00000008")
    assert Path(placed["path"]).stat().st_ino == placed["inode"]
    assert assets.checkpoint_steps(tmp_path / "ckpt") == [4, 8]
    assert checkpoint.problems(assets.checkpoint_at(tmp_path / "ckpt", 8)) is None


def test_sigterm_right_after_resuming_does_not_save_again(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    sections: dict[str, Any] = {"training": {"maxSteps": 12}, "checkpoint": {"everySteps": 6}}
    cfg = TrainerConfig.model_validate(assets.trainer_config(tmp_path, llama_dir, train_jsonl, **sections))
    run(cfg, assets.cpu_runtime())
    shutil.rmtree(assets.checkpoint_at(tmp_path / "ckpt", 12))  # so that it resumes at step 6, with steps to go
    saved = assets.checkpoint_at(tmp_path / "ckpt", 6)
    before = tree(tmp_path / "ckpt")

    r = Run(cfg, assets.cpu_runtime(), Progress(1))
    r.setup()
    r.resume()
    assert r.step == 6
    r.stop.requested = True  # the SIGTERM arrives as training is about to go on
    with pytest.raises(Stopped) as stopped:
        r.loop()
    assert stopped.value.step == 6 and f"({saved})" in str(stopped.value)
    after = tree(tmp_path / "ckpt")
    assert {p: v for p, v in after.items() if ".attempt-" not in p} == {
        p: v for p, v in before.items() if ".attempt-" not in p
    }
    assert not [p for p in after if ".attempt-" in p]  # nothing was even written to scratch


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pause", "resumed_at"),
    [
        ({"on": "write", "nth": 11, "signal": "STOP"}, 2),  # writing its second checkpoint (step 4)
        ({"on": "rename", "nth": 2, "signal": "STOP"}, 4),  # step 4 in place, its rotation not done yet
    ],
    ids=["while-writing", "before-rotating"],
)
def test_an_older_attempts_late_writes_do_nothing(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, pause: dict[str, Any], resumed_at: int
) -> None:
    """Attempt 1 is paused in the middle of a save (its pod in its grace period, say); attempt 2 starts, resumes and
    finishes. When attempt 1 goes on, it must change nothing: no checkpoint renamed in, none rotated out, no
    output written; and attempt 2 must not have deleted attempt 1's unfinished save while it might still be live."""
    sections: dict[str, Any] = {
        "training": {"maxSteps": 12},
        "checkpoint": {"everySteps": 2, "keepLast": 2},
    }

    def config(attempt: int) -> Path:
        identity = {"namespace": "team-a", "name": "bot", "uid": "uid-1", "run": 1, "attempt": attempt}
        cfg = assets.trainer_config(tmp_path, llama_dir, train_jsonl, identity=identity, **sections)
        path = tmp_path / f"config-{attempt}.json"
        path.write_text(json.dumps(cfg))
        return path

    root = tmp_path / "ckpt"
    old = subprocess.Popen(
        trainer_cmd(config(1)),
        env=faulty_env(root, tmp_path / "faults.log", [pause]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while process_state(old.pid) != "T":
            assert old.poll() is None and time.monotonic() < deadline, "attempt 1 did not reach its pause"
            time.sleep(0.05)
        # What attempt 1 has written of a checkpoint not yet in place (its unfinished save, if paused in one).
        in_flight = {p for p in tree(root) if not Path(p).relative_to(root).parts[0].startswith("step-")}
        assert bool(in_flight) == (pause["on"] == "write")

        new = subprocess.run(trainer_cmd(config(2)), env=assets.worker_env(), capture_output=True, text=True)
        assert new.returncode == 0, new.stderr[-3000:]
        resumed = RESUMED.search(new.stderr)
        assert resumed is not None and int(resumed.group(2)) == resumed_at
        after_new = tree(root, tmp_path / "out")
        assert in_flight <= set(after_new), "attempt 2 deleted attempt 1's unfinished save"
    finally:
        old.send_signal(signal.SIGCONT)
    _, stderr = old.communicate(timeout=300)
    assert old.returncode == 143, stderr[-3000:]
    assert "attempt 1 is superseded by attempt 2" in stderr
    # Attempt 1 changed nothing outside its own scratch directory.
    scratch_1 = next((p.name for p in root.glob(".attempt-*-00000001")), None)
    assert tree(root, tmp_path / "out", skip=scratch_1) == {
        p: v for p, v in after_new.items() if scratch_1 not in Path(p).parts
    }


def test_a_recreated_object_trains_from_step_0_and_leaves_the_old_files_alone(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same name applied again after a delete (a new uid) with other data, on the same checkpoint directory:
    it must not resume from the old object's checkpoints (which are further than its whole run), must leave them and
    the old output untouched, must say what it ignored, and must end exactly as on an empty directory."""
    other_data = assets.write_jsonl(tmp_path / "other.jsonl", assets.rows(120, "prompt_completion", seed=9))
    ckpt = tmp_path / "ckpt"

    def config(uid: str, data: Path, out: str, steps: int, ckpt_dir: Path = ckpt) -> TrainerConfig:
        doc = assets.trainer_config(
            tmp_path,
            llama_dir,
            data,
            identity={"namespace": "team-a", "name": "bot", "uid": uid, "run": 1, "specFingerprint": "f-" + uid},
            training={"maxSteps": steps},
            checkpoint={"dir": str(ckpt_dir), "everySteps": 5, "keepLast": 2},
            output={"dir": str(tmp_path / out)},
        )
        return TrainerConfig.model_validate(doc)

    run(config("uid-old", train_jsonl, "out-old", 20), assets.cpu_runtime())
    # A checkpoint from before checkpoints recorded who wrote them: a stranger too.
    legacy = ckpt / "step-00000005"
    written = assets.checkpoint_at(ckpt, 20)
    legacy.mkdir()
    for f in written.iterdir():
        if f.is_file():
            (legacy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((written / "manifest.json").read_text())
    (legacy / "manifest.json").write_text(json.dumps({"step": 5, "files": manifest["files"]}))
    old_files = tree(ckpt, tmp_path / "out-old")

    reports: list[Progress] = []

    class Recorded(Progress):
        def __init__(self, world_size: int) -> None:
            super().__init__(world_size)
            reports.append(self)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level("INFO"):
        mp.setattr("kubetune_trainer.train.Progress", Recorded)
        result = run(config("uid-new", other_data, "out-new", 10), assets.cpu_runtime())
    assert result["steps"] == 10
    assert json.loads((tmp_path / "out-new" / "manifest.json").read_text())["resumedFromStep"] is None
    assert not any("resumed from" in r.getMessage() for r in caplog.records)
    assert {p: v for p, v in tree(ckpt, tmp_path / "out-old").items() if p in old_files} == old_files
    ignored = {Path(i["path"]).name: i["reason"] for i in reports[0].snapshot()["ignoredCheckpoints"]}
    assert ignored == {
        "step-00000005": "written before checkpoints recorded who wrote them",
        **{
            p.name: "another FineTuneJob object (uid uid-old; this one is uid-new)"
            for _, p in checkpoint.list_checkpoints(ckpt)
            if "uid-old" in (p / "manifest.json").read_text()
        },
    }
    assert len(ignored) == 3

    # Where it may not write: the old object's output.
    with pytest.raises(PermanentError, match=r"out-old belongs to another training \(.*uid uid-old"):
        run(config("uid-new", other_data, "out-old", 10), assets.cpu_runtime())
    assert {p: v for p, v in tree(ckpt, tmp_path / "out-old").items() if p in old_files} == old_files
    assert tree(tmp_path / "out-old").keys() <= old_files.keys()

    # Exactly what the new object trains on an empty checkpoint directory.
    fresh = config("uid-new", other_data, "out-fresh", 10, ckpt_dir=tmp_path / "fresh-ckpt")
    run(fresh, assets.cpu_runtime())
    a, b = assets.adapter_tensors(tmp_path / "out-fresh"), assets.adapter_tensors(tmp_path / "out-new")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the pure parts ---------------------------------------------------------------------------------


def test_whose_checkpoint_it_is() -> None:
    me = RunIdentity(namespace="ns", name="bot", uid="u1", run=2, attempt=3, spec_fingerprint="f1")
    data = ["d1"]

    def manifest(**changes: Any) -> dict[str, Any]:
        identity = {**me.owner(attempt=True), **changes.pop("identity", {})}
        return {"identity": identity, "datasetSha256": data, **changes}

    assert checkpoint.stranger_reason(manifest(identity={"attempt": 1}), me, data) is None  # older attempts: ours
    assert checkpoint.stranger_reason({"step": 5}, me, data) == "written before checkpoints recorded who wrote them"
    assert checkpoint.stranger_reason(manifest(identity={"uid": "u0"}), me, data) == (
        "another FineTuneJob object (uid u0; this one is u1)"
    )
    assert checkpoint.stranger_reason(manifest(identity={"run": 1}), me, data) == "run 1 (this is run 2)"
    assert checkpoint.stranger_reason(manifest(identity={"specFingerprint": "f0"}), me, data) == (
        "another spec (fingerprint f0)"
    )
    assert checkpoint.stranger_reason(manifest(datasetSha256=["d0"]), me, data) == (
        "other dataset contents (the files' sha256 differ)"
    )
    # The lineage changes with each of those, and not with the attempt.
    base = checkpoint.lineage_key(me, data)
    assert checkpoint.lineage_key(me.model_copy(update={"attempt": 9}), data) == base
    for changed in ({"uid": "u0"}, {"run": 1}, {"spec_fingerprint": "f0"}, {"name": "bot2"}):
        assert checkpoint.lineage_key(me.model_copy(update=changed), data) != base
    assert checkpoint.lineage_key(me, ["d0"]) != base
    assert checkpoint.run_key(me.model_copy(update={"spec_fingerprint": "f0"})) == checkpoint.run_key(me)
