"""Reliability: no data loss, no foreign code, no silent wrong results, clear errors (see docs/reliability.md).

Every test asserts a specific outcome: the previous prompt bit-identical, the error naming the field / tensor / path,
a marker file that hostile code would create never appearing, no ``.NAME.staging-*`` directory left behind.

Real kills: a writer runs in a *forked* child (no second interpreter start-up: the package takes ~10 s to import on
two shared cores) and an injected hook sends it a real SIGKILL at the chosen step; the random-time kills and the
writers/reader race are forked processes too. Only the hub-cache test starts a fresh interpreter (huggingface_hub reads
HF_HUB_CACHE at import time).

Dangerous-path tests chdir into tmp dirs and point $HOME at a tmp dir; the ``/`` cases pass a model or adapter path
that does not exist, so that even a broken check could never reach a write.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
import safetensors.torch
import tiny
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_softprompt_ext import SoftPromptConfig, adapter_dir, atomic, export
from peft_softprompt_ext.app import cli

P = 4
DIM = 32
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TINY_ARGS = ["--init", "vocab", "--steps", "1", "--batch-size", "1", "--eval-size", "1", "--no-progress",
             "--device", "cpu"]  # fmt: skip


# =========================================================================== helpers


def version(i: int) -> torch.Tensor:
    """Prompt number `i`: distinct random values, so that a read tells exactly which write it came from."""
    return torch.randn(P, DIM, generator=torch.Generator().manual_seed(1000 + i))


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def make_model(prompt: torch.Tensor | None = None, arch: str = "llama", **config):
    model = get_peft_model(
        tiny.causal_lm(arch), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **config)
    )
    if prompt is not None:
        set_prompt(model, prompt)
    return model.eval()


def set_prompt(model, prompt: torch.Tensor) -> None:
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(prompt)


def save_adapter(path, prompt: torch.Tensor, **config) -> str:
    make_model(prompt, **config).save_pretrained(path)
    return str(path)


def snapshot(directory) -> dict[str, bytes]:
    """Every visible file under `directory` (relative path -> bytes)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, directory)] = f.read()
    return out


def leftovers(directory) -> list[str]:
    return tiny.staging_leftovers(directory)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse: usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in err


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) when the block blocks, e.g. reading a FIFO or /dev/zero."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- forked children


def fork(fn, *args, error_file: str | None = None) -> int:
    """Run fn(*args) in a forked child; exit 0 on success, 1 on an exception (traceback to `error_file`)."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        # The package caches one FileLock per path per process and filelock refuses an instance inherited across
        # fork (see test_a_forked_process_can_save_and_read); a fresh process would start with an empty cache.
        atomic._locks.clear()
        torch.set_num_threads(1)
        fn(*args)
    except BaseException:  # noqa: BLE001  (report anything, then leave without running pytest's teardown)
        code = 1
        if error_file:
            with open(error_file, "a") as f:
                f.write(traceback.format_exc())
    finally:
        os._exit(code)


def wait(pid: int, timeout: float = 120) -> int:
    """Exit status of a child: its code, or -signal when a signal killed it."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} still running after {timeout} s")
        time.sleep(0.005)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no finally blocks, no atexit, no flush


# --------------------------------------------------------------------------- fault injection


class InjectedFailure(OSError):
    """The failure a hook injects (an OSError, as a full disk or a failing rename would raise)."""


STEPS = ("save_file", "seal", "commit_record", "replace_1", "replace_2", "cleanup")
COMMITTED = ("replace_1", "replace_2", "cleanup")  # crashed after the commit record: the next reader rolls forward


_HOLDERS: dict[int, list] = {}


def _holders(function) -> list:
    """(module, name) of every loaded module that imported `function` by name (PEFT's `safe_save_file`, ours)."""
    if id(function) not in _HOLDERS:
        _HOLDERS[id(function)] = [
            (module, name)
            for module in list(sys.modules.values())
            for name, value in list(getattr(module, "__dict__", {}).items())
            if value is function
        ]
    return _HOLDERS[id(function)]


