"""Read-only answers from a local MLflow sqlite store, without importing MLflow.

`segloop models list|history` only read the registry, and importing MLflow alone takes
2-3 s on a small shared CPU; sqlite3 answers in milliseconds. Used only for a local
sqlite store whose tables have the columns read here, without MLflow workspaces in use,
and with local artifact folders; in every other case (`Unsupported`) the callers in
`segloop.registry` go through MLflow's client. Never writes (the file is opened read-only).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from segloop.tracking import Store, sqlite_path

# The columns read below, per table: a store of another schema is left to MLflow.
_COLUMNS = {
    "model_versions": {"name", "version", "creation_time", "run_id", "current_stage", "workspace"},
    "registered_models": {"name", "workspace"},
    "registered_model_aliases": {"alias", "version", "name", "workspace"},
    "model_version_tags": {"key", "value", "name", "version", "workspace"},
    "experiments": {"experiment_id", "name", "lifecycle_stage", "workspace"},
    "runs": {"run_uuid", "experiment_id", "artifact_uri", "start_time", "lifecycle_stage"},
    "tags": {"key", "value", "run_uuid"},
}
_DELETED = "Deleted_Internal"  # MLflow's current_stage of a deleted model version


class Unsupported(Exception):
    """This store cannot be read here; ask MLflow."""


@dataclass(frozen=True)
class Version:
    """The attributes of an MLflow ModelVersion that segloop.registry reads."""

    version: str
    creation_timestamp: int
    run_id: str
    tags: dict[str, str]


def _connect(store: Store) -> sqlite3.Connection:
    db = sqlite_path(store.uri)
    if db is None or not db.is_file():
        raise Unsupported(store.uri)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for table, columns in _COLUMNS.items():
            if not columns <= {row[1] for row in con.execute(f"pragma table_info({table})")}:
                raise Unsupported(f"{db}: table {table} lacks {sorted(columns)}")
        if con.execute("select count(*) from experiments where workspace != 'default'").fetchone()[0]:
            raise Unsupported(f"{db}: MLflow workspaces in use")
    except BaseException:
        con.close()
        raise
    return con


def versions(store: Store, name: str) -> tuple[dict[str, list[str]], list[Version]] | None:
    """({version: [aliases]}, versions) of registered model `name`; None if it is not registered."""
    with closing(_connect(store)) as con:
        if (
            con.execute("select 1 from registered_models where name = ? and workspace = 'default'", (name,)).fetchone()
            is None
        ):
            return None
        aliases: dict[str, list[str]] = {}
        for alias, version in con.execute(
            "select alias, version from registered_model_aliases where name = ? and workspace = 'default'", (name,)
        ):
            aliases.setdefault(str(version), []).append(alias)
        tags: dict[str, dict[str, str]] = {}
        for version, key, value in con.execute(
            "select version, key, value from model_version_tags where name = ? and workspace = 'default'", (name,)
        ):
            tags.setdefault(str(version), {})[key] = value
        rows = con.execute(
            "select version, creation_time, run_id from model_versions "
            "where name = ? and workspace = 'default' and current_stage != ?",
            (name, _DELETED),
        ).fetchall()
    return aliases, [Version(str(v), int(t), run_id, tags.get(str(v), {})) for v, t, run_id in rows]


def history_files(store: Store, experiment: str, name: str, folder: str) -> list[Path]:
    """The JSON files of `name`'s alias history run (in `experiment`), sorted by name; [] without one."""
    with closing(_connect(store)) as con:
        row = con.execute(
            "select r.artifact_uri from runs r join experiments e on r.experiment_id = e.experiment_id "
            "join tags k on k.run_uuid = r.run_uuid and k.key = 'segloop.kind' and k.value = 'alias_history' "
            "join tags m on m.run_uuid = r.run_uuid and m.key = 'segloop.model_name' and m.value = ? "
            "where e.name = ? and e.workspace = 'default' and r.lifecycle_stage = 'active' "
            "order by r.start_time asc limit 1",
            (name, experiment),
        ).fetchone()
    if row is None:
        return []
    uri = urlparse(row[0])
    if uri.scheme not in ("", "file"):
        raise Unsupported(f"artifacts at {row[0]}")
    local = Path(uri.path) / folder
    return sorted(local.glob("*.json")) if local.is_dir() else []
