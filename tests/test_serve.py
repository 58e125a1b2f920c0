"""Serving tests: `segloop serve` on a real uvicorn (a free loopback port) over a real sqlite
MLflow store holding two tiny registered versions (real `registry.log_model`). Requests go
over HTTP with httpx; the registry is changed with segloop's own promote/rollback; /metrics is
read with prometheus_client's text parser. Nothing of the service is mocked."""

import io
import json
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from segloop import registry
from segloop.capture import CAPTURES, PENDING, Capture, read_captured_batch
from segloop.checkpoint import save_checkpoint
from segloop.cli import main
from segloop.config import CaptureSettings, settings_from_dict
from segloop.data.files import list_samples, read_mask
from segloop.loop import Workspace, batch_domain, pending_batches
from segloop.models import build_model
from segloop.serve import Service, create_app
from segloop.tracking import TrackedRun, ensure_experiment, open_store, resolve_store

NAME = "tiny"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, base_data, migrated_store):
    """A store with versions 1 and 2 of `tiny` (two random tiny U-Nets, registered as real MLflow
    models) and v1 as champion; settings that serve it; a few test images as PNG bytes."""
    from conftest import ROOT, TINY, _merge, copy_store

    root = tmp_path_factory.mktemp("serve")
    patch = pytest.MonkeyPatch()  # downloaded checkpoints are cached under the temp folder: keep ours in root
    (root / "tmp").mkdir()
    patch.setattr(tempfile, "tempdir", str(root / "tmp"))
    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["tracking"] = {"enabled": True, "uri": copy_store(migrated_store, root / "store"), "experiment": "test"}
    raw["registry"] = {"model_name": NAME}
    raw["flows"] = {"workspace": str(root / "workspace"), "incoming": str(root / "incoming")}
    raw["serve"] = {"cache": str(root / "cache"), "poll_s": None}
    settings = settings_from_dict(raw)
    client = open_store(resolve_store(settings.tracking))
    store = resolve_store(settings.tracking)
    exp = ensure_experiment(client, store, "test")
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model(settings.model, 3, settings.num_classes)
        ckpt = root / f"v{seed}" / "best.pt"
        save_checkpoint(
            ckpt,
            {
                "model": model.state_dict(),
                "settings": settings.model_dump(mode="json"),
                "classes": list(settings.data.classes),
                "channels": 3,
                "parent": None,
            },
        )
        run = client.create_run(exp)
        assert registry.log_model(TrackedRun(client, run.info.run_id, store, exp), ckpt, NAME) == str(seed)
        client.set_terminated(run.info.run_id, "FINISHED")
    registry.promote(settings, "champion", "1", "serve tests: first champion")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    samples = list_samples(base_data)[:6]
    yield {
        "root": root,
        "raw": raw,
        "settings": settings,
        "params": params,
        "client": client,
        "images": {s.stem: s.image.read_bytes() for s in samples},
        "data": base_data,
    }
    patch.undo()


def settings_with(env, **serve):
    """The module's settings with these `serve.*` values."""
    raw = json.loads(json.dumps(env["raw"]))
    raw["serve"].update(serve)
    return settings_from_dict(raw)


@contextmanager
def serving(settings, ref=None):
    """`segloop serve`'s app on a real uvicorn in a thread, on a free loopback port; yields (base URL, service)."""
    import uvicorn

    service = Service(settings, ref)
    service.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", service
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def png_mask(content: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(content)) as img:
        assert img.format == "PNG" and img.mode == "P"
        return np.array(img)


