"""Read a soft prompt back as tokens, measure what those tokens keep, and train prompts that stay tokens.

Three pieces, all built on one chunked nearest-neighbour search over the input embedding table:

- `decode_prompt`: for each virtual token, the top-k vocabulary tokens by cosine similarity, L2 distance or dot
  product (`SoftPromptModel.decode_prompt` is the same for an adapter of a model).
- `evaluate_decoding`: the task score and the next-token KL of the soft prompt next to each metric's top-1
  decoded hard prompt (the literature decodes prompts but never says how much of the task the text keeps).
- `projected_prompt`: PEZ-style training (Wen et al. 2023): the forward sees the nearest-token projection of
  the prompt, the gradient updates the continuous prompt (straight-through).

Candidates are the outputs of the model's input embedding *module* (what the prompt is concatenated with), so
models that scale their embeddings (Gemma) are searched in the right space. The table is read in chunks of rows;
the search never holds more than one float32 chunk plus a [P, chunk] score block, never [P, V, d]. Under
DeepSpeed ZeRO-3 the table is gathered for the search (every rank must take part, as for any gathered read).

Which metric recovers a prompt initialised from text exactly:
  - cosine: cos(e_j, e_j) = 1 is the maximum; only a row that is a positive multiple of e_j can tie.
  - l2: ||e_j - e_j|| = 0 is the minimum; only a duplicate row can tie.
  - dot: NOT guaranteed. <e_j, e_i> > <e_j, e_j> whenever ||e_i|| cos(angle) > ||e_j||, so a large-norm token
    near e_j wins (Prompt Waywardness decodes this way). It is exact when all rows have the same norm.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .architecture import evaluating
from .constants import METRICS
from .distributed import full_shape, gathered_params
from .vocab import embed, load_tokenizer, special_token_ids

logger = logging.getLogger(__name__)
_CHUNK_ELEMENTS = 1 << 24  # float32 elements of one table chunk (64 MiB): bounds the extra memory to O(chunk)


# --------------------------------------------------------------------------- nearest-token search


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; valid metrics are {', '.join(METRICS)}.")


def _table_shape(embeddings: torch.Tensor | nn.Module) -> tuple[int, int]:
    """(rows, hidden) of an embedding matrix or module, also when ZeRO-3 has partitioned it."""
    weight = embeddings if isinstance(embeddings, torch.Tensor) else getattr(embeddings, "weight", None)
    if weight is None:
        raise TypeError(f"Expected an embedding matrix or a module with `.weight`, got {type(embeddings).__name__}.")
    shape = full_shape(weight)
    if len(shape) != 2:
        raise ValueError(f"The embedding table must be 2-D [vocab, hidden], got shape {tuple(shape)}.")
    return int(shape[0]), int(shape[1])


def _weight_of(embeddings: torch.Tensor | nn.Module) -> torch.Tensor:
    return embeddings if isinstance(embeddings, torch.Tensor) else embeddings.weight


def _lookup(embeddings: torch.Tensor | nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Embeddings of `ids` as the model sees them (a module may scale its rows), float32."""
    device = _weight_of(embeddings).device
    ids = ids.to(device)
    rows = embeddings[ids] if isinstance(embeddings, torch.Tensor) else embed(embeddings, ids)
    return rows.detach().float()


@contextlib.contextmanager
def _gathered(embeddings: torch.Tensor | nn.Module) -> Iterator[None]:
    """Read-only gather of a ZeRO-3 partitioned table (no-op otherwise)."""
    weight = _weight_of(embeddings)
    with gathered_params([weight] if isinstance(weight, nn.Parameter) else []):
        yield


def _check_prompt(prompt: torch.Tensor, hidden: int) -> torch.Tensor:
    if prompt.dim() != 2:
        raise ValueError(f"The prompt must be 2-D [num_virtual_tokens, hidden], got shape {tuple(prompt.shape)}.")
    if prompt.shape[1] != hidden:
        raise ValueError(
            f"Hidden size mismatch: the prompt has hidden size {prompt.shape[1]} but the embedding table has "
            f"hidden size {hidden}; decode against the model the prompt was trained for."
        )
    return prompt


