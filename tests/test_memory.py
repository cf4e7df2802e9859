"""The memory estimator: breakdown, each knob's direction, the trace model, refusal, the OOM report."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from trainer.config import TrainConfig
from trainer.errors import TrainingError
from trainer.hosts.base import MemoryInfo
from trainer.preflight import activation_trace as T
from trainer.preflight import memory as M


@pytest.fixture(scope="module")
def host(tiny_models):
    from trainer.hosts.diffusers_host import DiffusersHost

    return DiffusersHost(tiny_models("sd15"))


def cfg_with(**changes) -> TrainConfig:
    cfg = TrainConfig(batch_size=1)
    network = changes.pop("network", {})
    optimizer = changes.pop("optimizer", {})
    cfg = dataclasses.replace(cfg, **changes)
    cfg.network = dataclasses.replace(cfg.network, **network)
    cfg.optimizer = dataclasses.replace(cfg.optimizer, **optimizer)
    return cfg


def estimate(host, cfg=None, buckets=((256, 256),), batch=None, suggest=False, **kw):
    kw.setdefault("resident_encoders", False)
    return M.estimate_training_memory(host, cfg or cfg_with(), list(buckets), batch, suggest=suggest, **kw)


def part(est, prefix: str) -> int:
    found = [v for k, v in est.breakdown.items() if k.startswith(prefix)]
    assert found, f"no '{prefix}' in {list(est.breakdown)}"
    return sum(found)


def test_breakdown_total_text_and_dict(host):
    est = estimate(host, cfg_with(ema_decay=0.999), suggest=True, resident_encoders=True)
    for prefix in ("model weights", "text encoders", "VAE", "LoRA adapters", "gradients", "optimizer state",
                   "EMA copy", "activations", "process baseline", "step overhead"):
        assert part(est, prefix) >= 0
    assert est.total == sum(est.breakdown.values())
    weights = sum(p.numel() * p.element_size() for p in host.unet.parameters())
    assert part(est, "model weights") >= weights
    assert est.verdict in M.VERDICTS and est.device == "cpu"
    assert est.available == est.device_free + est.resident
    text = est.to_text()
    assert est.verdict.upper() in text and "activations" in text and "To use less memory" in text
    data = json.loads(json.dumps(est.to_dict()))
    assert data["total"] == est.total and data["breakdown"][0]["label"] == "model weights"
    assert data["suggestions"] and data["suggestions"][0]["saves"] > 0


def test_adapter_count_matches_formula(host):
    cfg = cfg_with(network={"rank": 8})
    est = estimate(host, cfg)
    targets = host.adapter_targets("transformer", False, False)
    expected = 0
    for t in targets:
        m = t.module
        if isinstance(m, torch.nn.Conv2d):
            expected += 8 * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * 8
        else:
            expected += 8 * (m.in_features + m.out_features)
    assert est.settings["adapter_params"] == expected
    assert part(est, "LoRA adapters") == 4 * expected == part(est, "gradients")
    assert part(est, "optimizer state") == 8 * expected  # AdamW: two fp32 moments


def test_rank_raises_adapters_and_optimizer(host):
    low, high = estimate(host, cfg_with(network={"rank": 4})), estimate(host, cfg_with(network={"rank": 16}))
    for prefix in ("LoRA adapters", "gradients", "optimizer state", "activations"):
        assert part(high, prefix) > part(low, prefix), prefix
    assert high.total > low.total


def test_checkpointing_lowers_activations(host):
    plain = estimate(host, cfg_with(gradient_checkpointing=False), buckets=((512, 512),))
    ckpt = estimate(host, cfg_with(gradient_checkpointing=True), buckets=((512, 512),))
    assert part(ckpt, "activations") < 0.7 * part(plain, "activations")
    assert not any("fixed ratio" in n for n in ckpt.notes)  # traced, not the fallback ratio


def test_batch_and_resolution_raise_activations(host):
    one = part(estimate(host, batch=1), "activations")
    four = part(estimate(host, batch=4), "activations")
    assert 3.5 * one < four <= 4.01 * one
    small = part(estimate(host, buckets=((256, 256),)), "activations")
    big = part(estimate(host, buckets=((512, 512), (256, 256))), "activations")  # the largest bucket counts
    assert 3.5 * small < big < 4.2 * small


def test_eight_bit_and_adafactor_lower_optimizer_state(host):
    adamw = part(estimate(host, cfg_with(optimizer={"name": "adamw"})), "optimizer state")
    eight = part(estimate(host, cfg_with(optimizer={"name": "adamw8bit"})), "optimizer state")
    factor = part(estimate(host, cfg_with(optimizer={"name": "adafactor"})), "optimizer state")
    assert eight < adamw / 3 and factor < adamw / 3


def test_mixed_precision_and_encoders(host):
    fp32 = estimate(host, buckets=((512, 512),))
    bf16 = estimate(host, cfg_with(mixed_precision="bf16"), buckets=((512, 512),))
    assert part(bf16, "activations") < part(fp32, "activations")
    resident = estimate(host, resident_encoders=True)
    assert "text encoders" in resident.breakdown and "VAE" in resident.breakdown
    assert "text encoders" not in fp32.breakdown
    te = estimate(host, cfg_with(network={"train_text_encoder": True}))
    assert "text encoders" in te.breakdown and part(te, "text-encoder activations") > 0
    assert te.settings["adapter_params"] > fp32.settings["adapter_params"]


def test_suggestions_are_ranked_reestimates(host):
    est = estimate(host, cfg_with(network={"rank": 16}), buckets=((512, 512),), batch=4, suggest=True)
    assert est.suggestions
    saves = [s.saves for s in est.suggestions]
    assert saves == sorted(saves, reverse=True) and min(saves) > 0
    changes = " | ".join(s.change for s in est.suggestions)
    for needle in ("gradient_checkpointing", "batch_size 4 -> 2", "network.rank 16 -> 8", "resolution",
                   "mixed_precision"):
        assert needle in changes
    ckpt = next(s for s in est.suggestions if "gradient_checkpointing" in s.change)
    alone = estimate(host, cfg_with(network={"rank": 16}, gradient_checkpointing=True), buckets=((512, 512),),
                     batch=4)
    assert abs(ckpt.total - alone.total) < 0.02 * alone.total


def test_trace_fit_extrapolates_exactly(host):
    """The fitted polynomial predicts a larger trace it never saw (sd15 tiny UNet, side 40)."""
    targets = host.adapter_targets("transformer", False, False)
    ranks = [4] * len(targets)
    fit = M.trace_denoiser(host, targets, ranks, checkpointing=False)
    predicted, _ = fit.saved(3, 40 * 40, checkpointing=False)
    text = T._text_shapes(host)
    denoiser = host.denoiser()
    with T._grad_mode(), T._Adapters(targets, ranks, 0.0) as adapters:
        exclude = T._exclude_ptrs(denoiser) | {p.untyped_storage().data_ptr() for p in adapters.params}

        def run():
            noisy, t, cond = T._dummy_inputs(host, 3, 40, text)
            return host.predict(noisy, t, cond)

        measured = T._trace_once(run, denoiser, exclude, adapters, want_regions=False).total
    assert predicted == pytest.approx(measured, rel=0.01)


def test_adapter_emulation_matches_the_real_network(host):
    """Calibration against trainer/adapters/network.py: saved bytes of a real LoRANetwork forward vs the estimate's."""
    network_mod = pytest.importorskip("trainer.adapters.network")
    cfg = cfg_with(network={"rank": 8})
    targets = host.adapter_targets("transformer", False, False)
    network = network_mod.LoRANetwork(targets, cfg.network)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.01)
    denoiser = host.denoiser()
    params = {t.untyped_storage().data_ptr() for t in list(denoiser.parameters()) + list(network.parameters())
              + list(denoiser.buffers()) + list(network.buffers())}
    seen: dict[int, int] = {}
    alive = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            alive.append(t)
        return None

    side, batch = 32, 2
    noisy, t, cond = T._dummy_inputs(host, batch, side, T._text_shapes(host))
    with T._grad_mode(), network.attached(), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        out = host.predict(noisy, t, cond)
        del out
    measured = sum(seen.values())
    est = estimate(host, cfg, buckets=((side * 8, side * 8),), batch=batch)
    assert part(est, "activations") == pytest.approx(measured * M.ACTIVATION_PEAK_FACTOR, rel=0.05)