def encode(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def metric_samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of a /metrics page, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what, condition, timeout: float = 60.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


# ---------------------------------------------------------------- same answer as `segloop predict`


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_segment_returns_the_mask_segloop_predict_writes(env, tmp_path, backend):
    settings = settings_with(env, backend=backend)
    with serving(settings) as (url, service), httpx.Client(base_url=url, timeout=60) as http:
        info = http.get("/v1/model").json()
        assert info["name"] == NAME and info["version"] == "1" and info["alias"] == "champion"
        assert info["classes"] == list(settings.data.classes) and info["channels"] == 3
        assert info["backend"] == ("onnx-fp32" if backend == "onnx" else "torch") and info["loaded_at"]
        assert http.get("/readyz").json() == {"ready": True, "version": "1"}
        assert http.get("/healthz").headers["x-model-version"] == "1"
        got = {}
        for i, (stem, data) in enumerate(env["images"].items()):
            if i % 2:  # multipart, as a browser form or `curl -F image=@file` sends it
                r = http.post("/v1/segment", files={"image": (f"{stem}.png", data, "image/png")})
            else:
                r = http.post("/v1/segment", content=data, headers={"content-type": "image/png"})
            assert r.status_code == 200 and r.headers["x-model-version"] == "1", r.text
            got[stem] = png_mask(r.content)
            summary = http.post("/v1/segment?format=json", content=data).json()
            counts = np.bincount(got[stem].ravel(), minlength=len(settings.data.classes))
            assert summary["class_area"] == pytest.approx(dict(zip(settings.data.classes, counts / counts.sum())))
            assert summary["image"] == {"height": 72, "width": 80, "channels": 3}
            assert summary["version"] == "1" and summary["model"] == NAME
            assert (
                1 / len(settings.data.classes) <= summary["mean_confidence"] <= 1 and 0 <= summary["mean_entropy"] <= 1
            )
        model = (
            "models:/tiny@champion" if backend == "torch" else info["file"]
        )  # predict's onnx backend takes the export
    images = tmp_path / "images"
    images.mkdir()
    for stem, data in env["images"].items():
        (images / f"{stem}.png").write_bytes(data)
    assert (
        main(
            [
                "predict",
                "--params",
                str(env["params"]),
                "--backend",
                backend,
                "--model",
                model,
                "--input",
                str(images),
                "--out",
                str(tmp_path / "predicted"),
            ]
        )
        == 0
    )
    for stem, mask in got.items():
        np.testing.assert_array_equal(mask, read_mask(tmp_path / "predicted" / f"{stem}.png"))


# ---------------------------------------------------------------- following the alias


class Stream:
    """Two client threads posting one image in a loop; records every response's status and version,
    and checks each mask is the one its X-Model-Version's model gives."""

    def __init__(self, url: str, image: bytes, expected: dict[str, np.ndarray]):
        self.url, self.image, self.expected = url, image, expected
        self.seen: list[tuple[int, str]] = []
        self.wrong: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self):
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    r = http.post("/v1/segment", content=self.image)
                except httpx.HTTPError as err:
                    self.seen.append((0, type(err).__name__))
                    continue
                version = r.headers.get("x-model-version", "?")
                self.seen.append((r.status_code, version))
                if r.status_code == 200 and not np.array_equal(png_mask(r.content), self.expected[version]):
                    self.wrong.append(version)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def wait_for(self, version: str, timeout: float = 90.0) -> None:
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        while not any(v == version for _, v in self.seen[start:]):
            assert time.monotonic() < deadline, f"version {version} never answered; last: {self.seen[-5:]}"
            time.sleep(0.05)
        n = len(self.seen)
        while len(self.seen) < n + 4:  # a few more on the new version
            assert time.monotonic() < deadline
            time.sleep(0.02)


def expected_masks(env, image: bytes) -> dict[str, np.ndarray]:
    """The mask each version's cached export gives `image`, by `segloop predict`'s code (not the service's)."""
    from segloop.evaluate import predict_folder

    out = {}
    for version in ("1", "2"):
        mv = env["client"].get_model_version(NAME, version)
        path = registry.download_checkpoint(env["client"], resolve_store(env["settings"].tracking), mv)
        (onnx,) = Path(env["settings"].serve.cache).glob(f"{registry.file_sha256(path)[:16]}-*/model.onnx")
        folder = Path(tempfile.mkdtemp(dir=env["root"]))
        (folder / "in").mkdir()
        (folder / "in" / "x.png").write_bytes(image)
        predict_folder(onnx, folder / "in", folder / "out", env["settings"].eval, "onnx")
        out[version] = read_mask(folder / "out" / "x.png")
    return out


