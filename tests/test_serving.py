"""`python -m export serve` for real: one Ray instance (started by the command, as users start
it) serves two exported backbones on 127.0.0.1 for this whole module; clients nobody here wrote
(tritonclient, httpx) and the Python handle API talk to it; one replica is killed under load.

Every request is bounded by a timeout; the server is stopped at the end (SIGINT, then SIGKILL of
its process group, which this module started)."""

import asyncio
import copy
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from export.pipeline.build import export_backbone
from tests.conftest import REPO, assert_within_bound, build_small, flat_outputs
from zoo.base import RETURNT_MODES

pytestmark = pytest.mark.xdist_group("serve")

MODELS = ("mnistmlp", "resnet18")
TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (eager net, export directory with ONNX files)."""
    root = tmp_path_factory.mktemp("served")
    out = {}
    for name in MODELS:
        net, shape = build_small(name)
        export_backbone(net, root / name, input_shape=shape, formats=("onnx",))
        out[name] = (net, root / name)
    yield out
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Server:
    url: str
    host_port: str
    ray_address: str
    proc: subprocess.Popen
    lines: list
    grpc: str = ""


def _reader(proc: subprocess.Popen, lines: list, q: "queue.Queue[str]") -> None:
    for line in proc.stdout:
        lines.append(line)
        q.put(line)


def start_server(dirs, *args, timeout_s: float = 150.0) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "export", "serve", *map(str, dirs), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list = []
    q: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=_reader, args=(proc, lines, q), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if "Ctrl-C stops" in line:
            address = line.split(", ray ")[1].split(")")[0].split(",")[0]
            grpc = line.split(" and grpc ")[1].split(" ")[0] if " and grpc " in line else ""
            return Server(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", address, proc, lines, grpc)
    stop_server(proc)
    raise AssertionError("server did not start:\n" + "".join(lines[-40:]))


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the command's own process group: Ray's processes
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


#: the test server's --max-request-mb: room for batch 32 at 3x224x224 as JSON
LIMIT_MB = 40
LIMIT = LIMIT_MB << 20


#: the model also served with weight versions: a 5-task Mammoth run that starts from its export's
#: weights (version 1 is the export's own weights, so every other test sees the same numbers)
CONTINUAL = "resnet18"
TASKS = 5


@dataclass
class Continual:
    directory: object
    checkpoints: list
    eager: dict  # version number -> eager backbone with that version's weights
    trusted: tuple  # (private, public) key serve trusts
    foreign: tuple  # another key pair
    url: str = ""


@pytest.fixture(scope="module")
def continual(models, tmp_path_factory):
    """Versions 1-3 of CONTINUAL's export published from the run's per-task checkpoints, signed
    with the key the server trusts; tasks 4 and 5 are published by tests."""
    from export.cli import main
    from export.pipeline.checkpoint import read_checkpoint
    from tests.continual import key_pair, task_checkpoints

    net, directory = models[CONTINUAL]
    root = tmp_path_factory.mktemp("continual")
    args = json.loads((directory / "manifest.json").read_text())["backbone"]["args"]
    ckpts = task_checkpoints(root / "ckpts", CONTINUAL, TASKS, start=net, **args)
    trusted, foreign = key_pair(root, "trusted"), key_pair(root, "foreign")
    assert main(["publish", str(directory), *map(str, ckpts[:3]), "--sign-key", str(trusted[0])]) == 0
    eager = {}
    for n, ckpt in enumerate(ckpts, start=1):
        eager[n] = copy.deepcopy(net)
        eager[n].load_state_dict(read_checkpoint(ckpt).state_dict)
        eager[n].eval()
    yield Continual(directory, ckpts, eager, trusted, foreign)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(models, continual):
    """mnistmlp and resnet18 (resnet18 as weight version 1 of 1-3: its export's weights; signed
    versions only) on one server."""
    srv = start_server([d for _, d in models.values()], "--replicas", "2", "--threads", "1",
                       "--max-request-mb", str(LIMIT_MB), "--request-timeout-s", str(TIMEOUT_S),
                       "--grpc-port", str(free_port()), "--versions", "1", "--trust-key", str(continual.trusted[1]))
    yield srv
    stop_server(srv.proc)
    assert "stopped" in "".join(srv.lines[-20:]), "".join(srv.lines[-20:])


@pytest.fixture(scope="module")
def ray_driver(server):
    """This process joined to the server's Ray instance (handle API, killing a replica)."""
    # the command's local cluster has Ray's token auth; a driver given an explicit address
    # uses the token (~/.ray/auth_token) only when told to, before Ray reads its config
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    ray.init(address=server.ray_address, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = old


def _x(net_shape, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *net_shape)).astype(np.float32)


def _eager(net, x: np.ndarray, mode: str):
    with torch.no_grad():
        out = net(torch.from_numpy(x), returnt=mode)
    return [o.numpy() for o in flat_outputs(out)]


def test_metadata_matches_the_manifest(server, models):
    import tritonclient.http as th

    client = th.InferenceServerClient(server.host_port, network_timeout=TIMEOUT_S)
    assert client.is_server_ready()
    for name, (_, directory) in models.items():
        manifest = json.loads((directory / "manifest.json").read_text())
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        spec = manifest["input"]
        dims = [-1 if i == 0 or (i >= 2 and "height" in spec["dynamic"]) else d for i, d in enumerate(spec["shape"])]
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": dims}]
        full = manifest["modes"]["full"]["outputs"]
        assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in full]
        assert [o["shape"] for o in meta["outputs"]] == [[d if isinstance(d, int) else -1 for d in o["shape"]]
                                                          for o in full]
        assert meta["parameters"]["files"] == {n: f["sha256"] for n, f in manifest["files"].items()}


