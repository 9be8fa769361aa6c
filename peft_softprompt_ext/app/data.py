"""Real, offline data for training, evaluation and benchmarks.

Two tasks from WordNet 3.0's nouns (Debian package ``wordnet-base``: no network, identical on every machine):

- supersense classification: given ``"{lemma}: {gloss}"`` predict the lexicographer file of the synset
  (``animal``, ``artifact``, ...; 26 one-word classes);
- hypernym generation: given ``"{lemma}: {gloss}"`` write a lemma of the synset's hypernym (``"dog: a member of
  the genus Canis ..."`` -> ``"canine"``), scored by exact match against every lemma of every direct hypernym.

Users bring their own data as JSONL with ``input``/``output`` fields.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from collections.abc import Callable
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
    """One input/output pair; frozen so cached datasets cannot be mutated by callers. `answers`: every output
    that counts as correct (empty: only `output`), e.g. all lemmas of a hypernym."""

    input: str
    output: str
    answers: tuple[str, ...] = ()

    def accepted(self) -> tuple[str, ...]:
        return self.answers or (self.output,)


@dataclass(frozen=True)
class Synset:
    """The fields of one ``data.noun`` line the tasks use."""

    offset: str
    lex_filenum: int
    lemmas: tuple[str, ...]  # underscores replaced by spaces, in WordNet's order
    gloss: str
    hypernyms: tuple[str, ...]  # offsets of the direct hypernyms: "@" (class) and "@i" (instance) pointers


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


def supersense_example(synset: Synset, lexnames: dict[int, str]) -> Example:
    """``Example("{first lemma}: {gloss}", supersense)`` of one noun synset."""
    lexname = lexnames.get(synset.lex_filenum)
    if lexname is None or not lexname.startswith("noun."):
        raise ValueError(f"synset {synset.offset}: lex_filenum {synset.lex_filenum} is not a noun lexicographer file")
    return Example(input=f"{synset.lemmas[0]}: {synset.gloss}", output=lexname.removeprefix("noun."))


def parse_synset(line: str) -> Synset:
    """Parse one ``data.noun`` line: ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [ptr offset pos
    src/tgt] ... | gloss``. w_cnt is two hex digits, p_cnt three decimal ones."""
    head, sep, gloss = line.partition("| ")
    fields = head.split()
    bad = ValueError(f"expected 'offset lex_filenum ss_type w_cnt word ... p_cnt ... | gloss', got {line[:60]!r}")
    try:
        n_words = int(fields[3], 16)
        words = fields[4 : 4 + 2 * n_words : 2]
        at = 4 + 2 * n_words
        pointers = [fields[at + 1 + 4 * k : at + 5 + 4 * k] for k in range(int(fields[at]))]
        lex_filenum = int(fields[1])
    except (IndexError, ValueError):
        raise bad from None
    if not sep or len(words) != n_words or any(len(p) != 4 for p in pointers):
        raise bad
    hypernyms = tuple(p[1] for p in pointers if p[0] in ("@", "@i") and p[2] == "n")
    lemmas = tuple(w.replace("_", " ") for w in words)
    return Synset(fields[0], lex_filenum, lemmas, gloss.strip(), hypernyms)


@functools.lru_cache(maxsize=4)
def _load_synsets_cached(path: str) -> tuple[Synset, ...]:
    synsets = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.startswith("  "):  # license header
                continue
            try:
                synsets.append(parse_synset(line))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return tuple(synsets)


def load_noun_synsets(path: str | os.PathLike = WORDNET_NOUN_PATH) -> list[Synset]:
    """Every synset of ``data.noun`` in file order (parsed once, cached)."""
    if not os.path.isfile(path):
        raise _missing_wordnet(path)
    return list(_load_synsets_cached(os.path.abspath(path)))


def load_wordnet_hypernyms(path: str | os.PathLike = WORDNET_NOUN_PATH) -> list[Example]:
    """One example per noun synset that has a hypernym: ``"{lemma}: {gloss}"`` -> the first lemma of its first
    hypernym (WordNet lists the most common lemma first), accepting every lemma of every direct hypernym (class
    and instance pointers). 82,114 of the 82,115 noun synsets have one (all but ``entity``)."""
    synsets = load_noun_synsets(path)
    by_offset = {s.offset: s for s in synsets}
    examples = []
    for s in synsets:
        parents = [by_offset[o] for o in s.hypernyms if o in by_offset]
        if not parents:
            continue
        answers = tuple(dict.fromkeys(lemma for p in parents for lemma in p.lemmas))
        examples.append(Example(f"{s.lemmas[0]}: {s.gloss}", parents[0].lemmas[0], answers))
    return examples


def seeded_splits(
    examples: list[Example], seed: int, n_train: int | None, n_dev: int, n_test: int
) -> dict[str, list[Example]]:
    """Seeded, disjoint train/dev/test splits (``n_train=None``: all the rest) of examples de-duplicated by input
    (the last of equal inputs is kept, in the first one's place), so no text is in two splits. Test is carved from the shuffled pool
    first, then dev, then train: for a given seed the test set does not change with the other sizes."""
    unique = list({ex.input: ex for ex in examples}.values())
    sizes = {"n_dev": n_dev, "n_test": n_test, "n_train": n_train}
    if any(v is not None and v < 0 for v in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    wanted = n_test + n_dev + (n_train or 0)
    if wanted > len(unique):
        raise ValueError(f"requested {wanted} examples ({sizes}) but only {len(unique)} unique exist")
    random.Random(seed).shuffle(unique)
    test, dev = unique[:n_test], unique[n_test : n_test + n_dev]
    rest = unique[n_test + n_dev :]
    return {"train": rest if n_train is None else rest[:n_train], "dev": dev, "test": test}


def hypernym_instruction() -> str:
    """Zero-shot instruction of the hypernym task."""
    return (
        "Give the hypernym of the WordNet noun sense below: a more general word that it is a kind of "
        "(dog -> canine, car -> motor vehicle). Answer with the word only."
    )


def normalize_answer(text: str) -> str:
    """What exact match compares: lowercased, whitespace collapsed, surrounding spaces and a final period
    dropped (the model's answer is free text; WordNet lemmas are lowercase except proper nouns)."""
    return " ".join(text.strip().lower().removesuffix(".").split())


def exact_match(prediction: str, example: Example) -> bool:
    """True if the normalised prediction equals one of the example's accepted answers."""
    return normalize_answer(prediction) in {normalize_answer(a) for a in example.accepted()}


def _missing_wordnet(path: str | os.PathLike) -> FileNotFoundError:
    return FileNotFoundError(f"WordNet noun data not found at {path}; install it with: {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def _load_wordnet_cached(path: str) -> tuple[Example, ...]:
    lexnames = read_lexnames(os.path.dirname(path))
    try:
        examples = tuple(supersense_example(synset, lexnames) for synset in _load_synsets_cached(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    logger.info("Loaded %d noun synsets from %s", len(examples), path)
    return examples


def load_wordnet_supersenses(path: str | os.PathLike = WORDNET_NOUN_PATH) -> list[Example]:
    """All 82,115 WordNet 3.0 noun synsets as supersense examples, in file order (parsed once, cached)."""
    if not os.path.isfile(path):
        raise _missing_wordnet(path)
    return list(_load_wordnet_cached(os.path.abspath(path)))


def supersense_pool_size(path: str | os.PathLike = WORDNET_NOUN_PATH) -> int:
    """How many distinct examples the supersense task has (what all splits together can hold)."""
    return len({ex.input for ex in load_wordnet_supersenses(path)})


WORDNET_TASKS: dict[str, Callable[[str | os.PathLike], list[Example]]] = {
    "supersense": load_wordnet_supersenses,
    "hypernym": load_wordnet_hypernyms,
}


def wordnet_splits(
    task: str,
    seed: int = 0,
    n_train: int | None = 2000,
    n_dev: int = 500,
    n_test: int = 1000,
    path: str | os.PathLike = WORDNET_NOUN_PATH,
) -> dict[str, list[Example]]:
    """Seeded, disjoint train/dev/test splits of a WordNet task (`WORDNET_TASKS`; ``n_train=None``: all the rest);
    see `seeded_splits`: for a given seed the test set does not change with the other sizes."""
    if task not in WORDNET_TASKS:
        raise ValueError(f"task must be one of {', '.join(WORDNET_TASKS)}, got {task!r}")
    return seeded_splits(WORDNET_TASKS[task](path), seed, n_train, n_dev, n_test)


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


def format_example(
    tokenizer,
    text: str,
    instruction: str | None = None,
    system: str | None = None,
    demos: list[tuple[str, str]] | None = None,
) -> str:
    """Render ``text`` (after ``instruction``) as a prompt ready for the model's answer.

    Instruct models get a chat-template user turn with the generation prompt appended, matching how
    they were tuned (and, with `system`, that system turn: e.g. a soft prompt's slot); tokenizers without a
    chat template get plain text ending in a newline. `demos` are solved examples (input, answer) put before the
    example as earlier user/assistant turns (few-shot prompting); the instruction goes before the first of them.
    """
    turns = [*(demos or []), (text, None)]
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system is not None else []
        for i, (user, answer) in enumerate(turns):
            messages.append({"role": "user", "content": f"{instruction}\n\n{user}" if instruction and i == 0 else user})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [] if system is None else [system]
    for i, (user, answer) in enumerate(turns):
        lines.append(f"{instruction}\n\n{user}" if instruction and i == 0 else user)
        if answer is not None:
            lines.append(answer)
    return "\n".join(lines) + "\n"


def few_shot_demos(examples: list[Example], k: int, seed: int, labels: tuple[str, ...] | None = None) -> list[Example]:
    """k solved examples for few-shot prompting, seeded. With `labels`, round-robin over the classes (k = number
    of classes: one per class; each class's examples in a seeded order), then shuffled so that no class always sits
    nearest the question; without, the first k of a seeded shuffle."""
    rng = random.Random(f"demos-{seed}-{k}")
    pool = examples[:]
    rng.shuffle(pool)
    if labels is None:
        return pool[:k]
    queues = [[ex for ex in pool if ex.output == label] for label in labels]
    chosen: list[Example] = []
    depth = 0
    while len(chosen) < k and any(depth < len(q) for q in queues):
        chosen += [q[depth] for q in queues if depth < len(q)][: k - len(chosen)]
        depth += 1
    rng.shuffle(chosen)
    return chosen


def label_token_ids(tokenizer, labels: tuple[str, ...] = SUPERSENSE_LABELS, prefix: str = " ") -> list[int]:
    """First token id of ``prefix + label`` for each label, for ranking classes by next-token logits.

    With SmolLM2 and ``prefix=" "`` every supersense is one token except ``Tops`` (`` T`` + ``ops``);
    its first token is still unique, which is all ranking needs. Raises if two labels would collide.
    """
    ids = [tokenizer.encode(prefix + label, add_special_tokens=False)[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels share a first token with prefix {prefix!r}; ranking would be ambiguous")
    return ids
