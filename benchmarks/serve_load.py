"""Load on `segloop serve`: throughput and latency at concurrency 1, 8 and 32, an alias switch
under load, and the HTTP layer's cost against the backend's own throughput.

    python benchmarks/serve_load.py [--seconds S] [--quick] [--backend onnx|torch] [--out DIR]

Builds a temporary MLflow store with two versions of params.yaml's architecture (random
weights: speed does not depend on them), champion v1, and starts the real command
(`segloop serve`, a separate process, alias re-read on POST /v1/reload) on a loopback port.
A 512x512 synthetic PNG is posted for `--seconds` at each concurrency (asyncio + httpx, one
connection per concurrent client); the backend's own throughput is `predict_logits` on the
same image in this process with the service idle, measured before and after the load phases,
same thread count. Then a switch phase at concurrency 8: v2 is promoted half-way through
and the service is told (POST /v1/reload, as an MLflow webhook would); every response is
checked. Both versions' exports are made before the service starts, as a loaded
service would have them cached, so the switch measures the swap, not an export.

Client and server share this machine's cores: read the figures as a lower bound of the
service on a machine of its own. Writes reports/bench/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
NAME = "serve-bench"
GOALS = {"c8_http_efficiency": 0.85}  # service / backend throughput at concurrency 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(work: Path, params: dict, backend: str, threads: int | None) -> tuple[Path, object]:
    """A store with versions 1 and 2 of params' architecture, champion v1; the params file serving it."""
    from segloop import registry
    from segloop.checkpoint import save_checkpoint
    from segloop.config import settings_from_dict
    from segloop.models import build_model
    from segloop.tracking import TrackedRun, ensure_experiment, open_store, resolve_store

    raw = json.loads(json.dumps(params))
    raw["data"]["crop_size"] = raw["data"].get("crop_size") or 256
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{work / 'store' / 'mlflow.db'}", "experiment": "serve-bench"}
    raw["registry"] = {**raw.get("registry", {}), "model_name": NAME}
    raw["serve"] = {
        **raw.get("serve", {}),
        "cache": str(work / "cache"),
        "poll_s": None,
        "backend": backend,
        "threads": threads,
        "capture": {"rate": 0.0},
    }
    settings = settings_from_dict(raw)
    store = resolve_store(settings.tracking)
    client = open_store(store)
    exp = ensure_experiment(client, store, "serve-bench")
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model(settings.model, settings.data.channels, settings.num_classes)
        ckpt = work / f"v{seed}" / "best.pt"
        save_checkpoint(
            ckpt,
            {
                "model": model.state_dict(),
                "settings": settings.model_dump(mode="json"),
                "classes": list(settings.data.classes),
                "channels": settings.data.channels,
                "parent": None,
            },
        )
        run = client.create_run(exp)
        registry.log_model(TrackedRun(client, run.info.run_id, store, exp), ckpt, NAME)
        client.set_terminated(run.info.run_id, "FINISHED")
        if backend == "onnx":  # cached as a service that has loaded the version before would have it
            from segloop.serve import onnx_export

            onnx_export(ckpt, settings, f"models:/{NAME}/{seed}")
    registry.promote(settings, "champion", "1", "serve_load benchmark")
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, settings


def backend_throughput(settings, model_file: str, backend: str, image: np.ndarray, seconds: float) -> dict:
    """Images/s of predict_logits + argmax alone on `image` (what `segloop predict` runs per image)."""
    from segloop.data.dataset import to_tensor
    from segloop.evaluate import load_backend
    from segloop.inference import OnnxBackend, predict_logits

    if backend == "onnx":
        model = OnnxBackend(model_file, threads=settings.serve.threads)
    else:
        model = load_backend(Path(model_file), "torch")[0]
    x = to_tensor(image)[None]
    for _ in range(2):
        predict_logits(model, x, settings.eval.max_size, settings.eval.overlap)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predict_logits(model, x, settings.eval.max_size, settings.eval.overlap).argmax(1)
        n += 1
    elapsed = time.perf_counter() - started
    return {"images": n, "seconds": round(elapsed, 2), "images_per_s": n / elapsed}


