"""Every command in README.md runs, at small sizes, and the demo's report agrees with its sources.

The README's ``bash`` and ``python`` blocks are extracted and executed in order, in a copy of the
repository (tracked files, the same ``.venv``) with ``HOME`` in a temporary folder. Each command
must match exactly one rule of ``RULES``, which says how it runs here: as written, or with
flags appended (argparse keeps the last value of a repeated flag) to shrink epochs, tracks and
trials, with GPU flags dropped (no GPU here), and with the placeholder dataset and storage paths
(``/data/musdb18hq``, ``/shared/...``) and the port replaced by local ones; ``s3://bucket`` is a
real S3-compatible server (moto) on 127.0.0.1, named by the standard AWS environment. A
command no rule matches fails the test, so a new README command needs a way to run first.

All commands share one Ray instance started by this module (``RAY_ADDRESS``); ``ray job submit``
goes to its dashboard. ``./run.sh demo`` is the demo test: the report checks below read its output.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from distunmix.data.synth import split_counts
from distunmix.demo.pipeline import SIZES, STAGES
from distunmix.demo.report import FIGURES
from distunmix.realtime import verdict
from distunmix.serve.client import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


# -- extraction ----------------------------------------------------------------------------------------
def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced ``bash`` or ``python`` block, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S)]


def bash_commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comment-only and blank lines dropped."""
    out, current = [], ""
    for line in body.splitlines():
        current += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            out.append(re.sub(r"\s+#.*$", "", current).strip())
        current = ""
    return out


# -- how each command runs here ------------------------------------------------------------------------
SMALL_TRAIN = "--epochs 1 --hidden-size 16 --seq-dur 1 --samples-per-track 2 --batch-size 2 --loader-workers 0"
SMALL_DATA = "--synth-tracks 5 --synth-duration 4"
SMALL_TUNE = "--space quick --num-samples 1 --max-epochs 1 --speed-seconds 1 --cpus-per-trial 1"
UMXHQ_TRAIN = SMALL_TRAIN.replace("--hidden-size 16 ", "")  # --init-from umxhq: its hidden size, 512
ONE_CPU = "--num-workers 1 --cpus-per-worker 1"  # DDP itself is run by the readme-train command and the demo


@dataclass(frozen=True)
class Rule:
    pattern: str  # re.search on the README command
    append: str = ""  # flags added at the end
    kind: str = "run"  # run | server | ci | python
    timeout: float = 300.0


RULES = [
    Rule(r"^\./run\.sh test$", kind="ci"),  # the suite itself: CI's .ci/run runs it (checked below)
    # its tuning and training runs on S3 (and copied back for the report): the wheel test's demo did this
    Rule(r"^\./run\.sh demo$", append="--size tiny --storage-path s3://bucket/demo", timeout=900),
    Rule(r"distunmix synth-clip ", append="--duration 6"),
    Rule(r"distunmix init-model "),
    Rule(r"distunmix separate "),
    Rule(r"distunmix export "),
    Rule(r"distunmix synth data/", append="--tracks 5 --duration 8"),  # the Python example reads 6 s excerpts
    Rule(r"distunmix prepare --root "),
    Rule(r"distunmix prepare$", append=SMALL_DATA),
    Rule(r"distunmix train .*--name readme-train", append="--synth-tracks 5 --synth-duration 4 --samples-per-track 2"),
    Rule(r"distunmix train --root \S+musdb18hq ", append=f"{SMALL_TRAIN} {ONE_CPU}"),
    Rule(r"distunmix train --root /shared/my_stems ", append=f"{UMXHQ_TRAIN} {ONE_CPU}"),
    Rule(r"python -m tune --space quick ", append="--num-samples 1 --max-epochs 1 --speed-seconds 1"),
    Rule(r"^ray job submit ", append=SMALL_TUNE, timeout=600),
    Rule(r"\.venv/bin/serve run ", kind="server"),
    Rule(r"distunmix serve ", kind="server"),
    Rule(r"^mkdir -p models && cp -r "),  # a models root for multiplexing, from the README's own models
    Rule(r"^curl "),
    Rule(r"distunmix client "),
    Rule(r"distunmix evaluate ", append="--synth-tracks 5 --synth-duration 4"),
    Rule(r"distunmix stream "),
    Rule(r"python benchmarks/scaling\.py"),
    Rule(r"", kind="python"),  # python blocks
]


