"""The routed MLflow model over HTTP: a real `mlflow models serve` and a real `taps-cl serve`
subprocess on free loopback ports, answers equal to ``Engine.route``, hostile requests refused
with a 4xx and one line while the server keeps answering, a snapshot loaded in a fresh process,
and a task committed after start-up served within ``version_ttl``.

Request decoding (paths, bombs, limits) is tested in-process first, while the servers boot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taps_cl import Engine
from taps_cl.config import TrainConfig
from taps_cl.serving.pyfunc import save_routed_model
from taps_cl.serving.requests import RequestError, RequestLimits, decode_rows
from taps_cl.serving.spec import ServedStore
from tests.conftest import require
from tests.tiny import tiny_images

BASE = "timm-random:test_efficientnet"
FAST = TrainConfig(epochs=1, image_size=32, batch_size=8)
LIMITS = {"max_batch": 8, "max_image_bytes": 200_000}  # small, so the tests can exceed them
BODY_LIMIT = 400_000  # taps-cl serve --max-body-bytes


def dark(n: int, seed: int = 1):
    x, y = tiny_images(n, 3, size=32, seed=seed)
    return x * 0.3, y


def bright(n: int, seed: int = 2):
    x, y = tiny_images(n, 2, size=32, seed=seed)
    x = 1 - x * 0.3
    x[:, 0] = 0
    return x, y


def png(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def images(n: int = 6, seed: int = 9) -> list[bytes]:
    (xa, _), (xb, _) = dark(n // 2, seed), bright(n - n // 2, seed + 1)
    return [png(t) for t in torch.cat([xa, xb])]


# -- request decoding, in-process ---------------------------------------------------------------


def test_strings_are_base64_never_paths(tmp_path):
    file = tmp_path / "a.png"
    file.write_bytes(images(1)[0])
    for text in (str(file), "file://" + str(file), "/etc/passwd", "~/x.png", "C:\\a.png"):
        with pytest.raises(RequestError, match="row 0: (paths are not accepted|not an image)"):
            decode_rows({"image": [text]})
    rows = decode_rows({"image": [b64(file.read_bytes())], "task": ["dark"]})
    assert rows.images[0].shape == (3, 32, 32) and rows.tasks == ["dark"]


def test_bombs_are_refused_from_the_header(monkeypatch):
    from PIL import ImageFile

    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # 36 Mpixels in a few kB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(RequestError, match="6000x6000 pixels is over the limit"):
        decode_rows({"image": [buf.getvalue()]})
    assert loads == []  # refused before any pixel was decoded


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"image": []}, "empty batch"),
        ({"image": ["AAAA"] * 9}, "batch of 9 images is over the limit of 8"),
        ({"image": [b"x" * 300_000]}, "over the limit of 200000"),
        ({"image": [b"not an image at all"]}, "not an image"),
        ({"image": [images(1)[0][:60]]}, "truncated or corrupt image"),
        ({"image": [[1, 2, 3]]}, "must be \\[H, W\\] or \\[H, W, C\\]"),
        ({"image": [[[0.5, 2.0]]]}, "float pixels must be finite and in \\[0, 1\\]"),
        ({"image": [[["a"]]]}, "must be numeric"),
        ({"image": [7]}, "base64 bytes or a numeric array"),
        ({"image": ["@@@@"]}, "not valid base64"),
        ({"image": ["AAAA"], "task": [3]}, "task must be a name"),
        ({"image": ["AAAA"], "task": ["a", "b"]}, "2 task names for 1 images"),
        ({"picture": ["AAAA"]}, "need an 'image' column"),
    ],
)
def test_bad_rows_get_one_line(rows, message):
    with pytest.raises(RequestError, match=message) as err:
        decode_rows(rows, RequestLimits(**LIMITS))
    assert "\n" not in str(err.value)


def test_arrays_and_dataframes_decode_like_images():
    import pandas as pd

    img = images(1)[0]
    arr = np.asarray(Image.open(io.BytesIO(img)))
    rows = decode_rows(pd.DataFrame({"image": [b64(img), arr.tolist(), arr / 255.0]}))
    assert torch.equal(rows.images[0], rows.images[1])
    assert rows.images[2].dtype == torch.float32 and rows.tasks == [None] * 3


# -- servers ------------------------------------------------------------------------------------


@dataclass
class Served:
    engine: Engine
    root: Path
    mlflow_url: str  # `mlflow models serve` of the saved live model
    cli_url: str  # `taps-cl serve`
    procs: list[subprocess.Popen]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    bindir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` by name
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("http_serving")
    store = root / "tasks.db"
    engine = Engine(BASE, store=str(store), train=FAST, version_ttl=0.0)
    engine.add_task(dark(32), name="dark", class_names=["d0", "d1", "d2"], quiet=True)
    engine.add_task(bright(32), name="bright", quiet=True)
    spec = ServedStore(base=BASE, fingerprint=engine.fingerprint, store=f"sqlite:///{store}",
                       version_ttl=0.5, limits=LIMITS)  # fmt: skip
    model = save_routed_model(root / "model", spec)
    ports = _free_port(), _free_port()
    procs = [
        _start([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model),
                "--env-manager", "local", "--host", "127.0.0.1", "--port", str(ports[0])],
               root / "mlflow.log"),
        _start([sys.executable, "-m", "taps_cl", "serve", "--store", str(store), "--base", BASE,
                "--port", str(ports[1]), "--version-ttl", "0.5",
                "--max-body-bytes", str(BODY_LIMIT), "--max-batch", "8",
                "--max-image-bytes", "200000"], root / "cli.log"),
    ]  # fmt: skip
    yield Served(engine, root, *(f"http://127.0.0.1:{p}" for p in ports), procs)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this fixture started
        proc.wait()


def _healthy(served: Served, url: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in served.procs):
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    logs = {
        n: (served.root / n).read_text(errors="replace")[-1500:] for n in ("mlflow.log", "cli.log")
    }
    require(False, f"server at {url} did not start: {logs}")


def post(url: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/invocations", data=data,
                                     headers={"Content-Type": content_type})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"message": text.decode(errors="replace")}


def expected(engine: Engine, pngs: list[bytes], tasks: list[str | None]) -> list[dict]:
    """What Engine.route (rows without a task) and Engine.predict (rows with one) answer."""
    pil = [Image.open(io.BytesIO(p)) for p in pngs]
    free = [i for i, t in enumerate(tasks) if t is None]
    out: list[dict] = [{} for _ in pngs]
    if free:
        routed = engine.route([pil[i] for i in free])
        for j, i in enumerate(free):
            out[i] = {"task": routed.tasks[j], "label": int(routed.labels[j]),
                      "class_name": routed.class_names[j],
                      "confidence": float(routed.confidence[j]),
                      "version": routed.versions[routed.tasks[j]]}  # fmt: skip
    for i, t in enumerate(tasks):
        if t is not None:
            p = torch.softmax(engine.predict(t, pil[i], logits=True).double(), 1)[0]
            names = engine.class_names(t)
            k = int(p.argmax())
            version = engine.versions(t)[-1].version
            out[i] = {"task": t, "label": k, "class_name": names[k] if names else None,
                      "confidence": float(p[k]), "version": version}  # fmt: skip
    return out


def same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in ("task", "label", "class_name", "version")} == {
            k: w[k] for k in ("task", "label", "class_name", "version")
        }
        assert g["confidence"] == pytest.approx(w["confidence"], rel=1e-5)


FORMATS = {
    "dataframe_records": lambda imgs, tasks: {
        "dataframe_records": [{"image": b64(i), "task": t}
                              for i, t in zip(imgs, tasks, strict=True)]
    },
    "dataframe_split": lambda imgs, tasks: {
        "dataframe_split": {"columns": ["image", "task"],
                            "data": [[b64(i), t] for i, t in zip(imgs, tasks, strict=True)]}
    },
    "inputs": lambda imgs, tasks: {"inputs": {"image": [b64(i) for i in imgs], "task": tasks}},
}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_answers_equal_engine_route(served, fmt):
    _healthy(served, served.mlflow_url)
    pngs = images(6)
    tasks = [None, None, "bright", None, "dark", None]
    status, body = post(served.mlflow_url, FORMATS[fmt](pngs, tasks))
    assert status == 200, body
    same(body["predictions"], expected(served.engine, pngs, tasks))


def _hostile(tmp: Path) -> list[tuple[str, bytes | dict, str]]:
    good = images(1)[0]
    file = tmp / "on_disk.png"
    file.write_bytes(good)
    bomb = io.BytesIO()
    Image.new("1", (6000, 6000)).save(bomb, format="PNG")
    recs = lambda *rows: {"dataframe_records": list(rows)}  # noqa: E731
    return [
        ("malformed JSON", b'{"dataframe_records": [{"image"', "application/json"),
        ("not JSON at all", b"\xff\xfe\x00garbage", "application/json"),
        ("wrong content type", b"image=1", "text/plain"),
        ("wrong dtype", recs({"image": 5}), ""),
        ("wrong shape", recs({"image": [[[[1]]]]}), ""),
        ("strings in an array", recs({"image": [["a", "b"]]}), ""),
        ("non-image bytes", recs({"image": b64(b"hello, world")}), ""),
        ("truncated image", recs({"image": b64(good[: len(good) // 2])}), ""),
        ("unknown task", recs({"image": b64(good), "task": "nope"}), ""),
        ("bad task name", recs({"image": b64(good), "task": "../../etc"}), ""),
        ("empty batch", {"dataframe_records": []}, ""),
        ("empty inputs", {"inputs": {"image": []}}, ""),
        ("a path", recs({"image": str(file)}), ""),
        ("a file URL", recs({"image": f"file://{file}"}), ""),
        ("oversized batch", recs(*[{"image": b64(good)}] * 9), ""),
        ("oversized image bytes", recs({"image": b64(os.urandom(250_000))}), ""),
        ("decompression bomb", recs({"image": b64(bomb.getvalue())}), ""),
        ("bad routing method", {"inputs": {"image": [b64(good)]}, "params": {"method": "x"}}, ""),
    ]


def test_hostile_requests_get_a_4xx_and_the_server_keeps_answering(served, tmp_path):
    pngs, tasks = images(2), [None, None]
    stat = (served.root / "tasks.db").stat()
    for url in (served.mlflow_url, served.cli_url):
        _healthy(served, url)
        for what, body, ctype in _hostile(tmp_path):
            status, reply = post(url, body, ctype or "application/json")
            assert 400 <= status < 500, (url, what, status, reply)
            if url == served.cli_url:  # behind the guard: one short line
                message = reply["message"]
                assert "\n" not in message and len(message) <= 500, (what, message)
            status, reply = post(url, FORMATS["inputs"](pngs, tasks))
            assert status == 200, (what, reply)
            same(reply["predictions"], expected(served.engine, pngs, tasks))
    assert (served.root / "tasks.db").stat().st_mtime == stat.st_mtime  # never written


def test_paths_are_refused_with_their_reason(served, tmp_path):
    _healthy(served, served.cli_url)
    file = tmp_path / "x.png"
    file.write_bytes(images(1)[0])
    status, reply = post(served.cli_url, {"inputs": {"image": [str(file)]}})
    assert status == 400 and "paths are not accepted" in reply["message"]


def test_cli_serve_prints_its_url_and_refuses_big_bodies(served):
    _healthy(served, served.cli_url)
    log = (served.root / "cli.log").read_text(errors="replace")
    assert f"at {served.cli_url}/invocations" in log
    status, reply = post(served.cli_url, b"x" * (BODY_LIMIT + 1))
    assert status == 413 and "over the limit" in reply["message"]
    status, reply = post(served.cli_url, {"dataframe_records": [{"image": "@"}]})
    assert status == 400 and reply["message"] == "row 0: image is not valid base64"


def test_concurrent_clients_get_engine_answers(served):
    from concurrent.futures import ThreadPoolExecutor

    _healthy(served, served.cli_url)
    batches = [images(4, seed=s) for s in range(8)]
    want = [expected(served.engine, b, [None] * 4) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(lambda b: post(served.cli_url, FORMATS["inputs"](b, [None] * 4)), batches)
        )
    for (status, reply), w in zip(got, want, strict=True):
        assert status == 200
        same(reply["predictions"], w)


def test_snapshot_loads_in_a_fresh_process(served):
    from taps_cl.tracking import log_routed_model

    engine = served.engine
    uri = f"sqlite:///{served.root / 'mlflow.db'}"
    spec = ServedStore(base=BASE, fingerprint=engine.fingerprint)
    info = log_routed_model(engine.store, spec, uri=uri, registered_name="routed")
    assert info.versions == {"bright": 1, "dark": 1} and info.registered_version == "1"
    pngs = images(4, seed=3)
    code = (
        "import sys, json, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]); "
        "rows = pd.DataFrame({'image': json.loads(sys.stdin.read())}); "
        "print(m.predict(rows).to_json(orient='records'))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    rows = json.dumps([b64(p) for p in pngs])
    out = subprocess.run([sys.executable, "-c", code, "models:/routed/1"], env=env, check=True,
                         input=rows, capture_output=True, text=True)  # fmt: skip
    same(json.loads(out.stdout.strip().splitlines()[-1]), expected(engine, pngs, [None] * 4))


def test_live_model_serves_a_task_committed_after_start(served):
    """Last: it adds a task to the store every server reads."""
    for url in (served.mlflow_url, served.cli_url):
        _healthy(served, url)
    x, y = tiny_images(32, 2, size=32, seed=5)
    x[:, 1:] = 0  # pure red images: unlike both tasks
    served.engine.add_task((x, y), name="red", quiet=True)
    time.sleep(1.0)  # > version_ttl of both servers
    pngs = [png(t) for t in x[:2]]
    for url in (served.mlflow_url, served.cli_url):
        status, reply = post(url, FORMATS["inputs"](pngs, ["red", None]))
        assert status == 200, reply
        same(reply["predictions"], expected(served.engine, pngs, ["red", None]))
        assert reply["predictions"][0]["task"] == "red"