@pytest.mark.parametrize("mode", RETURNT_MODES)
def test_tritonclient_infer_matches_eager(server, models, mode):
    """tritonclient asks for the mode's outputs by name (binary and JSON alternating); the
    server picks the mode from them; numbers within the export's verification bound."""
    import tritonclient.http as th

    client = th.InferenceServerClient(server.host_port, network_timeout=TIMEOUT_S)
    for name, (net, directory) in models.items():
        manifest = json.loads((directory / "manifest.json").read_text())
        names = [o["name"] for o in manifest["modes"][mode]["outputs"]]
        x = _x(manifest["input"]["shape"][1:], 3, seed=len(mode))
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=mode != "features")
        outputs = [th.InferRequestedOutput(n, binary_data=i % 2 == 0) for i, n in enumerate(names)]
        result = client.infer(name, [inp], outputs=outputs)
        assert result.get_response()["parameters"]["returnt"] == mode
        for got, want in zip([result.as_numpy(n) for n in names], _eager(net, x, mode)):
            assert_within_bound(got, want)


def test_returnt_parameter_and_json_tensors_over_plain_http(server, models):
    """What `curl` sends: JSON data, nested lists, parameters.returnt, no outputs named."""
    import httpx

    net, directory = models["resnet18"]
    x = _x(net.input_shape, 2, seed=7)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}],
            "parameters": {"returnt": "both"}}
    resp = httpx.post(f"{server.url}/v2/models/resnet18/infer", json=body, timeout=TIMEOUT_S)
    assert resp.status_code == 200, resp.text
    outs = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in resp.json()["outputs"]}
    assert list(outs) == ["logits", "features"]
    for got, want in zip(outs.values(), _eager(net, x, "both")):
        assert_within_bound(got, want)


def _infer_body(shape=(1, 1, 28, 28), **overrides) -> dict:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(shape), "data": [0.5] * int(np.prod(shape))}
    tensor.update(overrides)
    return {"inputs": [tensor]}


INFER = "/v2/models/mnistmlp/infer"
BAD_REQUESTS = [
    ("unknown model", "POST", "/v2/models/mnistmpl/infer", _infer_body(),
     "unknown model 'mnistmpl'; did you mean mnistmlp", 404),
    ("unknown version", "POST", "/v2/models/mnistmlp/versions/7/infer", _infer_body(), "no version '7'", 404),
    ("wrong shape", "POST", INFER, _infer_body((1, 1, 28, 27)), "expected [batch, 1, 28, 28]"),
    ("wrong rank", "POST", INFER, _infer_body((1, 784)), "expected rank 4"),
    ("zero batch", "POST", INFER, _infer_body((0, 1, 28, 28)), "batch >= 1"),
    ("wrong datatype", "POST", INFER, _infer_body(datatype="FP64"), "datatype 'FP64'; allowed: FP32"),
    ("too few values", "POST", INFER, _infer_body(data=[0.5] * 10), "data has 10 values"),
    ("strings as data", "POST", INFER, _infer_body(data=["a"] * 784), "not a (nested) list of numbers"),
    ("NaN input", "POST", INFER, _infer_body(data=[float("nan")] * 784), "NaN or Inf"),
    ("unknown input", "POST", INFER, _infer_body(name="input"), "unknown input 'input'"),
    ("unknown output", "POST", INFER, {**_infer_body(), "outputs": [{"name": "logit"}]},
     "unknown output 'logit'; did you mean logits"),
    ("unknown returnt", "POST", INFER, {**_infer_body(), "parameters": {"returnt": "all"}},
     "returnt='all' is not served; allowed: out, features, both, full"),
    ("returnt without the output", "POST", INFER,
     {**_infer_body(), "parameters": {"returnt": "out"}, "outputs": [{"name": "stage_0"}]}, "has no output 'stage_0'"),
    ("malformed JSON", "POST", INFER, b'{"inputs": [', "not valid JSON"),
    ("JSON list", "POST", INFER, b"[1, 2]", "JSON list; expected an object"),
    ("no inputs", "POST", INFER, {"outputs": []}, "inputs: Field required"),
    ("over the size limit", "POST", INFER, b"{" + b" " * LIMIT + b"}", f"over the limit of {LIMIT}", 413),
    ("output name not a string", "POST", INFER, {**_infer_body(), "outputs": [{"name": [1]}]},
     "outputs.0.name: Input should be a valid string"),
    ("nested 100k levels deep", "POST", INFER, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "nests 100001 levels deep"),
    ("data nested as 784 x [1]", "POST", INFER, _infer_body(data=[[0.5]] * 784), "data is nested as [784, 1]"),
    ("id not a string", "POST", INFER, {**_infer_body(), "id": {"a": 1}}, "id: Input should be a valid string"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_one_line_4xx_and_the_server_keeps_serving(server, case):
    import httpx

    _, method, path, body, fragment, *status = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.request(method, server.url + path, content=content, timeout=TIMEOUT_S)
    assert resp.status_code == (status[0] if status else 400), resp.text
    assert "\n" not in resp.text.strip() and fragment in resp.json()["error"], resp.text
    ok = httpx.post(f"{server.url}/v2/models/mnistmlp/infer", json=_infer_body(), timeout=TIMEOUT_S)
    assert ok.status_code == 200, ok.text


def test_binary_input_with_wrong_size_is_refused(server):
    import httpx

    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "parameters": {"binary_data_size": 784 * 4}}]}).encode()
    resp = httpx.post(f"{server.url}/v2/models/mnistmlp/infer", content=head + b"\0" * 100,
                      headers={"Inference-Header-Content-Length": str(len(head))}, timeout=TIMEOUT_S)
    assert resp.status_code == 400 and "needs exactly 3136 bytes" in resp.json()["error"], resp.text


