"""``lowbit inspect``: one layer's activation outliers before and after a transform, as numbers and figures.

A transform is any function-preserving change of the float model that moves outliers
(rotation, smoothing). Each is one entry of :data:`TRANSFORMS`: a name and a function
of (model, calibration samples) that changes the model in place. This module imports
torch only when used, so the CLI can list the transforms without loading it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .eval.outliers import InputStats


def _rotate(model: nn.Module, calib: torch.Tensor) -> None:
    from .methods import RotationConfig, quantize_

    quantize_(model, RotationConfig(), calib)


def _smoothquant(model: nn.Module, calib: torch.Tensor) -> None:
    from .methods import SmoothQuantConfig, quantize_

    quantize_(model, SmoothQuantConfig(alpha=0.5), calib)


TRANSFORMS: dict[str, Callable[[nn.Module, torch.Tensor], object]] = {
    "rotate": _rotate,
    "smoothquant": _smoothquant,
}

FIGURES = ("surface", "heatmap")


def inspect_layer(model: nn.Module, calib: torch.Tensor, layer: int,
                  transform: str | None = None) -> dict[str, list[InputStats]]:
    """Stage name ("float", then the transform's) -> statistics of each input of ``layer``."""
    from .eval.outliers import activation_stats

    stages = {"float": activation_stats(model, calib, [layer], keep_sample=True)}
    if transform is not None:
        TRANSFORMS[transform](model, calib)
        stages[transform] = activation_stats(model, calib, [layer], keep_sample=True)
    return stages


def figure_paths(out_dir: Path, layer: int, stages: list[str]) -> dict[tuple[str, str], Path]:
    """(stage, figure kind) -> the PNG it is written to."""
    return {(s, k): out_dir / f"layer{layer}_{s}_{k}.png" for s in stages for k in FIGURES}


def _pooled(a: torch.Tensor, tokens: int, channels: int) -> torch.Tensor:
    """Max-pool |x| [seq, width] to at most tokens × channels, so a thin outlier stays visible."""
    import torch

    t, c = min(tokens, a.shape[0]), min(channels, a.shape[1])
    return torch.nn.functional.adaptive_max_pool2d(a[None, None], (t, c))[0, 0]


def save_figures(stages: dict[str, list[InputStats]], paths: dict[tuple[str, str], Path], title: str) -> None:
    """Per stage: a 3D surface and a heat map of |x| (token × channel), one panel per input.

    Panels of one input share their |x| scale across stages, so a flattened outlier looks flatter.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .atomic_write import atomic_path

    def save(fig, stage: str, kind: str, layer: int) -> None:
        fig.suptitle(f"{title}: layer {layer}, {stage}")
        fig.tight_layout()
        with atomic_path(paths[(stage, kind)]) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)

    n_inputs = len(next(iter(stages.values())))
    zmax = [max(float(st[i].sample.max()) for st in stages.values()) for i in range(n_inputs)]
    for stage, stats in stages.items():
        fig = plt.figure(figsize=(4.6 * n_inputs, 4.4))
        for i, s in enumerate(stats):
            a = _pooled(s.sample, 64, 128).numpy()
            ax = fig.add_subplot(1, n_inputs, i + 1, projection="3d")
            tok, ch = torch.meshgrid(torch.linspace(0, s.sample.shape[0] - 1, a.shape[0]),
                                     torch.linspace(0, s.sample.shape[1] - 1, a.shape[1]), indexing="ij")
            ax.plot_surface(ch.numpy(), tok.numpy(), a, cmap="coolwarm", linewidth=0, antialiased=False,
                            vmin=0, vmax=zmax[i])
            ax.set_zlim(0, zmax[i])
            ax.set(xlabel="channel", ylabel="token", zlabel="|x|")
            ax.set_title(f"{s.name}\nkurtosis {s.kurtosis:.1f}, max/median {s.max_median:.1f}", fontsize=9)
        save(fig, stage, "surface", stats[0].layer)

        fig, axes = plt.subplots(1, n_inputs, figsize=(4.6 * n_inputs, 3.8), squeeze=False)
        for ax, s, z in zip(axes[0], stats, zmax):
            a = _pooled(s.sample, 256, 512)
            im = ax.imshow(a.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=z, interpolation="nearest",
                           extent=(0, s.sample.shape[1], s.sample.shape[0], 0))
            ax.set(xlabel="channel", ylabel="token", title=f"{s.name}: max |x| {float(s.channel_max.max()):.3g}")
            fig.colorbar(im, ax=ax, label="|x|")
        save(fig, stage, "heatmap", stats[0].layer)


def rows(stages: dict[str, list[InputStats]], top: int = 5) -> list[dict]:
    """One flat record per stage and input."""
    return [{"stage": stage, **s.row(top)} for stage, stats in stages.items() for s in stats]
