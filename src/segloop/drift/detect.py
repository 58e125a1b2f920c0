"""One drift check: reference folder vs current batch -> drift.json + drift.html.

The step `segloop drift` and the flows call: featurise both folders (cached), run the
Evidently report, apply the decision rule (segloop.drift.decision), and, for a labelled
batch with a champion, the quality-drop check. Logging the two files to MLflow / DVC is
the caller's business.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from segloop.config import DriftSettings, EvalSettings
from segloop.data.files import list_samples
from segloop.drift.decision import (
    QualityCheck,
    decide,
    drift_record,
    evidently_report,
    quality_check,
    table_pvalues_and_mmd,
    write_json,
)
from segloop.drift.features import Champion, featurise_folder
from segloop.drift.reference import read_reference

DRIFT_JSON, DRIFT_HTML = "drift.json", "drift.html"


def check_batch_folder(folder: Path, min_images: int, role: str) -> int:
    """Number of images in `folder`; a clear error for a missing, empty or too small folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} {folder}: folder not found")
    try:
        n = len(list_samples(folder, require_masks=False))
    except ValueError as err:
        raise ValueError(f"{role} {err}") from None
    if n < min_images:
        raise ValueError(f"{role} {folder}: {n} images, drift detection needs at least {min_images} (drift.min_images)")
    return n


def _labelled(folder: Path) -> bool:
    try:
        list_samples(folder, require_masks=True)
        return True
    except (FileNotFoundError, ValueError):
        return False


def detect_drift(
    reference_dir: Path,
    current_dir: Path,
    out_dir: Path,
    cfg: DriftSettings,
    channels: int,
    champion: Champion | None = None,
    cache_dir: Path | None = None,
    eval_cfg: EvalSettings | None = None,
    champion_miou: float | None = None,
    progress: bool = True,
) -> dict:
    """Compare `current_dir` with `reference_dir`; write out_dir/drift.json and drift.html.

    Without a champion only image statistics are compared (`method` says so). With one,
    its predictions and embeddings are compared too, and a labelled batch (every image
    has a mask) is also evaluated: performance drift if its mIoU is more than
    `cfg.max_quality_drop` below `champion_miou` (default: the checkpoint's val mIoU).
    Returns the drift.json payload.
    """
    reference_dir, current_dir, out_dir = Path(reference_dir), Path(current_dir), Path(out_dir)
    n_ref = check_batch_folder(reference_dir, cfg.min_images, "reference")
    n_cur = check_batch_folder(current_dir, cfg.min_images, "current")
    channels = champion.channels if champion is not None else channels
    featurise = partial(
        featurise_folder,
        channels=channels,
        champion=champion,
        cache_dir=cache_dir,
        crop=cfg.model_crop,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    ref = featurise(reference_dir)
    cur = featurise(current_dir)

    ref_cols, cur_cols, mmd = table_pvalues_and_mmd(ref, cur, cfg)
    w = cfg.embedding_alpha_share if mmd is not None else 0.0
    column_alpha = cfg.alpha * (1 - w) / len(ref_cols)
    snapshot, pvalues = evidently_report(ref_cols, cur_cols, column_alpha, cfg.min_drifted_columns, cfg.stat_test)
    decision = decide(pvalues, None if mmd is None else mmd["p_value"], cfg)
    decision.mmd = mmd

    warnings = []
    reference_record = read_reference(reference_dir)
    if champion is not None and reference_record and reference_record.get("model_id") not in (None, champion.model_id):
        warnings.append(
            f"reference was sampled for model {reference_record['model_id']}, champion is {champion.model_id}: "
            "rebuild the reference from the champion's training data"
        )

    quality = QualityCheck(None, "no champion (--model) given")
    if champion is not None:
        if not _labelled(current_dir):
            quality = QualityCheck(None, "batch has no masks")
        elif champion_miou is None and champion.held_out_miou is None:
            quality = QualityCheck(None, "champion's held-out mIoU unknown (checkpoint has no val_miou)")
        elif champion.path is None:
            quality = QualityCheck(None, "champion has no checkpoint path to evaluate")
        else:
            from segloop.evaluate import evaluate

            metrics = evaluate(champion.path, current_dir, out_dir / "quality", eval_cfg or EvalSettings())
            held_out = champion_miou if champion_miou is not None else champion.held_out_miou
            quality = quality_check(metrics["miou"], held_out, cfg.max_quality_drop)

    if champion is None or mmd is None:  # a champion gives embeddings, and so the MMD test
        method = f"{cfg.stat_test} per column over image statistics only (no champion given); Bonferroni"
    else:
        method = (
            f"{cfg.stat_test} per column over image statistics, champion predictions and "
            f"{mmd['components']} embedding PCs + MMD permutation test on the embedding PCs; weighted Bonferroni"
        )
    extra = {
        "reference": str(reference_dir),
        "current": str(current_dir),
        "model_id": champion.model_id if champion is not None else None,
        "model": str(champion.path) if champion is not None and champion.path else None,
        "reference_model_id": (reference_record or {}).get("model_id"),
        "cache": {"reference": ref.from_cache, "current": cur.from_cache},
        # The champion's mean max-softmax on each side (a prediction column; None without a champion).
        "confidence": {k: float(t.columns["confidence"].mean()) for k, t in (("reference", ref), ("current", cur))}
        if "confidence" in cur.columns
        else None,
        "warnings": warnings,
    }
    record = drift_record(decision, quality, method, n_ref, n_cur, cfg, extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out_dir / DRIFT_HTML))
    write_json(out_dir / DRIFT_JSON, record)
    return record
