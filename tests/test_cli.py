"""The `softprompt` command: train / info / generate / decode / export on a tiny model, one-line errors for bad input,
Ctrl-C leaves no half-written adapter, and (slow) the zero-argument demo path on the bundled SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tiny

from peft_softprompt_ext.app import cli

TINY_ARGS = ["--init", "vocab", "--steps", "2", "--batch-size", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "task.jsonl"
    rows = [{"input": f"w{4 + i % 20} w{30 + i % 7}", "output": f"w{50 + i % 3}"} for i in range(12)]
    return tiny.write_jsonl(path, rows)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, jsonl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "adapter")
    assert cli.main(["train", "--model", tiny_model_dir, "--data", jsonl, "--out", out, *TINY_ARGS]) == 0
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse: usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_saves_adapter_and_reports(tiny_model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "a"
    code, stdout, _ = run_cli(
        capsys, "train", "--model", tiny_model_dir, "--data", jsonl, "--out", str(out), "--num-tokens", "3", *TINY_ARGS
    )
    assert code == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "training_info.json"} <= set(os.listdir(out))
    assert "exact-match accuracy" in stdout and "before" in stdout and "after" in stdout
    assert "few-shot, 4 solved examples in the context" in stdout  # --data's default few-shot baseline
    assert f"saved adapter to {out}" in stdout
    info = json.loads((out / "training_info.json").read_text())
    assert info["versions"]["peft"] and info["versions"]["transformers"] and info["versions"]["torch"]
    assert info["settings"]["steps"] == 2 and len(info["before"]) and info["after"]["n"] >= 1
    assert info["few_shot"]["k"] == 4 and 0 <= info["few_shot"]["accuracy"] <= 1
    assert not tiny.staging_leftovers(tmp_path)


def test_train_options_optimizer_schedule_no_few_shot(tiny_model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["train", "--model", tiny_model_dir, "--data", jsonl, "--out", str(out), *TINY_ARGS]
    code, stdout, _ = run_cli(capsys, *argv, "--optimizer", "adafactor", "--schedule", "cosine", "--few-shot", "0")
    assert code == 0 and "few-shot" not in stdout
    info = json.loads((out / "training_info.json").read_text())
    assert info["few_shot"] is None
    assert info["settings"]["optimizer"] == "adafactor" and info["settings"]["schedule"] == "cosine"
    assert "Adafactor" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "schedule, expected",
    [("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]), ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0])],
)
def test_lr_schedules(schedule, expected):
    import torch

    from peft_softprompt_ext.app.recipe import make_optimizer

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = make_optimizer([param], "adamw", 1.0, schedule, steps=6, warmup=0.3)
    seen = []
    for _ in range(6):
        seen.append(round(optimizer.param_groups[0]["lr"], 6))
        optimizer.step()
        scheduler.step()
    assert seen == expected


def test_same_seed_same_result(tiny_model_dir, jsonl, tmp_path, capsys):
    """The same command prints the same numbers and saves the same prompt (seeded data order, init, eval)."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, stdout, _ = run_cli(
            capsys, "train", "--model", tiny_model_dir, "--data", jsonl, "--out", str(out), *TINY_ARGS
        )
        assert code == 0
        info = json.loads((out / "training_info.json").read_text())
        outs.append((info["before"], info["few_shot"], info["after"], info["final_loss"]))
        outs[-1] += ((out / "adapter_model.safetensors").read_bytes(),)
    assert outs[0] == outs[1]


def test_info(trained, capsys):
    code, stdout, _ = run_cli(capsys, "info", trained)
    assert code == 0
    assert "SOFT_PROMPT" in stdout and "num_virtual_tokens: 20" in stdout and "saved with:" in stdout
    code, stdout, _ = run_cli(capsys, "info", trained, "--json")
    info = json.loads(stdout)
    assert info["num_virtual_tokens"] == 20 and info["token_dim"] == 32 and info["init"] == "vocab"
    assert info["saved_with"]["peft_softprompt_ext"] and "adapter_model.safetensors" in info["files"]


def test_generate_single_and_mixed(trained, tiny_model_dir, capsys):
    code, stdout, _ = run_cli(capsys, "generate", "--adapter", trained, "--max-new-tokens", "3", "w5 w6", "w7")
    assert code == 0 and len(stdout.splitlines()) == 2
    code, stdout, _ = run_cli(
        capsys,
        "generate",
        "--adapter",
        f"a={trained}",
        "--adapter",
        f"b={trained}",
        "--base",
        tiny_model_dir,
        "--max-new-tokens",
        "3",
        "w5 w6",
        "@b w7",
        "@base w8",
    )
    lines = stdout.splitlines()
    assert code == 0 and [line.split("]")[0] for line in lines] == ["[a", "[b", "[b", "[base"]
    assert lines[0].split("] ")[1:] == lines[1].split("] ")[1:]  # same prompt, same input: same greedy output