def test_handle_api_takes_numpy(ray_driver, models):
    from ray import serve

    net, _ = models["mnistmlp"]
    handle = serve.get_app_handle("mnistmlp")
    x = _x(net.input_shape, 4, seed=3)
    logits, feats = handle.infer.remote(x, returnt="both").result(timeout_s=TIMEOUT_S)
    for got, want in zip((logits, feats), _eager(net, x, "both")):
        assert_within_bound(got, want)
    with pytest.raises(ValueError, match="unknown returnt 'all'"):
        handle.infer.remote(x, returnt="all").result(timeout_s=TIMEOUT_S)


def test_concurrent_requests_of_different_sizes_and_modes_are_batched_back_correctly(server, models):
    """Many requests at once: the replicas batch them (different batch sizes concatenated, per
    mode) and every request gets its own rows back."""
    import httpx

    from tests.test_oip import HEADER_LENGTH, decode_infer_response, encode_infer_request

    net, _ = models["resnet18"]
    cases = [(_x(net.input_shape, 1 + i % 3, seed=100 + i), RETURNT_MODES[i % 4]) for i in range(24)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as client:
            async def one(x, mode):
                body, headers = encode_infer_request("x", x, returnt=mode)
                resp = await client.post("/v2/models/resnet18/infer", content=body, headers=headers)
                assert resp.status_code == 200, resp.text
                return decode_infer_response(resp.content, resp.headers.get(HEADER_LENGTH))
            return await asyncio.gather(*(one(x, m) for x, m in cases))

    for (x, mode), got in zip(cases, asyncio.run(run())):
        for g, want in zip(got.values(), _eager(net, x, mode)):
            assert_within_bound(g, want)


def test_a_killed_replica_costs_at_most_retriable_errors(server, ray_driver, models):
    """ray.kill on one replica during a bounded load: every request succeeds or gets 503 (none
    hangs, none is wrong); the deployment is back to two replicas and then all requests succeed."""
    from ray import serve

    from export.serving.loadtest import run_load

    net, _ = models["mnistmlp"]
    x = _x(net.input_shape, 1, seed=11)
    expected = {"logits": _eager(net, x, "out")[0]}
    handle = serve.get_app_handle("mnistmlp")
    names = {handle.replica_info.remote().result(timeout_s=TIMEOUT_S)["actor_name"] for _ in range(20)}
    assert len(names) == 2, names
    victim = sorted(names)[0]

    async def load_and_kill():
        task = asyncio.create_task(run_load(server.url, "mnistmlp", 400, 16, timeout_s=TIMEOUT_S,
                                            duration_s=60, expected=expected, x=x))
        await asyncio.sleep(0.5)
        assert not task.done(), "the load ended before the replica was killed"
        ray_driver.kill(ray_driver.get_actor(victim, namespace="serve"), no_restart=True)
        return await task

    result = asyncio.run(load_and_kill())
    assert set(result.errors) <= {"503"}, result.report()
    assert result.wrong == 0 and result.sent == 400, result.report()
    assert len(result.latencies_s) + result.errors.get("503", 0) == 400

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = serve.status().applications["mnistmlp"].deployments["Backbone"].replica_states
        if states.get("RUNNING") == 2 and len(states) == 1:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"deployment did not recover to 2 running replicas: {states}")
    # a new replica replaced the killed one; the handle's router hears of it asynchronously
    names_after: set[str] = set()
    deadline = time.monotonic() + 30
    while len(names_after) < 2 and time.monotonic() < deadline:
        names_after |= {handle.replica_info.remote().result(timeout_s=TIMEOUT_S)["actor_name"] for _ in range(10)}
        time.sleep(0.2)
    assert victim not in names_after and len(names_after) == 2, names_after
    after = asyncio.run(run_load(server.url, "mnistmlp", 100, 8, timeout_s=TIMEOUT_S, expected=expected, x=x))
    assert not after.errors and after.wrong == 0 and len(after.latencies_s) == 100, after.report()


def test_loadtest_command_reports_and_writes_json(server, tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "export", "loadtest", server.url, "--model", "resnet18",
                           "--requests", "60", "--concurrency", "8", "--batch", "2", "--json", str(out),
                           "--server-pid", str(server.proc.pid)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] == 60 and report["errors"] == {} and report["wrong"] == 0
    # the replicas of the model under load did the inference: their CPU shows per request
    cpu = report["server_cpu_ms_per_request"]
    assert any(name.startswith("ray::ServeReplica:resnet18:Backbone") and ms > 0 for name, ms in cpu.items()), cpu
    assert report["images_per_s"] == pytest.approx(2 * report["requests_per_s"], rel=1e-3)
    assert report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]


