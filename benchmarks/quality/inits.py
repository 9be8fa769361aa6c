"""Lester et al.'s class-label initialisation, registered for the benchmark's sweep.

Each virtual token starts as the mean embedding of one class label's tokens (labels in the order given, most
frequent first); tokens beyond the number of labels are sampled from the vocabulary like ``init="vocab"``.
The labels come newline-separated in ``init_text``. It lives here, not in the package, until it wins the sweep:
an adapter saved with ``init="class_labels"`` only loads where this module was imported.
"""

from __future__ import annotations

import torch

from peft_softprompt_ext.initializers import (
    INITIALIZERS,
    InitContext,
    embedding_rows,
    register_initializer,
    vocab_ids,
)
from peft_softprompt_ext.vocab import special_token_ids

NAME = "class_labels"


def label_prompt(ctx: InitContext) -> torch.Tensor:
    """Mean embedding of each label's tokens (no leading space, as a chat answer starts), then vocab samples."""
    tokenizer = ctx.tokenizer()
    specials = special_token_ids(tokenizer)
    labels = [line for line in ctx.config.init_text.split("\n") if line.strip()]
    rows = []
    for label in labels[: ctx.num_virtual_tokens]:
        ids = [i for i in tokenizer(label, add_special_tokens=False)["input_ids"] if i not in specials]
        rows.append(embedding_rows(ctx.embeddings, ids).mean(0))
    missing = ctx.num_virtual_tokens - len(rows)
    if missing > 0:
        rows += list(embedding_rows(ctx.embeddings, vocab_ids(ctx)[:missing]))
    return torch.stack(rows)


if NAME not in INITIALIZERS:
    register_initializer(
        NAME,
        requires=("init_text",),
        accepts=("init_text", "tokenizer_kwargs"),
        needs_tokenizer=True,
        help="one virtual token per class label (mean of its tokens' embeddings; labels newline-separated in "
        "init_text), the rest sampled from the vocabulary",
    )(label_prompt)