def rule_for(lang: str, command: str) -> Rule | None:
    if lang == "python":
        return RULES[-1]
    matches = [r for r in RULES[:-1] if re.search(r.pattern, command)]
    return matches[0] if matches else None


def readme_commands() -> list[tuple[int, str, str]]:
    """(block number, language, command) in README order."""
    out = []
    for k, (lang, body) in enumerate(readme_blocks(README.read_text())):
        commands = bash_commands(body) if lang == "bash" else [body]
        out += [(k, lang, c) for c in commands]
    return out


def test_every_readme_command_has_a_rule_and_every_rule_a_command():
    commands = readme_commands()
    assert len(commands) > 20
    missing = [c for _, lang, c in commands if rule_for(lang, c) is None]
    assert not missing, f"README commands no rule in tests/test_readme.py runs: {missing}"
    used = {id(rule_for(lang, c)) for _, lang, c in commands}
    unused = [r.pattern for r in RULES if id(r) not in used]
    assert not unused, f"rules that match no README command (stale): {unused}"


def test_extraction_joins_continuations_and_drops_comments():
    body = "# a comment\nfoo --a 1 \\\n    --b 2   # trailing\n\nbar\n"
    assert bash_commands(body) == ["foo --a 1      --b 2", "bar"]
    blocks = readme_blocks("x\n```bash\nls\n```\n```text\nno\n```\n```python\nprint(1)\n```\n")
    assert blocks == [("bash", "ls\n"), ("python", "print(1)\n")]


def test_ci_runs_the_readme_test_command():
    """``./run.sh test`` is not run from inside the suite it starts; CI runs exactly it."""
    assert "./run.sh test" in README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*(exec\s+)?\./run\.sh test\b", ci, re.M), ci


