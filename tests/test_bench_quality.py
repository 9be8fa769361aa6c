"""benchmarks/bench_quality.py end to end at --quick settings on a tiny Llama, a word-level tokenizer with a chat
template and a synthetic WordNet file (supersenses and hypernym pointers): both tasks and every method run, the
JSON summary has its schema, the markdown / PNG are written, the sweep merges its rows. No accuracy assertions (a
random tiny model learns nothing in 3 steps), except where a result is known exactly."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import tiny
import torch
from transformers import LlamaForCausalLM

from peft_softprompt_ext.app import data
from peft_softprompt_ext.app.data import SUPERSENSE_LABELS

ROOT = os.path.dirname(os.path.dirname(__file__))
BENCH = os.path.join(ROOT, "benchmarks", "bench_quality.py")
N_SYNSETS = 90
LEMMAS = [f"w{i}" for i in range(N_SYNSETS)]
WORDS = [f"word{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def make_tokenizer():
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "system", "user", "assistant", ":", ",", ".", "->", "(", ")"]
    instruction_words = " ".join([data.supersense_instruction(), data.hypernym_instruction()]).split()
    vocab += list(SUPERSENSE_LABELS) + WORDS + LEMMAS
    vocab += [w for w in dict.fromkeys(instruction_words) if w not in vocab]
    tokenizer = tiny.word_tokenizer(vocab, split_punctuation=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = tiny.llama_config(vocab_size=len(tokenizer), max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def synset_line(i: int) -> str:
    """Synset i: lexicographer file 03 + i % 26, lemma w{i}, hypernym w{i // 3} (none for 0)."""
    lex = 3 + i % len(SUPERSENSE_LABELS)
    gloss = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))
    pointers = "000" if i == 0 else f"001 @ {i // 3:08d} n 0000"
    return f"{i:08d} {lex:02d} n 01 {LEMMAS[i]} 0 {pointers} | {gloss}\n"


@pytest.fixture(scope="module")
def wordnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wordnet") / "data.noun"
    path.write_text("  1 This is a license header line\n" + "".join(synset_line(i) for i in range(N_SYNSETS)))
    return str(path)


def quick(tiny_model_dir, wordnet_file, out, *extra):
    return ["--quick", "--model", tiny_model_dir, "--data-path", wordnet_file, "--out-dir", str(out), *extra]


def check_task_entry(bench, task: str, entry: dict) -> None:
    """One task's summary entry: seeds, every method with mean / sd / trainable_params, the goal's criteria."""
    assert entry["seeds"] == [0, 1]
    methods = entry["methods"]
    assert list(methods) == [m for m in bench.METHODS if not (task == "hypernym" and m == "few_shot_per_class")]
    for m in methods.values():
        assert 0.0 <= m["mean"] <= 1.0 and isinstance(m["sd"], float) and m["sd"] >= 0.0
        assert len(m["scores"]) == 2 and m["seeds"] == [0, 1] and isinstance(m["trainable_params"], int)
    for name in ("ours_default", "pez_hard_prompt", "ours_prepend", "peft_pt_defaults", "peft_pt_tuned"):
        assert methods[name]["trainable_params"] == 20 * 32
    assert methods["lora"]["trainable_params"] > methods["ours_default"]["trainable_params"]
    assert all(methods[name]["trainable_params"] == 0 for name in ("zero_shot", "few_shot_best", "decoded_nearest"))
    goal = entry["goal"]
    assert set(goal["met_by_criterion"]) == {"of_lora", "fewer_params_than_lora", "of_few_shot_best", "pez_gain_kept"}
    assert goal["checks"]["fewer_params_than_lora"] == methods["lora"]["trainable_params"] / 640
    assert isinstance(goal["met"], bool)
    selection = methods["few_shot_best"]["config"]["selection"]
    assert selection["dev_curve"][str(selection["k"])] == max(selection["dev_curve"].values())  # dev's best k


def check_rows(report: dict) -> None:
    rows = report["results"]
    trained = [r for r in rows if r["trainable_params"]]
    assert trained and all(len(r["losses"]) == report["settings"]["steps"] and r["train_seconds"] > 0 for r in trained)
    assert all(len(r["correct"]) == 16 for r in rows)  # one flag per test example
    gen = next(r for r in rows if r["task"] == "hypernym" and r["method"] == "ours_default")
    assert gen["extra"]["sample_outputs"][0]["gold"]  # generated text next to the accepted answers


