"""The promotion gate: check a candidate serves, score candidate and champion on the same
held-out sets, decide by explicit per-domain rules (`registry.gate`), log the evidence,
then move `champion` (through `segloop.registry`).

It sits above both the registry and serving (it needs the registry's versions and
serving's servability check), so neither of them imports the other for it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from segloop.config import GateSettings, Settings
from segloop.data.files import Folders, folders
from segloop.registry import (
    CHAMPION,
    DECISION_FILE,
    _alias_version,
    _now,
    alias_record,
    describe_version,
    download_checkpoint,
    get_version,
    move_alias,
    registry_client,
    set_version_tags,
    version_miou,
    version_tags,
)
from segloop.tracking import Store, TrackedRun, dir_md5


@dataclass
class Check:
    """One explicit rule applied to one domain's mIoU."""

    domain: str
    rule: str  # "min_gain" | "max_forgetting" | "floor_miou" | "not_learnt" (reported, never fails)
    candidate: float
    champion: float | None
    threshold: float  # the candidate's mIoU must be >= this
    setting: float
    passed: bool

    def reason(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.rule == "floor_miou":
            return (
                f"{verdict} {self.domain} mIoU {self.candidate:.4f} {'>=' if self.passed else '<'} floor "
                f"{self.threshold:.4f} "
                f"(registry.gate.floor_miou, no champion yet)"
            )
        assert self.champion is not None  # every rule but floor_miou compares with a champion
        delta = self.candidate - self.champion
        if self.rule == "not_learnt":
            return (
                f"INFO {self.domain} mIoU {self.candidate:.4f} vs champion {self.champion:.4f} ({delta:+.4f}); "
                "not learnt by the champion (no promoted model trained on it): reported, not protected"
            )
        what = "target domain must gain" if self.rule == "min_gain" else "old domain may lose at most"
        return (
            f"{verdict} {self.domain} mIoU {self.candidate:.4f} vs champion {self.champion:.4f} "
            f"({delta:+.4f}); {what} {self.setting:.4f} (registry.gate.{self.rule}): "
            f"needs >= {self.threshold:.4f}"
        )


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    target: str,
    cfg: GateSettings,
    learnt: Collection[str] | None = None,
    servability: Mapping[str, Any] | None = None,
) -> dict:
    """Promote or not, from per-domain mIoU of candidate and champion (None: no champion yet).

    With a champion: target mIoU >= champion + min_gain, and every other domain the
    champion has *learnt* >= champion - max_forgetting. `learnt`: the domains a promoted
    champion was trained on (None: every domain counts as learnt). Forgetting is losing
    what was learnt: on a domain the champion never learnt its score is what an untrained
    model gets there, and holding a candidate to it would refuse updates that do not also
    learn that domain; such domains are reported, not protected (their own update, with
    its min_gain, is what lifts them). Without a champion: every domain >= floor_miou. Each rule becomes
    an absolute MetricThreshold checked by mlflow.validate_evaluation_results; the
    reasons list every threshold, passed or failed. `servability`: the result of
    `segloop.serve.servability` (None: not checked); a candidate that fails it is refused,
    and its reason ends the list.
    """
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    if target not in candidate:
        raise ValueError(f"target domain {target!r} not among the evaluated domains {sorted(candidate)}")
    checks = []
    for domain, value in candidate.items():
        if champion is None:
            checks.append(
                Check(domain, "floor_miou", value, None, cfg.floor_miou, cfg.floor_miou, value >= cfg.floor_miou)
            )
            continue
        if domain == target:
            rule, setting, threshold = "min_gain", cfg.min_gain, champion[domain] + cfg.min_gain
        elif learnt is not None and domain not in learnt:
            checks.append(Check(domain, "not_learnt", value, champion[domain], 0.0, 0.0, True))  # no bar
            continue
        else:
            rule, setting, threshold = "max_forgetting", cfg.max_forgetting, champion[domain] - cfg.max_forgetting
        checks.append(Check(domain, rule, value, champion[domain], threshold, setting, value >= threshold))
    thresholds = {
        f"{c.domain}/miou": MetricThreshold(threshold=float(c.threshold), greater_is_better=True)
        for c in checks
        if c.rule != "not_learnt"
    }
    try:
        mlflow.validate_evaluation_results(
            thresholds, EvaluationResult({f"{d}/miou": float(v) for d, v in candidate.items()}, {})
        )
        mlflow_passed, mlflow_message = True, "passed"
    except ModelValidationFailedException as err:
        mlflow_passed, mlflow_message = False, err.message
    promoted = all(c.passed for c in checks)
    if promoted != mlflow_passed:  # same thresholds, same comparison: a mismatch is a bug here
        raise RuntimeError(f"gate checks disagree with mlflow.validate_evaluation_results: {mlflow_message}")
    reasons = [c.reason() for c in checks]
    if servability is not None:
        promoted = promoted and bool(servability["passed"])
        reasons.append(servability["reason"])
    table = {
        d: {
            "candidate": candidate[d],
            "champion": None if champion is None else champion[d],
            "delta": None if champion is None else candidate[d] - champion[d],
            "role": "target" if d == target else "old" if learnt is None or d in learnt else "not_learnt",
        }
        for d in candidate
    }
    return {
        "promoted": promoted,
        "reasons": reasons,
        "metrics": table,
        "checks": [asdict(c) for c in checks],
        "learnt": None if learnt is None else sorted(learnt),
        "mlflow_validation": mlflow_message,
        "rules": cfg.model_dump(),
        "servability": None if servability is None else dict(servability),
    }


