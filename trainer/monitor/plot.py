"""Loss plot with Pillow only (no matplotlib): the run folder's ``loss.png`` and Train LoRA's IMAGE output.

``render_loss_plot(read_history(run_dir))`` draws the raw loss (light), its EMA (bold, the same bias-corrected EMA as
the live panel, :data:`trainer.monitor.events.EMA_BETA`), dashed vertical marks where previews, saves and resumes happened,
axes with 1-2-5 ticks and step labels. Long series are reduced to min/max per pixel column, so spikes stay visible.
The image is drawn at 2x and downsampled for smooth lines.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..files import atomic
from .events import EMA_BETA, ema_series

SUPERSAMPLE = 2

BG = (255, 255, 255)
PLOT_BG = (250, 251, 253)
AXIS = (120, 126, 136)
GRID = (228, 231, 236)
TEXT = (40, 44, 52)
MUTED = (110, 116, 126)
RAW = (150, 186, 226)
EMA = (26, 92, 178)
MARK_COLORS = {"preview": (156, 81, 182), "save": (38, 150, 84), "resume": (140, 140, 140)}
MARK_LABELS = {"preview": "preview", "save": "save", "resume": "resume"}

_FONT_CACHE: dict = {}


def _font(px: int):
    if px not in _FONT_CACHE:
        try:
            _FONT_CACHE[px] = ImageFont.load_default(size=px)  # Pillow >= 10.1 (scalable when FreeType is present)
        except TypeError:
            _FONT_CACHE[px] = ImageFont.load_default()
    return _FONT_CACHE[px]


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def _line_height(font) -> int:
    """Height from the drawing origin to the bottom of "Ag" (what a line of text occupies below its y)."""
    return font.getbbox("Ag")[3]


# ------------------------------------------------------------------------------------------------- numbers and ticks
def nice_step(span: float, target: int) -> float:
    """A 1-2-5 step so that about ``target`` ticks cover ``span``."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def nice_ticks(lo: float, hi: float, target: int = 5, min_step: float = 0.0) -> list[float]:
    step = max(nice_step(hi - lo, target), min_step)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(round(v, 12))
        v += step
    return ticks


def format_number(v: float, step: Optional[float] = None) -> str:
    """Readable tick/value text: decimals from the tick step; scientific for tiny or huge values."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        s = f"{v:.1e}"
        mant, exp = s.split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    if step is not None and step > 0:
        decimals = max(0, min(6, -math.floor(math.log10(step) + 1e-9)))
        frac = (step * 10 ** decimals) % 1
        if min(frac, 1 - frac) > 1e-6 and decimals < 6:  # steps like 2.5, 0.25
            decimals += 1
        return f"{v:.{decimals}f}"
    if a >= 1000:
        return f"{v:.0f}"
    return f"{v:.4g}"


def format_step(v: float) -> str:
    v = int(round(v))
    if abs(v) >= 100000:
        return f"{v / 1000:g}k"
    return str(v)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis given log10 bounds: decades, or 1-2-5 inside a narrow range."""
    d0, d1 = math.floor(lo), math.ceil(hi)
    cands = []
    mults = (1,) if d1 - d0 > 4 else ((1, 2, 5) if d1 - d0 > 1 else (1, 1.5, 2, 3, 5, 7))
    for d in range(d0, d1 + 1):
        for m in mults:
            lv = d + math.log10(m)
            if lo - 1e-9 <= lv <= hi + 1e-9:
                cands.append(lv)
    if len(cands) < 2:  # very narrow: fall back to linear ticks in value space
        vals = nice_ticks(10 ** lo, 10 ** hi, 4)
        cands = [math.log10(v) for v in vals if v > 0]
    return cands


# ------------------------------------------------------------------------------------------------------- data
def _as_history(history: Any) -> dict:
    if history is None:
        return {"steps": [], "loss": [], "marks": []}
    if isinstance(history, dict):
        loss = list(history.get("loss") or [])
        steps = list(history.get("steps") or range(1, len(loss) + 1))
        return {"steps": steps[: len(loss)], "loss": loss[: len(steps)], "marks": list(history.get("marks") or [])}
    loss = list(history)  # a plain sequence of losses
    return {"steps": list(range(1, len(loss) + 1)), "loss": loss, "marks": []}


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _minmax_columns(xs: Sequence[float], ys: Sequence[Optional[float]], x0: float, x1: float, width: int):
    """Per pixel column: (col, first, min, max, last) of the finite points; keeps spikes visible."""
    cols: dict[int, list] = {}
    span = (x1 - x0) or 1.0
    for x, y in zip(xs, ys):
        if y is None:
            continue
        c = int((x - x0) / span * (width - 1) + 0.5)
        c = min(max(c, 0), width - 1)
        e = cols.get(c)
        if e is None:
            cols[c] = [y, y, y, y]
        else:
            if y < e[1]:
                e[1] = y
            if y > e[2]:
                e[2] = y
            e[3] = y
    return sorted((c, *v) for c, v in cols.items())


def _quantile(vals: list[float], q: float) -> float:
    s = sorted(vals)
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