def inject(mp: pytest.MonkeyPatch, step: str, target, how: str) -> list[str]:
    """Make the write into `target` fail at `step`: raise InjectedFailure (how="raise") or SIGKILL this process
    (how="kill"). Returns a list that records each time the hook fired.

    save_file: the staged weights file is half written, then the failure; seal: before the staged files are
    synced; commit_record: the commit record file is created, then the disk is full (nothing written);
    replace_k: the k-th `os.replace` into the target; cleanup: every file moved, the commit record not yet gone."""
    target = atomic.normalize(target)
    fired: list[str] = []

    def fail(detail: str = "") -> None:
        fired.append(step)
        if how == "kill":
            kill_self()
        raise InjectedFailure(errno.ENOSPC if step == "commit_record" else errno.EIO, f"injected at {step} {detail}")

    if step == "save_file":
        original = safetensors.torch.save_file

        def half_written(tensors, filename, metadata=None):
            original(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            fail(str(filename))

        for module, name in _holders(original):
            mp.setattr(module, name, half_written)
    elif step == "seal":
        mp.setattr(atomic, "_seal", lambda *a, **k: fail())
    elif step == "commit_record":

        class DiskFullJson:
            load, loads, dumps = staticmethod(json.load), staticmethod(json.loads), staticmethod(json.dumps)

            @staticmethod
            def dump(obj, f, **kw):
                fail(f.name)

        mp.setattr(atomic, "json", DiskFullJson)
    elif step.startswith("replace_"):
        k = int(step.split("_")[1])
        real_replace = os.replace
        seen = [0]

        def replace(src, dst, *a, **kw):
            dst_s = os.fspath(dst)
            if dst_s == target or dst_s.startswith(target + os.sep):
                seen[0] += 1
                if seen[0] == k:
                    fail(dst_s)
            return real_replace(src, dst, *a, **kw)

        mp.setattr(os, "replace", replace)
    elif step == "cleanup":
        mp.setattr(atomic, "_remove", lambda *a, **k: fail())
    else:
        raise ValueError(step)
    return fired


# =========================================================================== shared fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on two shared cores (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "task.jsonl"
    rows = [{"input": f"w{4 + i}", "output": f"w{50 + i % 3}"} for i in range(3)]
    return tiny.write_jsonl(path, rows)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Read-only inputs: SOFT_PROMPT adapters holding prompt A and B, and their PEFT PROMPT_TUNING exports."""
    root = tmp_path_factory.mktemp("sources")
    a, b = save_adapter(root / "a", version(0)), save_adapter(root / "b", version(1))
    pa = export.export_peft_prompt_tuning(a, root / "peft-a")
    pb = export.export_peft_prompt_tuning(b, root / "peft-b")
    return {"a": a, "b": b, "peft-a": pa, "peft-b": pb, "root": str(root)}


@pytest.fixture(scope="module")
def trained_a(tiny_model_dir, jsonl, tmp_path_factory):
    """An adapter written by `softprompt train` (2 virtual tokens, seed 0): copied as the previous version."""
    out = str(tmp_path_factory.mktemp("train-a") / "adapter")
    argv = ["train", "--model", tiny_model_dir, "--data", jsonl, "--out", out, "--num-tokens", "2", "--seed", "0"]
    assert cli.main([*argv, *TINY_ARGS]) == 0
    return out


# =========================================================================== 1. never replace what is not ours


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """cwd = tmp/top/work and $HOME = tmp/home, each holding sentinel files; returns the paths."""
    home, top = tmp_path / "home", tmp_path / "top"
    work = top / "work"
    foreign = tmp_path / "foreign"
    for d in (home, work, foreign):
        d.mkdir(parents=True)
    for d in (home, top, work, foreign, tmp_path):
        (d / "SENTINEL.txt").write_text(f"do not delete {d}")
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("keep")
    os.symlink(work, tmp_path / "link-to-cwd")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return {"tmp": tmp_path, "home": home, "top": top, "work": work, "foreign": foreign}


DANGEROUS = {
    "empty": lambda s: "",
    "blank": lambda s: "  ",
    "dot": lambda s: ".",
    "dot-slash": lambda s: "./",
    "cwd-absolute": lambda s: str(s["work"]),
    "parent": lambda s: "..",
    "grandparent": lambda s: "../..",
    "root": lambda s: "/",
    "home-tilde": lambda s: "~",
    "home-absolute": lambda s: str(s["home"]),
    "symlink-to-cwd": lambda s: str(s["tmp"] / "link-to-cwd"),
    "foreign-dir": lambda s: str(s["foreign"]),
}


@pytest.mark.parametrize("command", ["train", "export-embeds", "export-peft"])
@pytest.mark.parametrize("case", list(DANGEROUS))
def test_overwrite_never_replaces_cwd_home_root_or_foreign_dirs(case, command, sandbox, tiny_model_dir, jsonl,
                                                                 sources, capsys):  # fmt: skip
    out = DANGEROUS[case](sandbox)
    before = snapshot(sandbox["tmp"])
    # `/`: a model / adapter that does not exist, so even a missing check fails before any write
    model = "/nonexistent/model" if case == "root" else tiny_model_dir
    adapter = "/nonexistent/adapter" if case == "root" else sources["a"]
    if command == "train":
        argv = ["train", "--out", out, "--overwrite", "--model", model, "--data", jsonl, *TINY_ARGS]
    else:
        argv = ["export", adapter, "--to", command.split("-")[1], out, "--overwrite"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 1, (stdout, err)
    assert one_line_error(err), err
    assert "Refusing to replace" in err or "empty path" in err, err
    assert snapshot(sandbox["tmp"]) == before  # every sentinel, byte for byte
    for d in (sandbox["work"], sandbox["top"], sandbox["tmp"], sandbox["home"]):
        assert leftovers(d) == []


def test_train_out_empty_without_overwrite_is_refused_before_training(sandbox, capsys):
    """'' names no directory (an unset $OUT): refused at once, not after a whole training run (--model is missing
    on purpose: a late check would report the model instead)."""
    before = snapshot(sandbox["tmp"])
    code, _, err = run_cli(capsys, "train", "--out", "", "--model", "/nonexistent/model", *TINY_ARGS)
    assert code == 1 and one_line_error(err), err
    assert "empty path" in err and "--out" in err, err
    assert snapshot(sandbox["tmp"]) == before


@pytest.mark.parametrize("case", ["empty", "dot", "parent", "home-tilde", "foreign-dir"])
def test_python_api_replace_refuses_dangerous_paths(case, sandbox, sources):
    out = DANGEROUS[case](sandbox)
    before = snapshot(sandbox["tmp"])
    with pytest.raises(ValueError, match="empty path|Refusing to replace"):
        export.export_prompt_embeds(sources["a"], out, overwrite=True)
    with pytest.raises(ValueError, match="empty path|Refusing to replace"):
        with adapter_dir.writing(out, "replace") as staging:
            open(os.path.join(staging, "x"), "w").close()
    assert snapshot(sandbox["tmp"]) == before


def test_overwrite_replaces_an_adapter_dir_we_wrote(sandbox, sources, capsys):
    """The control: --overwrite does replace what this package wrote (a refusal of everything would pass above)."""
    out = sandbox["tmp"] / "embeds"
    assert run_cli(capsys, "export", sources["a"], "--to", "embeds", str(out))[0] == 0
    code, _, err = run_cli(capsys, "export", sources["b"], "--to", "embeds", str(out), "--overwrite")
    assert code == 0, err
    assert bits(export.load_prompt_embeds(out)[0]) == bits(version(1))


# =========================================================================== 2/3. crash or kill -9 while writing


class _Writer:
    """One writer of the package: `out` holds version A; `write_b()` writes version B; `identify()` reads `out`
    with the package's own reader and says "A" or "B" (AssertionError for anything torn or unknown)."""

    def __init__(self, tmp_path, sources, trained_a, tiny_model_dir, jsonl):
        self.tmp, self.sources, self.trained_a, self.model_dir, self.jsonl = (
            tmp_path,
            sources,
            trained_a,
            tiny_model_dir,
            jsonl,
        )
        self.out = str(tmp_path / "parent" / "out")
        os.makedirs(os.path.dirname(self.out))
        self.setup()

    def prompt_of(self, prompt: torch.Tensor) -> str:
        found = {bits(version(0)): "A", bits(version(1)): "B"}.get(bits(prompt))
        assert found, "the prompt read is neither the previous nor the new version: torn or corrupted"
        return found


class SavePretrained(_Writer):
    def setup(self):
        save_adapter(self.out, version(0))
        self.model = make_model(version(1))

    def write_b(self):
        self.model.save_pretrained(self.out)

    def identify(self):
        loaded = PeftModel.from_pretrained(tiny.causal_lm("llama"), self.out)  # the user's reader goes first
        got = self.prompt_of(loaded.prompt_embeddings())
        assert self.prompt_of(adapter_dir.read(self.out).prompt) == got
        return got


class ExportEmbeds(_Writer):
    def setup(self):
        export.export_prompt_embeds(self.sources["a"], self.out)

    def write_b(self):
        export.export_prompt_embeds(self.sources["b"], self.out, overwrite=True)

    def identify(self):
        prompt, metadata = export.load_prompt_embeds(self.out)
        assert metadata["shape"] == [P, DIM]
        return self.prompt_of(prompt)


class ExportPeft(_Writer):
    def setup(self):
        export.export_peft_prompt_tuning(self.sources["a"], self.out)

    def write_b(self):
        export.export_peft_prompt_tuning(self.sources["b"], self.out, overwrite=True)

    def identify(self):
        return self.prompt_of(adapter_dir.read(self.out, ("PROMPT_TUNING",)).prompt)


class ImportPeft(_Writer):
    def setup(self):
        export.import_peft_prompt_tuning(self.sources["peft-a"], self.out)

    def write_b(self):
        export.import_peft_prompt_tuning(self.sources["peft-b"], self.out, overwrite=True)

    def identify(self):
        return self.prompt_of(adapter_dir.read(self.out).prompt)


class Writing(_Writer):
    """`adapter_dir.writing` itself: three files that must always come from the same version."""

    mode = "overlay"

    def _write(self, tag: str, prompt: torch.Tensor, extra: str | None = None):
        with adapter_dir.writing(self.out, self.mode) as staging:
            adapter_dir.write_json(staging, "adapter_config.json", {"peft_type": "SOFT_PROMPT", "version": tag})
            safetensors.torch.save_file(
                {"prompt_embeddings": prompt}, os.path.join(staging, "adapter_model.safetensors")
            )
            with open(os.path.join(staging, "notes.txt"), "w") as f:
                f.write(tag)
            if extra:
                with open(os.path.join(staging, extra), "w") as f:
                    f.write(tag)

    def setup(self):
        self._write("A", version(0), extra="training_info.json")  # a file the package writes, only in A

    def write_b(self):
        self._write("B", version(1))

    def identify(self):
        with atomic.reading(self.out) as folder:
            config = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
            notes = open(os.path.join(folder, "notes.txt")).read()
            prompt = load_file(os.path.join(folder, "adapter_model.safetensors"))["prompt_embeddings"]
            names = set(os.listdir(folder))
        got = self.prompt_of(prompt)
        assert config["version"] == notes == got, (config, notes, got)
        if self.mode == "replace":  # replace removes stale files the package writes, never anything else
            assert ("training_info.json" in names) == (got == "A"), names
        return got


class WritingReplace(Writing):
    mode = "replace"


class CliTrain(_Writer):
    """`softprompt train --overwrite` over an adapter it wrote: A has 2 virtual tokens (seed 0), B 3 (seed 1)."""

    def setup(self):
        shutil.copytree(self.trained_a, self.out)
        self.prompt_a = load_file(os.path.join(self.out, "adapter_model.safetensors"))["prompt_embeddings"]

    def write_b(self):
        argv = ["train", "--model", self.model_dir, "--data", self.jsonl, "--out", self.out, "--overwrite",
                "--num-tokens", "3", "--seed", "1", *TINY_ARGS]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = cli.main(argv)
        if code != 0:
            raise RuntimeError(f"softprompt train exited {code}: {err.getvalue()}")

    def identify(self):
        saved = adapter_dir.read(self.out)  # validated: a config/weights mix of A and B fails the shape check
        info = json.loads(open(os.path.join(self.out, "training_info.json")).read())
        rows = saved.prompt.shape[0]
        if rows == 2 and bits(saved.prompt) == bits(self.prompt_a) and info["settings"]["seed"] == 0:
            return "A"
        if rows == 3 and info["settings"]["seed"] == 1 and info["settings"]["num_tokens"] == 3:
            return "B"
        raise AssertionError(f"torn adapter: {rows} rows, training_info seed {info['settings']['seed']}")


WRITERS = {
    "save_pretrained": SavePretrained,
    "export_prompt_embeds": ExportEmbeds,
    "export_peft_prompt_tuning": ExportPeft,
    "import_peft_prompt_tuning": ImportPeft,
    "writing-overlay": Writing,
    "writing-replace": WritingReplace,
    "cli-train": CliTrain,
}


@pytest.mark.parametrize("how", ["raise", "kill"])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_crash_at_each_step_leaves_previous_or_new(writer, step, how, tmp_path, monkeypatch, sources, trained_a,
                                                    tiny_model_dir, jsonl):  # fmt: skip
    w = WRITERS[writer](tmp_path, sources, trained_a, tiny_model_dir, jsonl)
    previous = snapshot(w.out)
    if how == "raise":
        with monkeypatch.context() as mp:
            fired = inject(mp, step, w.out, how)
            with pytest.raises(Exception):  # noqa: B017  (InjectedFailure, or the CLI's exit status 1)
                w.write_b()
        assert fired == [step], "the injected failure never fired: the step was not reached"
    else:
        errors = str(tmp_path / "child-errors.txt")
        status = wait(fork(lambda: (inject(pytest.MonkeyPatch(), step, w.out, how), w.write_b()), error_file=errors))
        assert status == -signal.SIGKILL, (status, open(errors).read() if os.path.exists(errors) else "")

    got = w.identify()  # the next reader: recovery happens here
    expected = ("B",) if step in COMMITTED else ("A", "B") if step == "commit_record" else ("A",)
    assert got in expected, f"after a crash at {step} the reader got version {got}, expected {expected}"
    if got == "A":
        assert snapshot(w.out) == previous, "the previous adapter changed"
    assert leftovers(os.path.dirname(w.out)) == [], "staging left behind after the next read"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kill_during_first_save_into_existing_empty_dir_rolls_forward_for_from_pretrained(k, tmp_path):
    """`save_pretrained(dir)` into an existing empty directory (a Trainer's output_dir, pytest's tmp_path) killed after
    the commit, mid-move: the next `PeftModel.from_pretrained` must finish the write and load the new adapter, like
    `adapter_dir.read` does."""
    out = tmp_path / "out"
    out.mkdir()
    model = make_model(version(1))
    status = wait(fork(lambda: (inject(pytest.MonkeyPatch(), f"replace_{k}", out, "kill"), model.save_pretrained(out))))
    assert status == -signal.SIGKILL
    loaded = PeftModel.from_pretrained(tiny.causal_lm("llama"), str(out))
    assert bits(loaded.prompt_embeddings()) == bits(version(1))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("k", [1, 3])
def test_kill_during_first_save_into_existing_empty_dir_rolls_forward_for_load_adapter(k, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    writer = make_model(version(1))
    status = wait(
        fork(lambda: (inject(pytest.MonkeyPatch(), f"replace_{k}", out, "kill"), writer.save_pretrained(out)))
    )
    assert status == -signal.SIGKILL
    model = PeftModel.from_pretrained(tiny.causal_lm("llama"), save_adapter(tmp_path / "other", version(0)))
    model.load_adapter(str(out), "new")
    assert bits(model.prompt_embeddings("new")) == bits(version(1))
    assert leftovers(tmp_path) == []


def test_kill_during_first_save_into_missing_dir_leaves_nothing_and_next_save_cleans(tmp_path):
    out = tmp_path / "out"
    model = make_model(version(1))
    status = wait(fork(lambda: (inject(pytest.MonkeyPatch(), "save_file", out, "kill"), model.save_pretrained(out))))
    assert status == -signal.SIGKILL
    assert not out.exists() and leftovers(tmp_path)  # the killed write's staging is there ...
    with pytest.raises(FileNotFoundError):
        adapter_dir.read(out)
    assert leftovers(tmp_path) == []  # ... and a read (even of a missing adapter) removed it
    status = wait(fork(lambda: (inject(pytest.MonkeyPatch(), "replace_1", out, "kill"), model.save_pretrained(out))))
    assert status == -signal.SIGKILL and not out.exists() and leftovers(tmp_path)
    make_model(version(2)).save_pretrained(out)  # the next save cleans up too
    assert leftovers(tmp_path) == []
    assert bits(adapter_dir.read(out).prompt) == bits(version(2))


def test_killed_save_staging_is_cleaned_by_the_next_save(tmp_path):
    out = tmp_path / "out"
    save_adapter(out, version(0))
    model = make_model(version(1))
    status = wait(fork(lambda: (inject(pytest.MonkeyPatch(), "seal", out, "kill"), model.save_pretrained(out))))
    assert status == -signal.SIGKILL and leftovers(tmp_path)
    set_prompt(model, version(2))
    model.save_pretrained(out)
    assert leftovers(tmp_path) == []
    assert bits(adapter_dir.read(out).prompt) == bits(version(2))


def test_kill_at_random_moments_leaves_previous_or_new(tmp_path):
    """A child saves versions 1, 2, 3, ... in a loop and is SIGKILLed at a random moment; every time, the next
    reader sees one whole version, bit for bit, and no staging is left."""
    out = tmp_path / "out"
    save_adapter(out, version(0))
    versions = {bits(version(i)): i for i in range(400)}
    model = make_model(version(0))

    def save_forever():
        for i in range(1, 400):
            set_prompt(model, version(i))
            model.save_pretrained(out)

    rng = random.Random(1234)
    newest = 0
    for trial in range(6):
        delay = rng.uniform(0.05, 0.5)
        pid = fork(save_forever)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL, f"trial {trial}: the child finished before the kill"
        got = versions.get(bits(adapter_dir.read(out).prompt))
        assert got is not None, f"trial {trial} (kill after {delay:.3f} s): torn or unknown prompt"
        assert leftovers(tmp_path) == [], f"trial {trial}: staging left after the read"
        loaded = PeftModel.from_pretrained(tiny.causal_lm("llama"), str(out))
        assert versions.get(bits(loaded.prompt_embeddings())) == got
        newest = max(newest, got)
    assert newest > 0  # the children did get saves through


def test_concurrent_writers_and_reader(tmp_path):
    """2 processes x 20 saves to one directory while a third reads in a loop: 0 failed saves, 0 torn/missing reads,
    every read bit-identical to one of the written versions."""
    out = tmp_path / "out"
    save_adapter(out, version(0))
    saves = 20
    expected = {bits(version(w * 100 + i)): (w, i) for w in (1, 2) for i in range(1, saves + 1)}
    expected[bits(version(0))] = (0, 0)
    stop = tmp_path / "stop"
    report = tmp_path / "reader.json"
    errors = str(tmp_path / "errors.txt")

    def writer(w):
        model = make_model(version(0))
        for i in range(1, saves + 1):
            set_prompt(model, version(w * 100 + i))
            model.save_pretrained(out)

    def reader():
        reads, bad, seen = 0, [], set()
        base = tiny.causal_lm("llama")
        while not stop.exists() or reads < 5:
            try:
                if reads % 4 == 3:
                    prompt = PeftModel.from_pretrained(base, out).prompt_embeddings()
                else:
                    prompt = adapter_dir.read(out).prompt
                got = expected.get(bits(prompt))
                if got is None:
                    bad.append(f"read {reads}: unknown prompt")
                seen.add(got)
            except Exception as err:  # noqa: BLE001
                bad.append(f"read {reads}: {type(err).__name__}: {err}")
            reads += 1
        report.write_text(json.dumps({"reads": reads, "bad": bad, "versions": len(seen)}))

    reader_pid = fork(reader, error_file=errors)
    writers = [fork(writer, w, error_file=errors) for w in (1, 2)]
    statuses = [wait(pid) for pid in writers]
    stop.touch()
    reader_status = wait(reader_pid)
    text = open(errors).read() if os.path.exists(errors) else ""
    assert statuses == [0, 0], f"failed saves: {text}"
    assert reader_status == 0, text
    result = json.loads(report.read_text())
    assert result["bad"] == [], result["bad"][:5]
    assert result["reads"] >= 5
    final = expected[bits(adapter_dir.read(out).prompt)]
    assert final in {(1, saves), (2, saves)}  # the last save of one of the writers
    assert leftovers(tmp_path) == []


def test_a_forked_process_can_save_and_read(tmp_path):
    """A process forked after a save (multiprocessing's default start method on Linux, DataLoader workers) must
    still be able to save and read adapters."""
    out = tmp_path / "out"
    model = make_model(version(0))
    model.save_pretrained(out)  # this process now holds a lock object for `out`
    errors = tmp_path / "errors.txt"
    pid = os.fork()
    if pid == 0:  # no helper here: the child must work without any test-side reset
        code = 0
        try:
            set_prompt(model, version(1))
            model.save_pretrained(out)
            adapter_dir.read(out)
        except BaseException:  # noqa: BLE001
            errors.write_text(traceback.format_exc())
            code = 1
        os._exit(code)
    status = wait(pid)
    assert status == 0, errors.read_text()[-1500:] if errors.exists() else status
    assert bits(adapter_dir.read(out).prompt) == bits(version(1))


# =========================================================================== 2/6. save-time refusals and symlinks


def test_save_with_safe_serialization_false_refuses_at_save_time(tmp_path):
    out = tmp_path / "out"
    save_adapter(out, version(0))
    previous = snapshot(out)
    with pytest.raises(ValueError, match="safe_serialization=False.*pickle"):
        make_model(version(1)).save_pretrained(out, safe_serialization=False)
    assert snapshot(out) == previous and not (out / "adapter_model.bin").exists()
    with pytest.raises(ValueError, match="safe_serialization"):
        make_model(version(1)).save_pretrained(tmp_path / "new", safe_serialization=False)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_save_replaces_a_symlinked_weights_file_never_writes_through_it(tmp_path):
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"user data")
    out = tmp_path / "out"
    save_adapter(out, version(0))
    os.remove(out / "adapter_model.safetensors")
    os.symlink(precious, out / "adapter_model.safetensors")
    make_model(version(1)).save_pretrained(out)
    assert precious.read_bytes() == b"user data"
    assert not os.path.islink(out / "adapter_model.safetensors")
    assert bits(adapter_dir.read(out).prompt) == bits(version(1))


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_save_over_a_readme_that_is_a_device_or_fifo_does_not_hang(kind, tmp_path):
    out = tmp_path / "out"
    save_adapter(out, version(0))
    os.remove(out / "README.md")
    if kind == "fifo":
        os.mkfifo(out / "README.md")
    else:
        os.symlink("/dev/zero", out / "README.md")
    with deadline(20):
        make_model(version(1)).save_pretrained(out)
    assert bits(adapter_dir.read(out).prompt) == bits(version(1))


# =========================================================================== 4. custom code in a base folder


def _evil_folder(path, marker) -> str:
    """A model folder whose config and tokenizer config point (auto_map) at local code that creates `marker`."""
    os.makedirs(path)
    code = f"open({str(marker)!r}, 'w').write('custom code ran')\n"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        with open(os.path.join(path, f"{module}.py"), "w") as f:
            f.write(code + "class EvilConfig: pass\nclass EvilModel: pass\nclass EvilTokenizer: pass\n")
    config = {
        "model_type": "evil-custom",
        "architectures": ["EvilModel"],
        "auto_map": {
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModel": "modeling_evil.EvilModel",
            "AutoModelForCausalLM": "modeling_evil.EvilModel",
            "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
        },
    }
    tokenizer_config = {
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    return str(path)


@pytest.fixture
def evil(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER-custom-code-ran"
    folder = _evil_folder(tmp_path / "evil-base", marker)
    # sanity: the trap is armed (running the file does create the marker; removed again)
    exec(compile(open(os.path.join(folder, "modeling_evil.py")).read(), "modeling_evil.py", "exec"), {})
    assert marker.exists()
    marker.unlink()
    adapter = save_adapter(tmp_path / "adapter", version(0))
    config_path = os.path.join(adapter, "adapter_config.json")
    config = json.loads(open(config_path).read())
    config.update(base_model_name_or_path=folder, tokenizer_name_or_path=folder)
    with open(config_path, "w") as f:
        json.dump(config, f)
    stdin = io.StringIO("y\ny\ny\n")  # a prompt "trust this code? [y/N]" would read a yes
    monkeypatch.setattr(sys, "stdin", stdin)
    return {"folder": folder, "marker": marker, "adapter": adapter, "stdin": stdin}


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--adapter", "{adapter}", "--device", "cpu", "--max-new-tokens", "2", "w5 w6"],
        ["generate", "--base", "{folder}", "--device", "cpu", "--max-new-tokens", "2", "w5 w6"],
        ["decode", "{adapter}"],
        ["decode", "{adapter}", "--base", "{folder}"],
    ],
    ids=["generate-adapter-base", "generate-base", "decode-adapter-base", "decode-base"],
)
def test_cli_never_runs_custom_code_of_a_base_folder(argv, evil, capsys):
    argv = [a.format(**evil) for a in argv]
    code, stdout, err = run_cli(capsys, *argv)
    assert not evil["marker"].exists(), "custom code from the base folder ran"
    assert evil["stdin"].tell() == 0, "something read stdin (a trust_remote_code prompt?)"
    assert code == 1, (stdout, err)
    assert one_line_error(err), err


def test_decode_with_custom_code_tokenizer_never_runs_it(evil, tiny_model_dir, capsys):
    code, _, err = run_cli(capsys, "decode", evil["adapter"], "--base", tiny_model_dir, "--tokenizer", evil["folder"])
    assert not evil["marker"].exists() and evil["stdin"].tell() == 0
    assert code in (0, 1) and "Traceback" not in err


def test_text_init_from_custom_code_tokenizer_never_runs_it(evil):
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, init="text", init_text="w5",
                              tokenizer_name_or_path=evil["folder"], tokenizer_kwargs={"trust_remote_code": True})  # fmt: skip
    with pytest.raises((ValueError, OSError)):
        get_peft_model(tiny.causal_lm("llama"), config)
    assert not evil["marker"].exists() and evil["stdin"].tell() == 0