def test_loadtest_counts_wrong_numbers(server, models):
    from export.serving.loadtest import run_load

    net, _ = models["mnistmlp"]
    x = _x(net.input_shape, 1, seed=5)
    wrong = {"logits": _eager(net, x, "out")[0] + 1.0}
    result = asyncio.run(run_load(server.url, "mnistmlp", 10, 2, timeout_s=TIMEOUT_S, expected=wrong, x=x))
    assert result.wrong == 10 and result.latencies_s == []


def test_loadtest_unreachable_server_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "export", "loadtest", f"http://127.0.0.1:{free_port()}",
                           "--model", "resnet", "--requests", "1", "--timeout-s", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot reach" in proc.stderr, proc.stderr


def test_tampered_directory_refuses_to_start(models, tmp_path):
    _, directory = models["mnistmlp"]
    bad = tmp_path / "mnistmlp"
    shutil.copytree(directory, bad)
    data = bytearray((bad / "out.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "out.onnx").write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "export", "serve", str(bad), "--port", str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "sha256" in proc.stderr and "out.onnx" in proc.stderr, proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # refused before Ray started


@pytest.mark.parametrize("args, fragment", [
    (["--replicas", "0"], "--replicas 0 is not allowed"),
    (["--engine", "aoti"], "lists no"),
    (["--engine", "onnxruntime", "--precision", "bf16"], "no precision 'bf16'"),
    (["--port", "70000"], "--port 70000 is not allowed"),
    (["--haproxy", "--address", "127.0.0.1:1"], "--haproxy applies to a local Ray instance"),
    (["--haproxy", "--grpc-port", "9001"], "use one of the two"),
    (["--grpc-port", "8000"], "--grpc-port 8000 is not allowed; expected 1-65535, not the HTTP --port"),
])
def test_bad_serve_options_are_one_line(models, args, fragment, capsys):
    """Through the command's entry point in this process (the first case as a real command):
    refused before Ray starts, one line, exit status 2."""
    from export.cli import main

    _, directory = models["mnistmlp"]
    if args == ["--replicas", "0"]:
        proc = subprocess.run([sys.executable, "-m", "export", "serve", str(directory), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = main(["serve", str(directory), *args]), capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


def test_print_config_is_a_serve_deploy_config(models, capsys):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from export.cli import main

    dirs = [str(d) for _, d in models.values()]
    assert main(["serve", *dirs, "--replicas", "3", "--print-config"]) == 0
    config = ServeDeploySchema.model_validate(yaml.safe_load(capsys.readouterr().out))
    apps = {a.name: a for a in config.applications}
    assert set(apps) == {"mnistmlp", "resnet18", "oip"}
    assert apps["oip"].route_prefix == "/" and apps["mnistmlp"].route_prefix is None
    assert apps["resnet18"].args["replicas"] == 3 and apps["resnet18"].args["directory"] == dirs[1]
    # the default limit takes batch 64 at 3x224x224 in binary
    assert apps["oip"].args["max_request_bytes"] > 64 * 3 * 224 * 224 * 4 + 1000
    assert config.grpc_options is None or not config.grpc_options.grpc_servicer_functions
    assert main(["serve", *dirs, "--grpc-port", "9001", "--print-config"]) == 0
    config = ServeDeploySchema.model_validate(yaml.safe_load(capsys.readouterr().out))
    assert config.grpc_options.port == 9001
    assert config.grpc_options.grpc_servicer_functions == ["export.serving.grpc_oip.add_inference_service"]


def test_triton_repository_of_several_directories(models, tmp_path, capsys):
    """One `triton` call over two export directories writes both models' repositories; the same
    backbone twice is refused in one line (its model directories would replace each other)."""
    from export.cli import main

    dirs = [str(d) for _, d in models.values()]
    assert main(["triton", *dirs, "--repo", str(tmp_path / "r"), "--backends", "onnxruntime"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.is_dir()) == sorted(
        f"{name}_{mode}" for name in models for mode in RETURNT_MODES)
    capsys.readouterr()
    assert main(["triton", dirs[0], dirs[0], "--repo", str(tmp_path / "s"), "--backends", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "both hold backbone 'mnistmlp'" in err and not (tmp_path / "s").exists()


def test_the_batch_function_splits_mixed_requests_back(models):
    """run_batch (the replica's batch function) on an in-process engine: mixed sizes and modes
    give each request exactly what a call of its own gives."""
    from export.runtime import load
    from export.serving.app import run_batch

    net = load(models["mnistmlp"][1])
    items = [(_x(net.input_shape, n, seed=n), mode, "1") for n, mode in [(1, "out"), (3, "full"), (2, "out"),
                                                                            (1, "both")]]
    for (x, mode, _), got in zip(items, run_batch({"1": net}, items)):
        want = flat_outputs(net(x, returnt=mode))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.shape, w.shape)
            assert_within_bound(g, w)


_IMAGENET: dict = {}


def _imagenet_batch(net, batch: int):
    """(float64 values with two decimals, the same as float32, eager 'both' outputs) of a
    3x224x224 batch, made once per size for the HTTP, JSON and gRPC tests."""
    if batch not in _IMAGENET:
        # two decimals keep the JSON body compact (their float64 repr is short)
        x64 = np.round(_x((3, 224, 224), batch, seed=batch).astype(np.float64), 2)
        x = x64.astype(np.float32)
        _IMAGENET[batch] = (x64, x, _eager(net, x, "both"))
    return _IMAGENET[batch]


def _post_binary(server, model: str, x: np.ndarray, outputs, timeout: float = 120.0):
    """tritonclient.http's request and parser (binary tensors both ways)."""
    import tritonclient.http as th

    client = th.InferenceServerClient(server.host_port, network_timeout=timeout, connection_timeout=timeout)
    inp = th.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[th.InferRequestedOutput(n) for n in outputs])


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize("tensors", ["binary", "json"])
def test_imagenet_size_requests_pass_every_hop(server, models, batch, tensors):
    """3x224x224 at batch 8 (4.8 MB binary) and 32 (19 MB binary, ~30 MB JSON) through the
    proxy, the ingress and the replica; over 4 MB these failed with 500 before."""
    import httpx

    net, _ = models["resnet18"]
    x64, x, want = _imagenet_batch(net, batch)
    if tensors == "binary":
        got = _post_binary(server, "resnet18", x, ["logits", "features"])
        outs = [got.as_numpy("logits"), got.as_numpy("features")]
    else:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x64.tolist()}],
                "outputs": [{"name": "logits"}, {"name": "features"}]}
        content = json.dumps(body).encode()
        assert 4 << 20 < len(content) < LIMIT
        resp = httpx.post(f"{server.url}/v2/models/resnet18/infer", content=content, timeout=120.0)
        assert resp.status_code == 200, resp.text[:300]
        outs = [np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in resp.json()["outputs"]]
    for got, w in zip(outs, want):
        assert_within_bound(got, w)


def test_a_request_just_under_the_limit_is_served_and_one_byte_over_is_413(server, models):
    import httpx

    net, _ = models["mnistmlp"]
    per_image = 4 * int(np.prod(net.input_shape))
    head_room = 300  # the JSON part of the body
    batch = (LIMIT - head_room) // per_image
    x = _x(net.input_shape, batch, seed=21)
    got = _post_binary(server, "mnistmlp", x, ["logits"])
    assert_within_bound(got.as_numpy("logits"), _eager(net, x, "out")[0])
    resp = httpx.post(f"{server.url}/v2/models/mnistmlp/infer", content=b"{" + b" " * (LIMIT - 1) + b"}",
                      timeout=TIMEOUT_S)
    assert resp.status_code == 413 and f"request of {LIMIT + 1} bytes" in resp.json()["error"], resp.text


def test_generated_mutations_never_get_a_5xx(server):
    """1,000 seeded variants of valid requests (types swapped, keys dropped and added, shapes and
    datatypes changed, bytes truncated and flipped, lying headers), 32 at a time: every answer
    is 200, or 4xx with one line of JSON naming the problem; then the server still serves."""
    import httpx

    from tests.mutations import variants

    cases = variants([1, 1, 28, 28], 1000, seed=2026)
    answers: list = [None] * len(cases)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as client:
            sem = asyncio.Semaphore(32)

            async def one(i, body, headers):
                async with sem:
                    resp = await client.post(INFER, content=body, headers=headers)
                    answers[i] = (resp.status_code, resp.headers.get("content-type", ""), resp.content)

            await asyncio.gather(*(one(i, body, headers) for i, (_, body, headers) in enumerate(cases)))

    asyncio.run(run())
    statuses: dict = {}
    for (what, body, _), (status, ctype, content) in zip(cases, answers):
        statuses[status] = statuses.get(status, 0) + 1
        assert status == 200 or 400 <= status < 500, (what, body[:200], status, content[:300])
        if status != 200:
            text = content.decode()
            assert ctype == "application/json" and "\n" not in text.strip(), (what, text)
            assert json.loads(text)["error"], (what, text)
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k != 200) > 500, statuses
    ok = httpx.post(f"{server.url}{INFER}", json=_infer_body(), timeout=TIMEOUT_S)
    assert ok.status_code == 200, ok.text


def _grpc_client(server):
    import tritonclient.grpc as tg

    assert server.grpc, "the test server runs with --grpc-port"
    return tg, tg.InferenceServerClient(server.grpc)


def test_grpc_health_and_metadata(server, models):
    tg, client = _grpc_client(server)
    assert client.is_server_live() and client.is_server_ready()
    for name, (_, directory) in models.items():
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name, as_json=True)
        manifest = json.loads((directory / "manifest.json").read_text())
        full = manifest["modes"]["full"]["outputs"]
        assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in full]
        assert meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["datatype"] == "FP32"
        assert meta["versions"] == ["1"]