def refuse_unservable(
    champion: Mapping[str, float] | None,
    cfg: GateSettings,
    learnt: Collection[str] | None,
    servability: Mapping[str, Any],
) -> dict:
    """The decision on a candidate that could not be loaded or answer on the serving backend:
    refused, its mIoU never measured (the champion's, when there is one, still recorded)."""
    return {
        "promoted": False,
        "reasons": [servability["reason"]],
        "metrics": {
            d: {
                "candidate": None,
                "champion": v,
                "delta": None,
                "role": "old" if learnt is None or d in learnt else "not_learnt",
            }
            for d, v in (champion or {}).items()
        },
        "checks": [],
        "learnt": None if learnt is None else sorted(learnt),
        "mlflow_validation": "not run: the candidate is not servable",
        "rules": cfg.model_dump(),
        "servability": dict(servability),
    }


def _described(data: Folders) -> dict:
    """A held-out set in the decision: its folder(s) and their DVC md5(s)."""
    paths = folders(data)
    if len(paths) == 1:
        return {"path": str(paths[0]), "md5": dir_md5(paths[0])}
    return {"path": [str(p) for p in paths], "md5": [dir_md5(p) for p in paths]}


class AlreadyChampion(ValueError):
    """The candidate holds the champion alias already (e.g. a re-run with nothing new)."""


def _promoted_by_gate(client, store: Store, candidate) -> dict | None:
    """The decision of the gate that made `candidate` champion (its alias record says so), or None.

    Makes `gate` idempotent: a retry that finds its own candidate promoted returns that
    decision, finishing what the first attempt may have left (version descriptions)."""
    import mlflow

    record = alias_record(version_tags(candidate), CHAMPION)
    if record.get("kind") != "gate" or not record.get("decision"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=record["decision"], dst_path=tmp, tracking_uri=store.uri
        )
        decision = json.loads(Path(path).read_text())
    if str(decision.get("candidate_version")) != str(candidate.version) or not decision.get("promoted"):
        return None
    for v in {decision.get("champion_version"), str(candidate.version)} - {None}:
        describe_version(client, candidate.name, v)
    return {**decision, "decision_uri": record["decision"]}


