"""The built wheel, installed into a fresh virtual environment, works from a folder outside the clone.

The fresh environment gets the wheel with ``pip install --no-deps``; its dependencies (torch, Ray, ...)
come from the project's environment through a ``.pth`` path line, so the test takes seconds to set
up instead of reinstalling 2 GB. That path holds no ``distunmix`` package (the project's own install
is an editable finder, which a path line does not activate), and a check below proves that every
``distunmix`` module imported there is the wheel's. Every command runs with the temporary folder as
its working directory, on one Ray instance started by the fresh environment's Python.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from distunmix.serve.client import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    dist, venv, work = tmp / "dist", tmp / "venv", tmp / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, cwd=tmp)  # fmt: skip
    wheel = next(dist.glob("distunmix-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    (_site_packages(venv) / "_project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "RAY_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(
        PATH=f"{venv / 'bin'}:{env['PATH']}", HOME=str(tmp / "home"), DISTUNMIX_CACHE=str(tmp / "cache"),
        RAY_AUTH_MODE="disabled", MPLBACKEND="Agg", PYTHONUNBUFFERED="1", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
    )  # fmt: skip
    # one Ray for every command, started by the fresh environment's Python: its workers import the wheel
    head = subprocess.Popen(
        [python, "-c", "import ray, sys; ray.init(address='local', num_cpus=2, log_to_driver=False, "
         "include_dashboard=False); print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=work, env=env,
    )  # fmt: skip
    env["RAY_ADDRESS"] = head.stdout.readline().strip()
    yield {"wheel": wheel, "venv": venv, "python": python, "work": work, "env": env}
    head.stdin.close()  # the driver shuts its Ray down and exits
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


def _run(env: dict, *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(command, cwd=env["work"], env=env["env"], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{command}: rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_the_wheel_holds_the_package_data_and_no_top_level_entry_points(wheel_env):
    names = zipfile.ZipFile(wheel_env["wheel"]).namelist()
    assert {"distunmix/tuning/spaces/quick.yaml", "distunmix/tuning/spaces/seed.yaml"} <= set(names)
    assert "distunmix/serve/app.py" in names and "distunmix/cli/__init__.py" in names
    assert not [n for n in names if n.startswith(("tune/", "serve/", "tests/"))]
    code = "import distunmix, distunmix.serve.app, distunmix.tuning.space as s; print(distunmix.__file__, s.SPACES)"
    out = _run(wheel_env, str(wheel_env["python"]), "-c", code).stdout
    site = str(_site_packages(wheel_env["venv"]))
    assert out.startswith(site) and str(ROOT) not in out


def test_tune_and_serve_from_outside_the_clone(wheel_env):
    env = wheel_env
    _run(env, "distunmix", "tune", "--space", "quick", "--num-samples", "1", "--max-epochs", "1", "--speed-seconds",
         "1", "--synth-tracks", "3", "--synth-duration", "3", "--name", "t", "-q")  # fmt: skip
    best = env["work"] / "runs" / "t" / "best"
    assert (best / "separator.json").is_file()
    _run(env, "distunmix", "synth-clip", "clip.wav", "--duration", "2")
    port = free_port()
    server = subprocess.Popen(["distunmix", "serve", "-m", str(best), "--port", str(port)], cwd=env["work"],
                              env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _wait_healthy(port, server)
        out = _run(env, "distunmix", "client", f"http://127.0.0.1:{port}", "clip.wav", "-o", "sep").stdout
        assert "t-best" in out and len(list((env["work"] / "sep" / "t-best" / "clip").glob("*.wav"))) == 4
    finally:
        _stop(server)
        _serve_shutdown(env)
    # serve run with the package's builder, as serve/config.yaml does, from a config written here
    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = free_port()
    doc["http_options"]["port"] = port
    doc["applications"][0]["args"]["model"] = str(best)
    (env["work"] / "app.yaml").write_text(yaml.safe_dump(doc))
    server = subprocess.Popen([str(env["python"]), "-m", "ray.serve.scripts", "run", "app.yaml"], cwd=env["work"],
                              env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _wait_healthy(port, server)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=30) as r:
            assert b'"t-best"' in r.read()
    finally:
        _stop(server)
        _serve_shutdown(env)


def _wait_healthy(port: int, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no healthy server on port {port} after {timeout} s")


def _serve_shutdown(env: dict) -> None:
    """No Serve app left on the module's shared Ray (a server stopped the hard way leaves its
    replicas holding CPUs, and the demo's training after it would wait for them)."""
    code = "import ray; from ray import serve; ray.init(log_to_driver=False); serve.shutdown()"
    subprocess.run([str(env["python"]), "-c", code], cwd=env["work"], env=env["env"], capture_output=True, timeout=120)


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