def nearest_tokens(
    prompt: torch.Tensor,
    embeddings: torch.Tensor | nn.Module,
    metric: str = "cosine",
    top_k: int = 1,
    exclude_ids: Iterable[int] | None = None,
    num_candidates: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidate ids and scores per prompt row, best first: ([P, k] long, [P, k] float32), on CPU.

    `embeddings` is a [V, d] matrix or an embedding module (called on id chunks, so scaled embeddings are honoured).
    Scores: cosine similarity and dot product (higher is closer), L2 distance (lower is closer). Only ids below
    `num_candidates` (default V) and not in `exclude_ids` are candidates. Runs without autograd.
    """
    _check_metric(metric)
    rows, hidden = _table_shape(embeddings)
    _check_prompt(prompt, hidden)
    limit = rows if num_candidates is None else min(int(num_candidates), rows)
    excluded = sorted({int(i) for i in (exclude_ids or ()) if 0 <= int(i) < limit})
    available = limit - len(excluded)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= available:
        raise ValueError(
            f"top_k must be an integer in [1, {available}] (the {available} candidate tokens of a {rows}-row "
            f"vocabulary), got {top_k!r}."
        )
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(hidden, 1))
    with torch.no_grad(), _gathered(embeddings):
        device = _weight_of(embeddings).device
        query = prompt.detach().to(device=device, dtype=torch.float32)
        if metric == "cosine":
            query = F.normalize(query, dim=-1)
        excluded_t = torch.tensor(excluded, dtype=torch.long, device=device)
        best_keys = query.new_empty(query.shape[0], 0)
        best_ids = torch.empty(query.shape[0], 0, dtype=torch.long, device=device)
        for start in range(0, limit, chunk):
            ids = torch.arange(start, min(start + chunk, limit), device=device)
            table = _lookup(embeddings, ids)
            keys = query @ table.T  # [P, c]; larger is closer for every metric below
            if metric == "cosine":
                keys = keys / table.norm(dim=-1).clamp_min(1e-12)
            elif metric == "l2":  # ||q - e||^2 = ||q||^2 - (2 q.e - ||e||^2); ||q||^2 is constant per row
                keys = 2 * keys - (table * table).sum(-1)
            inside = excluded_t[(excluded_t >= ids[0]) & (excluded_t <= ids[-1])] - start
            if len(inside):
                keys[:, inside] = -math.inf
            keys = torch.cat([best_keys, keys], dim=1)
            cand = torch.cat([best_ids, ids.expand(query.shape[0], -1)], dim=1)
            best_keys, index = keys.topk(min(top_k, keys.shape[1]), dim=1)
            best_ids = cand.gather(1, index)
        if metric == "l2":  # exact distances for the winners (the expansion above cancels digits)
            scores = torch.stack(
                [(query - _lookup(embeddings, best_ids[:, j])).norm(dim=-1) for j in range(best_ids.shape[1])], 1
            )
        else:
            scores = best_keys
    return best_ids.cpu(), scores.float().cpu()


# --------------------------------------------------------------------------- decoding


def _token_strings(tokenizer: Any, ids: torch.Tensor) -> list[list[str]]:
    return [[tokenizer.decode([int(i)]) for i in row] for row in ids]


@dataclass
class DecodedPrompt:
    """A soft prompt read back as vocabulary tokens.

    `token_ids` / `scores` are [num_virtual_tokens, top_k], best candidate first. Scores are cosine similarity or
    dot product (higher is closer) or L2 distance (lower is closer). `text` is the top-1 tokens decoded as one
    string and `tokens` the decoded candidates (both None without a tokenizer).
    """

    token_ids: torch.Tensor
    scores: torch.Tensor
    metric: str
    tokens: list[list[str]] | None = None
    text: str | None = None
    adapter_name: str | None = None

    @property
    def top1_ids(self) -> list[int]:
        """The decoded hard prompt: the nearest token of each virtual token."""
        return self.token_ids[:, 0].tolist()

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "adapter_name": self.adapter_name,
            "text": self.text,
            "token_ids": self.token_ids.tolist(),
            "scores": self.scores.tolist(),
            "tokens": self.tokens,
        }

    def __str__(self) -> str:
        k = self.token_ids.shape[1]
        closer = "lower is closer" if self.metric == "l2" else "higher is closer"
        name = f" {self.adapter_name!r}" if self.adapter_name else ""
        lines = [f"Soft prompt{name}: {len(self)} virtual tokens, top {k} by {self.metric} ({closer})"]
        header = ["pos"] + [f"top-{j + 1}" for j in range(k)]
        table = [header]
        for p in range(len(self)):
            row = [str(p)]
            for j in range(k):
                label = repr(self.tokens[p][j]) if self.tokens is not None else f"#{int(self.token_ids[p, j])}"
                row.append(f"{label} {float(self.scores[p, j]):.3f}")
            table.append(row)
        widths = [max(len(row[j]) for row in table) for j in range(k + 1)]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
        if self.text is not None:
            lines.append(f"text: {self.text!r}")
        return "\n".join(lines)


def _check_tokenizer(tokenizer: Any, rows: int) -> int:
    """The number of ids to search: the tokenizer's, or the table's when every id beyond it is an added special
    token (slot placeholders, `slots.add_slot_tokens`, are never embedded); any other tokenizer larger than the
    table is not this model's."""
    size = len(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if size > rows and all(i in added and added[i].special for i in range(rows, size)):
        return rows
    if size > rows:
        raise ValueError(
            f"Vocabulary size mismatch: the tokenizer has {size} tokens but the model's input embedding table has "
            f"{rows} rows; the tokenizer does not belong to this model."
        )
    if size < rows:
        logger.info("Embedding table has %d rows, tokenizer %d tokens: searching the tokenizer's ids only.", rows, size)
    return size


def decode_prompt(
    prompt: torch.Tensor,
    embeddings: torch.Tensor | nn.Module,
    tokenizer: Any = None,
    metric: str = "cosine",
    top_k: int = 5,
    exclude_ids: Iterable[int] | None = None,
    skip_special_tokens: bool = True,
    chunk_size: int | None = None,
) -> DecodedPrompt:
    """Nearest vocabulary tokens of each row of a [P, d] `prompt` in an embedding matrix or module.

    With a tokenizer, its special and added tokens are skipped (`skip_special_tokens`), candidates stop at
    `len(tokenizer)` (rows past it are padding no text produces) and a tokenizer larger than the table is an error.
    `exclude_ids` removes further ids. See the module docstring for which metric recovers text exactly.
    """
    _check_metric(metric)
    rows, hidden = _table_shape(embeddings)
    _check_prompt(prompt, hidden)
    exclude = set(exclude_ids or ())
    limit = None
    if tokenizer is not None:
        limit = _check_tokenizer(tokenizer, rows)
        if skip_special_tokens:
            exclude |= special_token_ids(tokenizer)
    ids, scores = nearest_tokens(prompt, embeddings, metric, top_k, exclude, limit, chunk_size)
    tokens = text = None
    if tokenizer is not None:
        tokens = _token_strings(tokenizer, ids)
        text = tokenizer.decode(ids[:, 0].tolist())
    return DecodedPrompt(token_ids=ids, scores=scores, metric=metric, tokens=tokens, text=text)


def _input_embeddings(model: nn.Module) -> nn.Module:
    """The input embedding module of a SoftPromptModel (tied or untied output head alike)."""
    embeddings = getattr(model, "word_embeddings", None)
    return embeddings if embeddings is not None else model.get_input_embeddings()


def _adapter(model: nn.Module, adapter_name: str | None) -> str:
    name = adapter_name or model.active_adapter
    if name not in model.prompt_encoder:
        raise ValueError(f"No soft-prompt adapter {name!r}; this model has {sorted(model.prompt_encoder)}.")
    return name


def _config_tokenizer(model: nn.Module, name: str) -> Any:
    """The tokenizer the adapter's config names, when it can be had without surprises (else None)."""
    config = model.peft_config[name]
    tokenizer = getattr(config, "tokenizer", None)
    path = getattr(config, "tokenizer_name_or_path", None)
    if tokenizer is None and path:
        try:
            tokenizer = load_tokenizer(path, getattr(config, "tokenizer_kwargs", None))
        except (OSError, ValueError) as err:
            logger.warning(
                "Could not load tokenizer %r named by the adapter config (%s); decoding ids only.", path, err
            )
    return tokenizer


def _excluded_ids(model: nn.Module, tokenizer: Any, skip_special_tokens: bool) -> set[int]:
    if not skip_special_tokens:
        return set()
    return special_token_ids(tokenizer, getattr(model.base_model, "config", None))


def decode_model_prompt(
    model: nn.Module,
    tokenizer: Any = None,
    adapter_name: str | None = None,
    metric: str = "cosine",
    top_k: int = 5,
    skip_special_tokens: bool = True,
) -> DecodedPrompt:
    """`SoftPromptModel.decode_prompt`: decode an adapter's effective prompt against the model's input embeddings.

    Without `tokenizer` the adapter config's tokenizer is used when it has one (else ids only). Special ids of the
    tokenizer and of the model config are skipped unless `skip_special_tokens=False`.
    """
    _check_metric(metric)
    name = _adapter(model, adapter_name)
    if tokenizer is None:
        tokenizer = _config_tokenizer(model, name)
    with torch.no_grad():
        prompt = model.prompt_encoder[name]()
    embeddings = _input_embeddings(model)
    exclude = _excluded_ids(model, tokenizer, skip_special_tokens)
    result = decode_prompt(prompt, embeddings, tokenizer, metric, top_k, exclude, skip_special_tokens)
    result.adapter_name = name
    return result


# --------------------------------------------------------------------------- prompt overrides


class _StraightThrough(torch.autograd.Function):
    """Forward returns the hard prompt bit for bit; backward hands its gradient to the soft prompt."""

    @staticmethod
    def forward(ctx: Any, soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@contextlib.contextmanager
def _override_prompt(model: nn.Module, name: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Every prompt the adapter's encoder produces inside this block goes through `transform` (forward hook: the
    model's own forward, generate and prefix-KV paths all read the prompt through the encoder)."""
    handle = model.prompt_encoder[name].register_forward_hook(lambda module, args, output: transform(output))
    _forget_compiled_prompt(model, name)
    try:
        yield
    finally:
        handle.remove()
        _forget_compiled_prompt(model, name)


def _forget_compiled_prompt(model: nn.Module, name: str) -> None:
    """Drop the model's compiled inference cache of this prompt: it is keyed on the encoder's parameters, which an
    override leaves untouched, so a cache built on one side of the override would be reused on the other."""
    compiled = getattr(model, "compiled_prompts", None)
    if compiled is not None:
        compiled.discard(name)


@dataclass
class ProjectionState:
    """What the projection saw last: the token ids the forward actually used."""

    metric: str
    adapter_name: str
    token_ids: list[int] = field(default_factory=list)


@contextlib.contextmanager
def projected_prompt(
    model: nn.Module,
    metric: str = "cosine",
    adapter_name: str | None = None,
    tokenizer: Any = None,
    skip_special_tokens: bool = True,
) -> Iterator[ProjectionState]:
    """PEZ-style projection-aware training: inside this block the forward (training, eval and generate) uses the
    nearest-token projection of the prompt, while gradients update the continuous prompt (straight-through).

    Wrap a training loop or ``trainer.train()``. The projected tokens are in the yielded state's `token_ids`
    after each forward, and equal ``model.decode_prompt(metric=metric, top_k=1).top1_ids`` on the same prompt.
    Each forward runs one nearest-token search over the vocabulary (chunked; a gather under ZeRO-3).
    """
    _check_metric(metric)
    name = _adapter(model, adapter_name)
    embeddings = _input_embeddings(model)
    rows, _ = _table_shape(embeddings)
    limit = _check_tokenizer(tokenizer, rows) if tokenizer is not None else None
    exclude = _excluded_ids(model, tokenizer, skip_special_tokens)
    state = ProjectionState(metric=metric, adapter_name=name)

    def project(soft: torch.Tensor) -> torch.Tensor:
        ids, _ = nearest_tokens(soft, embeddings, metric, 1, exclude, limit)
        state.token_ids = ids[:, 0].tolist()
        with torch.no_grad(), _gathered(embeddings):
            hard = _lookup(embeddings, ids[:, 0]).to(device=soft.device, dtype=soft.dtype)
        return _StraightThrough.apply(soft, hard)

    with _override_prompt(model, name, project):
        yield state


@contextlib.contextmanager
def hard_prompt(model: nn.Module, token_ids: Sequence[int], adapter_name: str | None = None) -> Iterator[None]:
    """Inside this block the adapter's prompt is the embeddings of `token_ids` (a hard prompt re-embedded through
    the model's own input embeddings); the number of ids must equal num_virtual_tokens."""
    name = _adapter(model, adapter_name)
    embeddings = _input_embeddings(model)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    expected = model.prompt_encoder[name].num_virtual_tokens
    if ids.dim() != 1 or len(ids) != expected:
        raise ValueError(f"A hard prompt for adapter {name!r} needs {expected} token ids, got {len(ids)}.")
    with torch.no_grad(), _gathered(embeddings):
        rows = _lookup(embeddings, ids)
    with _override_prompt(model, name, lambda soft: rows.to(device=soft.device, dtype=soft.dtype)):
        yield


# --------------------------------------------------------------------------- fidelity


@dataclass
class FidelityResult:
    """One prompt's row in a fidelity report. `kl` is the mean KL(soft || this prompt) of next-token distributions
    (0 for the soft prompt itself); None where the eval gave no inputs to compare on."""

    prompt: str
    score: float | None
    kl: float | None
    token_ids: list[int] | None = None
    text: str | None = None


@dataclass
class FidelityReport:
    """Soft prompt first, then one row per decoding metric."""

    results: list[FidelityResult]
    num_examples: int | None = None
    adapter_name: str | None = None

    def __getitem__(self, prompt: str) -> FidelityResult:
        for result in self.results:
            if result.prompt == prompt:
                return result
        raise KeyError(f"No result for {prompt!r}; have {[r.prompt for r in self.results]}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_name": self.adapter_name,
            "num_examples": self.num_examples,
            "results": [vars(r).copy() for r in self.results],
        }

    def __str__(self) -> str:
        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        lines = [f"{'prompt':<8}  {'score':>8}  {'KL(soft||p)':>11}  text"]
        for r in self.results:
            text = "(soft)" if r.prompt == "soft" else repr(r.text) if r.text is not None else str(r.token_ids)
            lines.append(f"{r.prompt:<8}  {fmt(r.score):>8}  {fmt(r.kl):>11}  {text}")
        return "\n".join(lines)


def _as_example(item: Any, tokenizer: Any) -> tuple[list[int], int | None]:
    """(input_ids, target_id) from a tuple/list pair or a dict with input_ids and target_id / label / labels."""
    if isinstance(item, dict):
        inputs = item.get("input_ids", item.get("input"))
        target = next((item[k] for k in ("target_id", "label", "labels") if k in item), None)
    elif isinstance(item, (tuple, list)) and len(item) == 2 and not isinstance(item[0], int):
        inputs, target = item  # (input_ids, target_id); a bare list of two ids is an input without a target
    else:
        inputs, target = item, None
    if isinstance(inputs, str):
        if tokenizer is None:
            raise ValueError("Text examples need `tokenizer=`; or pass token ids.")
        inputs = tokenizer(inputs)["input_ids"]
    ids = torch.as_tensor(inputs, dtype=torch.long).reshape(-1).tolist()
    if not ids:
        raise ValueError("An evaluation example has no input tokens.")
    if isinstance(target, torch.Tensor):
        target = target.reshape(-1)
        if target.numel() != 1:
            raise ValueError(f"Each example's target must be one id, got {target.numel()}.")
        target = target.item()
    return ids, None if target is None else int(target)


def _final_logits(model: nn.Module, batch: list[list[int]], pad_id: int) -> torch.Tensor:
    """Log-probabilities at the last real position of each (right-padded) row, float32 [B, V] (or [B, C])."""
    device = _weight_of(_input_embeddings(model)).device
    length = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    if logits.dim() == 3:
        last = (mask.sum(1) - 1).to(logits.device)
        logits = logits[torch.arange(len(batch), device=logits.device), last]
    return logits.float().log_softmax(-1).cpu()


def _next_token_logprobs(model: nn.Module, inputs: list[list[int]], batch_size: int) -> torch.Tensor:
    pad_id = next(
        (
            v
            for v in (getattr(model.base_model.config, n, None) for n in ("pad_token_id", "eos_token_id"))
            if isinstance(v, int)
        ),
        0,
    )
    parts = [_final_logits(model, inputs[i : i + batch_size], pad_id) for i in range(0, len(inputs), batch_size)]
    return torch.cat(parts)


@contextlib.contextmanager
def _evaluating(model: nn.Module, name: str) -> Iterator[None]:
    """Adapter `name` active and the model evaluating for the block; both restored afterwards."""
    previous_adapter = model.active_adapter
    if name != previous_adapter:
        model.set_adapter(name)
    try:
        with evaluating(model):
            yield
    finally:
        if name != previous_adapter:
            model.set_adapter(previous_adapter)


def evaluate_decoding(
    model: nn.Module,
    data: Callable[[nn.Module], float] | Iterable[Any],
    metrics: Sequence[str] = METRICS,
    *,
    adapter_name: str | None = None,
    tokenizer: Any = None,
    kl_inputs: Iterable[Any] | None = None,
    batch_size: int = 16,
) -> FidelityReport:
    """How much of the task survives decoding: the soft prompt next to each metric's top-1 hard prompt.

    The hard prompt of a metric is its top-1 decoded tokens, re-embedded through this model's input embeddings
    and put where the soft prompt goes (the same as prepending those token ids to every input). Two ways to give
    the task, both used by the quality benchmark:

    - ``data`` is a dataset: an iterable of ``(input_ids, target_id)`` pairs or dicts with ``input_ids`` and
      ``target_id`` (or ``label``); input_ids may be a list, a 1-D tensor, or text when `tokenizer` is given.
      Score = accuracy of the argmax next token at the last input position (for a classification head: of the
      argmax class). Examples without a target only feed the KL.
    - ``data`` is ``eval_fn(model) -> float``: called once per prompt with the prompt swapped in (evaluate `model`
      as usual; higher is better). The KL is then measured on `kl_inputs` (same forms as above) when given.

    KL is the mean over inputs of KL(p_soft || p_hard) between next-token distributions at the last position.
    Runs in eval mode without gradients; the model's mode and active adapter are restored afterwards.
    """
    for metric in metrics:
        _check_metric(metric)
    name = _adapter(model, adapter_name)
    eval_fn = data if callable(data) else None
    examples = [_as_example(x, tokenizer) for x in (kl_inputs if eval_fn is not None else data) or ()]
    if eval_fn is None and not examples:
        raise ValueError("evaluate_decoding got an empty dataset.")
    inputs = [ids for ids, _ in examples]
    labelled = [(i, t) for i, (_, t) in enumerate(examples) if t is not None]

    decoded = {m: decode_model_prompt(model, tokenizer, name, m, top_k=1) for m in metrics}

    def run(label: str, ids: list[int] | None, text: str | None, soft_lp: torch.Tensor | None) -> tuple:
        override = hard_prompt(model, ids, name) if ids is not None else contextlib.nullcontext()
        with override:
            score = float(eval_fn(model)) if eval_fn is not None else None
            logprobs = _next_token_logprobs(model, inputs, batch_size) if inputs else None
        kl = None
        if logprobs is not None:
            if eval_fn is None and labelled:
                rows = torch.tensor([i for i, _ in labelled])
                targets = torch.tensor([t for _, t in labelled])
                score = float((logprobs[rows].argmax(-1) == targets).float().mean())
            reference = logprobs if soft_lp is None else soft_lp
            kl = float(F.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1).mean())
        return FidelityResult(label, score, kl, ids, text), logprobs

    with _evaluating(model, name):
        soft, soft_lp = run("soft", None, None, None)
        results = [soft] + [run(m, dec.top1_ids, dec.text, soft_lp)[0] for m, dec in decoded.items()]
    report = FidelityReport(results, num_examples=len(inputs) if inputs else None, adapter_name=name)
    logger.info("Decoding fidelity:\n%s", report)
    return report
