"""Real data: WordNet noun supersenses, seeded splits, the JSONL reader and prompt helpers."""

from __future__ import annotations

import collections
import json
import os

import pytest

from peft_softprompt_ext.app import data
from peft_softprompt_ext.app.data import Example

needs_wordnet = pytest.mark.skipif(
    not os.path.isfile(data.WORDNET_NOUN_PATH),
    reason=f"{data.WORDNET_NOUN_PATH} absent (apt-get install wordnet-base)",
)


@needs_wordnet
def test_wordnet_counts_and_labels():
    examples = data.load_wordnet_supersenses()
    assert len(examples) == 82115
    counts = collections.Counter(ex.output for ex in examples)
    assert set(counts) == set(data.SUPERSENSE_LABELS)
    assert len(counts) == 26  # includes the tiny "Tops" class (51 synsets)
    assert counts["Tops"] == 51 and counts.most_common(1)[0][0] == "artifact"
    assert examples[0].input.startswith("entity: that which is perceived or known or inferred")
    assert examples[0].output == "Tops"


@needs_wordnet
def test_wordnet_example_format():
    by_input = {ex.input: ex.output for ex in data.load_wordnet_supersenses()}
    # 02084071 05 n 08 dog 0 domestic_dog 0 Canis_familiaris 0 ... | a member of the genus Canis ...
    dog = [k for k in by_input if k.startswith("dog: a member of the genus Canis")]
    assert len(dog) == 1 and by_input[dog[0]] == "animal"
    # Multi-word lemmas use spaces, not underscores.
    assert any(k.startswith("physical entity: ") for k in by_input)
    assert not any("_" in k.split(": ", 1)[0] for k in by_input)


@needs_wordnet
def test_splits_sizes_disjoint_deterministic():
    splits = data.supersense_splits(seed=0, n_train=300, n_dev=100, n_test=200)
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "dev": 100, "test": 200}
    inputs = {k: {ex.input for ex in v} for k, v in splits.items()}
    assert sum(len(s) for s in inputs.values()) == 600  # unique within splits
    assert not (inputs["train"] & inputs["dev"] or inputs["train"] & inputs["test"] or inputs["dev"] & inputs["test"])
    assert data.supersense_splits(seed=0, n_train=300, n_dev=100, n_test=200) == splits
    assert data.supersense_splits(seed=1, n_train=300, n_dev=100, n_test=200)["test"] != splits["test"]


@needs_wordnet
def test_test_split_stable_across_train_sizes():
    a = data.supersense_splits(seed=0, n_train=10, n_dev=50)
    b = data.supersense_splits(seed=0, n_train=None, n_dev=50)
    assert a["test"] == b["test"] and a["dev"] == b["dev"]
    assert len(a["test"]) == 1000
    assert len(b["train"]) == 82114 - 1050  # one duplicated input is dropped before splitting


@needs_wordnet
def test_splits_reject_bad_sizes():
    with pytest.raises(ValueError, match="only 82114 unique"):
        data.supersense_splits(n_train=90000)
    with pytest.raises(ValueError, match=">= 0"):
        data.supersense_splits(n_dev=-1)


def test_missing_wordnet_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_wordnet_supersenses(tmp_path / "data.noun")
    message = str(info.value)
    assert "apt-get install wordnet-base" in message and "\n" not in message


def test_parse_uses_lexnames_file(tmp_path):
    (tmp_path / "lexnames").write_text("05\tnoun.animal\t1\n06\tnoun.artifact\t1\n")
    (tmp_path / "data.noun").write_text(
        "  1 license header line\n"
        "02084071 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis  \n"
        "02958343 06 n 01 motor_car 0 000 | a motor vehicle with four wheels  \n"
    )
    assert data.load_wordnet_supersenses(tmp_path / "data.noun") == [
        Example("dog: a member of the genus Canis", "animal"),
        Example("motor car: a motor vehicle with four wheels", "artifact"),
    ]


def test_parse_rejects_non_noun_lexfile(tmp_path):
    (tmp_path / "data.noun").write_text("00001740 00 n 01 entity 0 000 | gloss\n")
    with pytest.raises(ValueError, match=r"data.noun:1: lex_filenum 00"):
        data.load_wordnet_supersenses(tmp_path / "data.noun")


def _write(tmp_path, text):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    return path


def test_jsonl_ok_skips_blank_lines(tmp_path):
    rows = [{"input": "a", "output": "b"}, {"input": "c", "output": "d", "extra": 1}]
    path = _write(tmp_path, "\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert data.load_jsonl(path) == [Example("a", "b"), Example("c", "d")]


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"input": "a", "output": "b"}\n{"input": "a",\n', r"d.jsonl:2: malformed JSON"),
        ('{"input": "a", "output": "b"}\n\n{"input": "a"}\n', r"d.jsonl:3: missing field 'output'"),
        ('{"output": "b"}\n', r"d.jsonl:1: missing field 'input'"),
        ('{"input": 3, "output": "b"}\n', r"d.jsonl:1: field 'input' must be a string"),
        ('["input", "output"]\n', r"d.jsonl:1: expected a JSON object"),
        ("\n  \n", r"d.jsonl: empty dataset"),
    ],
)
def test_jsonl_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match) as info:
        data.load_jsonl(_write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_jsonl(tmp_path / "nope.jsonl")


def test_instruction_lists_all_labels():
    text = data.supersense_instruction()
    assert all(label in text for label in data.SUPERSENSE_LABELS)


class _PlainTokenizer:
    chat_template = None


class _ChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_format_example_plain_and_chat():
    assert data.format_example(_PlainTokenizer(), "dog: a canine") == "dog: a canine\n"
    assert data.format_example(_PlainTokenizer(), "dog", instruction="Classify.") == "Classify.\n\ndog\n"
    assert data.format_example(_ChatTokenizer(), "dog", instruction="Classify.") == (
        "<user>Classify.\n\ndog</user><assistant>"
    )


@pytest.mark.slow
def test_supersense_label_tokens_with_smollm2():
    """Design assumption: class names are single SmolLM2 tokens. True with a leading space, except Tops."""
    from peft_softprompt_ext.app.bundled import load_smollm2

    _, tokenizer = load_smollm2()
    lengths = {lab: len(tokenizer.encode(" " + lab, add_special_tokens=False)) for lab in data.SUPERSENSE_LABELS}
    assert {lab for lab, n in lengths.items() if n != 1} == {"Tops"}
    ids = data.label_token_ids(tokenizer)
    assert len(set(ids)) == 26
    prompt = data.format_example(tokenizer, "dog: a canine", data.supersense_instruction())
    assert prompt.endswith("<|im_start|>assistant\n") and "Classify" in prompt
