"""The bench command's two plots: useful TF/s against sequence length, and time against sequence length
(log-log, dense extrapolated ∝ n² where it was not measured). matplotlib without global state."""

from __future__ import annotations

from pathlib import Path

__all__ = ["time_plot", "tflops_plot"]

STYLE = {"dense": ("black", "s"), "ceiling": ("tab:gray", "^"), "portable": ("tab:blue", "o"),
         "fused": ("tab:red", "D")}


def _figure(modes: list[str]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("bench plots need matplotlib: pip install 'dilated-attention-pytorch[bench]'") from err
    fig = Figure(figsize=(6 * len(modes), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, len(modes), i + 1) for i in range(len(modes))]


def _axes(ax, ylabel: str, title: str, log_y: bool) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1024:g}K" if x >= 1024 else f"{x:g}"))
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")


def _points(rows: list[dict], mode: str, method: str, key: str) -> list[tuple[int, float]]:
    return [(r["seq_len"], r[key]) for r in rows if r["mode"] == mode and r["method"] == method and r[key]]


MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward + backward"}


def tflops_plot(rows: list[dict], modes: list[str], methods: list[str], title: str, path: Path) -> None:
    fig, axes = _figure(modes)
    for ax, mode in zip(axes, modes):
        for method in methods:
            pts = _points(rows, mode, method, "tflops")
            if pts:
                color, marker = STYLE[method]
                ax.plot(*zip(*pts), marker=marker, color=color, label=method)
        _axes(ax, "useful TF/s (attended pairs only)", f"{MODE_NAMES[mode]}: {title}", log_y=False)
    fig.tight_layout()
    fig.savefig(path)


def time_plot(rows: list[dict], modes: list[str], methods: list[str], title: str, path: Path) -> None:
    fig, axes = _figure(modes)
    for ax, mode in zip(axes, modes):
        for method in (m for m in methods if m != "ceiling"):
            color, marker = STYLE[method]
            pts = _points(rows, mode, method, "ms")
            if pts:
                label = "dense attention (whole sequence)" if method == "dense" else f"dilated, {method}"
                ax.plot(*zip(*pts), marker=marker, color=color, label=label)
            est = _points(rows, mode, method, "dense_estimate_ms")
            if est and pts:
                est = [pts[-1]] + est  # the dashed line continues the measured one
                ax.plot(*zip(*est), marker=marker, color=color, ls="--", mfc="none",
                        label="dense, extrapolated ∝ n² (not run: past --dense-max or out of memory)")
        _axes(ax, "time per call (ms, median)", f"{MODE_NAMES[mode]}: {title}", log_y=True)
    fig.tight_layout()
    fig.savefig(path)