@pytest.mark.parametrize("mode", RETURNT_MODES)
def test_grpc_infer_matches_eager_in_every_mode(server, models, mode):
    """tritonclient.grpc with raw tensors; the mode from parameters.returnt, or (no parameter)
    from the outputs named."""
    tg, client = _grpc_client(server)
    for name, (net, directory) in models.items():
        manifest = json.loads((directory / "manifest.json").read_text())
        names = [o["name"] for o in manifest["modes"][mode]["outputs"]]
        x = _x(manifest["input"]["shape"][1:], 3, seed=10 + len(mode))
        inp = tg.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        if mode == "both":
            result = client.infer(name, [inp], parameters={"returnt": mode})
        else:
            result = client.infer(name, [inp], outputs=[tg.InferRequestedOutput(n) for n in names])
        assert result.get_response().parameters["returnt"].string_param == mode
        assert [o.name for o in result.get_response().outputs] == names
        for got, want in zip([result.as_numpy(n) for n in names], _eager(net, x, mode)):
            assert_within_bound(got, want)


def test_grpc_large_batch(server, models):
    tg, client = _grpc_client(server)
    net, _ = models["resnet18"]
    _, x, want = _imagenet_batch(net, 32)
    inp = tg.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("resnet18", [inp], outputs=[tg.InferRequestedOutput("logits")], client_timeout=120)
    assert_within_bound(result.as_numpy("logits"), want[0])


