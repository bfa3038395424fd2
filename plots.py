"""Training pictures from results/metrics.jsonl: loss curves of both stages and codebook usage.

    update_plots(results_dir)                             # -> results_dir/loss_curves.png
    plot_codebook_usage(counts, metrics_path, out_png)    # -> codebook_usage.png

Both are called from the training loops, so they must be cheap and may never stop a run: any error
becomes one warning per function, and the function returns None. Drawing uses matplotlib's Agg
canvas directly (no pyplot, no global backend switch), and the PNG is written to a temp file and
then renamed, so a viewer never sees a half-written picture. metrics.jsonl is read incrementally:
only the lines appended since the last call are parsed.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Stage-one panels: (title, [(key, label), ...]); val_* keys come from the epoch-end validation.
VQGAN_PANELS = (
    ("reconstruction (L1)", [("rec_loss", "train"), ("val_rec_loss", "val")]),
    ("perceptual (LPIPS)", [("perceptual_loss", "train"), ("val_perceptual_loss", "val")]),
    ("codebook", [("q_loss", "q_loss")]),
    ("GAN", [("g_loss", "generator"), ("d_loss", "discriminator")]),
    ("adaptive weight lambda", [("lambda", "lambda")]),
)
# Stage two logs the loss in nats and bits per token; the val record has bits only.
TRANSFORMER_PANEL = ("transformer (bits/token)", [("bits_per_token", "train"), ("val_bits_per_token", "val")])

MAX_POINTS = 800  # per curve; longer series are thinned after smoothing

_warned: set[str] = set()
_cache: dict[str, tuple[int, list[dict]]] = {}  # path -> (bytes parsed, records)


def _warn_once(what: str, err: Exception):
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"plots.{what} failed (training goes on; later failures are not reported): "
                      f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)


def read_metrics(path) -> list[dict]:
    """All records of a metrics.jsonl; lines that are not JSON objects (e.g. a torn last line) are skipped.

    Only bytes appended since the previous call are parsed; a file that shrank (a resume truncates
    it) is read again from the start."""
    path = Path(path)
    key = str(path.resolve())
    size = path.stat().st_size
    done, records = _cache.get(key, (0, []))
    if size < done:
        done, records = 0, []
    with open(path, "rb") as f:
        f.seek(done)
        chunk = f.read(size - done)
    end = chunk.rfind(b"\n") + 1  # leave a partly written last line for the next call
    for line in chunk[:end].splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            records.append(r)
    _cache[key] = (done + end, records)
    return records


def _series(records: list[dict], stage: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records
           if r.get("stage") == stage and key in r and "step" in r and r[key] is not None]
    if not pts:
        return np.empty(0), np.empty(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    """Trailing moving average over n points (shorter at the start)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - n, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _draw_panel(ax, records, stage, title, keys) -> bool:
    drawn = False
    for key, label in keys:
        x, y = _series(records, stage, key)
        if len(x) == 0:
            continue
        if key.startswith("val_") or len(x) < 50:
            ax.plot(x, y, marker="o" if key.startswith("val_") else None, ms=3, lw=1.2, label=label)
        else:  # noisy per-step values: faint raw curve, smoothed curve on top
            ys = _smooth(y, max(5, len(x) // 50))
            keep = slice(None, None, max(1, len(x) // MAX_POINTS))  # a panel is ~400 px wide
            line, = ax.plot(x[keep], y[keep], lw=0.6, alpha=0.3)
            ax.plot(x[keep], ys[keep], lw=1.4, color=line.get_color(), label=label)
        drawn = True
    if drawn:
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return drawn


def _save(fig: Figure, out_png: Path):
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp{os.getpid()}.png")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, out_png)


def update_plots(results_dir):
    """Rewrite results_dir/loss_curves.png from results_dir/metrics.jsonl -> its path, or None
    (no metrics yet, or an error, which is warned about once and never raised)."""
    try:
        results_dir = Path(results_dir)
        metrics = results_dir / "metrics.jsonl"
        if not metrics.is_file():
            return None
        records = read_metrics(metrics)
        panels = [("vqgan",) + p for p in VQGAN_PANELS] + [("transformer",) + TRANSFORMER_PANEL]
        present = [p for p in panels if any(r.get("stage") == p[0] and any(k in r for k, _ in p[2])
                                            for r in records)]
        if not present:
            return None
        cols = min(3, len(present))
        rows = -(-len(present) // cols)
        fig = Figure(figsize=(4.2 * cols, 2.9 * rows))
        for i, (stage, title, keys) in enumerate(present):
            _draw_panel(fig.add_subplot(rows, cols, i + 1), records, stage, title, keys)
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.93, wspace=0.3, hspace=0.45)
        out = results_dir / "loss_curves.png"
        _save(fig, out)
        return out
    except Exception as e:  # a plot must never stop training
        _warn_once("update_plots", e)
        return None


def plot_codebook_usage(counts, metrics_path, out_png):
    """Write out_png: per-code use counts (codes ranked by use) and codebook usage % over the steps
    (key codebook_usage of the stage-one records in metrics_path) -> out_png, or None on error.

    counts: (K,) uses per code (a tensor, array or list), e.g. a bincount of recent indices."""
    try:
        counts = np.asarray(counts.detach().cpu() if hasattr(counts, "detach") else counts, dtype=np.float64)
        counts = counts.reshape(-1)
        k = len(counts)
        used = int((counts > 0).sum())
        fig = Figure(figsize=(9, 3))
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9, wspace=0.25)
        ax = fig.add_subplot(1, 2, 1)
        ranked = np.sort(counts)[::-1]
        ax.stairs(ranked, np.arange(k + 1), fill=True, alpha=0.8)  # one artist, fast even for K = 16384
        ax.set_title(f"code use, ranked: {used}/{k} codes used ({100 * used / max(k, 1):.1f}%)", fontsize=9)
        ax.set_xlabel("code (sorted by count)", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        if ranked.max(initial=0) > 0:
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)

        ax = fig.add_subplot(1, 2, 2)
        if metrics_path is not None and Path(metrics_path).is_file():
            x, y = _series(read_metrics(metrics_path), "vqgan", "codebook_usage")
            if len(x):
                ax.plot(x, 100 * y, lw=1.2)
        ax.set_ylim(0, 105)
        ax.set_title("codebook usage per logged batch (%)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        out_png = Path(out_png)
        _save(fig, out_png)
        return out_png
    except Exception as e:  # a plot must never stop training
        _warn_once("plot_codebook_usage", e)
        return None