# -- the sandbox ---------------------------------------------------------------------------------------
@dataclass
class Sandbox:
    repo: Path
    home: Path
    env: dict[str, str]
    port: int
    log: list[str]

    def substitute(self, command: str) -> str:
        data = self.home / "data"
        command = command.replace("/data/musdb18hq", str(data / "musdb18hq"))
        command = command.replace("/shared/musdb18hq", str(data / "musdb18hq"))
        command = command.replace("/shared/", f"{self.home}/")  # my_stems, models/umxhq
        command = re.sub(r"\s--use-gpu\b", "", command)
        command = re.sub(r"--gpus-per-trial [0-9.]+", "--gpus-per-trial 0", command)
        command = command.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
        return command.replace("--port 8000", f"--port {self.port}")

    def run(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        p = subprocess.run(
            ["bash", "-c", command], cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.log.append(f"{time.perf_counter() - t0:6.1f} s  rc {p.returncode}  {command}")
        return p


def _copy_repo(dest: Path) -> None:
    """The repository's files (committed or not, ignored ones left out) and a link to its .venv."""
    listed = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listed, cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def _fixtures(sb: Sandbox) -> None:
    """What the README assumes a user has: songs, an album, official-style weights, a dataset, stems."""
    from distunmix.cli import main

    home, repo = sb.home, sb.repo
    steps = [
        ["synth-clip", str(repo / "other_song.flac"), "--duration", "3", "--seed", "5"],
        ["synth-clip", str(repo / "my_album" / "track1.wav"), "--duration", "3", "--seed", "6"],
        ["synth", str(home / "data" / "musdb18hq"), "--tracks", "5", "--duration", "4", "--seed", "1"],
        ["init-model", str(home / "models" / "umxhq"), "--seed", "3"],  # umxhq's architecture
    ]
    for step in steps:
        assert main(step) == 0, step
    # official weights come as <target>-<hash>.pth files and nothing else
    umx = home / "models" / "umxhq"
    hashes = {"vocals": "b62c91ce", "drums": "9619578f", "bass": "8d85a5bd", "other": "b52fbbf7"}
    for f in umx.iterdir():
        if f.suffix == ".pth":
            f.rename(umx / f"{f.stem}-{hashes[f.stem]}.pth")
        else:
            f.unlink()
    # your own stems, trackfolder layout: root/{train,valid}/<track>/<source>.wav
    stems = home / "my_stems"
    for split, track in (("train", "Artist - One"), ("train", "Artist - Two"), ("valid", "Artist - Three")):
        src = next((home / "data" / "musdb18hq" / "train").iterdir())
        shutil.copytree(src, stems / split / track)
    assert (repo / "other_song.flac").is_file()


def _check_setup_is_current() -> None:
    """./run.sh demo in the copy would reinstall (into the shared .venv, from the copy) if the
    environment were older than pyproject.toml and run.sh: refuse, as CI runs set-up first."""
    import hashlib

    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "run.sh").read_bytes()).hexdigest()[:16]
    stamp = ROOT / ".venv" / ".distunmix-installed"
    if not stamp.is_file() or stamp.read_text().strip() != want:
        pytest.fail("the .venv is older than pyproject.toml or run.sh: run ./run.sh setup (./run.sh test does)")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, s3):  # s3: the AWS environment is set before Ray starts
    import ray

    _check_setup_is_current()

    base = tmp_path_factory.mktemp("readme")
    repo, home = base / "repo", base / "home"
    repo.mkdir()
    home.mkdir()
    _copy_repo(repo)
    port = free_port()
    config = repo / "serve" / "config.yaml"
    config.write_text(config.read_text().replace("port: 8000", f"port: {port}"))
    dashboard = free_port()
    saved = dict(os.environ)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # what processes of the Ray instance (a job's driver too) inherit: the venv's python, the caches
    os.environ["PATH"] = f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"
    os.environ["DISTUNMIX_CACHE"] = str(home / ".cache" / "distunmix")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    # a head node of its own, its dashboard agent on a free port: another test's Ray on this machine
    # holds the agent's default port, and ray job submit needs this instance's agent
    from ray.cluster_utils import Cluster

    # and a Ray temp folder of its own: a job's driver joins the cluster named in the temp folder's
    # ray_current_cluster (Ray's job supervisor resolves "auto"), which another test's Ray on this
    # machine overwrites in the shared /tmp/ray (the README's tune job once ran on that other
    # instance, where its working dir package did not exist). Short: Ray's sockets live below it.
    ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    # started in the repository root, as a user's `ray start` there: `serve run` builds its app in a
    # worker of this instance, where a relative path (serve/config.yaml's default runs/) means the
    # folder the instance started in
    here = os.getcwd()
    os.chdir(repo)
    try:
        head = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
            "dashboard_agent_listen_port": free_port()})  # fmt: skip
    finally:
        os.chdir(here)
    ray.init(address=head.address, log_to_driver=False)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        "HOME": str(home),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}",
        "RAY_AUTH_MODE": "disabled",
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # Ray Train notices a finished run sooner (default 2 s)
    }
    sb = Sandbox(repo, home, env, port, [])
    try:
        _wait_for_job_agent(f"http://127.0.0.1:{dashboard}")
        _fixtures(sb)
        yield sb
    finally:
        ray.shutdown()
        head.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)
        print("\n".join(sb.log))


