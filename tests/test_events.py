"""Progress events: throttling, payload schema, EMA, speed, memory snapshot, emit failures."""
from __future__ import annotations

import json
import math

import psutil
import pytest

from trainer.hosts.base import MemoryInfo
from trainer.monitor.events import (
    EMA_BETA,
    PHASES,
    SCHEMA_VERSION,
    LossEMA,
    ProgressReporter,
    ema_series,
    fanout,
    memory_info,
    memory_snapshot,
    preview_url,
    reset_peak_memory,
)


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


MEM = {"device": "cuda:0", "allocated": 1 << 30, "reserved": 2 << 30, "peak": 3 << 30, "total": 24 << 30}


def make(clock=None, total=1000, **kw):
    sent: list[dict] = []
    clock = clock or FakeClock()
    rep = ProgressReporter(sent.append, node="5", run="run_a", total=total, clock=clock, memory=lambda: dict(MEM), **kw)
    return rep, sent, clock


def test_training_updates_are_throttled_to_four_per_second():
    rep, sent, clock = make()
    rep.phase("training")
    sent.clear()
    for step in range(1, 1001):  # 100 it/s for 10 s
        clock.advance(0.01)
        rep.step(step, 1.0 / step, 1e-4)
    assert 35 <= len(sent) <= 41, len(sent)
    # no window of one second holds more than 4 events
    times = []
    t = 100.0
    for p in sent:  # reconstruct send times from the step (0.01 s per step)
        times.append(t + p["step"] * 0.01)
    for i in range(len(times)):
        in_window = [x for x in times if times[i] <= x < times[i] + 1.0 - 1e-9]
        assert len(in_window) <= 4
    assert rep.dropped == 1000 - len(sent)


def test_dropped_updates_are_carried_by_the_next_event():
    rep, sent, clock = make()
    rep.phase("training")
    rep.step(1, 0.9, 1e-4)
    n = len(sent)
    clock.advance(0.05)
    rep.step(2, 0.8, 2e-4)  # dropped
    clock.advance(0.05)
    rep.step(3, 0.7, 3e-4)  # dropped
    assert len(sent) == n
    clock.advance(0.2)
    rep.step(4, 0.6, 4e-4)  # 0.3 s after the last send: goes out with the latest values
    assert len(sent) == n + 1
    last = sent[-1]
    assert (last["step"], last["loss"], last["lr"]) == (4, 0.6, 4e-4)
    assert last["loss_ema"] == pytest.approx(ema_series([0.9, 0.8, 0.7, 0.6])[-1])
    # flush() sends a pending update at once (e.g. before a long pause)
    clock.advance(0.01)
    rep.step(5, 0.5, 5e-4)
    assert rep.flush() is True
    assert sent[-1]["step"] == 5
    assert rep.flush() is False  # nothing pending


def test_phase_changes_and_terminal_events_are_always_sent():
    rep, sent, clock = make()
    for ph in ("caching", "encoding", "training"):
        rep.phase(ph)  # same instant: throttle does not apply to phase changes
    rep.step(1, 0.5, 1e-4)  # same instant as the "training" event: throttled...
    rep.preview(1, preview_url("run_a", "step_000001.png"))  # ...and carried by the next (forced) event
    rep.phase("saving")
    rep.step(2, 0.4, 1e-4)  # back to training: a phase change
    rep.done("ok")
    assert [p["phase"] for p in sent] == ["caching", "encoding", "training", "preview", "saving", "training", "done"]
    assert (sent[3]["step"], sent[3]["loss"]) == (1, 0.5)
    # re-announcing the same phase is throttled (caching progress messages)
    rep2, sent2, clock2 = make()
    rep2.phase("caching", message="0/40")
    for i in range(1, 40):
        rep2.phase("caching", message=f"{i}/40")
    assert len(sent2) == 1
    clock2.advance(0.3)
    rep2.phase("caching", message="40/40")
    assert sent2[-1]["message"] == "40/40"
    # terminal phases go out even right after another event, and repeatedly
    rep2.error("out of memory")
    rep2.error("out of memory")
    assert [p["phase"] for p in sent2[-2:]] == ["error", "error"]


