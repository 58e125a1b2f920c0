"""Image drift detection: label-free image features, an Evidently report and a decision.

- `features`: images -> a table of per-image columns (image statistics, the champion's
  predictions) plus its pooled encoder embeddings; cached per dataset.
- `reference`: the fixed, seeded sample of the champion's training images.
- `decision`: Evidently report over the columns, an MMD test on the embeddings, the
  multiple-testing rule that turns them into one drift / no-drift answer, and the
  optional quality-drop check on labelled batches.
- `history`: the loop's checks over time, as snapshots in an Evidently workspace (one
  project per registered model, with its dashboard) and as Prometheus gauges.

Nothing here imports Prefect or MLflow; `drift.json` and `drift.html` are files a
caller logs wherever it likes.
"""