def _wait_for_job_agent(url: str, timeout: float = 180.0) -> None:
    """Until the new Ray instance's job agent takes jobs (on a busy machine it starts after
    ray.init returns, and ``ray job submit`` fails with 'No available agent' before)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "a trivial Ray job did not finish"
        time.sleep(0.5)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/healthz did not answer within {timeout} s")


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop a README server, and Serve with it: all servers share this module's Ray, so an app a
    stopped server left running would answer the next server's health check (seen: a stream client
    reached the previous block's models)."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    from ray import serve

    serve.shutdown()  # a no-op when the server shut Serve down itself


@pytest.fixture(scope="module")
def readme_run(sandbox):
    """Run every README command in order; returns {command: CompletedProcess} (servers: their output)."""
    results: dict[str, subprocess.CompletedProcess | str] = {}
    server: subprocess.Popen | None = None
    block = -1
    for k, lang, command in readme_commands():
        if k != block:
            _stop(server)
            server, block = None, k
        rule = rule_for(lang, command)
        if rule.kind == "ci":
            continue
        if rule.kind == "python":
            script = sandbox.repo / f"readme_block_{k}.py"
            script.write_text(command)
            results[command] = sandbox.run(f"{sys.executable} {script.name}", rule.timeout)
            continue
        line = sandbox.substitute(command) + (f" {rule.append}" if rule.append else "")
        if rule.kind == "server":
            _stop(server)
            server = subprocess.Popen(
                ["bash", "-c", line], cwd=sandbox.repo, env=sandbox.env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )  # fmt: skip
            _wait_healthy(f"http://127.0.0.1:{sandbox.port}", server, 240)
            sandbox.log.append(f"server up: {line}")
            results[command] = "up"
            continue
        results[command] = sandbox.run(line, rule.timeout)
    _stop(server)
    return results


def _first_traceback(text: str, limit: int = 4000) -> str:
    """The first Python traceback in a command's output (a Ray job's trial failures are logged there,
    far from the tail), or ''."""
    start = text.find("Traceback (most recent call last)")
    return text[start : start + limit] if start >= 0 else ""


@pytest.mark.integration
@pytest.mark.timeout(1200)  # the README's commands run in this test's set-up: ~9 min beside another test process
def test_readme_commands_run(readme_run):
    failed = {
        c: (p.returncode, _first_traceback(p.stdout + p.stderr), p.stdout[-1500:], p.stderr[-3000:])
        for c, p in readme_run.items()
        if not isinstance(p, str) and p.returncode != 0
    }
    assert not failed, json.dumps(failed, indent=1)
    assert len(readme_run) == len([c for _, lang, c in readme_commands() if rule_for(lang, c).kind != "ci"])


@pytest.mark.integration
def test_readme_commands_made_their_outputs(sandbox, readme_run):
    repo = sandbox.repo
    expected = [
        repo / "song.wav",
        repo / "separated" / "demo-model" / "song" / "vocals.wav",  # separate -m runs/demo/model
        repo / "separated" / "demo-model" / "other_song" / "bass.wav",
        repo / "separated" / "demo-model" / "track1" / "other.wav",
        repo / "separated" / "readme-train-best" / "song" / "vocals.wav",  # separate -m runs/readme-train/best
        repo / "separated" / "umxhq" / "song" / "drums.wav",  # official-style weights
        repo / "runs" / "readme-train" / "best" / "separator.json",
        repo / "runs" / "readme-tune" / "results.md",
        repo / "runs" / "umx-hq" / "best" / "vocals.pth",
        repo / "stems.zip",
        repo / "vocals.wav",
        repo / "runs" / "readme-eval" / "scores.md",
        repo / "separated" / "uni" / "song" / "vocals.wav",  # stream
        repo / "drums.wav",  # a multiplexed model's answer (by query)
        repo / "untrained.zip",  # and by Serve's header
        repo / "separator.onnx",  # export
        repo / "separated" / "separator" / "song" / "vocals.wav",  # separate --backend onnx
    ]
    missing = [str(p) for p in expected if not p.exists()]
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri("s3://bucket/")
    on_s3 = ["bucket/runs/my-vocals/best/vocals.pth",  # the cluster command
             "bucket/experiments/seed-study/results.csv"]  # ray job submit  # fmt: skip
    missing += [f"s3://{key}" for key in on_s3 if fs.get_file_info(key).type != pafs.FileType.File]
    assert not missing, missing
    import zipfile

    with zipfile.ZipFile(repo / "stems.zip") as z:
        assert sorted(z.namelist()) == ["drums.flac", "vocals.flac"]
    with zipfile.ZipFile(repo / "untrained.zip") as z:  # a ZIP of every target, not an error
        assert sorted(z.namelist()) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]


# -- the demo's outputs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(sandbox, readme_run):
    out = sandbox.repo / "runs" / "demo"
    assert (out / "demo.json").is_file(), "./run.sh demo did not run"
    return out


def _md_table(text: str, header_start: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)))
    return rows


@pytest.mark.integration
def test_demo_wrote_every_stage_and_report_file(demo):
    state = json.loads((demo / "demo.json").read_text())
    assert set(state["stages"]) == {s.name for s in STAGES}
    for name in (*FIGURES, "report.md", "serve.json", "speed.json"):
        assert (demo / name).stat().st_size > 0, name
    for rel in ("model/separator.json", "tune/results.csv", "train/history.json", "evaluation/scores.csv"):
        assert (demo / rel).is_file(), rel
    serve = json.loads((demo / "serve.json").read_text())
    assert serve["targets"] == ["bass", "drums", "other", "vocals"] and serve["max_abs_diff"] < 1e-4
    train = json.loads((demo / "train" / "config.json").read_text())
    assert train["num_workers"] == 2 and train["init_from"].endswith("tune/best")
    size = SIZES["tiny"]  # the final run spends its budget on its own excerpts and epochs
    assert (train["samples_per_track"], train["seq_dur"]) == (size.train_samples_per_track, size.train_seq_dur)


@pytest.mark.integration
def test_the_demos_model_card_holds_its_data_training_speed_and_scores(demo):
    card = json.loads((demo / "model" / "separator.json").read_text())["card"]
    scores = json.loads((demo / "evaluation" / "scores.json").read_text())["models"]["trained"]["scores"]
    for t, row in scores.items():
        assert card["evaluation"]["scores"][t]["SDR"] == pytest.approx(row["SDR"]), t
    assert card["evaluation"]["engine"].startswith("fast") and card["evaluation"]["niter"] == 1
    assert card["evaluation"]["data"]["tracks"] == {"test": split_counts(SIZES["tiny"].synth_tracks)[2]}
    history = json.loads((demo / "train" / "history.json").read_text())
    assert card["training"]["epochs"] == len(history) and card["training"]["workers"] == 2
    assert card["data"]["generated"]["tracks"] == SIZES["tiny"].synth_tracks and card["speed"]["x_real_time"] > 0
    tuned = json.loads((demo / "tune" / "best" / "separator.json").read_text())["card"]
    assert tuned["tuning"]["trial"] == json.loads((demo / "tune" / "results.json").read_text())["best"]["trial"]
    assert "evaluation" in tuned and "## Evaluation" in (demo / "model" / "model_card.md").read_text()


@pytest.mark.integration
def test_the_demo_kept_its_runs_on_s3_and_copied_back_what_the_report_reads(demo):
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri("s3://bucket/")
    stored = {i.path for i in fs.get_file_info(pafs.FileSelector("bucket/demo", recursive=True))}
    for key in ("tune/results.json", "tune/best/separator.json", "train/history.json", "train/best/separator.json"):
        assert f"bucket/demo/{key}" in stored, key
    assert any("/train/checkpoint_" in key for key in stored)  # the training run's checkpoints are on S3
    assert not [p for p in (demo / "train").glob("checkpoint_*") if p.is_dir()]  # its results and best/ copied back
    assert (demo / "train" / "best" / "separator.json").is_file() and (demo / "tune" / "results.md").is_file()


@pytest.mark.integration
def test_report_tables_equal_their_sources(demo):
    text = (demo / "report.md").read_text()
    trials = _md_table(text, "run")
    results = json.loads((demo / "tune" / "results.json").read_text())["rows"]
    source = [r for r in results if r["status"] == "ok"]
    assert len(trials) == len(source) + 1
    for row, src in zip(trials, source, strict=False):
        assert row["run"] == f"trial {src['trial']}"
        assert row["hidden size"] == str(src["hidden_size"]) and row["LSTM"] == src["lstm"]
        assert row["epochs"] == str(src["epochs"]) and row["batch size"] == str(src["batch_size"])
        assert float(row["lr"]) == pytest.approx(src["lr"], rel=6e-3)
        assert float(row["best valid loss"]) == pytest.approx(src["best_valid_loss"], abs=6e-5)
        assert float(row["valid SDR (dB)"]) == pytest.approx(src["valid_sdr"], abs=6e-3)
        assert float(row["training time (s)"]) == pytest.approx(src["train_time_s"], abs=0.06)
    with open(demo / "tune" / "results.csv") as f:  # the CSV holds the same trials
        assert [r["trial"] for r in csv.DictReader(f) if r["status"] == "ok"] == [r["trial"] for r in source]
    history = json.loads((demo / "train" / "history.json").read_text())
    final = trials[-1]
    assert final["epochs"] == str(len(history)) and final["workers"] == "2"
    assert float(final["best valid loss"]) == pytest.approx(min(h["valid_loss"] for h in history), abs=6e-5)
    scores = _md_table(text, "model")
    with open(demo / "evaluation" / "scores.csv") as f:
        source = list(csv.DictReader(f))
    assert [(r["model"], r["target"]) for r in scores] == [(r["model"], r["target"]) for r in source]
    assert {r["model"] for r in scores} == {"trained", "tuned", "untrained", "mixture"}
    for row, src in zip(scores, source, strict=True):
        for metric in ("SDR", "SIR", "ISR", "SAR"):
            if src[metric] in ("nan", "inf"):
                assert row[metric] == "n/a"
            else:
                assert float(row[metric]) == pytest.approx(float(src[metric]), abs=6e-3), (row, metric)


@pytest.mark.integration
def test_report_factor_effects_equal_those_computed_from_the_results(demo):
    """Each factor's effect on validation SDR at the epoch every trial reached, with its standard
    error, recomputed here from tune/results.json by least squares on the coded levels."""
    text = (demo / "report.md").read_text()
    rows = [r for r in json.loads((demo / "tune" / "results.json").read_text())["rows"] if r["status"] == "ok"]
    factors = ["batch_size", "hidden_size", "samples_per_track", "unidirectional", "bandwidth"]
    epoch = min(r["epochs"] for r in rows)
    y = np.array([next(h["valid_sdr"] for h in r["history"] if h["epoch"] == epoch) for r in rows])
    levels = {f: sorted({r["values"][f] for r in rows}) for f in factors}
    x = np.array([[1.0] + [1.0 if r["values"][f] == levels[f][1] else -1.0 for f in factors] for r in rows])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    df = len(rows) - x.shape[1]
    table = {r["factor"]: r for r in _md_table(text, "factor")}
    for j, name in enumerate(("Batch size", "Hidden size", "Samples per track", "LSTM", "Bandwidth"), 1):
        cell = table[name]["valid SDR (dB)"].strip("*")
        effect, se = (float(v) for v in re.fullmatch(r"([+-][0-9.]+) ± ([0-9.]+|n/a)", cell).groups())
        assert effect == pytest.approx(2 * coef[j], abs=6e-3), (name, cell)
        if df > 0:
            residual = y - x @ coef
            cov = residual @ residual / df * np.linalg.inv(x.T @ x)
            assert se == pytest.approx(2 * math.sqrt(cov[j, j]), abs=6e-3), (name, cell)
    speed = json.loads((demo / "speed.json").read_text())  # time effects: the combinations measured alone
    samples = np.array([t["samples_per_s"]["median"] for t in speed["training"]])
    points = [t["point"] for t in speed["training"]]
    xs = np.array([[1.0] + [1.0 if p[f] == levels[f][1] else -1.0 for f in factors] for p in points])
    cell = table["Batch size"]["samples/s"].strip("*")
    assert float(cell.split(" ± ")[0]) == pytest.approx(2 * np.linalg.lstsq(xs, samples, rcond=None)[0][1], abs=0.06)


@pytest.mark.integration
def test_the_bandwidth_section_answers_the_open_question_from_the_results(demo):
    """Mean validation SDR per bandwidth over the finished trials, and the mean separation speed of
    their architectures measured alone, as the report's bandwidth table states them."""
    text = (demo / "report.md").read_text()
    rows = [r for r in json.loads((demo / "tune" / "results.json").read_text())["rows"] if r["status"] == "ok"]
    separation = json.loads((demo / "speed.json").read_text())["separation"]
    table = _md_table(text, "bandwidth (Hz)")
    assert [float(r["bandwidth (Hz)"]) for r in table] == [8000.0, 16000.0]
    for row in table:
        chosen = [r for r in rows if r["bandwidth"] == float(row["bandwidth (Hz)"])]
        assert int(row["trials"]) == len(chosen) > 0
        assert float(row["mean valid SDR (dB)"]) == pytest.approx(np.mean([r["valid_sdr"] for r in chosen]), abs=6e-3)
        speeds = [next(s["x_rt"]["median"] for s in separation
                       if all(r["values"][k] == v for k, v in s["point"].items())) for r in chosen]  # fmt: skip
        assert float(row["mean speed (x RT)"]) == pytest.approx(np.mean(speeds), abs=0.06)
    assert "![validation SDR against bandwidth](sdr_vs_bandwidth.png)" in text


