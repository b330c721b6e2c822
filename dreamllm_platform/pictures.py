"""Pictures of a run: its loss curves and a captioned grid of the images it created.

Owns: which metrics are losses (`loss_keys`), the loss-curve figure (`loss_curves_png`: one panel per
metric group, the part of a key before `/`, x = step), the grid of created images with each prompt as a
caption under its cell (`image_grid_png`, PIL), the bar chart of an evaluation's metrics (`metrics_bar_png`),
`log_run_pictures`, which reads a training run's metric history back through its `tracking.RunLogger` and
logs both as artifacts under `plots/` (stage runs and the towers run alike), and `evaluation_pictures`, the
figures of a registry evaluation. A failure to plot (no metrics yet, a tracking outage) is a warning:
pictures never fail a run.

matplotlib and PIL are imported inside the functions (Agg backend: no display).
"""
from __future__ import annotations

import io
import sys
import textwrap
from typing import Mapping, Sequence

LOSS_WORDS = frozenset({"loss", "mse", "kl"})
"""A metric is a loss when one of the `_`-separated words of its last `/` part is one of these."""
LOSS_FILE = "plots/loss.png"
GRID_FILE = "plots/samples_grid.png"
METRICS_FILE = "plots/metrics.png"


def loss_keys(keys) -> list[str]:
    """The loss metrics among `keys`, sorted (`loss`, `vae/recon_mse`, `unet/loss`; not `lr`, `grad_norm`)."""
    return sorted(k for k in keys if LOSS_WORDS & set(k.rsplit("/", 1)[-1].lower().split("_")))


def loss_curves_png(histories: Mapping[str, Sequence[tuple[int, float]]], title: str = "") -> bytes:
    """PNG of the loss curves: one panel per group (the key's part before `/`, in the order the groups'
    metrics began), one line per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not histories:
        raise ValueError("no loss metrics to plot")
    groups: dict[str, dict] = {}
    for key in sorted(histories):
        group, _, name = key.rpartition("/")
        groups.setdefault(group, {})[name] = sorted(histories[key])
    # Panels in the order their metrics began (the towers' phases as they ran), not alphabetical.
    groups = dict(sorted(groups.items(), key=lambda g: min((p[0][0] for p in g[1].values() if p), default=0)))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.4), squeeze=False)
    for ax, (group, series) in zip(axes[0], groups.items()):
        for name, points in series.items():
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o" if len(points) < 20 else None,
                    markersize=3, label=name)
        ax.set_title(group or "losses")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def metrics_bar_png(metrics: Mapping[str, float], title: str = "") -> bytes:
    """PNG of an evaluation's metrics: one small panel per metric (their scales differ: a loss, an FID, an
    accuracy), its value written on its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        raise ValueError("no metrics to plot")
    names = sorted(metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(1.9 * len(names) + 0.6, 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        value = float(metrics[name])
        ax.bar([0], [value], color="tab:blue", width=0.6)
        ax.text(0, value, f"{value:.4g}", ha="center", va="bottom", fontsize=9)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_xlim(-0.8, 0.8)
        ax.set_ylim(min(0.0, value * 1.25), max(value * 1.25, 1e-9) if value > 0 else 1.0)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def image_grid_png(images: Sequence, captions: Sequence[str], columns: int = 4, cell: int = 160) -> bytes:
    """PNG of the images in rows of `columns`, each scaled to `cell` pixels, its caption wrapped under it."""
    from PIL import Image, ImageDraw, ImageFont

    if not images or len(images) != len(captions):
        raise ValueError(f"a grid needs one caption per image, got {len(images)} images, {len(captions)} captions")
    font = ImageFont.load_default()
    wrapped = [textwrap.wrap(c, width=max(8, cell // 7))[:4] for c in captions]
    text_h = 12 * max(len(w) for w in wrapped) + 6
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 3, y + cell + 3 + 12 * j), line, fill="black", font=font)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def log_run_pictures(log, images: Sequence = (), captions: Sequence[str] = (), title: str = "",
                     groups: Sequence[str] | None = None) -> dict[str, str]:
    """Log the run's loss curves (from its metric history in MLflow; with `groups`, only the losses of
    those groups, e.g. the towers' phases, not their one-point final figures) and, given images, their
    grid; returns {artifact file: URI} of what was logged. Every failure is one warning line, never an
    exception."""
    logged = {}
    try:
        keys = [k for k in loss_keys(log.metric_keys()) if groups is None or k.rpartition("/")[0] in groups]
        png = loss_curves_png(log.metric_histories(keys), title)
        uri = log.artifact(png, LOSS_FILE)
        if uri:
            logged[LOSS_FILE] = uri
    except Exception as e:  # noqa: BLE001 - a picture is never worth a failed run
        print(f"[tracking] warning: no loss curves for this run ({type(e).__name__}: {e})", file=sys.stderr)
    if images:
        try:
            uri = log.artifact(image_grid_png(list(images), list(captions)), GRID_FILE)
            if uri:
                logged[GRID_FILE] = uri
        except Exception as e:  # noqa: BLE001
            print(f"[tracking] warning: no sample grid for this run ({type(e).__name__}: {e})", file=sys.stderr)
    return logged


def evaluation_pictures(metrics: Mapping[str, float], images: Sequence = (), captions: Sequence[str] = (),
                        title: str = "") -> dict[str, bytes]:
    """{artifact file: PNG} of an evaluation: the bar chart of its metrics and, when it created images, their
    grid with the captions they were created from. A figure that cannot be drawn is one warning, left out."""
    figures = {}
    for name, draw in ((METRICS_FILE, lambda: metrics_bar_png(metrics, title)),
                       (GRID_FILE, lambda: image_grid_png(list(images), list(captions)) if images else None)):
        try:
            png = draw()
        except Exception as e:  # noqa: BLE001 - a picture is never worth a failed evaluation
            print(f"[tracking] warning: no {name} for this evaluation ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if png:
            figures[name] = png
    return figures
