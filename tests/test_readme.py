"""The README runs as written: its Python block is run in a fresh folder, and every `dicl` line of its shell
blocks is parsed as the CLI parses it (the command, its options, the YAML and every override valid), the cheap ones
(`--help`, `dicl config`) run. So a renamed key or command cannot leave the README behind."""
import re
import shlex
from pathlib import Path

import pytest

from clustering.config import PipelineConfig, load_config
from jobs.cli import main, parse, split_args

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def dicl_lines() -> list[list[str]]:
    """Every `dicl ...` command of the shell blocks, its continuation lines joined, comments left out."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "dicl" in words:
                found.append(words[words.index("dicl") + 1:])
    return found


def test_the_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    (code,) = blocks("python")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - the README's own code
    acc, best = capsys.readouterr().out.splitlines()[-2:]
    assert float(acc) > 0.9 and best == "{'n_clusters': 10}"
    assert (tmp_path / "my-run" / "checkpoint_000000" / "model.pt").exists()


@pytest.mark.parametrize("argv", dicl_lines(), ids=lambda argv: " ".join(argv)[:60])
def test_every_dicl_line_is_a_valid_command(argv, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        return
    if argv[0] == "config":
        assert main(argv) == 0
        return
    ns = parse(argv)
    path, overrides, rest = split_args(ns.args)
    assert path is None or (REPO / path).is_file(), path
    assert ns.command == "predict" or not rest, rest
    load_config(PipelineConfig, path, overrides)  # a key the config lacks would raise, naming it