def warm_exports(env):
    """Both versions exported into the module's cache (as a service loading them would)."""
    from segloop.serve import onnx_export

    for version in ("1", "2"):
        mv = env["client"].get_model_version(NAME, version)
        path = registry.download_checkpoint(env["client"], resolve_store(env["settings"].tracking), mv)
        onnx_export(path, env["settings"], f"models:/{NAME}/{version}")


def test_the_export_cache_keeps_only_the_most_recently_used_exports(env, tmp_path):
    from segloop.serve import onnx_export

    settings = settings_with(env, cache=str(tmp_path / "cache"), cache_keep=1)
    paths = {}
    for version in ("1", "2"):
        mv = env["client"].get_model_version(NAME, version)
        paths[version] = registry.download_checkpoint(env["client"], resolve_store(settings.tracking), mv)
    first = onnx_export(paths["1"], settings, "v1")
    second = onnx_export(paths["2"], settings, "v2")
    assert second.is_file() and not first.exists()  # v1's export made way for v2's
    assert [f.name for f in (tmp_path / "cache").iterdir()] == [second.parent.name]
    assert onnx_export(paths["1"], settings, "v1") == first and first.is_file() and not second.exists()


def test_an_export_made_under_other_export_settings_is_not_served_from_the_cache(env, tmp_path):
    """Changing how the file is made (here int8's per-channel scales; likewise the export code's
    recipe, export.EXPORT_RECIPE) makes a new export instead of serving the cached one."""
    from segloop.serve import onnx_export

    mv = env["client"].get_model_version(NAME, "1")
    settings = settings_with(env, cache=str(tmp_path / "cache"), precision="int8", calib=str(env["data"]))
    path = registry.download_checkpoint(env["client"], resolve_store(settings.tracking), mv)
    first = onnx_export(path, settings, "v1")
    assert onnx_export(path, settings, "v1") == first  # same settings: the cached file
    raw = settings.model_dump(mode="json")
    raw["export"]["per_channel"] = True
    second = onnx_export(path, settings_from_dict(raw), "v1")
    assert second != first and first.is_file() and second.is_file()

    def vector_scales(path):  # per-channel weight scales are vectors, per-tensor ones single values
        return [t.name for t in onnx.load(str(path)).graph.initializer if t.name.endswith("_scale") and sum(t.dims) > 1]

    assert vector_scales(second) and not vector_scales(first)


def test_promotion_and_rollback_are_followed_by_poll_during_a_request_stream(env):
    warm_exports(env)
    settings = settings_with(env, poll_s=0.3)
    image = next(iter(env["images"].values()))
    with serving(settings) as (url, service):
        expected = expected_masks(env, image)
        assert not np.array_equal(expected["1"], expected["2"])  # the versions are told apart by their masks too
        with Stream(url, image, expected) as stream:
            stream.wait_for("1")
            registry.promote(env["settings"], "champion", "2", "serve test: promotion while serving")
            stream.wait_for("2")
            registry.rollback(env["settings"], "serve test: rollback while serving")
            stream.wait_for("1")
        metrics = metric_samples(httpx.get(f"{url}/metrics").text)
    statuses = {status for status, _ in stream.seen}
    assert statuses == {200}, [s for s in stream.seen if s[0] != 200][:5]
    assert stream.wrong == []  # every answer is whole: the mask of the version its header names
    versions = [v for _, v in stream.seen]
    assert {"1", "2"} <= set(versions)
    assert metrics[("segloop_serve_reloads_total", (("result", "loaded"), ("trigger", "poll")))] == 2
    served = {
        v: metrics.get(("segloop_serve_requests_total", (("status", "200"), ("version", v))), 0) for v in ("1", "2")
    }
    assert served == {v: versions.count(v) for v in ("1", "2")}