def test_quick_run_writes_summary_for_both_tasks(bench, tiny_model_dir, wordnet_file, tmp_path):
    out = tmp_path / "results"
    argv = quick(tiny_model_dir, wordnet_file, out, "--suite", "all", "--few-shot-k", "search", "--threads", "1")
    assert bench.main(argv) == 0

    report = json.loads((out / "quality_all_quick.json").read_text())
    assert list(report["summary"]) == ["supersense", "hypernym"]
    for task, entry in report["summary"].items():
        check_task_entry(bench, task, entry)
    assert len(report["results"]) == 2 * (2 * len(bench.METHODS) - 1)  # 2 seeds; no per-class few-shot generating
    check_rows(report)
    assert report["settings"]["seeds"] == [0, 1] and report["machine"]["torch_threads"] == 1

    table = (out / "quality_all_quick.md").read_text()
    assert "### supersense" in table and "### hypernym" in table and "`ours_default`" in table
    assert "python benchmarks/bench_quality.py --quick" in table
    assert (out / "quality_all_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_suite_is_the_goal_set(bench):
    """The default command runs what the goal is judged on; the other baselines are one --suite away."""
    default = bench.SUITES["default"]
    assert {"zero_shot", "few_shot_best", "ours_default", "pez_hard_prompt", "lora"} <= set(default)
    assert set(bench.SUITES["default"]) | set(bench.SUITES["baselines"]) == set(bench.METHODS)


def test_same_command_same_scores(bench, tiny_model_dir, wordnet_file, tmp_path):
    """Deterministic data order, seeds and kernels: a rerun reproduces every per-example result, also when each
    method runs in a worker process of its own (two workers with one thread each against this process with one
    thread; `decoded_nearest` runs where `ours_default` trained its prompt)."""
    methods = "zero_shot,ours_default,decoded_nearest,lora"
    assert bench.units(methods.split(",")) == [("zero_shot",), ("ours_default", "decoded_nearest"), ("lora",)]
    argv = ["--task", "hypernym", "--seeds", "1,0", "--methods", methods]
    runs = []
    for name, parallel in (("a", ["--jobs", "1", "--threads", "1"]), ("b", ["--jobs", "2", "--threads", "2"])):
        assert bench.main(quick(tiny_model_dir, wordnet_file, tmp_path / name, *argv, *parallel)) == 0
        report = json.loads((tmp_path / name / "quality_quick.json").read_text())
        assert (report["settings"]["jobs"], report["settings"]["threads_per_job"]) == (int(parallel[1]), 1)
        runs.append([(r["seed"], r["method"], r["correct"], r["losses"]) for r in report["results"]])
    assert runs[0] == runs[1]
    assert [(seed, method) for seed, method, *_ in runs[0]] == [(s, m) for s in (1, 0) for m in methods.split(",")]


def test_sweep_rows_merge(bench, tiny_model_dir, wordnet_file, tmp_path):
    """Two workers (one per seed) add rows to one sweep file as they finish; a rerun replaces rows, never appends."""
    argv = ["--sweep", "--sweep-levers", "lr,lora_lr", "--task", "supersense", "--seeds", "0,1", "--jobs", "2"]
    assert bench.main(quick(tiny_model_dir, wordnet_file, tmp_path, *argv, "--threads", "2")) == 0
    first = json.loads((tmp_path / "quality_sweep_quick.json").read_text())
    assert {r["lever"] for r in first["rows"]} == {"lr", "lora_lr"}
    assert all(r["task"] == "supersense" and 0 <= r["dev_score"] <= 1 for r in first["rows"])
    per_seed = [sorted((r["lever"], r["row"]) for r in first["rows"] if r["seed"] == seed) for seed in (0, 1)]
    assert per_seed[0] == per_seed[1] and len(per_seed[0]) == len(first["rows"]) // 2
    argv = ["--sweep", "--sweep-levers", "lr", "--task", "supersense", "--threads", "1"]
    assert bench.main(quick(tiny_model_dir, wordnet_file, tmp_path, *argv)) == 0
    second = json.loads((tmp_path / "quality_sweep_quick.json").read_text())
    assert len(second["rows"]) == len(first["rows"]) and len(second["runs"]) == 2  # replaced, not appended
    assert "| supersense | lr | lr=0.1 |" in (tmp_path / "quality_sweep_quick.md").read_text()


def test_unknown_method_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit, match="unknown methods"):
        bench.main(["--quick", "--methods", "ours,lora", "--out-dir", str(tmp_path)])


def test_missing_wordnet_says_how_to_install(bench, tmp_path, capsys):
    assert bench.main(["--quick", "--data-path", str(tmp_path / "nope" / "data.noun"), "--out-dir", str(tmp_path)]) == 2
    assert "apt-get install wordnet-base" in capsys.readouterr().out


def test_exact_match_and_tasks(bench):
    from benchmarks.quality.tasks import TASKS

    ex = data.Example("dog: a canine", "canine", ("canine", "canid"))
    assert data.exact_match(" Canid.\n", ex) and data.exact_match("canine", ex) and not data.exact_match("dog", ex)
    assert TASKS["supersense"].kind == "rank" and TASKS["hypernym"].kind == "generate"


def test_generation_stops_a_row_only_once_it_cannot_match(bench):
    """`CannotMatch` never stops a row whose text could still exact-match (case, spaces, a final period), and stops
    one that has written more than its longest accepted answer allows; rows are judged one by one."""
    from benchmarks.quality.engine import CannotMatch

    tokenizer = make_tokenizer()
    ex = data.Example("w3: word1", "word2", ("word2", "word3 word4"))
    start = 2
    prefix = [tokenizer.convert_tokens_to_ids("user")] * start

    def stopped(*texts: str) -> list[bool]:
        rows = [prefix + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return CannotMatch(tokenizer, start, [ex] * len(texts))(ids, None).tolist()

    still_possible = ["word3 word4 .", "word2", "word3", ""]
    assert all(data.exact_match(t, ex) or t in ("word3", "") for t in still_possible)
    assert stopped(*still_possible) == [False] * 4
    assert stopped("word3 word4 word2", "word2", "word2 word2 word2") == [True, False, True]