def test_estimate_leaves_the_model_untouched(host):
    unet = host.unet
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in unet.parameters())).hexdigest()
    estimate(host, cfg_with(gradient_checkpointing=True, mixed_precision="bf16"), suggest=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())
    assert not any(p.requires_grad for p in unet.parameters())
    assert not unet.is_gradient_checkpointing
    assert hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in unet.parameters())).hexdigest() == digest


def test_math_attention_is_quadratic(host):
    sdpa = part(estimate(host, buckets=((512, 512),), attention="sdpa"), "activations")
    math_ = estimate(host, buckets=((512, 512),), attention="math")
    assert part(math_, "activations") > 1.5 * sdpa
    assert math_.activation_model["quadratic"] > 0
    with pytest.raises(ValueError):
        estimate(host, attention="bogus")


def test_untraceable_host_uses_the_fallback(host):
    class Broken:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def predict(self, *args, **kwargs):
            raise RuntimeError("cannot call this denoiser")

    est = estimate(Broken(host), buckets=((512, 512),))
    assert part(est, "activations") > 0
    assert any("rough formula" in n for n in est.notes)


def _fake_memory(host, free: int):
    real = type(host).memory(host)
    return MemoryInfo(device="cpu", allocated=real.allocated, reserved=real.reserved, peak=real.peak,
                      total=real.total, free=free)


