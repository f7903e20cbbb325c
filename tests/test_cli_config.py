"""CLI surface and the YAML schema validation every config goes through."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass, field

import pytest

from fastattr_hook import __version__
from fastattr_hook.config import load_yaml
from fastattr_hook.errors import FastattrError


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastattr_cli", *args], capture_output=True, text=True)


def test_help_lists_subcommands_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("sandbox", "index", "attribute", "inspect"):
        assert command in result.stdout
    assert run_cli("--version").stdout.strip() == f"fastattr {__version__}"


def test_every_command_and_option_has_help():
    """Issue 14: `--help` of every command explains every option (walks the whole parser tree)."""
    from fastattr_cli import build_parser

    def missing(parser, path):
        out = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                for name, sub in action.choices.items():
                    out += [f"{path} {name}"] * (not helps.get(name)) + missing(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                out.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return out

    assert missing(build_parser(), "fastattr") == []


def test_runtime_import_stays_light():
    code = ("import sys, fastattr_hook, fastattr_hook.attribution, fastattr_hook.cli; "
            "heavy = [m for m in ('torch', 'diffusers', 'open_clip', 'fastattr_sandbox', 'ray') if m in sys.modules]; "
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr
    # the whole command line (every package's subcommands) parses without torch: --help stays instant
    code = ("import sys, fastattr_cli; fastattr_cli.build_parser(); "
            "print([m for m in ('torch', 'diffusers', 'open_clip', 'ray') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_the_runtime_imports_nothing_above_it():
    """fastattr_hook is the bottom layer: not even a lazy import of the tools, teacher, sandbox or CLI."""
    import ast

    above = {"index_tools", "fastattr_teacher", "fastattr_distill", "fastattr_sandbox", "integrations", "fastattr_cli"}
    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "fastattr_hook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in above]
    assert not found, found


def test_user_errors_exit_2_with_a_message(tmp_path):
    result = run_cli("index", "info", str(tmp_path))
    assert result.returncode == 2
    assert "bundle.yaml: not found" in result.stderr and "Traceback" not in result.stderr


@dataclass
class _Inner:
    size: int
    ratio: float = 0.5


@dataclass
class _Config:
    name: str
    inner: _Inner
    tags: list[str] = field(default_factory=list)
    mode: str | None = None


def test_a_file_name_that_is_not_utf8_prints_as_its_bytes(tmp_path):
    """A UTF-8 locale's stdout is strict; a non-UTF-8 file name in a message must not crash the command."""
    import os

    out = os.path.join(os.fsencode(tmp_path), b"prompts-\xff.jsonl")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run([sys.executable, "-m", "fastattr_cli", "sandbox", "prompts", "--count", "2", "--out", out],
                            capture_output=True, env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.startswith(out + b": 2 held-out query prompts")
    assert os.path.isfile(out)


def test_sandbox_prompts_motif_rate_makes_a_motif_job(tmp_path, capsys):
    from fastattr_cli import main
    from fastattr_sandbox.build import DEFAULT_SANDBOX

    out = tmp_path / "motifs.jsonl"
    held_out = str(DEFAULT_SANDBOX / "data" / "query_prompts.jsonl")
    assert main(["sandbox", "prompts", "--count", "12", "--motif-rate", "1", "--exclude", held_out,
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r["attributes"]["motif"] and r["attributes"]["motif"] in r["prompt"] for r in rows)
    assert main(["sandbox", "prompts", "--count", "2", "--motif-rate", "1.5", "--out", str(out)]) == 2
    assert "--motif-rate 1.5: must be between 0 and 1" in capsys.readouterr().err


def test_yaml_schema_accepts_valid_and_names_bad_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner: {size: 3}\ntags: [a, b]\n")
    config = load_yaml(_Config, path)
    assert config.inner.size == 3 and config.inner.ratio == 0.5 and config.tags == ["a", "b"]
    path.write_text("name: x\ninner: {size: 3, ratio: 1e-5}\n")  # PyYAML reads 1e-5 as a string
    assert load_yaml(_Config, path).inner.ratio == 1e-5
    path.write_text("name: x\ninner: {size: 3, ratio: half}\n")
    with pytest.raises(FastattrError, match=r"key 'inner\.ratio' must be a number"):
        load_yaml(_Config, path)

    path.write_text("name: x\ninner: {size: 3, sise: 4}\n")
    with pytest.raises(FastattrError, match=r"c\.yaml: unknown key 'inner\.sise'"):
        load_yaml(_Config, path)
    path.write_text("name: x\ninner: {size: three}\n")
    with pytest.raises(FastattrError, match=r"c\.yaml: key 'inner\.size' must be an integer"):
        load_yaml(_Config, path)
    path.write_text("inner: {size: 1}\n")
    with pytest.raises(FastattrError, match="missing required key 'name'"):
        load_yaml(_Config, path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(FastattrError, match="not valid YAML"):
        load_yaml(_Config, path)
    path.write_bytes(b"name: caf\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(FastattrError, match=r"c\.yaml: not UTF-8 \(byte 9 is 0xe9\); fix the file"):
        load_yaml(_Config, path)
    path.write_text("name: " + "[" * 100_000)  # deeper than Python's recursion limit
    with pytest.raises(FastattrError, match=r"c\.yaml: (nested too deeply to read|not valid YAML)"):
        load_yaml(_Config, path)
