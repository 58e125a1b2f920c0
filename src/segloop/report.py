"""`segloop report`: one Markdown table of the per-domain metrics `segloop evaluate` wrote.

Reads metrics.json files only: no model, so no torch (the command answers at once).
"""

from __future__ import annotations

import json
from pathlib import Path


def domain_table(eval_dir: Path, reference: str = "base") -> str:
    """Markdown table of every `eval_dir/<domain>/metrics.json`, with the gap to `reference`."""
    rows = {
        d.name: json.loads((d / "metrics.json").read_text())
        for d in sorted(eval_dir.iterdir())
        if (d / "metrics.json").is_file()
    }
    if not rows:
        raise FileNotFoundError(f"{eval_dir}: no <domain>/metrics.json inside")
    ref = rows.get(reference, {}).get("miou")
    classes = list(next(iter(rows.values()))["per_class_iou"])
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "| domain | mIoU | vs " + reference + " | Dice | pixel acc | " + " | ".join(classes) + " | images |",
        "|---" * (6 + len(classes)) + "|",
    ]
    for name, m in rows.items():
        gap = "" if ref is None or name == reference else f"{100 * (m['miou'] - ref):+.1f} pts"
        per_class = " | ".join(fmt(m["per_class_iou"][c]) for c in classes)
        lines.append(
            f"| {name} | {fmt(m['miou'])} | {gap} | {fmt(m['dice'])} | {fmt(m['pixel_accuracy'])} | {per_class} | "
            f"{m['n_images']} |"
        )
    return "\n".join(lines)