def test_verdicts_follow_free_memory(host, monkeypatch):
    roomy = estimate(host)
    assert roomy.verdict == "fits" and M.check_fits(roomy) is None
    monkeypatch.setattr(M, "_cpu_available", lambda: 1)
    monkeypatch.setattr(host, "memory", lambda: _fake_memory(host, 1), raising=False)
    squeezed = estimate(host, buckets=((512, 512),), batch=4, suggest=True)
    assert squeezed.verdict == "does not fit" and squeezed.margin < 0
    with pytest.raises(TrainingError) as err:
        M.check_fits(squeezed, override=False)
    text = str(err.value)
    assert "Not enough memory" in text and "allow_over_memory" in text and "activations" in text
    assert squeezed.suggestions[0].change in text  # the top suggestion, by name
    warning = M.check_fits(squeezed, override=True)
    assert "starting anyway" in warning
    # "tight": available between total*(1+safety) and total*(1+tight margin)
    need_free = int(roomy.total * 1.15) - roomy.resident
    monkeypatch.setattr(M, "_cpu_available", lambda: need_free)
    monkeypatch.setattr(host, "memory", lambda: _fake_memory(host, need_free), raising=False)
    tight = estimate(host)
    assert tight.verdict == "tight" and "tight" in M.check_fits(tight)


def test_batch_table_finds_the_largest_batch_that_fits(host, monkeypatch):
    est = estimate(host, batch=1, batch_table=(1, 2, 4, 8))
    totals = [est.by_batch[b][0] for b in (1, 2, 4, 8)]
    assert totals[0] == est.total and totals == sorted(totals) and totals[3] > totals[0]
    # the same trace: batch 4's table entry equals the estimate made at batch 4
    assert est.by_batch[4][0] == pytest.approx(estimate(host, batch=4).total, rel=0.02)
    # available memory between what batch 2 and batch 4 need: 2 is the largest that fits
    need2, need4 = int(totals[1] * (1 + M.SAFETY_MARGIN)), int(totals[2] * (1 + M.SAFETY_MARGIN))
    free = (need2 + need4) // 2 - est.resident
    monkeypatch.setattr(M, "_cpu_available", lambda: free)
    monkeypatch.setattr(host, "memory", lambda: _fake_memory(host, free), raising=False)
    squeezed = estimate(host, batch=1, batch_table=(1, 2, 4, 8))
    assert [squeezed.by_batch[b][1] != "does not fit" for b in (1, 2, 4, 8)] == [True, True, False, False]
    assert squeezed.largest_fitting_batch == 2
    assert "largest that fits: 2" in squeezed.to_text()
    assert json.loads(json.dumps(squeezed.to_dict()))["by_batch"][2]["verdict"] == "does not fit"


def test_the_figure_compared_with_the_peak_follows_the_device(host):
    est = estimate(host)
    assert est.comparable_peak == est.total  # CPU: the peak is the process's peak RSS
    on_gpu = dataclasses.replace(est, device="cuda:0")
    assert on_gpu.comparable_peak == on_gpu.tensor_total < on_gpu.total  # GPU: max_memory_allocated (tensors)


def test_oom_report_compares_estimate_and_peak(host):
    est = estimate(host, batch=2, suggest=True)
    text = M.oom_report(est, est.total // 2, step=7)
    assert "step 7" in text and M.fmt_bytes(est.total) in text and "something else" in text
    assert est.suggestions[0].change in text
    over = M.oom_report(est, est.total * 2, step=1)
    assert "more than estimated" in over
    assert "no memory estimate" in M.oom_report(None, None, step=3)


def test_optimizer_state_fallback_table():
    assert M.optimizer_state_bytes("sgd", 1000, momentum=0) == 0
    shapes = [(8, 320), (320, 8)]
    n = 2 * 8 * 320
    # our own per-shape numbers (used when trainer.training.optim is unavailable) stay below AdamW's 8 B/param
    assert M.OPTIMIZER_STATE["adamw8bit"] * n < 8 * n
    assert M.optimizer_state_bytes("adamw", n, shapes) == 8 * n
