"""The benchmark's tasks and how an example becomes token ids, the same way for every method.

Both tasks come from WordNet 3.0's nouns (Debian `wordnet-base`, `peft_softprompt_ext.app.data`), with splits
that change with the seed:

- `supersense`: "lemma: gloss" -> one of 26 class names; scored by ranking the classes' first answer tokens at
  the last position (one forward per example).
- `hypernym`: "lemma: gloss" -> a lemma of its hypernym; scored by exact match of the text `generate` writes
  (greedy) against every lemma of every direct hypernym (`data.exact_match`).

Every request is the model's chat template: a system turn (empty by default: SmolLM2's default system message
would be 40 % of every example's tokens), the example in the user turn (cut to `max_text_tokens`), then the
generation prompt. Hard-prompt baselines put an instruction (and k solved examples as earlier chat turns) in
front of the example; everything before the example text is then one fixed prefix (`Layout.prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft_softprompt_ext.app import data
from peft_softprompt_ext.app.data import Example

SENTINEL = "\u2063TEXT\u2063"
RANK, GENERATE = "rank", "generate"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # RANK or GENERATE
    title: str
    metric: str
    instruction: str
    labels: tuple[str, ...] | None


TASKS: dict[str, TaskSpec] = {
    "supersense": TaskSpec(
        name="supersense",
        kind=RANK,
        title="WordNet 3.0 noun supersenses (26 classes)",
        metric="accuracy (argmax over the 26 classes' first answer tokens)",
        instruction=data.supersense_instruction(),
        labels=data.SUPERSENSE_LABELS,
    ),
    "hypernym": TaskSpec(
        name="hypernym",
        kind=GENERATE,
        title="WordNet 3.0 noun hypernyms (generation)",
        metric="exact match of greedy `generate` output against any lemma of a direct hypernym",
        instruction=data.hypernym_instruction(),
        labels=None,
    ),
}


@dataclass
class Row:
    """One example as ids: its (cut) text, the answer the loss trains (rank: the class's first token; generate:
    the answer's tokens and EOS) and, for ranking, the gold class index."""

    text: list[int]
    target: list[int]
    gold: int | None
    example: Example


@dataclass
class Layout:
    """Ids around the example text: `prefix` + text + `suffix` is the request."""

    prefix: list[int]
    suffix: list[int]


@dataclass
class TaskData:
    """One task at one seed, encoded: train / dev / test rows, class token ids, the texts inits use."""

    spec: TaskSpec
    seed: int
    train: list[Row]
    dev: list[Row]
    test: list[Row]
    class_ids: list[int] | None
    max_new_tokens: int
    labels: list[str]  # the classes, or the 20 most frequent training answers; most frequent in train first
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def majority(self) -> float:
        """Share of the test set held by its most frequent gold answer (a floor any method should beat)."""
        counts: dict[str, int] = {}
        for row in self.test:
            counts[row.example.output] = counts.get(row.example.output, 0) + 1
        return max(counts.values()) / len(self.test)


class Formatter:
    """Turns examples into ids with one tokenizer and one input cut."""

    def __init__(self, tokenizer: Any, max_text_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def cut(self, text: str) -> list[int]:
        return self.ids(text)[: self.max_text_tokens]

    def cut_text(self, text: str) -> str:
        return self.tokenizer.decode(self.cut(text))

    def layout(
        self, system: str = "", instruction: str | None = None, demos: list[tuple[str, str]] | None = None
    ) -> Layout:
        """The chat template around the example: `system` in the system turn; `instruction` before the first user
        text; `demos` (input, answer) as earlier user/assistant turns (inputs cut like the example's)."""
        demos = demos or []
        turns = [(self.cut_text(x), y) for x, y in demos] + [(SENTINEL, None)]
        messages = [{"role": "system", "content": system}] if self._chat else []
        for i, (user, answer) in enumerate(turns):
            content = f"{instruction}\n\n{user}" if instruction and i == 0 else user
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        if self._chat:
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            rendered = "".join(f"{m['content']}\n" if m["role"] != "system" or m["content"] else "" for m in messages)
        head, _, tail = rendered.partition(SENTINEL)
        return Layout(self.ids(head), self.ids(tail))

    @property
    def _chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def rows(self, examples: list[Example], spec: TaskSpec, class_ids: list[int] | None) -> list[Row]:
        eos = self.tokenizer.eos_token_id
        out = []
        for ex in examples:
            if spec.kind == RANK:
                gold = spec.labels.index(ex.output)
                out.append(Row(self.cut(ex.input), [class_ids[gold]], gold, ex))
            else:
                out.append(Row(self.cut(ex.input), self.ids(ex.output) + [eos], None, ex))
        return out


def class_token_ids(tokenizer: Any, labels: tuple[str, ...]) -> list[int]:
    """First token of each class name as the chat template writes an answer (no leading space); distinct."""
    return data.label_token_ids(tokenizer, labels, prefix="")


def frequent_answers(examples: list[Example], n: int) -> list[str]:
    """The `n` most frequent training answers (ties by first appearance): the generative task's 'class labels'."""
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.output] = counts.get(ex.output, 0) + 1
    return sorted(counts, key=lambda a: -counts[a])[:n]


def load_task(name: str, seed: int, sizes: dict[str, int], formatter: Formatter, path: str) -> TaskData:
    """Seeded splits (test carved first), encoded. `sizes`: n_train, n_dev, n_test."""
    spec = TASKS[name]
    splits = data.wordnet_splits(spec.name, seed, sizes["n_train"], sizes["n_dev"], sizes["n_test"], path)
    class_ids = class_token_ids(formatter.tokenizer, spec.labels) if spec.kind == RANK else None
    rows = {k: formatter.rows(v, spec, class_ids) for k, v in splits.items()}
    longest = max((len(formatter.ids(a)) for r in rows["test"] for a in r.example.accepted()), default=1)
    labels = frequent_answers(splits["train"], len(spec.labels) if spec.labels else 20)
    labels += [label for label in spec.labels or () if label not in labels]  # classes absent from train last
    return TaskData(
        spec=spec,
        seed=seed,
        train=rows["train"],
        dev=rows["dev"],
        test=rows["test"],
        class_ids=class_ids,
        max_new_tokens=min(longest + 1, 16),
        labels=labels,
    )


def demos(task: TaskData, k: int, seed: int) -> list[tuple[str, str]]:
    """k solved training examples for few-shot prompting (`data.few_shot_demos`: seeded; round-robin over the
    classes for a ranking task, so k = number of classes is one per class)."""
    labels = task.spec.labels if task.spec.kind == RANK else None
    chosen = data.few_shot_demos([r.example for r in task.train], k, seed, labels)
    return [(ex.input, ex.output) for ex in chosen]