@pytest.mark.integration
def test_every_column_the_design_varied_has_two_values_in_the_table(demo):
    text = (demo / "report.md").read_text()
    varied = re.search(r"Columns the design varied: ([^.]+)\.", text).group(1).split(", ")
    assert {"batch size", "hidden size", "samples/track", "LSTM", "bandwidth"} <= set(varied)
    trials = [r for r in _md_table(text, "run") if r["run"].startswith("trial ")]
    for column in varied:
        assert len({r[column] for r in trials}) >= 2, column


@pytest.mark.integration
def test_report_findings_follow_the_numbers(demo):
    text = (demo / "report.md").read_text()
    with open(demo / "evaluation" / "scores.csv") as f:  # trained against the others, target by target
        sdr = {(r["model"], r["target"]): float(r["SDR"]) for r in csv.DictReader(f)}
    targets = sorted({t for _, t in sdr})
    wins = all(sdr["trained", t] > sdr[m, t] for t in targets for m in ("tuned", "untrained", "mixture"))
    said = "beats the untrained model, the tuned model and the mixture on every target"
    assert (said in text) == wins and ("does not beat every other model" in text) == (not wins)
    exact = json.loads((demo / "evaluation" / "scores.json").read_text())["models"]  # unrounded: as printed
    for t in targets:
        trained, tuned = exact["trained"]["scores"][t]["SDR"], exact["tuned"]["scores"][t]["SDR"]
        assert f"{t} {trained:.2f} dB (tuned {tuned:.2f}, untrained" in text
    speed = json.loads((demo / "speed.json").read_text())  # speed measured alone, not during tuning
    train = json.loads((demo / "train" / "config.json").read_text())
    sep = next(s for s in speed["separation"] if all(train[k] == v for k, v in s["point"].items()))
    assert f"separates at {sep['x_rt']['median']:.1f} ({sep['x_rt']['min']:.1f}–{sep['x_rt']['max']:.1f})x" in text
    for s in speed["streaming"]:
        assert s["verdict"] == verdict(s)


