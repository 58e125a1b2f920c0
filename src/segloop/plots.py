"""Pictures people would rather look at than read: confusion matrices, overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from segloop.data.files import IGNORE_INDEX  # noqa: E402


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: distinct ones for classes, white for ignore."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    for k in range(num_classes):
        colours[k] = np.array(cmap(k % cmap.N)[:3]) * 255
    colours[IGNORE_INDEX] = 255
    return colours


def save_overlay(
    path: Path,
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    classes: list[str] | None = None,
) -> None:
    """image (H, W, C) uint8 | truth | prediction, side by side, titled, with a legend of the class colours."""
    from matplotlib.patches import Patch

    colours = palette(num_classes)
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    names = classes or [str(k) for k in range(num_classes)]
    h, w = image.shape[:2]
    scale = max(1.0, 160 / max(h, w))  # small images get room for the titles and legend text
    fig, axes = plt.subplots(1, 3, figsize=(3 * w * scale / 100 + 0.4, h * scale / 100 + 0.9), dpi=100)
    for ax, title, panel in zip(
        axes, ("image", "truth", "prediction"), (rgb, colours[truth.astype(np.uint8)], colours[pred.astype(np.uint8)])
    ):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    handles = [Patch(color=colours[k] / 255, label=name) for k, name in enumerate(names)]
    if (truth == IGNORE_INDEX).any():
        handles.append(Patch(facecolor="white", edgecolor="black", label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.22, wspace=0.03)
    fig.savefig(path)
    plt.close(fig)


def save_confusion(path: Path, cm: np.ndarray, classes: list[str]) -> None:
    """Row-normalised confusion matrix (rows = truth) with the counts' shares printed."""
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = 1.2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_accuracy_matrix(
    path: Path, r: np.ndarray, domains: list[str], title: str = "", steps: list[str] | None = None
) -> None:
    """Heatmap of R[i][j] = mIoU on domain j after step i (steps: row labels, default
    "after <domain i>"); NaN = not measured."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(domains), 1.0 + 0.8 * len(r)))
    im = ax.imshow(r, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(r)), steps or [f"after {d}" for d in domains[: len(r)]])
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            if r[i, j] == r[i, j]:
                ax.text(j, i, f"{r[i, j]:.2f}", ha="center", va="center", color="white" if r[i, j] < 0.6 else "black")
    ax.set_xlabel("evaluated on")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="mIoU")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_domain_curves(
    path: Path, curves: dict[str, np.ndarray], domains: list[str], steps: list[str] | None = None
) -> None:
    """One panel per strategy: mIoU of each domain over the steps of the stream
    (steps: x labels, default the domains)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.0), sharey=True, squeeze=False)
    for ax, (name, r) in zip(axes[0], curves.items()):
        for j, domain in enumerate(domains):
            ax.plot(range(len(r)), r[:, j], marker="o", label=domain)
        ax.set_title(name)
        ax.set_xticks(range(len(r)), steps or domains[: len(r)], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mIoU")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