def test_decode_and_export_are_mounted(trained, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "decode", trained, "--top-k", "2", "--json")
    assert code == 0 and len(json.loads(stdout)["top1_ids"] if "top1_ids" in stdout else stdout) > 0
    code, stdout, _ = run_cli(capsys, "export", trained, "--to", "embeds", str(tmp_path / "e"))
    assert code == 0 and os.path.isdir(tmp_path / "e")


@pytest.mark.parametrize(
    "case, extra, message, status",
    [
        ("missing data", ["--data", "MISSING.jsonl"], "not found", 1),
        ("malformed", ["--data", "BAD"], ":2: malformed JSON", 1),
        ("empty", ["--data", "EMPTY"], "empty dataset", 1),
        ("bad model", ["--model", "./no/such/model"], "model path not found", 1),
        ("steps", ["--steps", "0"], "argument --steps: must be > 0", 2),
        ("lr", ["--lr", "0"], "argument --lr: must be a positive number", 2),
        ("tokens", ["--num-tokens", "-1"], "argument --num-tokens: must be > 0", 2),
        ("too many tokens", ["--num-tokens", "100000000"], "--num-tokens must be at most 16384", 1),
    ],
)
def test_bad_input_one_line(case, extra, message, status, tiny_model_dir, jsonl, tmp_path, capsys):
    files = {"MISSING.jsonl": tmp_path / "missing.jsonl", "BAD": tmp_path / "bad.jsonl", "EMPTY": tmp_path / "e.jsonl"}
    files["BAD"].write_text('{"input": "w5", "output": "w6"}\n{"input": oops}\n')
    files["EMPTY"].write_text("\n")
    extra = [str(files.get(a, a)) for a in extra]  # argparse keeps the last of a repeated option
    argv = ["train", "--out", str(tmp_path / "out"), "--model", tiny_model_dir, "--data", jsonl, *TINY_ARGS, *extra]
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == status, (case, stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_other_bad_input(trained, tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", str(tmp_path / "nope"))
    assert code == 1 and "not found" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "generate", "--adapter", trained, "@zzz hi")
    assert code == 1 and "unknown adapter @zzz" in err
    code, _, err = run_cli(capsys, "train", "--out", trained, "--steps", "1")  # non-empty output dir
    assert code == 1 and "--overwrite" in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--out", "x", "--steps", "many"])
    assert exit_.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_debug_shows_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "o"), "--data", missing)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("softprompt train: error: JSONL data file not found") and len(err.splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="JSONL data file not found"):  # propagates: Python prints it
        cli.main(["train", "--out", str(tmp_path / "o"), "--data", missing, "--debug"])


def test_ctrl_c_leaves_no_adapter(tiny_model_dir, jsonl, tmp_path):
    out = tmp_path / "runs" / "adapter"
    stderr_path = tmp_path / "stderr.txt"
    argv = [
        sys.executable,
        "-m",
        "peft_softprompt_ext.app.cli",
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        jsonl,
        "--out",
        str(out),
        "--init",
        "vocab",
        "--steps",
        "1000000",
        "--device",
        "cpu",
    ]
    with open(stderr_path, "w") as err:
        # a suite started in the background (`cmd &`, nohup) hands its children SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the CLI the default disposition a terminal would
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_env(),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 240
            while "train:" not in stderr_path.read_text():  # the training progress bar is up
                assert proc.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, "training never started"
                time.sleep(0.2)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    message = stderr_path.read_text()
    assert proc.returncode == 130, message
    assert "interrupted: no adapter was written" in message and "Traceback" not in message
    assert not out.exists()
    assert os.listdir(out.parent) == [] if out.parent.exists() else True  # no hidden half-written temp dir


@pytest.mark.slow
def test_real_model_builtin_task(tmp_path, capsys):
    """The zero-argument path (bundled SmolLM2 + WordNet task), shrunk to 2 steps; then generate and info on it."""
    pytest.importorskip("peft_softprompt_ext.app.bundled").smollm2_gguf_path()
    from peft_softprompt_ext.app import data

    if not os.path.isfile(data.WORDNET_NOUN_PATH):
        pytest.skip("WordNet not installed (apt-get install wordnet-base)")
    out = tmp_path / "demo"
    code, stdout, _ = run_cli(
        capsys, "train", "--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-size", "6", "--no-progress"
    )
    assert code == 0, stdout
    assert "label-ranking accuracy on 6 held-out examples" in stdout
    assert "hand-written instruction" in stdout and "soft prompt (20 virtual tokens, 2 steps)" in stdout
    assert "few-shot, 4 solved examples in the context" in stdout  # one per class, of the 4 training examples
    code, stdout, _ = run_cli(
        capsys,
        "generate",
        "--adapter",
        f"wn={out}",
        "--adapter",
        f"wn2={out}",
        "--max-new-tokens",
        "4",
        "@wn dog: a domestic canine",
        "@base What is 2+2?",
    )
    lines = stdout.splitlines()
    assert code == 0 and lines[0].startswith("[wn] ") and lines[1].startswith("[base] ")
    code, stdout, _ = run_cli(capsys, "info", str(out))
    assert code == 0 and "SmolLM2-135M-Instruct" in stdout and "label-ranking accuracy: before" in stdout