def gate(
    settings: Settings,
    candidate_version: str,
    data: Mapping[str, Folders],
    target: str,
    out_dir: Path,
    log: Callable[[str], None] = print,
    learnt: Collection[str] | None = None,
) -> dict:
    """Check the candidate serves, evaluate candidate and champion on the same held-out sets,
    decide, log, then promote.

    Servability first (`segloop.serve.servability`, on the first image of the target domain's
    set): a candidate that cannot be loaded on serve.backend or answer is refused without
    being evaluated; its latency there is held to registry.gate.max_latency_ratio x the champion's.
    `learnt`: the domains the champion has learnt, the only ones protected from forgetting
    (None: all of them; see `decide`). `data`: each domain's held-out set, one folder or
    several scored as one set.

    Writes `out_dir/promotion_decision.json` and per-model, per-domain reports; logs them
    to the candidate's run; moves `champion` only after all of that is logged.
    """
    from segloop.data.files import samples_of
    from segloop.evaluate import evaluate
    from segloop.serve import servability

    client, store = registry_client(settings)
    name = settings.registry.model_name
    if target not in data:
        raise ValueError(f"--target {target}: not among --data domains {sorted(data)}")
    if candidate_version == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"{name}: no registered versions to gate")
        candidate_version = str(max(int(v.version) for v in versions))
    candidate = get_version(client, f"models:/{name}/{candidate_version}")
    champion_version = _alias_version(client, name, CHAMPION)
    if champion_version == str(candidate.version):
        done = _promoted_by_gate(client, store, candidate)
        if done is None:
            raise AlreadyChampion(f"{name} v{candidate.version} is already the champion: nothing to decide")
        return done  # a retried gate (e.g. after an error once the alias had moved): it succeeded
    models = {"candidate": candidate}
    if champion_version:
        models["champion"] = client.get_model_version(name, champion_version)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {role: download_checkpoint(client, store, mv) for role, mv in models.items()}
    sample = samples_of(data[target], require_masks=False)[0].image
    served = servability(
        settings,
        (paths["candidate"], candidate),
        (paths["champion"], models["champion"]) if "champion" in models else None,
        sample,
    )
    log(f"candidate v{candidate.version}: {served['reason']} ({served['seconds']:.1f}s)")
    servable = served["error"] is None  # loaded and answered (the latency rule is decide's)
    scores: dict[str, dict[str, float]] = {}
    for role, mv in models.items():
        if role == "candidate" and not servable:
            continue  # it could not even be loaded or answer: nothing to evaluate
        scores[role] = {}
        for domain, folder in data.items():
            m = evaluate(
                paths[role], folder, out_dir / role / domain, settings.eval, label=f"models:/{name}/{mv.version}"
            )
            scores[role][domain] = m["miou"]
            log(f"{role} v{mv.version} {domain}: mIoU {m['miou']:.4f}")
    if servable:
        decision = decide(scores["candidate"], scores.get("champion"), target, settings.registry.gate, learnt, served)
    else:
        decision = refuse_unservable(scores.get("champion"), settings.registry.gate, learnt, served)
    decision = {
        "promoted": decision["promoted"],
        "reasons": decision["reasons"],
        "metrics": decision["metrics"],
        "model": name,
        "candidate_version": str(candidate.version),
        "champion_version": champion_version,
        "target": target,
        "time": _now(),
        "data": {d: _described(f) for d, f in data.items()},
        **{k: v for k, v in decision.items() if k not in ("promoted", "reasons", "metrics")},
    }
    decision_path = out_dir / DECISION_FILE
    decision_path.write_text(json.dumps(decision, indent=1))

    # Evidence first: the decision, the reports and the metrics go to the candidate's run.
    # Microseconds: two gates within a second must never share (and overwrite) a folder.
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    gate_folder = f"gate/{stamp}-vs-{'v' + champion_version if champion_version else 'none'}"
    run_id = candidate.run_id
    client.log_artifacts(run_id, str(out_dir), gate_folder)
    run = TrackedRun(client, run_id, store, "")
    run.log_metrics(
        {f"gate.{role}.{d}.miou": v for role, s in scores.items() for d, v in s.items()}
        | {
            f"gate.servability.{k}": served[k]
            for k in ("candidate_ms", "champion_ms", "ratio")
            if served[k] is not None
        }
    )
    decision_uri = f"{client.get_run(run_id).info.artifact_uri}/{gate_folder}/{DECISION_FILE}"
    for role, mv in models.items():
        if role not in scores:
            continue
        miou = version_miou(version_tags(client.get_model_version(name, mv.version))) | {
            d: round(v, 5) for d, v in scores[role].items()
        }
        set_version_tags(client, name, mv.version, {"segloop.miou": miou})
    set_version_tags(
        client,
        name,
        candidate.version,
        {
            "segloop.gate.promoted": decision["promoted"],
            "segloop.gate.decision": decision_uri,
            "segloop.gate.reasons": "\n".join(decision["reasons"]),  # to the run
        },
    )
    for mv in models.values():
        describe_version(client, name, mv.version)
    if decision["promoted"]:
        if _alias_version(client, name, CHAMPION) != champion_version:  # another gate or a person moved it
            raise ValueError(
                f"{name}: champion changed while v{candidate.version} was being gated "
                f"(was {champion_version}); decision logged, nothing promoted; gate again"
            )
        summary = "; ".join(r for r in decision["reasons"])
        move_alias(settings, CHAMPION, str(candidate.version), "gate", f"gate passed: {summary}", decision_uri)
    decision["decision_uri"] = decision_uri
    return decision