def test_promotion_and_rollback_are_followed_on_reload_during_a_request_stream(env):
    warm_exports(env)
    image = list(env["images"].values())[1]
    with serving(settings_with(env, poll_s=None)) as (url, service), httpx.Client(base_url=url, timeout=120) as http:
        expected = expected_masks(env, image)
        with Stream(url, image, expected) as stream:
            stream.wait_for("1")
            registry.promote(env["settings"], "champion", "2", "serve test: promotion, then a webhook")
            time.sleep(0.5)
            assert {v for _, v in stream.seen[-4:]} == {"1"}  # no poll: nothing changes until told
            # MLflow's webhook payload is not read: the service asks the registry
            r = http.post("/v1/reload?wait=true", json={"entity": "model_version_alias", "action": "created"})
            assert r.status_code == 200 and r.json()["result"] == "loaded" and r.json()["version"] == "2", r.text
            stream.wait_for("2")
            assert http.post("/v1/reload?wait=true").json()["result"] == "unchanged"
            registry.rollback(env["settings"], "serve test: rollback, then a webhook")
            r = http.post("/v1/reload")  # as a webhook sends it: answered at once, loaded in the background
            assert r.status_code == 202 and r.json()["status"] == "scheduled"
            stream.wait_for("1")
        info = http.get("/v1/model").json()
    assert {s for s, _ in stream.seen} == {200} and stream.wrong == []
    assert {"1", "2"} <= {v for _, v in stream.seen}
    assert info["version"] == "1" and info["last_check"]["trigger"] == "reload" and info["poll_s"] is None


