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
    splits = data.wordnet_splits("supersense", seed=0, n_train=300, n_dev=100, n_test=200)
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "dev": 100, "test": 200}
    inputs = {k: {ex.input for ex in v} for k, v in splits.items()}
    assert sum(len(s) for s in inputs.values()) == 600  # unique within splits
    assert not (inputs["train"] & inputs["dev"] or inputs["train"] & inputs["test"] or inputs["dev"] & inputs["test"])
    assert data.wordnet_splits("supersense", seed=0, n_train=300, n_dev=100, n_test=200) == splits
    assert data.wordnet_splits("supersense", seed=1, n_train=300, n_dev=100, n_test=200)["test"] != splits["test"]


@needs_wordnet
def test_test_split_stable_across_train_sizes():
    a = data.wordnet_splits("supersense", seed=0, n_train=10, n_dev=50)
    b = data.wordnet_splits("supersense", seed=0, n_train=None, n_dev=50)
    assert a["test"] == b["test"] and a["dev"] == b["dev"]
    assert len(a["test"]) == 1000
    assert len(b["train"]) == 82114 - 1050  # one duplicated input is dropped before splitting


@needs_wordnet
def test_splits_reject_bad_sizes():
    with pytest.raises(ValueError, match="only 82114 unique"):
        data.wordnet_splits("supersense", n_train=90000)
    with pytest.raises(ValueError, match=">= 0"):
        data.wordnet_splits("supersense", n_dev=-1)


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
    with pytest.raises(ValueError, match=r"data.noun: synset 00001740: lex_filenum 0 is not a noun"):
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


# --------------------------------------------------------------------------- hypernyms, few-shot demos, scoring


@needs_wordnet
def test_wordnet_hypernyms():
    examples = data.load_wordnet_hypernyms()
    assert len(examples) == 82114  # every noun synset but `entity`, the root
    dog = next(ex for ex in examples if ex.input.startswith("dog: a member of the genus Canis"))
    assert dog.output == "canine"  # first lemma of the first hypernym
    assert set(dog.answers) == {"canine", "canid", "domestic animal", "domesticated animal"}
    paris = next(ex for ex in examples if ex.input.startswith("Paris: the capital and largest city of France"))
    assert "national capital" in paris.answers  # instance hypernyms (@i) count too
    splits = data.wordnet_splits("hypernym", seed=3, n_train=100, n_dev=20, n_test=50)
    assert splits == data.wordnet_splits("hypernym", seed=3, n_train=100, n_dev=20, n_test=50)
    inputs = [ex.input for split in splits.values() for ex in split]
    assert len(inputs) == len(set(inputs)) == 170


def test_parse_synset_pointers():
    line = "02084071 05 n 02 dog 0 domestic_dog 0 003 @ 02083346 n 0000 @i 01317541 n 0000 ~ 01322604 n 0000 | a canine  \n"
    synset = data.parse_synset(line)
    assert synset.lemmas == ("dog", "domestic dog") and synset.lex_filenum == 5 and synset.gloss == "a canine"
    assert synset.hypernyms == ("02083346", "01317541")  # hyponyms (~) are not hypernyms
    with pytest.raises(ValueError, match="expected 'offset"):
        data.parse_synset("02084071 05 n 02 dog 0 | gloss\n")


def test_hypernym_examples_from_file(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 license header line\n"
        "00000001 03 n 02 animal 0 beast 0 000 | a living organism  \n"
        "00000002 05 n 01 dog 0 001 @ 00000001 n 0000 | a domestic canine  \n"
    )
    assert data.load_wordnet_hypernyms(tmp_path / "data.noun") == [
        Example("dog: a domestic canine", "animal", ("animal", "beast"))
    ]


def test_exact_match_normalises():
    ex = Example("dog: a canine", "canine", ("canine", "domestic animal"))
    assert data.exact_match("Canine.", ex) and data.exact_match("  domestic   animal\n", ex)
    assert not data.exact_match("a canine", ex) and not data.exact_match("", ex)
    assert data.exact_match("b", Example("a", "b"))  # no answers: the output is the one answer


def test_few_shot_demos_one_per_class():
    labels = ("a", "b", "c")
    pool = [Example(f"x{i}", labels[i % 3]) for i in range(30)]
    demos = data.few_shot_demos(pool, 3, seed=0, labels=labels)
    assert sorted(ex.output for ex in demos) == ["a", "b", "c"]
    assert data.few_shot_demos(pool, 3, seed=0, labels=labels) == demos
    assert data.few_shot_demos(pool, 3, seed=1, labels=labels) != demos
    assert [ex.output for ex in data.few_shot_demos(pool, 7, seed=0, labels=labels)].count("a") == 3
    assert len(data.few_shot_demos(pool, 5, seed=0)) == 5 and data.few_shot_demos(pool, 0, seed=0) == []


class _TurnsTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_format_example_with_demos():
    demos = [("cat", "animal"), ("oak", "plant")]
    assert data.format_example(_TurnsTokenizer(), "dog", "Classify.", demos=demos) == (
        "<user>Classify.\n\ncat<assistant>animal<user>oak<assistant>plant<user>dog<assistant>"
    )
    assert data.format_example(_PlainTokenizer(), "dog", "Classify.", demos=demos) == (
        "Classify.\n\ncat\nanimal\noak\nplant\ndog\n"
    )