# =========================================================================== 5. pickles are never loaded


class _Trap:
    """Unpickling this creates the marker file (what a malicious adapter_model.bin would do, with worse code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_trap_pickle(path, marker) -> None:
    """A torch.save checkpoint (what PEFT's adapter_model.bin is) whose unpickling calls open(marker, "w")."""
    torch.save({"prompt_embeddings": _Trap(marker), "base_model.lm_head.weight": _Trap(marker)}, path)


def _armed(tmp_path, tag="") -> None:
    """The trap works: a plain torch.load (weights_only=False) of it does create a marker."""
    sanity = tmp_path / f"sanity-marker{tag}"
    _write_trap_pickle(tmp_path / f"sanity{tag}.bin", sanity)
    torch.load(tmp_path / f"sanity{tag}.bin", weights_only=False)
    assert sanity.exists()


@pytest.fixture
def pickle_only(tmp_path, monkeypatch):
    """An adapter dir (and a subfolder) with adapter_config.json and a booby-trapped adapter_model.bin only."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # even a torch.load(weights_only=True) would run it
    _armed(tmp_path)
    marker = tmp_path / "MARKER-pickle-loaded"
    root = tmp_path / "pickled"
    save_adapter(root, version(0))
    os.makedirs(root / "sub")
    shutil.copy(root / "adapter_config.json", root / "sub" / "adapter_config.json")
    for folder in (root, root / "sub"):
        _write_trap_pickle(folder / "adapter_model.bin", marker)
    os.remove(root / "adapter_model.safetensors")
    return {"dir": str(root), "marker": marker}


def test_local_pickle_is_never_loaded(pickle_only, tmp_path, capsys):
    d, marker = pickle_only["dir"], pickle_only["marker"]
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors.*pickle, which is never loaded"):
        PeftModel.from_pretrained(tiny.causal_lm("llama"), d)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny.causal_lm("llama"), d, subfolder="sub")
    model = PeftModel.from_pretrained(tiny.causal_lm("llama"), save_adapter(tmp_path / "ok", version(1)))
    with pytest.raises(FileNotFoundError, match="pickle, which is never loaded"):
        model.load_adapter(d, "evil")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        model.load_adapter(d, "evil2", subfolder="sub")
    for argv in (["info", d], ["decode", d], ["generate", "--adapter", d, "--device", "cpu", "w5"],
                 ["export", d, "--to", "embeds", str(tmp_path / "e")]):  # fmt: skip
        code, _, err = run_cli(capsys, *argv)
        assert code == 1 and one_line_error(err) and "adapter_model.safetensors" in err, (argv, err)
    assert not marker.exists(), "the pickle was loaded"


def test_pickle_named_safetensors_and_pickle_beside_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER-pickle-loaded"
    beside = save_adapter(tmp_path / "beside", version(0))
    _write_trap_pickle(os.path.join(beside, "adapter_model.bin"), marker)
    loaded = PeftModel.from_pretrained(tiny.causal_lm("llama"), beside)  # loads the safetensors, ignores the .bin
    assert bits(loaded.prompt_embeddings()) == bits(version(0))
    renamed = save_adapter(tmp_path / "renamed", version(0))
    _write_trap_pickle(os.path.join(renamed, "adapter_model.safetensors"), marker)
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        PeftModel.from_pretrained(tiny.causal_lm("llama"), renamed)
    assert not marker.exists()


HUB_SCRIPT = r"""
import json, os, sys, traceback
import tiny, torch
from peft import PeftModel
import peft_softprompt_ext
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "loaded"
    except Exception as err:
        results[name] = f"{type(err).__name__}: {err}"
good = PeftModel.from_pretrained(tiny.causal_lm("llama"), "org/good")  # the fake cache layout itself works
results["control"] = float(good.prompt_embeddings()[0, 0])
attempt("from_pretrained", lambda: PeftModel.from_pretrained(tiny.causal_lm("llama"), "org/name"))
attempt("subfolder", lambda: PeftModel.from_pretrained(tiny.causal_lm("llama"), "org/name", subfolder="sub"))
attempt("load_adapter", lambda: good.load_adapter("org/name", "evil"))
attempt("load_adapter_subfolder", lambda: good.load_adapter("org/name", "evil2", subfolder="sub"))
print("RESULTS " + json.dumps(results))
"""


def test_hub_cache_pickle_is_never_loaded(tmp_path):
    """A hub cache whose snapshot of org/name holds adapter_config.json + a booby-trapped adapter_model.bin only
    (and the same in subfolder sub/): never unpickled, a clear error naming the missing safetensors."""
    _armed(tmp_path)
    cache = tmp_path / "hub"
    marker = tmp_path / "MARKER-pickle-loaded"
    source = save_adapter(tmp_path / "src", version(0))
    for repo, pickled in (("org--name", True), ("org--good", False)):
        commit = ("a1" if pickled else "b2") * 20
        snap = cache / f"models--{repo}" / "snapshots" / commit
        (cache / f"models--{repo}" / "refs").mkdir(parents=True)
        (cache / f"models--{repo}" / "refs" / "main").write_text(commit)
        for folder in (snap, snap / "sub"):
            folder.mkdir(parents=True)
            shutil.copy(os.path.join(source, "adapter_config.json"), folder / "adapter_config.json")
            if pickled:
                _write_trap_pickle(folder / "adapter_model.bin", marker)
            else:
                shutil.copy(os.path.join(source, "adapter_model.safetensors"), folder / "adapter_model.safetensors")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
           "PYTHONPATH": os.pathsep.join([TESTS, REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT], capture_output=True, text=True, timeout=180, env=env,
                          cwd=str(tmp_path), stdin=subprocess.DEVNULL)  # fmt: skip
    assert not marker.exists(), "the pickle from the hub cache was loaded"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    results = json.loads(lines[0].removeprefix("RESULTS "))
    assert results["control"] == float(version(0)[0, 0])
    for case in ("from_pretrained", "subfolder", "load_adapter", "load_adapter_subfolder"):
        message = results[case]
        assert message != "loaded", case
        assert "org/name" in message and "adapter_model.safetensors" in message, f"{case}: unclear error: {message}"
        assert "\n" not in message.strip(), f"{case}: {message}"


# =========================================================================== hostile / wrong adapter contents


def _hostile(tmp_path, case: str) -> str:
    path = save_adapter(tmp_path / case, version(0))
    weights = os.path.join(path, "adapter_model.safetensors")
    config_path = os.path.join(path, "adapter_config.json")
    prompt = version(0)
    if case in ("nan", "inf"):
        prompt[1, 2] = float("nan") if case == "nan" else float("inf")
        save_file({"prompt_embeddings": prompt}, weights)
    elif case in ("int32", "bool"):
        save_file({"prompt_embeddings": prompt.to(getattr(torch, case))}, weights)
    elif case == "lm_head":
        save_file({"prompt_embeddings": prompt, "lm_head.weight": torch.zeros(tiny.VOCAB, DIM)}, weights)
    elif case == "residual":
        save_file({"prompt_embeddings": prompt, "residual.raw_prompt": prompt.clone()}, weights)
    elif case == "no-prompt":
        save_file({"something_else": prompt}, weights)
    elif case == "wrong-shape":
        save_file({"prompt_embeddings": torch.zeros(P + 1, DIM)}, weights)
    elif case in ("weights-dev-zero", "config-dev-zero"):
        target = weights if case.startswith("weights") else config_path
        os.remove(target)
        os.symlink("/dev/zero", target)
    elif case in ("weights-fifo", "config-fifo"):
        target = weights if case.startswith("weights") else config_path
        os.remove(target)
        os.mkfifo(target)
    elif case == "huge-config":
        with open(config_path, "a") as f:
            f.write(" " * (2 << 20))
    else:
        raise ValueError(case)
    return path


HOSTILE = {
    "nan": r"'prompt_embeddings' has 1 NaN/Inf",
    "inf": r"'prompt_embeddings' has 1 NaN/Inf",
    "int32": r"'prompt_embeddings' has dtype torch.int32; expected a floating type",
    "bool": r"'prompt_embeddings' has dtype torch.bool",
    "lm_head": r"unexpected tensors \['lm_head.weight'\]",
    "residual": r"unexpected tensors \['residual.raw_prompt'\]: residual tensors need reparameterization='residual'",
    "no-prompt": r"no 'prompt_embeddings' tensor",
    "wrong-shape": r"shape \(5, 32\)",
    "weights-dev-zero": r"adapter_model.safetensors is not a regular file",
    "config-dev-zero": r"adapter_config.json is not a regular file",
    "weights-fifo": r"adapter_model.safetensors is not a regular file",
    "config-fifo": r"adapter_config.json is not a regular file",
    "huge-config": r"adapter_config.json is larger than",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_adapter_is_refused_fast_with_the_reason(case, tmp_path, capsys):
    """Our readers give the exact reason. For a device/FIFO in place of a file, PEFT's loaders only have to fail
    fast naming the file (today they say it is missing: `resolve` and PEFT's config lookup test isfile())."""
    path = _hostile(tmp_path, case)
    special = case.endswith(("dev-zero", "fifo"))
    loader_error = (ValueError, OSError) if special else ValueError
    loader_match = (
        ("adapter_model.safetensors" if case.startswith("weights") else "adapter_config.json")
        if special
        else HOSTILE[case]
    )
    with deadline(20):
        with pytest.raises(ValueError, match=HOSTILE[case]):
            adapter_dir.read(path)
        with pytest.raises(loader_error, match=loader_match):
            PeftModel.from_pretrained(tiny.causal_lm("llama"), path)
        model = make_model(version(1))
        with pytest.raises(loader_error, match=loader_match):
            model.load_adapter(path, "hostile")
        code, _, err = run_cli(capsys, "info", path)
    assert code == 1 and one_line_error(err), err
    assert re.search(HOSTILE[case], err), err


def test_fp16_overflow_is_an_error_at_load(tmp_path):
    prompt = version(0)
    prompt[0, 0] = 1e6  # > 65504
    path = save_adapter(tmp_path / "big", prompt)
    with pytest.raises(ValueError, match=r"exceeds what torch.float16 can hold"):
        PeftModel.from_pretrained(tiny.causal_lm("llama").half(), path)
    loaded = PeftModel.from_pretrained(tiny.causal_lm("llama").to(torch.bfloat16), path)  # bf16 holds it
    assert loaded is not None
    with pytest.raises(ValueError, match="float16"):
        export.export_prompt_embeds(path, tmp_path / "e16", dtype="float16")
    assert not (tmp_path / "e16").exists()


def test_export_int8_is_refused(sources, tmp_path, capsys):
    out = tmp_path / "e"
    code, _, err = run_cli(capsys, "export", sources["a"], "--to", "embeds", str(out), "--dtype", "int8")
    assert code == 2 and one_line_error(err) and "--dtype" in err and "int8" in err, err
    for dtype in ("int8", torch.int8, torch.bool):
        with pytest.raises(ValueError, match="dtype must be one of"):
            export.export_prompt_embeds(sources["a"], out, dtype=dtype)
    assert not out.exists() and leftovers(tmp_path) == []


# =========================================================================== config fields of the wrong type


@pytest.mark.parametrize(
    "field, value",
    [
        ("shared_prompt_kv", "no"),
        ("init_seed", "x"),
        ("init_text", 5),
        ("tokenizer_kwargs", ["trust_remote_code"]),
        ("num_virtual_tokens", "4"),
        ("num_virtual_tokens", True),
        ("init_vocab_top_k", 1.5),
        ("reparameterization", "resid"),
        ("residual_hidden_size", 0),
    ],
)
def test_config_field_of_wrong_type_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SoftPromptConfig\.{field}"):
        SoftPromptConfig(task_type="CAUSAL_LM", **{field: value})


@pytest.mark.parametrize("field, value", [("init_text", "hello"), ("tokenizer_kwargs", {"use_fast": True})])
def test_random_init_with_text_fields_is_refused(field, value):
    with pytest.raises(ValueError, match=rf"SoftPromptConfig\.{field} is only used by init"):
        SoftPromptConfig(init="random", **{field: value})


def test_default_config_works():
    config = SoftPromptConfig()
    assert config.num_virtual_tokens == 20 and config.shared_prompt_kv is True


@pytest.mark.parametrize("field, value", [("shared_prompt_kv", "no"), ("num_virtual_tokens", "4"), ("init_seed", "x")])
def test_saved_config_field_of_wrong_type_names_the_field_at_load(field, value, tmp_path):
    path = save_adapter(tmp_path / "a", version(0))
    config_path = os.path.join(path, "adapter_config.json")
    config = json.loads(open(config_path).read())
    config[field] = value
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=field):
        PeftModel.from_pretrained(tiny.causal_lm("llama"), path)


# =========================================================================== inputs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_mask_values_other_than_0_1_act_like_the_bare_model(arch):
    model = make_model(version(0), arch=arch)
    base = model.get_base_model()
    ids, mask = tiny.left_pad([tiny.random_ids(1, 5, seed=2)[0], tiny.random_ids(1, 3, seed=3)[0]])
    odd = mask * torch.tensor([[2, 7, 3, 1, 5]])  # zeros stay zeros, ones become 2, 7, 3, 1, 5
    with torch.no_grad():
        bare_01 = base(input_ids=ids, attention_mask=mask).logits
        bare_odd = base(input_ids=ids, attention_mask=odd).logits
        assert torch.equal(bare_01, bare_odd), "the bare model itself treats non-zero values like 1"
        ours_01 = model(input_ids=ids, attention_mask=mask).logits
        ours_odd = model(input_ids=ids, attention_mask=odd).logits
    assert torch.equal(ours_01, ours_odd)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **gen),
                       model.generate(input_ids=ids, attention_mask=odd, **gen))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), r"needs at least one row"),
        (dict(input_ids=torch.arange(3, 8)), r"input_ids must be a 2-D tensor"),
        (
            dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long)),
            r"attention_mask has shape \(2, 4\); expected \(2, 5\)",
        ),
        (
            dict(input_ids=torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long)),
            r"labels have shape \(2, 4\); expected \(2, 5\)",
        ),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), labels=torch.ones(3, 5, dtype=torch.long)), r"labels have"),
    ],
    ids=["0-rows", "1-D", "mask-shape", "label-shape", "label-rows"],
)
def test_bad_forward_inputs_are_clear_errors(kwargs, message):
    model = make_model(version(0))
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_generate_past_gpt2_positions_is_a_clear_error():
    model = make_model(version(0), arch="gpt2")  # n_positions = 64
    ids = tiny.random_ids(1, 40)
    with pytest.raises(ValueError, match=r"exceeds the model's 64 positions"):
        model.generate(input_ids=ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"exceeds the model's 64 positions"):
        model(input_ids=tiny.random_ids(1, 61))