@pytest.mark.slow
def test_an_mlflow_webhook_on_alias_changes_makes_the_service_follow(env, cli_env):
    """A real MLflow tracking server on the module's store fires its `model_version_alias.created`
    webhook at POST /v1/reload; the service does not poll, so only the webhook can move it."""
    import subprocess

    port = _free_port()
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--backend-store-uri",
            env["settings"].tracking.uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--allowed-hosts",
            f"127.0.0.1:{port},localhost:{port}",
        ],
        env={
            **cli_env,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # loopback webhook targets are refused unless allowed (DESIGN.md, machine facts)
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    remote = json.loads(json.dumps(env["raw"]))
    remote["tracking"]["uri"] = f"http://127.0.0.1:{port}"
    remote_settings = settings_from_dict(remote)
    try:
        _wait(
            "the MLflow server",
            lambda: (
                server.poll() is None and httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            ),
            timeout=120,
            every=0.5,
        )
        warm_exports(env)
        image = list(env["images"].values())[2]
        with serving(settings_with(env, poll_s=None)) as (url, service):
            client = open_store(resolve_store(remote_settings.tracking))
            hook = client.create_webhook(
                name="segloop-serve-test", url=f"{url}/v1/reload", events=["model_version_alias.created"]
            )
            try:
                with Stream(url, image, expected_masks(env, image)) as stream:
                    stream.wait_for("1")
                    registry.promote(
                        remote_settings, "champion", "2", "serve test: promotion through the tracking server"
                    )
                    stream.wait_for("2", timeout=60)
                    registry.rollback(remote_settings, "serve test: rollback through the tracking server")
                    stream.wait_for("1", timeout=60)
            finally:
                client.delete_webhook(hook.webhook_id)
        last = service.last_check
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert {s for s, _ in stream.seen} == {200} and stream.wrong == []
    assert last.trigger == "reload" and last.version == "1"  # moved by the webhook: the service never polls here


def test_a_registry_failing_during_polls_is_counted_and_the_loaded_version_keeps_serving(env):
    settings = settings_with(env, poll_s=0.2)
    db = Path(resolve_store(settings.tracking).uri.removeprefix("sqlite:///"))
    image = next(iter(env["images"].values()))
    with serving(settings) as (url, service), httpx.Client(base_url=url, timeout=60) as http:
        saved = db.read_bytes()
        try:
            with open(db, "r+b") as f:  # the registry breaks under the service: same file, garbage inside
                f.write(b"\0" * 4096)
            deadline = time.monotonic() + 30
            while service.last_check is None or service.last_check.result != "failed":
                assert time.monotonic() < deadline, service.last_check
                time.sleep(0.05)
            for _ in range(3):
                r = http.post("/v1/segment", content=image)
                assert r.status_code == 200 and r.headers["x-model-version"] == "1"
            info = http.get("/v1/model").json()
            assert info["last_check"]["result"] == "failed" and "registry" in info["last_check"]["error"]
            failures = metric_samples(http.get("/metrics").text)[("segloop_serve_registry_failures_total", ())]
            assert failures >= 1
        finally:
            with open(db, "r+b") as f:
                f.write(saved)
        deadline = time.monotonic() + 30
        while service.last_check.result != "unchanged":
            assert time.monotonic() < deadline, service.last_check
            time.sleep(0.05)


def test_a_registry_down_or_a_missing_model_at_start_is_one_clear_error(env, capsys):
    port = _free_port()  # nothing listens on it
    assert (
        main(
            [
                "serve",
                "--params",
                str(env["params"]),
                "--set",
                f"tracking.uri=http://127.0.0.1:{port}",
                "--set",
                "tracking.connect_timeout_s=1",
            ]
        )
        == 2
    )
    assert f"tracking server http://127.0.0.1:{port} did not answer within 1s" in capsys.readouterr().err
    assert main(["serve", "--params", str(env["params"]), "--model", "models:/tiny@nobody"]) == 2
    assert "models:/tiny@nobody: no such registered model version" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input and metrics


def test_bad_input_gets_a_json_4xx_and_metrics_count_every_request(env):
    settings = settings_with(env, max_pixels=72 * 80, max_body_mb=0.25)
    data = next(iter(env["images"].values()))
    rgb = np.array(Image.open(io.BytesIO(data)))
    gray = np.array(Image.fromarray(rgb).convert("L"))
    bad = {  # name: (body, content type, status)
        "not an image": (b"these are not the pixels you are looking for", "image/png", 415),
        "a GIF (no PNG/JPEG decoder)": (encode(rgb, "GIF"), "image/gif", 415),
        "truncated": (data[: len(data) // 2], "image/png", 422),
        "empty": (b"", "image/png", 400),
        "too many pixels": (encode(np.zeros((73, 80, 3), np.uint8)), "image/png", 413),
        "too large a body": (b"\x89PNG" + bytes(300 * 1024), "image/png", 413),
        "multipart without a file": (
            b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            400,
        ),
    }
    sent: dict[str, int] = {}
    with serving(settings) as (url, service), httpx.Client(base_url=url, timeout=60) as http:
        reference = png_mask(http.post("/v1/segment", content=data).content)
        gray_reference = png_mask(http.post("/v1/segment", content=encode(np.stack([gray] * 3, -1))).content)
        sent["200"] = 2
        for name, (body, ctype, status) in bad.items():
            r = http.post("/v1/segment", content=body, headers={"content-type": ctype})
            assert r.status_code == status, (name, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json" and r.json()["error"], name
            assert r.headers["x-model-version"] == "1", name
            sent[str(status)] = sent.get(str(status), 0) + 1
        # other channel counts and formats are converted, as `segloop predict` reads files
        rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 128, np.uint8)], -1)
        gray_alpha = np.stack([gray, np.full_like(gray, 128)], -1)
        for body, expected in (
            (encode(rgba), reference),
            (encode(gray), gray_reference),
            (encode(gray_alpha), gray_reference),
        ):
            r = http.post("/v1/segment", content=body)
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(png_mask(r.content), expected)
            sent["200"] += 1
        r = http.post("/v1/segment", content=encode(rgb, "JPEG", quality=95))
        assert r.status_code == 200 and png_mask(r.content).shape == rgb.shape[:2]
        sent["200"] += 1
        r = http.post("/v1/segment?format=xml", content=data)  # FastAPI's own validation: JSON too
        assert r.status_code == 422 and r.json()["detail"]
        text = http.get("/metrics").text
    m = metric_samples(text)
    requests = {dict(labels)["status"]: v for (name, labels), v in m.items() if name == "segloop_serve_requests_total"}
    assert requests == sent
    assert {dict(labels)["version"] for (name, labels), _ in m.items() if name == "segloop_serve_requests_total"} == {
        "1"
    }
    total = sum(sent.values())
    assert m[("segloop_serve_request_seconds_count", ())] == total
    assert m[("segloop_serve_request_seconds_bucket", (("le", "+Inf"),))] == total
    assert m[("segloop_serve_image_pixels_count", ())] == sent["200"]
    assert m[("segloop_serve_image_pixels_sum", ())] == sent["200"] * 72 * 80
    assert m[("segloop_serve_confidence_count", (("version", "1"),))] == sent["200"]
    assert m[("segloop_serve_entropy_count", (("version", "1"),))] == sent["200"]
    for c in settings.data.classes:
        assert m[("segloop_serve_class_area_count", (("class_name", c), ("version", "1")))] == sent["200"]
    info = [labels for (name, labels), _ in m.items() if name == "segloop_serve_model_info"]
    assert info == [
        (
            ("alias", "champion"),
            ("backend", "onnx-fp32"),
            ("name", NAME),
            ("ref", "models:/tiny@champion"),
            ("version", "1"),
        )
    ]
    assert m[("segloop_serve_model_version", ())] == 1 and m[("segloop_serve_in_flight", ())] == 0


# ---------------------------------------------------------------- capture into the loop


def test_captured_requests_become_unlabelled_batch_folders_in_the_loops_incoming(env, tmp_path):
    incoming = tmp_path / "incoming"
    raw = json.loads(json.dumps(env["raw"]))
    raw["flows"] = {"workspace": str(tmp_path / "workspace"), "incoming": str(incoming)}
    raw["serve"]["capture"] = {"rate": 1.0, "batch_size": 3, "seed": 0}
    settings = settings_from_dict(raw)
    sent = list(env["images"].items())[:5] + [list(env["images"].items())[0]] * 2  # 7 requests
    with serving(settings) as (url, service), httpx.Client(base_url=url, timeout=60) as http:
        for _, data in sent:
            assert http.post("/v1/segment", content=data).status_code == 200
        deadline = time.monotonic() + 30  # captures are written after the response is sent
        while service.capture.captured < len(sent):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        m = metric_samples(http.get("/metrics").text)
    assert m[("segloop_serve_captured_total", ())] == 7 and m[("segloop_serve_capture_batches_total", ())] == 2
    batches = pending_batches(Workspace.of(settings))  # what the loop would pick up: the rolled batches only
    assert [b.name.startswith("serve-") for b in batches] == [True, True]
    assert len(list((incoming / PENDING / "images").glob("*.png"))) == 1  # the 7th waits, hidden from the loop
    originals = [np.array(Image.open(io.BytesIO(d)).convert("RGB")) for _, d in sent]
    kept = []
    for batch in batches:
        info = read_captured_batch(batch)
        assert info.labelled is False and info.source == "segloop serve" and info.model == "models:/tiny@champion"
        assert info.images == 3 and info.versions == {"1": 3} and info.batch == batch.name
        assert batch_domain(batch) == "default"  # the loop reads its batch.json as it reads any batch's
        samples = list_samples(batch, require_masks=False)
        assert len(samples) == 3 and all(s.mask is None for s in samples)
        records = [json.loads(line) for line in (batch / CAPTURES).read_text().splitlines()]
        assert [r["image"] for r in records] == [f"images/{s.image.name}" for s in samples]
        assert all(r["version"] == "1" and 0 <= r["mean_confidence"] <= 1 for r in records)
        kept += [np.array(Image.open(s.image)) for s in samples]
    for a, b in zip(kept, originals):
        np.testing.assert_array_equal(a, b)  # the image as the model saw it, lossless


def test_capture_rolls_old_captures_and_stays_within_its_disk_bound(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    summary = {"version": "3", "mean_confidence": 0.9}
    capture = Capture(
        CaptureSettings(rate=1.0, batch_size=10, max_age_s=0.2), tmp_path, "models:/m@champion", min_images=2
    )
    assert capture.offer(image, summary) is None
    time.sleep(0.25)
    assert capture.roll_if_due() is None  # old, but fewer than min_images: the loop would refuse it
    rolled = capture.offer(image, summary)  # 2 images, the first one old: rolled now
    assert rolled and read_captured_batch(tmp_path / rolled).images == 2
    bounded = Capture(CaptureSettings(rate=1.0, batch_size=100, max_pending_mb=0.0001), tmp_path / "b", "m", 2)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # ~12 KiB as PNG: over the bound
    for _ in range(5):
        bounded.offer(noise, summary)
    assert bounded.captured == 1 and bounded.dropped == 4  # the first fills the bound; then dropped, counted
    shutil.rmtree(tmp_path / "b")
    assert not Capture(CaptureSettings(rate=0.0), tmp_path / "b", "m", 2).wants()


# ---------------------------------------------------------------- a real Prometheus scrapes it


def _prometheus() -> str:
    """The prometheus binary; Debian's package is installed when missing (root + apt), else the test skips."""
    import os
    import subprocess

    found = shutil.which("prometheus")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
        ):
            subprocess.run(
                cmd, capture_output=True, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            )
        found = shutil.which("prometheus")
    if found is None:
        pytest.skip("Debian's prometheus is not installed and could not be (apt-get install prometheus)")
    return found


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_service_with_the_shipped_config_and_rules(env, tmp_path, cli_env):
    import subprocess

    from conftest import ROOT

    prometheus = _prometheus()
    serve_port, prom_port = _free_port(), _free_port()
    # The shipped config, pointed at this test's port and scraping every second.
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{serve_port}"]}]
    config["rule_files"] = [str(ROOT / "monitoring" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    env_vars = {**cli_env, "OMP_NUM_THREADS": "1"}
    serve = subprocess.Popen(  # the real command, as `make serve` starts it
        ["segloop", "serve", "--params", str(env["params"]), "--port", str(serve_port), "--set", "serve.threads=1"],
        env=env_vars,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def query(q: str):
        r = httpx.get(f"{api}/query", params={"query": q}, timeout=10).json()
        assert r["status"] == "success", r
        return r["data"]["result"]

    try:
        url = f"http://127.0.0.1:{serve_port}"
        # a fresh process imports torch and MLflow and loads the champion: minutes on a busy 2-core box
        _wait(
            "segloop serve",
            lambda: serve.poll() is None and httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
            timeout=300,
            every=0.5,
        )
        _wait("the first scrape", lambda: query('up{job="segloop-serve"} == 1'))
        images = list(env["images"].values())
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(12):
                assert http.post("/v1/segment", content=images[i % len(images)]).status_code == 200
            assert http.post("/v1/segment", content=b"junk").status_code == 415
        ok = _wait("the request counter", lambda: query('segloop_serve_requests_total{status="200",version="1"} == 12'))
        assert ok[0]["metric"]["job"] == "segloop-serve"
        assert float(query('segloop_serve_requests_total{status="415"}')[0]["value"][1]) == 1
        p95 = _wait(
            "a latency quantile",
            lambda: query("histogram_quantile(0.95, sum by (le) (rate(segloop_serve_request_seconds_bucket[1m]))) > 0"),
        )
        assert 0 < float(p95[0]["value"][1]) <= 30
        assert (
            _wait("the recorded confidence", lambda: query("segloop:confidence:mean_5m"))[0]["metric"]["version"] == "1"
        )
        groups = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
        rules = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        assert {"SegloopServeLatencyP95High", "SegloopServeErrorRateHigh", "SegloopServeConfidenceDrop"} <= set(rules)
        _wait(
            "every rule evaluated",
            lambda: (
                set(
                    r["health"]
                    for g in httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
                    for r in g["rules"]
                )
                == {"ok"}
            ),
        )
    finally:
        for p in (prom, serve):
            p.terminate()
        for p in (prom, serve):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
