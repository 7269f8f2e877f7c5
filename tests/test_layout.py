"""The package's structure: no import cycles, Ray only at the edges, settings declared once, help renders."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from distunmix.cli import build_parser, main
from distunmix.data.config import DataConfig
from distunmix.flags import default_of, flag_name
from distunmix.serve.service import ServiceConfig
from distunmix.tables import fmt, markdown_table
from distunmix.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distunmix"
# the core: usable and testable without Ray
CORE = ("model", "xumx", "spectral", "separator", "stream", "stemfiles", "checkpoint", "fileio", "audio", "errors",
        "flags", "tables", "plots", "devices", "data", "serve.service", "serve.streaming", "serve.client",
        "serve.streamclient", "chunking", "onnxrun", "card", "bsseval", "speed", "realtime", "accel")  # fmt: skip


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the distunmix modules it imports (at the top or inside functions)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt) :] + [node, nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, [*trail, node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(n, []) for n in sorted(graph) if n not in state), f"import cycle: {' -> '.join(cycle)}"


def test_the_library_never_imports_the_cli_and_the_core_never_imports_ray():
    graph = import_graph()
    users = [
        m
        for m, deps in graph.items()
        if not m.startswith("distunmix.cli") and any(d.startswith("distunmix.cli") for d in deps)
    ]
    assert not users, f"library modules importing the CLI: {users}"
    for path in PACKAGE.rglob("*.py"):
        name = _module(path).removeprefix("distunmix.")
        if not any(name == c or name.startswith(c + ".") for c in CORE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path} imports Ray"


def test_nothing_reaches_outside_the_package():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "__file__" not in text, f"{path} edits sys.path or uses __file__"
    # Ray is started in one place
    starts = [p for p in PACKAGE.rglob("*.py") if "ray.init(" in p.read_text()]
    assert starts == [PACKAGE / "cluster.py"]


# -- settings declared once ----------------------------------------------------------------------------
def _actions(command: str) -> list[argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]._actions


@pytest.mark.parametrize("cls", [DataConfig, TrainConfig])
def test_every_training_setting_has_exactly_one_flag_with_its_default(cls):
    actions = _actions("train")
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli") or f.name == "data":  # data: DataConfig's own flags
            continue
        matching = [a for a in actions if flag_name(f) in a.option_strings]
        assert len(matching) == 1, f"{cls.__name__}.{f.name}: {len(matching)} flags"
        action = matching[0]
        assert action.dest == f.name and action.help, f.name
        expected = None if f.default is dataclasses.MISSING else default_of(f)
        assert action.default == expected, f"{f.name}: flag default {action.default!r}, field {expected!r}"
    # the fields that are no flag are few, and each says who sets it
    hidden = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("cli")]
    assert hidden == {"DataConfig": ["sources", "progress"], "TrainConfig": []}[cls.__name__]


def test_parsed_defaults_build_the_default_configs():
    args = build_parser().parse_args(["train"])
    config = TrainConfig.from_args(args)
    assert dataclasses.replace(config, name="x") == dataclasses.replace(TrainConfig(), name="x")
    assert config.name.startswith("train-")
    args = build_parser().parse_args(["train", "--hidden-size", "64", "--targets", "vocals,bass", "--no-is-wav"])
    config = TrainConfig.from_args(args)
    assert config.hidden_size == 64 and config.targets == ("vocals", "bass") and config.data.is_wav is False


def test_serve_config_yaml_holds_the_app_defaults():
    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "distunmix.serve.app:build_app"
    assert app["args"] == {f.name: f.default for f in dataclasses.fields(ServiceConfig)}


@pytest.mark.parametrize("command", [None, *sorted(build_parser()._actions[-1].choices)])
def test_help_renders_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"] if command else ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: distunmix" in out
    if command in ("train", "tune", "separate", "evaluate", "serve", "demo"):
        assert "(default: " in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("distunmix ")


# -- one number formatter ------------------------------------------------------------------------------
def test_fmt_and_markdown_table():
    assert fmt(float("nan")) == "n/a" and fmt(None) == "n/a" and fmt(math.nan, missing="") == ""
    assert fmt(math.inf) == "inf" and fmt(-math.inf) == "-inf"
    assert fmt(3) == "3" and fmt(2.345, 1) == "2.3" and fmt(True) == "True" and fmt("ok") == "ok"
    assert fmt(0.000123456, 4, significant=True) == "0.0001235"
    assert markdown_table(("a", "b"), [{"a": "1", "b": "2"}]) == ["| a | b |", "| --- | --- |", "| 1 | 2 |"]


def test_every_flag_of_every_command_has_help_and_one_name_per_concept():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help, f"distunmix {name} {action.option_strings or action.dest}: no help"
        flags = {s for a in parser._actions for s in a.option_strings}
        assert not flags & {"--outdir", "--workers", "--nb-workers"}, name  # renamed: -o/--out, --num-workers...
        if "--device" in flags:
            assert parser._option_string_actions["--device"].default == "auto", name
        if "--out" in flags:
            assert "-o" in parser._option_string_actions["--out"].option_strings, name
        if "--model" in flags:
            assert "-m" in parser._option_string_actions["--model"].option_strings, name