# =========================================================================== CLI: clear errors, early


def test_num_tokens_huge_is_refused_at_once(tmp_path, capsys):
    """The model path does not exist: an error about it would mean the check came after the load."""
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "o"), "--model", "/nonexistent/model",
                           "--num-tokens", "100000000")  # fmt: skip
    assert code == 1 and one_line_error(err) and "--num-tokens must be at most" in err, err


def test_out_under_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        code, _, err = run_cli(capsys, "train", "--out", str(out), "--model", "/nonexistent/model")
        assert code == 1 and one_line_error(err) and "--out" in err and "file" in err, err
        assert "model path not found" not in err
    assert (tmp_path / "file").read_text() == "x"


def test_out_unwritable_is_refused_before_training(tmp_path, capsys):
    if os.geteuid() != 0:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "adapter"
    elif not os.access("/proc/sys", os.W_OK):  # root ignores modes; a read-only mount still stops it
        out = "/proc/sys/softprompt-reliability-test"
    else:
        pytest.skip("root and no read-only location to test with")
    code, _, err = run_cli(capsys, "train", "--out", str(out), "--model", "/nonexistent/model")
    assert code == 1 and one_line_error(err) and "no write permission" in err, err


def test_non_utf8_jsonl_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"input": "w5", "output": "w6"}\n{"input": "\xff\xfe", "output": "w6"}\n')
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "o"), "--model", "/nonexistent/model",
                           "--data", str(data))  # fmt: skip
    assert code == 1 and one_line_error(err) and f"{data}:2" in err and "UTF-8" in err, err
    assert not (tmp_path / "o").exists()


