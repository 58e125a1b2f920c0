"""Run one batch through `segloop.loop.process_batch` and kill the process at a write boundary.

    python tests/crash_step.py PARAMS BATCH_DIR BOUNDARY before|after

The boundary's function is wrapped so that the process ends with `os._exit(CRASH_EXIT)`
just before it is called or just after it returns: no `finally`, no atexit, no flush,
as a kill or a power cut would. Exits 0 if the boundary was never reached (the test
treats that as a failure: a boundary not injected is not a boundary tested).
Not a test module (no test_ prefix): tests/test_crash.py runs it in a subprocess.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path

CRASH_EXIT = 17
# Every write a step makes, in order: (module, function) whose call is the write.
BOUNDARIES = {
    "settings": ("segloop.loop", "write_step_params"),  # params/<batch>.yaml, the step's own settings
    "ingest": ("segloop.loop", "ingest"),  # accepted files, quarantine, split
    "version": ("segloop.loop", "version_batch"),  # dvc add of the batch
    "drift": ("segloop.loop", "check_drift"),  # references, drift reports, MLflow drift runs
    "update": (
        "segloop.loop",
        "run_stage",
    ),  # the update stage: dvc.yaml, dvc.lock, models/<batch>, a registered version
    "alias": ("segloop.registry", "move_alias"),  # the gate moves `champion`
    "describe": ("segloop.registry", "describe_version"),  # version descriptions written once the alias moved
    "replay": ("segloop.loop", "new_replay"),  # replay/<batch> and its recorded stage
    "state": ("segloop.loop", "write_state"),
    "marker": ("segloop.loop", "write_marker"),
    "commit": ("segloop.loop", "commit"),
}


def inject(boundary: str, when: str) -> None:
    module, name = BOUNDARIES[boundary]
    mod = importlib.import_module(module)
    fn = getattr(mod, name)
    armed = [boundary != "describe"]  # a description counts once the alias has moved

    @functools.wraps(fn)
    def crashing(*args, **kwargs):
        if armed[0] and when == "before":
            os._exit(CRASH_EXIT)
        out = fn(*args, **kwargs)
        if armed[0]:
            os._exit(CRASH_EXIT)
        return out

    setattr(mod, name, crashing)
    if boundary == "describe":
        registry = importlib.import_module("segloop.registry")
        move = registry.move_alias

        @functools.wraps(move)
        def arming(*args, **kwargs):
            armed[0] = True
            return move(*args, **kwargs)

        registry.move_alias = arming


def main(argv: list[str]) -> int:
    params, batch, boundary, when = argv
    from segloop import loop
    from segloop.config import load_settings

    inject(boundary, when)
    settings = load_settings(Path(params))
    loop.process_batch(loop.Workspace.of(settings), Path(batch), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