@pytest.mark.integration
def test_demo_rerun_reuses_stages_and_redoes_a_missing_one(sandbox, demo):
    """The real stages: a re-run reuses them and remakes a lost report (tests/test_demo.py covers the
    rules with stand-in stages)."""
    state = json.loads((demo / "demo.json").read_text())
    report = (demo / "report.md").read_text()
    (demo / "report.md").unlink()
    p = sandbox.run(".venv/bin/distunmix demo --size tiny --storage-path s3://bucket/demo -q", 300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in [s.name for s in STAGES[:-1]]:
        assert re.search(rf"\] {name}: reused", p.stdout), p.stdout
    assert "] report: report.md and figures" in p.stdout
    assert (demo / "report.md").read_text() == report  # the same numbers from the same files
    after = json.loads((demo / "demo.json").read_text())
    assert all(
        after["stages"][name] == state["stages"][name] for name in [s.name for s in STAGES[:-1]]
    )  # not run again


@pytest.mark.integration
def test_demo_refuses_other_settings_in_the_same_folder(sandbox, demo):
    p = sandbox.run(".venv/bin/distunmix demo --size full -q", 120)
    assert p.returncode == 2
    assert "--out runs/demo" in p.stderr and "tiny" in p.stderr
    p = sandbox.run(".venv/bin/distunmix demo --out README.md -q", 120)
    assert p.returncode == 2 and "--out README.md" in p.stderr