@pytest.mark.parametrize("case, code, fragment", [
    ("unknown model", "NOT_FOUND", "unknown model 'mnistmpl'; did you mean mnistmlp"),
    ("wrong shape", "INVALID_ARGUMENT", "expected [batch, 1, 28, 28]"),
    ("wrong datatype", "INVALID_ARGUMENT", "datatype 'FP64'; allowed: FP32"),
    ("unknown output", "INVALID_ARGUMENT", "unknown output 'logit'; did you mean logits"),
    ("returnt not a string", "INVALID_ARGUMENT", "parameter returnt is a int64_param"),
    ("unknown returnt", "INVALID_ARGUMENT", "returnt='all' is not served"),
    ("NaN input", "INVALID_ARGUMENT", "NaN or Inf"),
])
def test_grpc_bad_requests_get_status_codes(server, case, code, fragment):
    from tritonclient.utils import InferenceServerException

    tg, client = _grpc_client(server)
    x = np.zeros((1, 1, 28, 28), np.float32)
    model, outputs, params = "mnistmlp", None, None
    if case == "unknown model":
        model = "mnistmpl"
    elif case == "wrong shape":
        x = np.zeros((1, 1, 28, 27), np.float32)
    elif case == "unknown output":
        outputs = [tg.InferRequestedOutput("logit")]
    elif case == "returnt not a string":
        params = {"returnt": 3}
    elif case == "unknown returnt":
        params = {"returnt": "all"}
    elif case == "NaN input":
        x[0, 0, 0, 0] = np.nan
    inp = tg.InferInput("x", list(x.shape), "FP64" if case == "wrong datatype" else "FP32")
    inp.set_data_from_numpy(x.astype(np.float64) if case == "wrong datatype" else x)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [inp], outputs=outputs, parameters=params)
    assert err.value.status() == f"StatusCode.{code}" and fragment in err.value.message(), err.value
    assert client.infer("mnistmlp", [tg.InferInput("x", [1, 1, 28, 28], "FP32").set_data_from_numpy(
        np.zeros((1, 1, 28, 28), np.float32))]).as_numpy("logits").shape == (1, 10)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_loadtest_over_both_protocols(server, models, protocol):
    from export.serving.loadtest import run_load

    net, _ = models["resnet18"]
    x = _x(net.input_shape, 2, seed=8)
    url = server.url if protocol == "http" else server.grpc
    result = asyncio.run(run_load(url, "resnet18", 40, 4, timeout_s=TIMEOUT_S, returnt="both", x=x,
                                  protocol=protocol,
                                  expected=dict(zip(["logits", "features"], _eager(net, x, "both")))))
    assert not result.errors and result.wrong == 0 and len(result.latencies_s) == 40, result.report()


# ---------------------------------------------------------------- weight versions: rollout, rollback, refusals


def _versioned_x(seed: int = 21) -> np.ndarray:
    return _x((3, 32, 32), 2, seed=seed)  # resnet18's input


async def _versioned_load(url: str, n: int, concurrency: int, x: np.ndarray, version=None, until=None,
                          most: int = 20000):
    """n infer requests at `concurrency` (tritonclient's HTTP encoder, httpx), and with `until`
    (an asyncio.Event) more until it is set, `most` at most: [(status, model version, logits or
    error text, time answered)] in the order answered."""
    import httpx
    import tritonclient.http as th

    inp = th.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, json_size = th.InferenceServerClient.generate_request_body(
        [inp], outputs=[th.InferRequestedOutput("logits", binary_data=True)])
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
    path = f"/v2/models/{CONTINUAL}" + (f"/versions/{version}" if version else "") + "/infer"
    answers: list = []
    sent = [0]

    def more() -> bool:
        return sent[0] < n or (until is not None and not until.is_set() and sent[0] < most)

    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as client:
        async def worker():
            while more():
                sent[0] += 1
                resp = await client.post(path, content=body, headers=headers)
                if resp.status_code != 200:
                    answers.append((resp.status_code, None, resp.text, time.monotonic()))
                    continue
                length = resp.headers.get("inference-header-content-length")
                result = th.InferenceServerClient.parse_response_body(
                    resp.content, header_length=int(length) if length else None)
                answers.append((200, result.get_response()["model_version"], result.as_numpy("logits"),
                                time.monotonic()))

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return answers


def _check_answers(continual, answers, x) -> dict:
    """Every answer 200 and equal to eager of the version it names; version -> count."""
    counts: dict = {}
    wanted = {}
    for status, version, logits, _ in answers:
        assert status == 200, (status, logits)
        v = int(version)
        if v not in wanted:
            wanted[v] = _eager(continual.eager[v], x, "out")[0]
        assert_within_bound(logits, wanted[v])
        counts[v] = counts.get(v, 0) + 1
    return counts


