"""Real, offline data for training, evaluation and benchmarks.

The main task is WordNet 3.0 noun supersense classification: given ``"{lemma}: {gloss}"`` predict the
lexicographer file of the synset (``animal``, ``artifact``, ...). The data comes from the Debian package
``wordnet-base``, so it needs no network and is identical on every machine. Users bring their own data
as JSONL with ``input``/``output`` fields.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

WORDNET_NOUN_PATH = "/usr/share/wordnet/data.noun"
INSTALL_HINT = "apt-get install wordnet-base"

# Lexicographer files 03..28 of WordNet 3.0 (the noun ones); used when no ``lexnames`` file ships.
_NOUN_LEXNAMES = (
    "Tops",
    "act",
    "animal",
    "artifact",
    "attribute",
    "body",
    "cognition",
    "communication",
    "event",
    "feeling",
    "food",
    "group",
    "location",
    "motive",
    "object",
    "person",
    "phenomenon",
    "plant",
    "possession",
    "process",
    "quantity",
    "relation",
    "shape",
    "state",
    "substance",
    "time",
)
DEFAULT_LEXNAMES: dict[int, str] = {3 + i: f"noun.{name}" for i, name in enumerate(_NOUN_LEXNAMES)}

# The 26 class names, in lexicographer-file order.
SUPERSENSE_LABELS: tuple[str, ...] = _NOUN_LEXNAMES


@dataclass(frozen=True)
class Example:
    """One input/output pair; frozen so cached datasets cannot be mutated by callers."""

    input: str
    output: str


def read_lexnames(wordnet_dir: str | os.PathLike) -> dict[int, str]:
    """Map lex_filenum -> lexname from ``<dir>/lexnames`` if present, else the WordNet 3.0 defaults.

    Lines look like ``05\\tnoun.animal\\t1``. Reading the file keeps us right if a packaging ships it.
    """
    path = Path(wordnet_dir) / "lexnames"
    if not path.is_file():
        return dict(DEFAULT_LEXNAMES)
    names: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[0].isdigit():
            raise ValueError(f"{path}:{lineno}: expected '<number> <lexname> [syntactic category]'")
        names[int(fields[0])] = fields[1]
    logger.debug("Read %d lexnames from %s", len(names), path)
    return names


def parse_noun_line(line: str, lexnames: dict[int, str]) -> Example:
    """Turn one ``data.noun`` synset line into ``Example("{lemma}: {gloss}", supersense)``.

    Format: ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt ... | gloss``; only
    the first word (w_cnt is hex, so we never need to count words) and the gloss are used.
    """
    head, sep, gloss = line.partition("| ")
    fields = head.split()
    if not sep or len(fields) < 5:
        raise ValueError(f"expected 'offset lex_filenum ss_type w_cnt word ... | gloss', got {line[:60]!r}")
    lexname = lexnames.get(int(fields[1]))
    if lexname is None or not lexname.startswith("noun."):
        raise ValueError(f"lex_filenum {fields[1]} is not a noun lexicographer file ({lexname})")
    lemma = fields[4].replace("_", " ")
    return Example(input=f"{lemma}: {gloss.strip()}", output=lexname.removeprefix("noun."))


def _missing_wordnet(path: str | os.PathLike) -> FileNotFoundError:
    return FileNotFoundError(f"WordNet noun data not found at {path}; install it with: {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def _load_wordnet_cached(path: str) -> tuple[Example, ...]:
    lexnames = read_lexnames(os.path.dirname(path))
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.startswith("  "):  # license header
                continue
            try:
                examples.append(parse_noun_line(line, lexnames))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    logger.info("Loaded %d noun synsets from %s", len(examples), path)
    return tuple(examples)


def load_wordnet_supersenses(path: str | os.PathLike = WORDNET_NOUN_PATH) -> list[Example]:
    """All 82,115 WordNet 3.0 noun synsets as supersense examples, in file order (parsed once, cached)."""
    if not os.path.isfile(path):
        raise _missing_wordnet(path)
    return list(_load_wordnet_cached(os.path.abspath(path)))


def supersense_pool_size(path: str | os.PathLike = WORDNET_NOUN_PATH) -> int:
    """How many distinct examples the supersense task has (what all splits together can hold)."""
    return len({ex.input for ex in load_wordnet_supersenses(path)})


def supersense_splits(
    seed: int = 0,
    n_train: int | None = 2000,
    n_dev: int = 500,
    n_test: int = 1000,
    path: str | os.PathLike = WORDNET_NOUN_PATH,
) -> dict[str, list[Example]]:
    """Seeded, disjoint train/dev/test splits of the supersense task (``n_train=None``: all the rest).

    Inputs are de-duplicated first so no text appears in two splits. Test is carved from the shuffled
    pool first, then dev, then train, so for a given seed the test set does not change with the other
    sizes and results stay comparable across runs.
    """
    examples = list({ex.input: ex for ex in load_wordnet_supersenses(path)}.values())
    sizes = {"n_dev": n_dev, "n_test": n_test, "n_train": n_train}
    if any(v is not None and v < 0 for v in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    wanted = n_test + n_dev + (n_train or 0)
    if wanted > len(examples):
        raise ValueError(f"requested {wanted} examples ({sizes}) but only {len(examples)} unique exist")
    random.Random(seed).shuffle(examples)
    test, dev = examples[:n_test], examples[n_test : n_test + n_dev]
    rest = examples[n_test + n_dev :]
    train = rest if n_train is None else rest[:n_train]
    return {"train": train, "dev": dev, "test": test}


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read user data: one JSON object per line with string fields ``input`` and ``output``.

    Blank lines are skipped. Errors name the file and line so a bad row in a big file is easy to find.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL data file not found: {path}")
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'input' and 'output'")
            for field in ("input", "output"):
                if field not in record:
                    raise ValueError(f"{path}:{lineno}: missing field '{field}'")
                if not isinstance(record[field], str):
                    raise ValueError(f"{path}:{lineno}: field '{field}' must be a string")
            examples.append(Example(input=record["input"], output=record["output"]))
    if not examples:
        raise ValueError(f"{path}: empty dataset (expected JSONL lines with 'input' and 'output')")
    logger.info("Loaded %d examples from %s", len(examples), path)
    return examples


def supersense_instruction(labels: tuple[str, ...] = SUPERSENSE_LABELS) -> str:
    """Zero-shot instruction naming every class, so an untuned model knows the answer space."""
    return (
        "Classify the WordNet noun sense below into one of these categories: "
        + ", ".join(labels)
        + ". Answer with the category name only."
    )


def format_example(tokenizer, text: str, instruction: str | None = None, system: str | None = None) -> str:
    """Render ``text`` (after ``instruction``) as a prompt ready for the model's answer.

    Instruct models get a chat-template user turn with the generation prompt appended, matching how
    they were tuned (and, with `system`, that system turn: e.g. a soft prompt's slot); tokenizers without a
    chat template get plain text ending in a newline.
    """
    content = f"{instruction}\n\n{text}" if instruction else text
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n{content}\n" if system is not None else f"{content}\n"


def label_token_ids(tokenizer, labels: tuple[str, ...] = SUPERSENSE_LABELS, prefix: str = " ") -> list[int]:
    """First token id of ``prefix + label`` for each label, for ranking classes by next-token logits.

    With SmolLM2 and ``prefix=" "`` every supersense is one token except ``Tops`` (`` T`` + ``ops``);
    its first token is still unique, which is all ranking needs. Raises if two labels would collide.
    """
    ids = [tokenizer.encode(prefix + label, add_special_tokens=False)[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels share a first token with prefix {prefix!r}; ranking would be ambiguous")
    return ids
