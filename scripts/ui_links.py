"""Print the MLflow UI links `make ui` opens on: the experiments' training runs and the
registered model, in the UI's model-training view (`workflowType=machine_learning`).

Reads the store (no server needed) and tags segloop's experiments as model-training ones
(`mlflow.experimentKind`) if an older segloop made them, so the UI opens them on their runs
instead of asking what they are for. Writes nothing else.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VIEW = "workflowType=machine_learning"  # the UI's GenAI/model-training switch, as a URL parameter


def main(argv: list[str] | None = None) -> int:
    from segloop.config import TrackingSettings, load_settings
    from segloop.tracking import drift_experiment, ensure_experiment, open_store, resolve_store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("mlruns/mlflow.db"))
    ap.add_argument("--base", required=True, help="the UI's address, e.g. http://127.0.0.2:5000")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    settings = load_settings(args.params)
    if not args.store.is_file():
        print(f"MLflow UI: {args.base}/#/?{VIEW}  (no store at {args.store} yet: run `make demo` or `segloop train`)")
        return 0
    store = resolve_store(TrackingSettings(uri=f"sqlite:///{args.store.resolve()}"))
    client = open_store(store)
    base = args.base.rstrip("/")
    print(f"MLflow UI:         {base}/#/?{VIEW}")
    for name in (settings.tracking.experiment, drift_experiment(settings)):
        if client.get_experiment_by_name(name) is not None:
            exp_id = ensure_experiment(client, store, name)  # exists: only tags its kind if missing
            print(f"  runs of {name + ':':<16} {base}/#/experiments/{exp_id}/runs?{VIEW}")
    model = settings.registry.model_name
    if client.search_registered_models(f"name = '{model}'"):
        print(f"  registered model:  {base}/#/models/{urllib.parse.quote(model)}?{VIEW}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
