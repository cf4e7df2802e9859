"""Loss plot (Pillow only): size, content, differences between histories, atomic save, IMAGE tensor."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image

from trainer.monitor.plot import (
    EMA,
    MARK_COLORS,
    RAW,
    format_number,
    image_to_tensor,
    nice_ticks,
    render_loss_plot,
    save_loss_plot,
)


def history(n=400, seed=0, scale=1.0, marks=True):
    rng = random.Random(seed)
    steps = list(range(1, n + 1))
    loss = [scale * (0.05 + 0.2 * math.exp(-s / 120) + abs(rng.gauss(0, 0.02))) for s in steps]
    m = [{"step": n // 4, "mark": "preview", "file": "a.png"}, {"step": n // 2, "mark": "save"}] if marks else []
    return {"steps": steps, "loss": loss, "lr": [1e-4] * n, "marks": m}


def near(arr: np.ndarray, rgb, tol=40) -> int:
    """Pixels within `tol` (per channel) of a colour."""
    return int((np.abs(arr.astype(int) - np.array(rgb)).max(axis=2) <= tol).sum())


def test_renders_at_the_requested_size():
    img = render_loss_plot(history(), width=640, height=360, title="test")
    assert isinstance(img, Image.Image)
    assert img.size == (640, 360) and img.mode == "RGB"
    img2 = render_loss_plot(history(), width=800, height=480)
    assert img2.size == (800, 480)


def test_draws_raw_loss_ema_and_marks():
    arr = np.asarray(render_loss_plot(history()))
    assert near(arr, EMA, 30) > 400  # the bold EMA line
    assert near(arr, RAW, 25) > 400  # the raw loss
    assert near(arr, MARK_COLORS["preview"], 30) > 50
    assert near(arr, MARK_COLORS["save"], 30) > 50
    no_marks = np.asarray(render_loss_plot(history(marks=False)))
    assert near(no_marks, MARK_COLORS["preview"], 30) < 5


def test_different_histories_give_different_images():
    a = np.asarray(render_loss_plot(history(seed=1)))
    b = np.asarray(render_loss_plot(history(seed=2)))
    c = np.asarray(render_loss_plot(history(seed=1, scale=3.0)))
    assert (a != b).any(axis=2).sum() > 500
    assert (a != c).any(axis=2).sum() > 500
    # the same history renders identically (deterministic)
    assert (a == np.asarray(render_loss_plot(history(seed=1)))).all()
    # log scale is a different drawing of the same data
    assert (a != np.asarray(render_loss_plot(history(seed=1), log_scale=True))).any(axis=2).sum() > 500


def test_curve_goes_down_for_a_decreasing_loss():
    """The EMA's pixels on the left are higher on the image (smaller y) than on the right."""
    arr = np.asarray(render_loss_plot(history(n=300), width=800, height=480))
    mask = (np.abs(arr.astype(int) - np.array(EMA)).max(axis=2) <= 30)
    ys, xs = np.nonzero(mask[60:])  # below the legend
    left = ys[xs < 250].mean()
    right = ys[xs > 650].mean()
    assert left < right - 50


def test_empty_short_and_odd_inputs():
    assert render_loss_plot({"steps": [], "loss": []}).size == (800, 480)
    assert render_loss_plot(None).size == (800, 480)
    assert render_loss_plot([0.5]).size == (800, 480)  # a plain list of losses, one point
    assert render_loss_plot([0.5, float("nan"), None, 0.3]).size == (800, 480)
    assert render_loss_plot([1.0, 1.0, 1.0]).size == (800, 480)  # flat
    assert render_loss_plot([0.0, -0.1, 0.2], log_scale=True).size == (800, 480)  # non-positive in log scale
    assert render_loss_plot(history(n=100_000, marks=False), width=300, height=200).size == (300, 200)


def test_tick_and_number_formatting():
    assert nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.07, 0.31, 4) == pytest.approx([0.1, 0.2, 0.3])
    assert nice_ticks(0.07, 0.31, 8) == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3])
    assert format_number(0.25, 0.05) == "0.25"
    assert format_number(0.0001) == "1e-4"
    assert format_number(12345.0) == "12345"
    assert format_number(0.123456) == "0.1235"
    assert format_number(250000.0) == "2.5e5"


def test_save_is_atomic_png(tmp_path):
    target = tmp_path / "run" / "loss.png"
    img = save_loss_plot(history(), target, width=400, height=240)
    assert target.exists()
    with Image.open(target) as im:
        assert im.format == "PNG" and im.size == (400, 240)
    assert img.size == (400, 240)
    assert [p.name for p in target.parent.iterdir()] == ["loss.png"]  # no temp files left


def test_image_to_tensor_is_a_comfy_image():
    torch = pytest.importorskip("torch")
    img = render_loss_plot(history(), width=320, height=200)
    t = image_to_tensor(img)
    assert isinstance(t, torch.Tensor)
    assert tuple(t.shape) == (1, 200, 320, 3) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert float(t.max()) == 1.0  # white background
    assert np.allclose(t[0].numpy() * 255.0, np.asarray(img), atol=0.5)