async def load_phase(url: str, body: bytes, concurrency: int, seconds: float, during=None) -> dict:
    """`concurrency` clients posting `body` for `seconds`; with `during(http)`, it runs after seconds / 2 and
    the clients go on for seconds / 2 after it returned (a switch is measured on both sides)."""
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    versions: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        done = asyncio.Event()
        during_error: list[str] = []

        hard_stop = started + 2 * seconds + 300  # bounded even if the switch hangs

        async def stop_later():
            try:
                await asyncio.sleep(seconds / 2)
                if during is not None:
                    await asyncio.wait_for(during(http), timeout=300)
                await asyncio.sleep(seconds / 2)
            except Exception as err:  # reported with the phase; the load stops
                during_error.append(f"{type(err).__name__}: {err}")
            finally:
                done.set()

        async def client():
            while not done.is_set() and time.perf_counter() < hard_stop:
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/segment", content=body, headers={"content-type": "image/png"})
                    key, version = str(r.status_code), r.headers.get("x-model-version", "?")
                except httpx.HTTPError as err:
                    key, version = type(err).__name__, "-"
                latencies.append(time.perf_counter() - t0)
                statuses[key] = statuses.get(key, 0) + 1
                versions[version] = versions.get(version, 0) + 1

        tasks = [client() for _ in range(concurrency)] + [stop_later()]
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    ok = statuses.get("200", 0)
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "ok": ok,
        "errors": len(latencies) - ok,
        "statuses": statuses,
        "versions": versions,
        "during_error": during_error or None,
        "throughput_rps": ok / elapsed,
        "latency_ms": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level (default 15)")
    parser.add_argument("--quick", action="store_true", help="5 s per level")
    parser.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    parser.add_argument("--threads", type=int, help="backend intra-op threads (default: torch's, the machine's cores)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench")
    args = parser.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    wall = time.perf_counter()
    import httpx
    from PIL import Image

    from segloop import registry
    from segloop.data.synthetic import generate

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        print("registering two versions and exporting them ...", flush=True)
        params_file, settings = make_store(work, params, args.backend, args.threads)
        generate(work / "img", "base", 1, 0, (args.size, args.size))
        png = next((work / "img" / "images").glob("*.png"))
        body = png.read_bytes()
        image = np.array(Image.open(png).convert("RGB" if settings.data.channels == 3 else "L"))
        if image.ndim == 2:
            image = image[..., None]

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "segloop.cli", "serve", "--params", str(params_file), "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                assert server.poll() is None, server.stdout.read()
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "segloop serve did not become ready"
                time.sleep(0.5)
            info = httpx.get(f"{url}/v1/model").json()
            print(f"serving v{info['version']} ({info['backend']}) on {url}", flush=True)
            httpx.post(f"{url}/v1/segment", content=body, timeout=120)  # warm-up

            backend = [backend_throughput(settings, info["file"], args.backend, image, seconds)]
            print(f"backend alone: {backend[0]['images_per_s']:.2f} img/s", flush=True)
            phases = []
            for c in (1, 8, 32):
                phases.append(asyncio.run(load_phase(url, body, c, seconds)))
                p = phases[-1]
                print(
                    f"concurrency {c:>2}: {p['throughput_rps']:.2f} req/s, p50 {p['latency_ms']['p50']:.0f} ms, "
                    f"p95 {p['latency_ms']['p95']:.0f} ms, p99 {p['latency_ms']['p99']:.0f} ms, errors {p['errors']}",
                    flush=True,
                )
            backend.append(backend_throughput(settings, info["file"], args.backend, image, seconds))
            print(f"backend alone (after): {backend[1]['images_per_s']:.2f} img/s", flush=True)

            switch_log = {}

            async def promote_and_reload(http):
                t0 = time.perf_counter()
                await asyncio.to_thread(registry.promote, settings, "champion", "2", "serve_load: switch under load")
                async with httpx.AsyncClient(
                    base_url=url, timeout=300
                ) as own:  # not queued behind the load's connections
                    r = await own.post("/v1/reload?wait=true")
                switch_log.update({"reload": r.json(), "promote_to_served_s": round(time.perf_counter() - t0, 2)})

            switch = asyncio.run(load_phase(url, body, 8, seconds, during=promote_and_reload))
            switch["switch"] = switch_log
            print(
                f"switch at concurrency 8: versions {switch['versions']}, errors {switch['errors']}, "
                f"promote->served {switch_log.get('promote_to_served_s')} s",
                flush=True,
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    backend_rate = float(np.mean([b["images_per_s"] for b in backend]))
    c8 = phases[1]
    efficiency = c8["throughput_rps"] / backend_rate
    goals = {
        "c8_http_efficiency >= 0.85": efficiency >= GOALS["c8_http_efficiency"],
        "zero errors": all(p["errors"] == 0 for p in phases),
        "switch: zero failures, both versions": switch["errors"] == 0 and {"1", "2"} <= set(switch["versions"]),
    }
    load = os.getloadavg()
    report = {
        "what": "segloop serve under load: concurrency 1/8/32, a 512x512 PNG, alias switch at concurrency 8",
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1_5_15_at_end": [round(x, 2) for x in load],
            "note": "client, server and any other work share these cores",
        },
        "settings": {
            "backend": info["backend"],
            "threads": args.threads or torch.get_num_threads(),
            "seconds_per_level": seconds,
            "image": [args.size, args.size],
            "arch": settings.model.model_dump(mode="json"),
        },
        "backend_images_per_s": backend,
        "backend_mean_images_per_s": backend_rate,
        "phases": phases,
        "switch": switch,
        "c8_http_efficiency": efficiency,
        "goals": goals,
        "goal_thresholds": GOALS,
        "headline": {
            **{
                f"c={p['concurrency']}": f"{p['throughput_rps']:.2f} req/s, p95 {p['latency_ms']['p95']:.0f} ms"
                for p in phases
            },
            "backend alone": f"{backend_rate:.2f} img/s",
            "c=8 / backend": f"{efficiency:.2f}",
            "switch": f"{switch['errors']} errors, versions {switch['versions']}",
        },
        "wall_s": time.perf_counter() - wall,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=1))
    print(f"c=8 / backend alone: {efficiency:.2f} (goal >= {GOALS['c8_http_efficiency']})")
    for name, ok in goals.items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}")
    print(f"wrote {args.out / 'serve_load.json'} ({report['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
