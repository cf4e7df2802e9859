"""Run history on disk: append, reload, torn last line, buffering, truncate_after / resume, latest.json."""
from __future__ import annotations

import json

import pytest

from trainer.monitor.runlog import HISTORY_FILE, LATEST_FILE, RunLog, read_history, read_latest


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def write_steps(log: RunLog, steps, loss=lambda s: 1.0 / s, lr=1e-4):
    for s in steps:
        log.log_step(s, loss(s), lr, time=1000.0 + s)


def test_append_and_reload(tmp_path):
    with RunLog(tmp_path / "run") as log:
        write_steps(log, range(1, 11))
        log.mark(5, "preview", "step_000005.png")
        log.mark(10, "save", "state/step_10")
    h = read_history(tmp_path / "run")
    assert h["steps"] == list(range(1, 11))
    assert h["loss"] == pytest.approx([1.0 / s for s in range(1, 11)])
    assert h["lr"] == [1e-4] * 10
    assert h["time"][0] == 1001.0
    assert h["marks"] == [{"step": 5, "mark": "preview", "file": "step_000005.png"},
                          {"step": 10, "mark": "save", "file": "state/step_10"}]
    # reopening appends
    with RunLog(tmp_path / "run") as log:
        write_steps(log, range(11, 13))
    assert read_history(tmp_path / "run")["steps"] == list(range(1, 13))


def test_empty_and_missing_history(tmp_path):
    assert read_history(tmp_path / "nope") == {"steps": [], "loss": [], "lr": [], "time": [], "marks": []}
    assert read_latest(tmp_path / "nope") is None


def test_buffered_writes_are_flushed_every_two_seconds(tmp_path):
    clock = FakeClock()
    log = RunLog(tmp_path, clock=clock)
    path = tmp_path / HISTORY_FILE
    write_steps(log, range(1, 6))
    assert read_history(tmp_path)["steps"] == []  # still buffered
    clock.t = 2.1
    write_steps(log, [6])  # the interval elapsed: everything so far reaches the file
    assert read_history(tmp_path)["steps"] == [1, 2, 3, 4, 5, 6]
    write_steps(log, [7])
    log.mark(7, "preview", "p.png")  # marks flush at once
    assert read_history(tmp_path)["steps"][-1] == 7
    write_steps(log, [8])
    log.write_latest({"phase": "preview", "step": 8})  # a non-training payload flushes too
    assert read_history(tmp_path)["steps"][-1] == 8
    write_steps(log, [9])
    # simulated crash: the buffered tail is lost, everything flushed survives
    del log._buf[:]
    log.close()
    assert read_history(tmp_path)["steps"] == list(range(1, 9))
    assert path.read_text().endswith("\n")


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    with RunLog(tmp_path) as log:
        write_steps(log, range(1, 4))
    path = tmp_path / HISTORY_FILE
    with open(path, "a") as f:
        f.write('{"step": 4, "loss": 0.2')  # crash mid-line
    h = read_history(tmp_path)
    assert h["steps"] == [1, 2, 3]
    with RunLog(tmp_path) as log:  # opening cuts the torn tail so new lines start clean
        write_steps(log, [4, 5])
    assert read_history(tmp_path)["steps"] == [1, 2, 3, 4, 5]
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    # a garbled line in the middle is skipped, the rest is read
    path.write_text("\n".join(lines[:2] + ["\x00\x00garbage", '["not", "an", "entry"]'] + lines[2:]) + "\n")
    assert read_history(tmp_path)["steps"] == [1, 2, 3, 4, 5]


def test_truncate_after_for_resume(tmp_path):
    with RunLog(tmp_path) as log:
        write_steps(log, range(1, 31))
        log.mark(10, "save", "state/step_10")
        log.mark(20, "save", "state/step_20")
        log.mark(25, "preview", "step_000025.png")
    with RunLog(tmp_path) as log:
        log.resume(20)  # truncate_after(20) + resume mark
        write_steps(log, range(21, 26), loss=lambda s: 10.0 + s)  # the resumed run's own values
    h = read_history(tmp_path)
    assert h["steps"] == list(range(1, 26))
    assert h["loss"][:20] == pytest.approx([1.0 / s for s in range(1, 21)])
    assert h["loss"][20:] == pytest.approx([10.0 + s for s in range(21, 26)])
    assert [(m["step"], m["mark"]) for m in h["marks"]] == [(10, "save"), (20, "save"), (20, "resume")]
    # truncate_after rewrote the file: the old steps 21..30 are gone from disk, not only hidden
    raw = [json.loads(x) for x in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert max(e["step"] for e in raw) == 25 and sum(1 for e in raw if e["step"] == 21) == 1


def test_reader_handles_a_resume_without_truncation(tmp_path):
    with RunLog(tmp_path) as log:
        write_steps(log, range(1, 11))
        log.mark(8, "preview", "a.png")
        log.mark(5, "resume")  # marks after step 5 belong to the abandoned timeline
        write_steps(log, range(6, 9), loss=lambda s: 5.0)
        write_steps(log, [3], loss=lambda s: 7.0)  # steps going back without a mark: also a rewind
    h = read_history(tmp_path)
    assert h["steps"] == [1, 2, 3]
    assert h["loss"][-1] == 7.0
    assert h["marks"] == []


def test_non_finite_loss_is_stored_as_null(tmp_path):
    with RunLog(tmp_path) as log:
        log.log_step(1, float("nan"), 1e-4)
        log.log_step(2, 0.5, float("inf"))
    h = read_history(tmp_path)
    assert h["loss"] == [None, 0.5] and h["lr"] == [1e-4, None]
    for line in (tmp_path / HISTORY_FILE).read_text().splitlines():
        json.loads(line)  # strict JSON


def test_latest_json_is_atomic_and_throttled(tmp_path):
    clock = FakeClock()
    log = RunLog(tmp_path, clock=clock)
    assert log.write_latest({"phase": "training", "step": 1}) is True
    assert log.write_latest({"phase": "training", "step": 2}) is False  # < 1 s later
    assert read_latest(tmp_path)["step"] == 1
    clock.t = 1.5
    assert log.write_latest({"phase": "training", "step": 3}) is True
    assert log.write_latest({"phase": "done", "step": 3}) is True  # other phases always
    assert read_latest(tmp_path) == {"phase": "done", "step": 3}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    (tmp_path / LATEST_FILE).write_text("{torn")
    assert read_latest(tmp_path) is None
    log.close()


def test_unknown_mark_is_rejected(tmp_path):
    with RunLog(tmp_path) as log:
        with pytest.raises(ValueError):
            log.mark(1, "party")