# ------------------------------------------------------------------------------------------------------- render
def render_loss_plot(history: Any, width: int = 800, height: int = 480, log_scale: bool = False,
                     title: str = "", ema_beta: float = EMA_BETA) -> Image.Image:
    """An RGB image of the loss curve. ``history``: :func:`trainer.monitor.runlog.read_history`'s dict (or a list of
    losses). ``log_scale`` plots log10(loss) (non-positive losses are left out)."""
    width, height = max(160, int(width)), max(120, int(height))
    S = SUPERSAMPLE
    W, H = width * S, height * S
    img = Image.new("RGB", (W, H), BG)
    draw = ImageDraw.Draw(img)
    fs = max(10, min(16, round(height / 34))) * S
    font, small, bold = _font(fs), _font(int(fs * 0.85)), _font(int(fs * 1.15))

    h = _as_history(history)
    steps = [float(s) for s in h["steps"]]
    raw = [float(v) if _finite(v) else None for v in h["loss"]]
    ema = ema_series(raw, ema_beta)

    def tr(v):
        if v is None:
            return None
        if log_scale:
            return math.log10(v) if v > 0 else None
        return v

    ty_raw = [tr(v) for v in raw]
    ty_ema = [tr(v) for v in ema]
    finite_raw = [v for v in ty_raw if v is not None]
    finite_ema = [v for v in ty_ema if v is not None]

    # ---- header: title, legend (right), summary between them when it fits
    pad = 10 * S
    title = title or "Training loss"
    tw, _ = _text_size(draw, title, bold)
    th = _line_height(bold)
    header_h = th + pad * 2
    draw.text((pad, pad), title, font=bold, fill=TEXT)

    kinds = [m.get("mark") for m in h["marks"] if isinstance(m, dict)]
    legend = [("loss", RAW, 2 * S, False), (f"EMA ({ema_beta:g})", EMA, 3 * S, False)]
    for k in ("preview", "save", "resume"):
        if k in kinds:
            legend.append((MARK_LABELS[k], MARK_COLORS[k], 2 * S, True))

    def legend_width(items) -> int:
        return sum(_text_size(draw, lab, small)[0] + 6 * S + (10 if d else 24) * S + 10 * S for lab, _, _, d in items)

    while len(legend) > 2 and legend_width(legend) > W - tw - 3 * pad:
        legend.pop()  # very narrow image: keep loss / EMA
    ly = pad + th // 2
    x = W - pad
    for label, color, lw, dashed in reversed(legend):
        x -= _text_size(draw, label, small)[0]
        draw.text((x, ly - _line_height(small) // 2), label, font=small, fill=TEXT)
        x -= 6 * S
        if dashed:
            draw.line([(x - 4 * S, ly - 7 * S), (x - 4 * S, ly + 7 * S)], fill=color, width=lw)
            x -= 10 * S
        else:
            draw.line([(x - 18 * S, ly), (x, ly)], fill=color, width=lw)
            x -= 24 * S
        x -= 10 * S
    legend_left = x

    if steps and finite_raw:
        last_loss = next((v for v in reversed(raw) if v is not None), None)
        last_ema = next((v for v in reversed(ema) if v is not None), None)
        summary = f"step {format_step(steps[-1])}"
        if last_loss is not None:
            summary += f"   loss {format_number(last_loss)}"
        if last_ema is not None:
            summary += f"   EMA {format_number(last_ema)}"
        if log_scale:
            summary += "   (log)"
        sw, _ = _text_size(draw, summary, small)
        sx = pad + tw + 2 * pad
        if sx + sw < legend_left - pad:
            draw.text((sx, ly - _line_height(small) // 2), summary, font=small, fill=MUTED)

    # ---- axes ranges
    if finite_raw:
        lo = min(finite_raw + finite_ema)
        hi_all = max(finite_raw + finite_ema)
        hi = hi_all
        if len(finite_raw) >= 50:  # single spikes should not flatten the curve (they are clipped at the edge)
            lo_all = lo
            lo = min(_quantile(finite_raw, 0.01), min(finite_ema))
            hi = max(_quantile(finite_raw, 0.99), max(finite_ema))
            spread = hi - lo
            lo = max(lo_all, lo - spread * 0.15)
            hi = min(hi_all, hi + spread * 0.15)
        if hi - lo <= 1e-12:
            d = abs(hi) * 0.1 or (0.1 if not log_scale else 0.05)
            lo, hi = lo - d, hi + d
        padv = (hi - lo) * 0.05
        lo, hi = lo - padv, hi + padv
        if not log_scale and lo < 0 <= min(finite_raw):
            lo = 0.0
    else:
        lo, hi = (0.0, 1.0) if not log_scale else (-2.0, 0.0)
    x0 = steps[0] if steps else 0.0
    x1 = steps[-1] if steps else 1.0
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1

    yt = _log_ticks(lo, hi) if log_scale else nice_ticks(lo, hi, max(3, min(8, height // 70)))
    ystep = (yt[1] - yt[0]) if len(yt) > 1 else (hi - lo)
    ylabels = [format_number(10 ** v) if log_scale else format_number(v, ystep) for v in yt]
    label_w = max([_text_size(draw, s, font)[0] for s in ylabels] + [10 * S])
    left = pad + label_w + 8 * S
    right = W - pad - 4 * S
    top = header_h + 4 * S
    xlabel_h = _line_height(font)
    cap_h = _line_height(small)
    bottom = H - pad - cap_h - xlabel_h - 10 * S
    pw, ph = right - left, bottom - top

    def px(xv: float) -> float:
        return left + (xv - x0) / (x1 - x0) * pw

    def py(yv: float) -> float:
        yv = min(max(yv, lo), hi)
        return bottom - (yv - lo) / (hi - lo) * ph

    draw.rectangle([left, top, right, bottom], fill=PLOT_BG)

    # grid + y labels
    for v, s in zip(yt, ylabels):
        y = py(v)
        draw.line([(left, y), (right, y)], fill=GRID, width=S)
        tw_, _ = _text_size(draw, s, font)
        draw.text((left - 8 * S - tw_, y - xlabel_h * 0.55), s, font=font, fill=MUTED)
    # x ticks
    xt = [v for v in nice_ticks(x0, x1, max(2, min(10, width // 110)), min_step=1.0) if x0 <= v <= x1]
    for v in xt:
        x = px(v)
        draw.line([(x, top), (x, bottom)], fill=GRID, width=S)
        draw.line([(x, bottom), (x, bottom + 5 * S)], fill=AXIS, width=S)
        s = format_step(v)
        tw_, _ = _text_size(draw, s, font)
        draw.text((min(max(x - tw_ / 2, left - 4 * S), W - pad - tw_), bottom + 6 * S), s, font=font, fill=MUTED)
    cap = "step"
    cw, _ = _text_size(draw, cap, small)
    draw.text((left + (pw - cw) / 2, bottom + 6 * S + xlabel_h + 3 * S), cap, font=small, fill=MUTED)
    draw.line([(left, bottom), (right, bottom)], fill=AXIS, width=S)
    draw.line([(left, top), (left, bottom)], fill=AXIS, width=S)

    if not finite_raw:
        msg = "no loss recorded yet"
        mw, mh = _text_size(draw, msg, bold)
        draw.text((left + (pw - mw) / 2, top + (ph - mh) / 2), msg, font=bold, fill=MUTED)
        return img.resize((width, height), Image.LANCZOS)

    # marks
    for m in h["marks"]:
        if not isinstance(m, dict) or m.get("mark") not in MARK_COLORS:
            continue
        try:
            s = float(m["step"])
        except (KeyError, TypeError, ValueError):
            continue
        if not x0 <= s <= x1:
            continue
        x = px(s)
        color = MARK_COLORS[m["mark"]]
        y = top
        dash = 6 * S
        while y < bottom:
            draw.line([(x, y), (x, min(y + dash, bottom))], fill=color, width=max(1, int(1.5 * S)))
            y += dash * 2
        r = 4 * S
        if m["mark"] == "save":
            draw.rectangle([x - r, top - r, x + r, top + r], fill=color)
        else:
            draw.polygon([(x - r, top - r), (x + r, top - r), (x, top + r)], fill=color)

    # raw loss: min/max per pixel column of the plot's width (in supersampled pixels / S)
    cols = _minmax_columns(steps, ty_raw, x0, x1, max(2, pw // S))
    colw = pw / max(1, (max(2, pw // S) - 1))
    pts = []
    for c, first, mn, mx, last in cols:
        x = left + c * colw
        pts.append((x, first, mn, mx, last))
    prev = None
    for x, first, mn, mx, last in pts:
        if prev is not None:
            draw.line([(prev[0], py(prev[1])), (x, py(first))], fill=RAW, width=int(1.5 * S))
        if mx > mn:
            draw.line([(x, py(mn)), (x, py(mx))], fill=RAW, width=int(1.5 * S))
        prev = (x, last)
    if len(pts) == 1:
        x, first = pts[0][0], pts[0][1]
        draw.ellipse([x - 3 * S, py(first) - 3 * S, x + 3 * S, py(first) + 3 * S], fill=RAW)

    # EMA: bold; average per column is enough (it is smooth)
    ecols = _minmax_columns(steps, ty_ema, x0, x1, max(2, pw // S))
    eline = [(left + c * colw, py(last)) for c, first, mn, mx, last in ecols]
    if len(eline) >= 2:
        draw.line(eline, fill=EMA, width=3 * S, joint="curve")
    elif eline:
        x, y = eline[0]
        draw.ellipse([x - 4 * S, y - 4 * S, x + 4 * S, y + 4 * S], fill=EMA)

    return img.resize((width, height), Image.LANCZOS)


def save_loss_plot(history: Any, path: str | os.PathLike, **kwargs) -> Image.Image:
    """Render and write a PNG atomically (``<run_dir>/loss.png``); returns the image."""
    img = render_loss_plot(history, **kwargs)
    atomic.write_with(path, lambda p: img.save(p, format="PNG"))
    return img


def image_to_tensor(img: Image.Image):
    """A PIL image -> ComfyUI IMAGE tensor ``(1, H, W, 3)`` float32 in [0, 1] (torch is imported here)."""
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).unsqueeze(0)