def test_steps_beyond_the_builtin_data_names_steps(tmp_path, capsys):
    from peft_softprompt_ext.app import data

    if not os.path.isfile(data.WORDNET_NOUN_PATH):
        pytest.skip("WordNet not installed (/usr/share/wordnet/data.noun)")
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "o"), "--steps", "100000", "--device", "cpu")
    assert code == 1 and one_line_error(err) and "--steps" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"adapter_config.json is not valid JSON"),
        ('["peft_type", "SOFT_PROMPT"]', r"adapter_config.json holds a JSON list, expected an object"),
        ('{"task_type": "CAUSAL_LM"}', r"adapter_config.json has no 'peft_type'"),
        (b"\xff\xfe{}", r"adapter_config.json is not UTF-8"),
    ],
    ids=["not-json", "list", "no-peft-type", "not-utf8"],
)
def test_info_on_a_bad_config_is_one_line(content, message, tmp_path, capsys):
    path = save_adapter(tmp_path / "a", version(0))
    config = os.path.join(path, "adapter_config.json")
    with open(config, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli(capsys, "info", path)
    assert code == 1 and one_line_error(err) and re.search(message, err), err


def test_decode_top_k_0_is_a_usage_error_before_loading(tmp_path, capsys, tiny_model_dir):
    path = save_adapter(tmp_path / "a", version(0))
    code, stdout, err = run_cli(capsys, "decode", path, "--base", tiny_model_dir, "--top-k", "0")
    assert code == 2 and stdout == "" and one_line_error(err) and "--top-k" in err, err
    assert "Loading" not in err and "weights" not in err.lower()
