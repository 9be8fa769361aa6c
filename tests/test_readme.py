"""The README's promises: its two commands are the real ones, its CLI reference matches the parser, and every
```python block runs (in order, sharing one namespace, in a scratch directory)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SETUP_AND_RUN = "bash scripts/setup.sh && softprompt train --out out/demo"
TEST_COMMAND = "python -m pytest -q tests"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_two_commands_match_ci_and_setup():
    assert SETUP_AND_RUN in README and TEST_COMMAND in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci and "bash scripts/setup.sh" in ci
    assert (ROOT / "scripts" / "setup.sh").is_file()


def test_cli_reference_matches_parser():
    from peft_softprompt_ext.app import cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001  (argparse has no public accessor)
    for name in commands:
        assert f"softprompt {name}" in README, f"README's CLI reference lacks `softprompt {name}`"
    train_flags = {opt for action in commands["train"]._actions for opt in action.option_strings}
    section = README.split("**`softprompt train")[1].split("**`softprompt generate")[0]
    for flag in set(re.findall(r"`(--[a-z-]+)", section)):
        assert flag in train_flags, f"README documents {flag}, which `softprompt train` does not take"
    generate_flags = {opt for action in commands["generate"]._actions for opt in action.option_strings}
    section = README.split("**`softprompt generate")[1].split("**`softprompt info")[0]
    for flag in set(re.findall(r"`(--[a-z-]+)", section)):
        assert flag in generate_flags, f"README documents {flag}, which `softprompt generate` does not take"


def test_documented_defaults_match_code():
    from peft_softprompt_ext.app.recipe import TrainSettings

    d = TrainSettings(out="")
    row = lambda flag: next(line for line in README.splitlines() if line.startswith(f"| `{flag}"))  # noqa: E731
    assert f"| {d.num_tokens} |" in row("--num-tokens") and f"| {d.lr} |" in row("--lr")
    assert f"| {d.steps}, {d.batch_size} |" in row("--steps") and f"| {d.eval_size} |" in row("--eval-size")


@pytest.mark.slow
def test_python_snippets_run(tmp_path, monkeypatch):
    """Loads the bundled SmolLM2 (hence slow) and trains two steps; all blocks share one namespace."""
    pytest.importorskip("peft_softprompt_ext.app.bundled").smollm2_gguf_path()
    blocks = python_blocks(README)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(blocks):
        code = compile(block, f"README.md python block {index + 1}", "exec")
        exec(code, namespace)  # noqa: S102  (the README is ours; running it is the point)
    assert os.path.isfile(tmp_path / "out" / "capitals" / "adapter_model.safetensors")