TYPES = {
    "v": int, "node": str, "run": str, "phase": str, "step": int, "total": int,
    "loss": (float, type(None)), "loss_ema": (float, type(None)), "lr": (float, type(None)),
    "it_per_s": (float, type(None)), "eta_s": (float, type(None)), "eta_detail": dict, "mem": dict,
}
ETA_DETAIL = {"training_s": (float, type(None)), "previews_left": int, "preview_cost_s": (float, type(None)),
              "saves_left": int, "save_cost_s": (float, type(None))}


def check_schema(p: dict) -> None:
    assert set(TYPES) <= set(p), set(TYPES) - set(p)
    assert set(p) <= set(TYPES) | {"message", "preview"}, set(p) - set(TYPES)
    for k, t in TYPES.items():
        assert isinstance(p[k], t) and not isinstance(p[k], bool), (k, p[k])
    assert p["v"] == SCHEMA_VERSION
    assert p["phase"] in PHASES
    assert set(p["eta_detail"]) == set(ETA_DETAIL)
    for k, t in ETA_DETAIL.items():
        assert isinstance(p["eta_detail"][k], t) and not isinstance(p["eta_detail"][k], bool), (k, p["eta_detail"])
    assert set(p["mem"]) - {"estimate"} == {"device", "allocated", "reserved", "peak", "total"}
    if "estimate" in p["mem"]:
        assert isinstance(p["mem"]["estimate"], int) and p["mem"]["estimate"] > 0
    assert isinstance(p["mem"]["device"], str)
    for k in ("allocated", "reserved", "peak", "total"):
        assert isinstance(p["mem"][k], int) and p["mem"][k] >= 0
    if "message" in p:
        assert isinstance(p["message"], str)
    if "preview" in p:
        assert isinstance(p["preview"], str)
    json.loads(json.dumps(p, allow_nan=False))  # valid JSON for the browser (no NaN)


def test_payload_schema_for_every_phase():
    rep, sent, clock = make(total=10)
    rep.phase("caching", message="caching latents 3/10")
    rep.phase("encoding")
    for s in range(1, 4):
        clock.advance(0.3)
        rep.step(s, 0.5 / s, 1e-4)
    rep.preview(3, preview_url("run a/b", "step 3.png"))
    rep.phase("saving")
    rep.stopped("stopped at step 3")
    rep.done()
    rep.error("boom")
    seen = set()
    for p in sent:
        check_schema(p)
        seen.add(p["phase"])
    assert seen == set(PHASES)
    pv = [p for p in sent if "preview" in p]
    assert len(pv) == 1 and pv[0]["preview"] == "/loralab/runs/run%20a%2Fb/previews/step%203.png"
    assert sent[0]["message"] == "caching latents 3/10" and sent[0]["loss"] is None
    assert sent[0]["mem"] == MEM and sent[0]["node"] == "5" and sent[0]["run"] == "run_a"


def test_non_finite_loss_becomes_null_and_does_not_poison_the_ema():
    rep, sent, clock = make()
    rep.step(1, 0.5, 1e-4)
    clock.advance(1)
    rep.step(2, float("nan"), 1e-4)
    clock.advance(1)
    rep.step(3, float("inf"), float("nan"))
    for p in sent:
        check_schema(p)
    assert sent[1]["loss"] is None and sent[1]["loss_ema"] == pytest.approx(0.5)
    assert sent[2]["loss"] is None and sent[2]["lr"] is None  # NaN/inf are sent as null, never as NaN
    assert rep.ema.count == 1


def test_ema_is_bias_corrected():
    assert EMA_BETA == 0.98
    e = LossEMA()
    assert e.value is None
    assert e.update(2.0) == pytest.approx(2.0)
    m = 0.98 * 0.02 * 2.0 + 0.02 * 1.0
    assert e.update(1.0) == pytest.approx(m / (1 - 0.98 ** 2))
    assert ema_series([0.3] * 30) == pytest.approx([0.3] * 30)
    # a long run forgets the start: after 500 steps of 0.1 the EMA is 0.1 whatever came first
    assert ema_series([5.0] * 10 + [0.1] * 500)[-1] == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError):
        LossEMA(1.0)