def _rollout(server, continual, version, check=True):
    proc = subprocess.run([sys.executable, "-m", "export", "rollout", str(continual.directory), "--version",
                           str(version), "--address", server.ray_address], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token"})
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _current(continual) -> dict:
    import urllib.request

    return json.loads(urllib.request.urlopen(f"{continual.url}/v2/models/{CONTINUAL}", timeout=TIMEOUT_S).read())


@pytest.fixture(scope="module")
def versioned(server, continual):
    continual.url = server.url
    yield continual
    from export.serving.rollout import rollout

    rollout(continual.directory, 1, server.ray_address)  # the export's weights again, for later tests


def test_a_versioned_model_starts_on_its_policy(versioned):
    meta = _current(versioned)
    assert meta["versions"] == ["1"] and meta["parameters"]["current_version"] == "1"
    assert len(meta["parameters"]["weights_sha256"]["1"]) == 64
    deployed = json.loads((versioned.directory / "versions" / "deployed.json").read_text())
    assert deployed[CONTINUAL]["version"] == 1


def test_a_deployment_rolls_through_the_tasks_under_load(server, ray_driver, versioned):
    """Versions 2 and 3 rolled out (the library's rollout, from this process joined to the
    cluster) while 480+ requests run at concurrency 16: none fails, each answer equals eager of
    the version it names, and once a rollout reports done every answer comes from its version."""
    from export.serving.rollout import rollout

    x = _versioned_x()

    async def load_and_roll():
        until = asyncio.Event()
        task = asyncio.create_task(_versioned_load(server.url, 480, 16, x, until=until))
        await asyncio.sleep(0.5)
        done_at = {}
        for version in (2, 3):
            assert not task.done(), "the load ended before the rollouts"
            result = await asyncio.to_thread(rollout, versioned.directory, version, server.ray_address)
            assert result.version == version and result.seconds < 60, result
            done_at[version] = time.monotonic()
        await asyncio.sleep(0.5)  # answers after the last rollout
        until.set()
        assert not task.done(), "the load stopped before the last rollout"
        return await task, done_at

    answers, done_at = asyncio.run(load_and_roll())
    counts = _check_answers(versioned, answers, x)
    assert set(counts) == {1, 2, 3} and 480 <= sum(counts.values()) < 20000, counts
    assert sum(1 for _, _, _, t in answers if t > done_at[3]) >= 10
    assert all(int(v) == 3 for _, v, _, t in answers if t > done_at[3])
    assert all(int(v) >= 2 for _, v, _, t in answers if t > done_at[2])
    meta = _current(versioned)
    assert meta["versions"] == ["1", "3"] and meta["parameters"]["current_version"] == "3"


def test_version_routes_answer_from_their_version(server, versioned):
    import tritonclient.grpc as tg

    x = _versioned_x(seed=22)
    for version in (1, 3):
        answers = asyncio.run(_versioned_load(server.url, 4, 2, x, version=version))
        assert _check_answers(versioned, answers, x) == {version: 4}
    answers = asyncio.run(_versioned_load(server.url, 1, 1, x, version=2))
    assert answers[0][0] == 404 and "has no version '2' served; versions: 1, 3" in answers[0][2]
    assert answers[0][2].count("\n") == 0
    client = tg.InferenceServerClient(server.grpc)
    inp = tg.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(CONTINUAL, [inp], model_version="1", outputs=[tg.InferRequestedOutput("logits")])
    assert result.get_response().model_version == "1"
    assert_within_bound(result.as_numpy("logits"), _eager(versioned.eager[1], x, "out")[0])
    assert client.get_model_metadata(CONTINUAL).versions == ["1", "3"]


def test_rollback_is_a_rollout_to_an_older_version(server, ray_driver, versioned):
    from export.serving.rollout import rollout

    result = rollout(versioned.directory, 1, server.ray_address)
    assert (result.version, result.previous) == (1, "3")
    x = _versioned_x(seed=23)
    assert _check_answers(versioned, asyncio.run(_versioned_load(server.url, 40, 8, x)), x) == {1: 40}


def test_tampered_and_foreign_signed_versions_are_refused_and_service_continues(server, ray_driver, versioned,
                                                                               capsys):
    """Version 4 published with the trusted key, then its weights changed on disk: `rollout`
    refuses in one line; version 5 signed with another key: refused too. Version 1 keeps serving."""
    from export.cli import main
    from export.errors import IntegrityError
    from export.serving.rollout import rollout

    directory = versioned.directory
    assert main(["publish", str(directory), str(versioned.checkpoints[3]), "--sign-key",
                 str(versioned.trusted[0])]) == 0
    weights = directory / "versions" / "4" / "weights.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"
    weights.write_bytes(bytes(data))
    proc = _rollout(server, versioned, 4, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "sha256 does not match version 4" in proc.stderr
    assert main(["publish", str(directory), str(versioned.checkpoints[4]), "--sign-key",
                 str(versioned.foreign[0])]) == 0
    with pytest.raises(IntegrityError, match="version 5: signature does not verify with trusted.pub"):
        rollout(directory, 5, server.ray_address)
    x = _versioned_x(seed=24)
    assert _check_answers(versioned, asyncio.run(_versioned_load(server.url, 20, 4, x)), x) == {1: 20}
    assert _current(versioned)["parameters"]["current_version"] == "1"


def test_a_replica_killed_during_a_rollout_comes_back_on_the_target(server, ray_driver, versioned):
    from ray import serve

    handle = serve.get_app_handle(CONTINUAL)
    victim = handle.replica_info.remote().result(timeout_s=TIMEOUT_S)["actor_name"]
    from export.serving.rollout import rollout

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(rollout, versioned.directory, 2, server.ray_address)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the controller is updating the replicas
            status = serve.status().applications[CONTINUAL]
            if str(getattr(status.status, "value", status.status)) != "RUNNING" or done.done():
                break
            time.sleep(0.02)
        ray_driver.kill(ray_driver.get_actor(victim, namespace="serve"), no_restart=True)
        assert done.result(timeout=300).version == 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = serve.status().applications[CONTINUAL].deployments["Backbone"].replica_states
        if states == {"RUNNING": 2}:
            break
        time.sleep(0.5)
    infos = []
    for _ in range(20):
        infos.append(handle.replica_info.remote().result(timeout_s=TIMEOUT_S))
    assert {i["version"] for i in infos} == {"2"}, infos
    assert victim not in {i["actor_name"] for i in infos}
    x = _versioned_x(seed=25)
    assert _check_answers(versioned, asyncio.run(_versioned_load(server.url, 40, 8, x)), x) == {2: 40}


def test_a_replica_starts_only_on_the_directory_serve_checked(models, tmp_path):
    """The pin `serve` gives each replica and the ingress: a directory changed since (a
    re-export, `params write`) is refused at (re)start in one line, so replicas never answer
    with different weights under one model version; the checked directory starts."""
    from export.errors import ExportError
    from export.serving.app import Backbone, OipIngress
    from export.serving.config import files_sha256

    _, directory = models["mnistmlp"]
    pinned = files_sha256(directory)
    replica = Backbone.func_or_class(str(directory), files_sha256=pinned)
    assert replica.held.nets["1"].manifest.backbone.name == "mnistmlp"
    changed = tmp_path / "mnistmlp"
    shutil.copytree(directory, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["source"] = {**manifest.get("source", {}), "note": "only the manifest's notes changed"}
    (changed / "manifest.json").write_text(json.dumps(manifest))
    Backbone.func_or_class(str(changed), files_sha256=pinned)  # the same files: starts
    name = "out.onnx"  # a re-export: another file under a listed name, hashed into the manifest
    (changed / name).write_bytes((changed / name).read_bytes() + b"\0")
    manifest["files"][name] = {"sha256": hashlib.sha256((changed / name).read_bytes()).hexdigest(),
                               "size": (changed / name).stat().st_size}
    (changed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"changed since `serve` checked it .*restart serve") as err:
        Backbone.func_or_class(str(changed), files_sha256=pinned)
    assert "\n" not in str(err.value)
    with pytest.raises(ExportError, match="changed since"):
        OipIngress.func_or_class([str(changed)], files_sha256s=[pinned])


def test_a_restarted_replica_never_serves_a_directory_changed_under_it(server, ray_driver, models):
    """What issue 22 measured on the old server: new weights exported into a served directory,
    then one replica killed (as a crash would). Every answer still comes from the weights
    `serve` started with (the replacement refuses the changed manifest); none from the new.
    Last in the module: it changes the served directory (restored after)."""
    from ray import serve

    from export.serving.loadtest import run_load

    net, directory = models["mnistmlp"]
    x = _x(net.input_shape, 1, seed=12)
    old = {"logits": _eager(net, x, "out")[0]}
    backup = directory.parent / "mnistmlp.backup"
    shutil.copytree(directory, backup)
    changed = build_small("mnistmlp")[0]
    with torch.no_grad():
        changed.set_params(changed.get_params() * 0.5)
    assert not np.allclose(_eager(changed, x, "out")[0], old["logits"])
    try:
        export_backbone(changed, directory, input_shape=net.input_shape, formats=("onnx",))
        handle = serve.get_app_handle("mnistmlp")
        victim = handle.replica_info.remote().result(timeout_s=TIMEOUT_S)["actor_name"]
        ray_driver.kill(ray_driver.get_actor(victim, namespace="serve"), no_restart=True)
        def backbone_status():
            return serve.status().applications["mnistmlp"].deployments["Backbone"]

        deadline = time.monotonic() + 60
        while backbone_status().replica_states == {"RUNNING": 2} and time.monotonic() < deadline:
            time.sleep(0.2)  # until the controller has noticed the kill
        # then until the replacement has started (the bug) or has refused the changed directory
        while time.monotonic() < deadline:
            status = backbone_status()
            if status.replica_states.get("RUNNING", 0) == 2 or "changed since" in status.message:
                break
            time.sleep(0.5)
        assert "changed since `serve` checked it" in status.message, (status.replica_states, status.message)
        result = asyncio.run(run_load(server.url, "mnistmlp", 80, 8, timeout_s=TIMEOUT_S, expected=old, x=x))
        assert result.wrong == 0 and set(result.errors) <= {"503"}, result.report()
        assert len(result.latencies_s) >= 70, result.report()
    finally:
        shutil.rmtree(directory)
        shutil.move(str(backup), str(directory))
