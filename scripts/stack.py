"""`make stack` / `make stack-down`: the scale-out stack on one machine, from local binaries.

    python scripts/stack.py up [--dir .stack] [--workers 2] [--auth]   # start, print URLs, write DIR/env
    source .stack/env                                                 # MLFLOW_TRACKING_URI, PREFECT_API_URL, ...
    python scripts/stack.py down [--dir .stack]                       # stop everything `up` started

What runs (all on loopback, ports chosen free at start):
- PostgreSQL 15 (data in DIR/pg, owned by the `postgres` user when run as root: initdb refuses
  root), one database for MLflow, one for Prefect (and one for MLflow's users with --auth);
- a loopback S3 endpoint (moto's server, in memory: standing in for S3/MinIO);
- the MLflow tracking server on PostgreSQL (`postgresql+psycopg://`), `--serve-artifacts` to
  the bucket, so clients need no storage credentials; optional basic auth;
- the Prefect server on PostgreSQL (`postgresql+asyncpg://`), a process work pool and N workers.

Secrets (the database password, the S3 keys, the MLflow admin password) come from the
environment (SEGLOOP_STACK_DB_PASSWORD, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY) or are generated once into DIR/secrets.env (mode 600; DIR is
git-ignored); never params.yaml. `up` records every process in DIR/stack.json (pids, ports,
start-up seconds, memory); `down` stops exactly those, by pid, with their child processes.
This script imports nothing from segloop: the stack is infrastructure, not the pipeline.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's mlflow, prefect, moto_server
HOST = "127.0.0.1"
DB_USER = "segloop"
BUCKET = "segloop"
POOL = "segloop"
SECRET_KEYS = (
    "SEGLOOP_STACK_DB_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_AUTH_ADMIN_PASSWORD",  # --auth: the admin user's, set when the user store is created
    "MLFLOW_FLASK_SERVER_SECRET_KEY",  # --auth: signs the UI's CSRF tokens
)


class StackError(RuntimeError):
    """The stack cannot start or stop; the message names the part and its log."""


# ---------------------------------------------------------------- small parts


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise StackError(f"{name} not found (PATH or /usr/lib/postgresql/*/bin): apt-get install -y postgresql-15")
    return found


def as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def load_secrets(folder: Path) -> dict[str, str]:
    """The stack's secrets: the environment first, else DIR/secrets.env (generated once, mode 600)."""
    path = folder / "secrets.env"
    stored = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line) if path.exists() else {}
    kept = {k: stored.get(k) or secrets.token_urlsafe(18) for k in SECRET_KEYS}  # what the environment gave stays there
    if kept != stored:
        path.touch(mode=0o600)
        path.write_text("".join(f"{k}={v}\n" for k, v in kept.items()))
    return {k: os.environ.get(k) or kept[k] for k in SECRET_KEYS}


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `url` answers 200, or StackError with the log's tail if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{log.stem} exited with {proc.returncode} before {url} answered:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise StackError(f"{log.stem}: {url} did not answer within {timeout:g}s:\n{tail(log)}")


def tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else f"(no {log})"


def daemon(name: str, cmd: list[str], env: dict[str, str], folder: Path) -> tuple[subprocess.Popen, Path]:
    """Start `cmd` in a session of its own (it outlives `up`; `down` stops its whole tree), logging to DIR/logs."""
    log = folder / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return proc, log


def descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def memory_mb(pid: int) -> float:
    """Proportional memory (PSS: shared pages split between their users) of pid and its descendants, MiB.
    RSS would count PostgreSQL's shared buffers once per backend."""
    total = 0
    for p in descendants(pid):
        try:
            total += next(int(x.split()[1]) for x in Path(f"/proc/{p}/smaps_rollup").open() if x.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---------------------------------------------------------------- services


def start_postgres(folder: Path, port: int, password: str) -> dict:
    started = time.monotonic()
    data, run = folder / "pg", folder / "pg-run"
    for d in (data, run):
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(d, "postgres", "postgres")
            d.chmod(0o700)
    probe = subprocess.run(as_postgres(["test", "-w", str(data)]), capture_output=True)
    if probe.returncode != 0:
        raise StackError(f"{data}: the postgres user cannot write here (a parent folder not searchable?); use --dir")
    log = folder / "logs" / "postgres.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    if os.geteuid() == 0:
        shutil.chown(log, "postgres", "postgres")
    if not (data / "PG_VERSION").exists():
        _run(
            as_postgres(
                [
                    pg_bin("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ]
            ),
            "initdb",
        )
    opts = f"-p {port} -k {run} -c listen_addresses={HOST}"
    _run(
        as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start"]),
        "pg_ctl",
    )
    create_databases(run, port, password)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return {
        "pid": pid,
        "port": port,
        "url": f"postgresql://{DB_USER}@{HOST}:{port}",
        "log": str(log),
        "seconds": time.monotonic() - started,
        "data": str(data),
        "socket": str(run),
    }


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise StackError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")


def create_databases(socket_dir: Path, port: int, password: str) -> None:
    """The role and the databases (idempotent; the password is set on every start)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=str(socket_dir), port=port, user="postgres", dbname="postgres", autocommit=True) as con:
        exists = con.execute("select 1 from pg_roles where rolname = %s", (DB_USER,)).fetchone()
        verb = "alter" if exists else "create"
        con.execute(sql.SQL(verb + " role {} login password {}").format(sql.Identifier(DB_USER), sql.Literal(password)))
        for db in ("mlflow", "mlflow_auth", "prefect"):
            if not con.execute("select 1 from pg_database where datname = %s", (db,)).fetchone():
                con.execute(sql.SQL("create database {} owner {}").format(sql.Identifier(db), sql.Identifier(DB_USER)))


def db_url(driver: str, port: int, password: str, db: str) -> str:
    return f"postgresql+{driver}://{DB_USER}:{quote(password, safe='')}@{HOST}:{port}/{db}"


def start_s3(folder: Path, port: int, env: dict[str, str]) -> dict:
    started = time.monotonic()
    proc, log = daemon("s3", [str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], env, folder)
    url = f"http://{HOST}:{port}"
    wait_http(f"{url}/moto-api/", proc, log, 60)
    # moto answers unsigned requests: the bucket needs no SDK.
    urllib.request.urlopen(urllib.request.Request(f"{url}/{BUCKET}", method="PUT"), timeout=10).close()
    return {
        "pid": proc.pid,
        "port": port,
        "url": url,
        "log": str(log),
        "seconds": time.monotonic() - started,
        "bucket": f"s3://{BUCKET}",
    }


def auth_config(folder: Path, pg_port: int, values: dict[str, str]) -> Path:
    """MLflow's basic-auth settings: users in PostgreSQL; a verified password is cached for a minute
    (without the cache every request re-hashes it, several times slower)."""
    path = folder / "mlflow_auth.ini"
    path.touch(mode=0o600)
    path.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {db_url('psycopg', pg_port, values['SEGLOOP_STACK_DB_PASSWORD'], 'mlflow_auth')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\nauth_cache_ttl_seconds = 60\n"
    )
    return path


def start_mlflow(folder: Path, port: int, pg_port: int, s3_url: str, values: dict, env: dict, args) -> dict:
    started = time.monotonic()
    env = env | {
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        # Job execution serves MLflow's GenAI jobs (huey workers), nothing segloop uses: off, it starts faster.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # in the environment, not on the command line: `ps` would show the password
        "MLFLOW_BACKEND_STORE_URI": db_url("psycopg", pg_port, values["SEGLOOP_STACK_DB_PASSWORD"], "mlflow"),
    }
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(args.mlflow_workers),
        "--artifacts-destination",
        f"s3://{BUCKET}/mlflow",
        "--serve-artifacts",
        "--allowed-hosts",
        f"{HOST}:{port},localhost:{port}",
        "--cors-allowed-origins",
        f"http://{HOST}:{port}",
    ]
    if args.auth:
        cmd += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(folder, pg_port, values))
        env |= {k: values[k] for k in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")}
    proc, log = daemon("mlflow", cmd, env, folder)
    url = f"http://{HOST}:{port}"
    wait_http(f"{url}/health", proc, log, args.timeout)
    return {"pid": proc.pid, "port": port, "url": url, "log": str(log), "seconds": time.monotonic() - started}


def start_prefect(folder: Path, port: int, pg_port: int, values: dict, env: dict, args) -> dict:
    started = time.monotonic()
    url = f"http://{HOST}:{port}/api"
    env = env | {
        "PREFECT_API_DATABASE_CONNECTION_URL": db_url(
            "asyncpg", pg_port, values["SEGLOOP_STACK_DB_PASSWORD"], "prefect"
        ),
        "PREFECT_UI_API_URL": url,  # else the UI asks :4200 for its data, not this server
    }
    cmd = [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    proc, log = daemon("prefect", cmd, env, folder)
    wait_http(f"{url}/health", proc, log, args.timeout)
    return {"pid": proc.pid, "port": port, "url": url, "log": str(log), "seconds": time.monotonic() - started}


def start_workers(folder: Path, env: dict, args, workers: list[dict]) -> None:
    """The process work pool (created or reset) and N workers polling it, each recorded in `workers`
    as it starts (so a failed start still stops it); returns once all are online."""
    started = time.monotonic()
    create = [str(BIN / "prefect"), "work-pool", "create", args.pool, "--type", "process", "--overwrite"]
    _run(create, "prefect work-pool create", env)
    procs = []
    for i in range(args.workers):
        name = f"{args.pool}-worker-{i + 1}"
        cmd = [str(BIN / "prefect"), "worker", "start", "--pool", args.pool, "--type", "process", "--name", name]
        proc, log = daemon(name, cmd, env, folder)
        workers.append({"name": name, "pid": proc.pid, "log": str(log)})
        procs.append((name, proc, log))
    wait_workers(env["PREFECT_API_URL"], args.pool, procs, args.timeout)
    for w in workers:
        w["seconds"] = time.monotonic() - started


def wait_workers(api: str, pool: str, procs: list, timeout: float) -> None:
    deadline, names = time.monotonic() + timeout, {name for name, _, _ in procs}
    while time.monotonic() < deadline:
        for name, proc, log in procs:
            if proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}:\n{tail(log)}")
        req = urllib.request.Request(
            f"{api}/work_pools/{pool}/workers/filter",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            online = {w["name"] for w in json.load(r) if w.get("status") == "ONLINE"}
        if names <= online:
            return
        time.sleep(0.5)
    raise StackError(f"workers {sorted(names)} not online in pool {pool} within {timeout:g}s")


# ---------------------------------------------------------------- up / down


def base_env(folder: Path, values: dict[str, str]) -> dict[str, str]:
    return os.environ | {
        "AWS_ACCESS_KEY_ID": values["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": values["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_HOME": str(folder / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def client_env(state: dict, values: dict[str, str], auth: bool) -> dict[str, str]:
    """What a client (the loop, `segloop`, a worker) needs: written to DIR/env."""
    env = {
        "MLFLOW_TRACKING_URI": state["mlflow"]["url"],
        "PREFECT_API_URL": state["prefect"]["url"],
        "SEGLOOP_WORK_POOL": state["pool"],
        "SEGLOOP_S3_ENDPOINT_URL": state["s3"]["url"],  # for a DVC remote on the same S3
    }
    if auth:
        env |= {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": values["MLFLOW_AUTH_ADMIN_PASSWORD"]}
    return env


def up(args) -> dict:
    folder = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "stack.json").exists() and any(alive(p) for p in recorded_pids(folder)):
        raise StackError(f"{folder}: a stack is running already (stack.json); stop it first: scripts/stack.py down")
    started, values = time.monotonic(), load_secrets(folder)
    env = base_env(folder, values)
    state: dict = {"dir": str(folder), "pool": args.pool, "auth": args.auth}
    try:
        with ThreadPoolExecutor(2) as ex:
            pg = ex.submit(start_postgres, folder, free_port(), values["SEGLOOP_STACK_DB_PASSWORD"])
            s3 = ex.submit(start_s3, folder, free_port(), env)
            state["postgres"], state["s3"] = pg.result(), s3.result()
            save(folder, state)
            pg_port = state["postgres"]["port"]
            ml = ex.submit(start_mlflow, folder, free_port(), pg_port, state["s3"]["url"], values, env, args)
            pf = ex.submit(start_prefect, folder, free_port(), pg_port, values, env, args)
            state["mlflow"], state["prefect"] = ml.result(), pf.result()
        save(folder, state)
        # Workers run the flows: they need what every client needs, and this checkout's code first.
        client = client_env(state, values, args.auth)
        worker_env = (
            env
            | client
            | {
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
                "PREFECT_WORKER_QUERY_SECONDS": str(args.poll_s),
            }
        )
        state["workers"] = []
        start_workers(folder, worker_env, args, state["workers"])
    except BaseException:
        save(folder, state)
        down_folder(folder)
        raise
    state["startup_s"] = time.monotonic() - started
    state["memory_mb"] = {k: memory_mb(state[k]["pid"]) for k in ("postgres", "s3", "mlflow", "prefect")} | {
        w["name"]: memory_mb(w["pid"]) for w in state["workers"]
    }
    save(folder, state)
    (folder / "env").touch(mode=0o600)
    (folder / "env").write_text("".join(f"export {k}={v}\n" for k, v in client_env(state, values, args.auth).items()))
    return state


def save(folder: Path, state: dict) -> None:
    (folder / "stack.json").write_text(json.dumps(state, indent=1, default=str) + "\n")


def recorded_pids(folder: Path) -> list[int]:
    state = json.loads((folder / "stack.json").read_text())
    return [state[k]["pid"] for k in ("s3", "mlflow", "prefect", "postgres") if k in state] + [
        w["pid"] for w in state.get("workers", [])
    ]


def stop_trees(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM each pid with its descendants (all at once), SIGKILL what is left after `timeout`."""
    tree = [p for pid in pids for p in descendants(pid) if alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.2)
        tree = [p for p in tree if alive(p)]
        if not tree:
            return


def stop_postgres(pg: dict) -> bool:
    """pg_ctl's fast shutdown (signals only, if that fails); False if it was not running."""
    if not alive(pg["pid"]):
        return False
    cmd = as_postgres([pg_bin("pg_ctl"), "-D", pg["data"], "-m", "fast", "-w", "stop"])
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        stop_trees([pg["pid"]])
    return True


def down_folder(folder: Path) -> list[str]:
    """Stop what DIR/stack.json records: workers, servers and S3, then PostgreSQL (its own clean shutdown)."""
    if not (folder / "stack.json").exists():
        return []
    state = json.loads((folder / "stack.json").read_text())
    services = [(w["name"], w["pid"]) for w in state.get("workers", [])]
    services += [(name, state[name]["pid"]) for name in ("mlflow", "prefect", "s3") if name in state]
    with ThreadPoolExecutor(1) as ex:
        # PostgreSQL's own fast shutdown, meanwhile: its clients are going away anyway.
        pg = ex.submit(stop_postgres, state["postgres"]) if "postgres" in state else None
        stop_trees([pid for _, pid in services])
        stopped = [name for name, _ in services] + (["postgres"] if pg and pg.result() else [])
    (folder / "stack.json").rename(folder / "stack.stopped.json")
    return stopped


def report(state: dict) -> str:
    lines = [f"stack up in {state['startup_s']:.1f}s ({state['dir']}); source {state['dir']}/env"]
    for name in ("postgres", "s3", "mlflow", "prefect"):
        s = state[name]
        lines.append(
            f"  {name:<9} {s['url']:<40} pid {s['pid']:<8} {s['seconds']:5.1f}s  {state['memory_mb'][name]:6.0f} MiB"
        )
    ui = state["prefect"]["url"].removesuffix("/api")
    lines.append(f"  {'prefect UI':<9} {ui}  (MLflow UI: {state['mlflow']['url']})")
    for w in state["workers"]:
        lines.append(
            f"  {w['name']:<20} pool {state['pool']:<18} pid {w['pid']:<8} {state['memory_mb'][w['name']]:6.0f} MiB"
        )
    lines.append(f"  memory (PSS, all processes): {sum(state['memory_mb'].values()):.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/stack.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=ROOT / ".stack", help="state, data and logs (default .stack)")
    parser.add_argument("--workers", type=int, default=2, help="process workers on the pool (default 2)")
    parser.add_argument("--pool", default=POOL, help=f"work pool name (default {POOL})")
    parser.add_argument("--auth", action="store_true", help="MLflow basic auth (admin password: secrets.env)")
    parser.add_argument("--mlflow-workers", type=int, default=1, help="MLflow server worker processes (default 1)")
    parser.add_argument("--poll-s", type=float, default=5, help="how often workers ask for runs (default 5 s)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds each server may take to answer")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            print(report(up(args)))
        else:
            stopped = down_folder(args.dir.resolve())
            print(f"stopped: {', '.join(stopped)}" if stopped else f"{args.dir}: no stack running")
    except StackError as err:
        print(f"stack: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