def test_resume_replays_the_ema():
    losses = [1 / (i + 1) for i in range(50)]
    rep, sent, clock = make()
    rep.resume(50, losses)
    rep.step(51, 0.02, 1e-4)
    full = ema_series(losses + [0.02])[-1]
    assert sent[-1]["loss_ema"] == pytest.approx(full)
    assert sent[-1]["step"] == 51


def test_speed_and_eta_from_a_smoothed_step_rate():
    rep, sent, clock = make(total=200)
    rep.phase("training")
    for s in range(1, 101):
        clock.advance(0.5)  # 2 it/s
        rep.step(s, 0.1, 1e-4)
    rep.flush()
    p = sent[-1]
    assert p["it_per_s"] == pytest.approx(2.0)
    assert p["eta_s"] == pytest.approx(50.0)
    # a long preview does not count as slow steps
    rep.preview(100, "/x.png")
    clock.advance(60)
    rep.step(101, 0.1, 1e-4)
    clock.advance(0.5)
    rep.step(102, 0.1, 1e-4)
    rep.flush()
    assert sent[-1]["it_per_s"] == pytest.approx(2.0)
    rep.done()
    assert sent[-1]["eta_s"] == 0.0


def test_report_entry_point_accepts_memoryinfo():
    rep, sent, clock = make()
    info = MemoryInfo("cuda:1", 10, 20, 30, 40, 5)
    rep.report("encoding", message="encoding captions", mem=info)
    rep.report("training", step=1, loss=0.3, lr=1e-4, mem=info)
    rep.report("preview", step=1, loss=0.3, preview="/p.png")
    rep.report("done", loss=0.3)
    assert [p["phase"] for p in sent] == ["encoding", "training", "preview", "done"]
    assert sent[0]["mem"] == {"device": "cuda:1", "allocated": 10, "reserved": 20, "peak": 30, "total": 40}
    assert sent[2]["preview"] == "/p.png"
    for p in sent:
        check_schema(p)
    with pytest.raises(ValueError):
        rep.report("bogus")


def test_the_memory_estimate_rides_along_once_known():
    rep, sent, clock = make()
    rep.report("encoding", message="estimating")
    rep.estimate = 3 * 2 ** 30
    rep.report("training", step=1, loss=0.3, lr=1e-4)
    rep.report("done", loss=0.3)
    assert "estimate" not in sent[0]["mem"]
    assert [p["mem"]["estimate"] for p in sent[1:]] == [3 * 2 ** 30] * 2
    for p in sent:
        check_schema(p)


def test_memory_snapshot_on_cpu():
    snap = memory_snapshot("cpu")
    assert set(snap) == {"device", "allocated", "reserved", "peak", "total"}
    assert snap["device"] == "cpu"
    assert snap["total"] == psutil.virtual_memory().total
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < snap["allocated"] < 2 * rss
    assert snap["peak"] >= snap["allocated"] > 0
    assert memory_snapshot(None)["device"] == "cpu"
    info = memory_info("cpu")
    assert isinstance(info, MemoryInfo) and info.total == snap["total"] and 0 < info.free <= info.total
    # the reporter's default memory source is the CPU snapshot for a CPU device
    sent = []
    ProgressReporter(sent.append, "1", "r", 10, device="cpu").phase("caching")
    assert sent[0]["mem"]["device"] == "cpu" and sent[0]["mem"]["total"] == snap["total"]


def test_reset_peak_memory_is_a_no_op_on_the_cpu(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: calls.append(dev))
    for device in ("cpu", None, torch.device("cpu"), "mps"):
        reset_peak_memory(device)  # never touches CUDA (which may not even be built in)
    assert calls == []
    assert memory_snapshot("cpu")["peak"] > 0  # the snapshot still works after it


def test_reset_peak_memory_resets_the_cuda_counter_of_that_device(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: calls.append(dev))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    reset_peak_memory("cuda")
    reset_peak_memory(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_emit_failures_never_break_training(caplog):
    calls = []

    def broken(p):
        calls.append(p)
        raise ConnectionResetError("socket closed")

    clock = FakeClock()
    rep = ProgressReporter(broken, "5", "r", 100, clock=clock, memory=lambda: 1 / 0)
    with caplog.at_level("WARNING", logger="loralab"):
        rep.phase("training")
        for s in range(1, 50):
            clock.advance(0.3)
            rep.step(s, 0.1, 1e-4)
        rep.done()
    assert len(calls) == 51
    assert calls[0]["mem"]["device"] == "unknown"  # a failing memory source does not stop events either
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # one for emit, one for memory: logged once each


def test_fanout_isolates_sinks():
    got = []

    def bad(p):
        raise OSError("disk full")

    emit = fanout(bad, None, got.append)
    emit({"a": 1})
    emit({"a": 2})
    assert got == [{"a": 1}, {"a": 2}]


def test_unknown_phase_is_rejected():
    rep, sent, clock = make()
    with pytest.raises(ValueError):
        rep.phase("sleeping")


def test_payload_is_finite_json_even_with_tensor_inputs():
    torch = pytest.importorskip("torch")
    rep, sent, clock = make()
    rep.step(1, torch.tensor(0.25), torch.tensor(1e-4))
    check_schema(sent[-1])
    assert sent[-1]["loss"] == pytest.approx(0.25) and math.isclose(sent[-1]["lr"], 1e-4, rel_tol=1e-6)


def test_eta_counts_the_previews_and_saves_still_to_come_at_their_measured_cost():
    # 2 it/s, a preview every 10 steps that takes 30 s, a save every 25 steps that takes 2 s, 100 steps
    rep, sent, clock = make(total=100, preview_every=10, save_every=25)
    rep.phase("training")
    for s in range(1, 11):
        clock.advance(0.5)
        rep.step(s, 0.1, 1e-4)
    rep.flush()
    before = sent[-1]
    assert before["eta_detail"] == {"training_s": pytest.approx(45.0), "previews_left": 10, "preview_cost_s": None,
                                    "saves_left": 3, "save_cost_s": None}
    assert before["eta_s"] == pytest.approx(45.0)  # nothing measured yet: only what is known
    rep.report("preview", step=10)  # the loop announces the preview, renders it, then announces the image
    clock.advance(30)
    rep.preview(10, "/step_10.png")
    during = sent[-1]
    assert during["phase"] == "preview" and during["eta_detail"]["preview_cost_s"] == pytest.approx(30.0)
    assert during["eta_detail"]["previews_left"] == 9  # 20..100; the one of step 10 is done
    assert during["eta_s"] == pytest.approx(45.0 + 9 * 30.0)
    for s in range(11, 26):
        clock.advance(0.5)
        rep.step(s, 0.1, 1e-4)
    rep.report("saving", step=25)
    clock.advance(2)  # the snapshot
    clock.advance(0.5)  # step 26 computes; its report ends the save (that step's time is not the save's)
    rep.step(26, 0.1, 1e-4)
    assert rep.costs == {"preview": pytest.approx(30.0), "saving": pytest.approx(2.0)}
    p = rep.payload()
    detail = p["eta_detail"]
    # previews at 30..100 (8, the last step included), saves at 50 and 75 (the final one is not periodic)
    assert detail["previews_left"] == 8 and detail["saves_left"] == 2
    assert detail["preview_cost_s"] == pytest.approx(30.0) and detail["save_cost_s"] == pytest.approx(2.0)
    assert detail["training_s"] == pytest.approx(74 / 2.0)
    assert p["eta_s"] == pytest.approx(37.0 + 8 * 30.0 + 2 * 2.0)
    # while a preview runs, what is left of it counts too
    for s in range(27, 31):
        clock.advance(0.5)
        rep.step(s, 0.1, 1e-4)
    rep.report("preview", step=30)
    clock.advance(10)
    p = rep.payload()
    assert p["eta_detail"]["previews_left"] == 7
    assert p["eta_s"] == pytest.approx(70 / 2.0 + 7 * 30.0 + 2 * 2.0 + (30.0 - 10.0))
    rep.done()
    assert sent[-1]["eta_s"] == 0.0


def test_eta_without_previews_or_saves_is_the_steps_left():
    rep, sent, clock = make(total=50)
    for s in range(1, 11):
        clock.advance(1.0)
        rep.step(s, 0.1, 1e-4)
    p = rep.payload()
    assert p["eta_detail"]["previews_left"] == 0 and p["eta_detail"]["saves_left"] == 0
    assert p["eta_s"] == pytest.approx(40.0)
    json.loads(json.dumps(p, allow_nan=False))
