"""Architecture conformance sweep: every model type of transformers' auto mappings, as a tiny random model
(tests/arch_zoo.py), wrapped with a soft prompt on both paths (shared_prompt_kv=True: prefix KV, False: concat).

One test per (task, architecture) builds the base once, wraps copies of it once per config and checks every
property that applies, then fails listing the properties that did not hold (with the exception or max |diff|):

  aligned      outputs have the input's length (logits [B, L, V], hidden states [B, L, d])
  reference    outputs equal a hand-made reference: prompt embeddings concatenated in front of the input
               embeddings, positions 0..P+L-1, prompt positions cut off
  pad_left     a short row left-padded next to a longer one gives the row's outputs alone
  pad_right    the same, right-padded (prompt + input is longer than the sliding window / attention chunk)
  generate     greedy generate() equals a greedy loop over our own forward (causal LM and seq2seq)
  gen_batch    the same on a padded batch of two rows (left-padded for decoders, right-padded for seq2seq)
  grad         the prompt's (and head's) gradient with shared_prompt_kv=True equals the one with False
  reload       save_pretrained -> PeftModel.from_pretrained gives identical outputs
  slots        (causal LM) the prompt split over two placeholder slots inside a left-padded batch: logits equal a
               hand-made splice of the prompt into the input embeddings, and greedy generate equals the greedy loop

Unbuildable architectures are pytest skips carrying arch_zoo's reason. A summary table goes to
/tmp/arch/table.md (and to $ARCH_TABLE when set), per-case details to /tmp/arch/results.json.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path

import arch_zoo
import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from peft_softprompt_ext import SoftPromptConfig, UnsupportedModelError

P = 4
NEW = 4
CONFIGS = {"kv": True, "cat": False}  # shared_prompt_kv
PROPERTIES = (
    "aligned",
    "reference",
    "pad_left",
    "pad_right",
    "generate",
    "gen_batch",
    "grad",
    "grad_ckpt",
    "reload",
    "slots",
)
APPLIES = {
    "CAUSAL_LM": PROPERTIES,
    "SEQ_2_SEQ_LM": tuple(p for p in PROPERTIES if p not in ("grad_ckpt", "slots")),
    "SEQ_CLS": ("aligned", "reference", "pad_left", "pad_right", "grad", "reload"),
    "TOKEN_CLS": ("aligned", "reference", "pad_left", "pad_right", "grad", "reload"),
    "FEATURE_EXTRACTION": ("aligned", "reference", "pad_left", "pad_right", "grad", "reload"),
}
NA_BASE = "n/a: the base alone isn't invariant either"
ATOL, RTOL = 1e-4, 1e-4  # fp32 tiny models; the reference takes other kernels (another sequence length)
TABLE_PATHS = [Path("/tmp/arch/table.md")] + ([Path(os.environ["ARCH_TABLE"])] if os.environ.get("ARCH_TABLE") else [])
RESULTS: list[dict] = []
_CLOCK = {"start": time.perf_counter()}


# --------------------------------------------------------------------------------------------------- helpers


class PropertyFailed(AssertionError):
    pass


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL, what: str = "") -> None:
    if actual.shape != expected.shape:
        raise PropertyFailed(f"{what}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all() or not torch.isfinite(expected).all():
        raise PropertyFailed(f"{what}non-finite values")
    bad = (actual - expected).abs() > atol + rtol * expected.abs()
    if bad.any():
        raise PropertyFailed(f"{what}max|diff|={_max_diff(actual, expected):.3g} ({int(bad.sum())}/{bad.numel()} off)")


def _where(exc: BaseException) -> str:
    """file:line of the deepest frame in our package, else in transformers, else the last one."""
    frames = traceback.extract_tb(exc.__traceback__)
    for marker in ("peft_softprompt_ext/", "transformers/", ""):
        hits = [f for f in frames if marker in f.filename]
        if hits:
            f = hits[-1]
            name = f.filename.split("site-packages/")[-1].split("/work/main/")[-1]
            return f"{name}:{f.lineno}"
    return "?"


def _describe(exc: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())[:300]
    if isinstance(exc, PropertyFailed):
        return text
    return f"{type(exc).__name__}: {text} @ {_where(exc)}"


class Record:
    """Outcome of each property on each config: 'ok', or the failure text."""

    def __init__(self, case: arch_zoo.Case) -> None:
        self.case = case
        self.outcomes: dict[str, dict[str, str]] = {}
        self.paths: dict[str, str] = {}
        self.unsupported: str | None = None

    def check(self, prop: str, cfg: str, fn, *args) -> object:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = fn(*args)
            self.outcomes.setdefault(prop, {})[cfg] = "ok"
            return value
        except UnsupportedModelError as exc:  # refused up front with a clear reason: not a failure, a finding
            if prop in ("wrap", "path", "aligned"):
                self.unsupported = str(exc)
            self.outcomes.setdefault(prop, {})[cfg] = f"n/a: unsupported ({exc})"
            return None
        except Exception as exc:  # noqa: BLE001  (every failure is a finding of the sweep)
            self.outcomes.setdefault(prop, {})[cfg] = _describe(exc)
            return None

    def failures(self) -> list[str]:
        return [
            f"{prop}[{cfg}]: {text}"
            for prop, by_cfg in self.outcomes.items()
            for cfg, text in by_cfg.items()
            if text != "ok" and not text.startswith("n/a")
        ]


def text_vocab(base) -> int:
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return min(arch_zoo.VOCAB, getattr(config, "vocab_size", None) or arch_zoo.VOCAB)


def make_ids(base, lengths: list[int], seed: int, eos_terminated: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, text_vocab(base), (n,), generator=generator) for n in lengths]
    if eos_terminated:  # encoder-decoder sequence classifiers pool the last <eos>
        for row in rows:
            row[-1] = arch_zoo.EOS
    return rows


def pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), arch_zoo.PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def real_span(mask_row: torch.Tensor) -> torch.Tensor:
    return mask_row.bool()


def wrap(base, task: str, shared: bool):
    config = SoftPromptConfig(task_type=task, num_virtual_tokens=P, shared_prompt_kv=shared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(arch_zoo.clone(base), config).eval()


def _accepts(module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def main_output(task: str, out) -> torch.Tensor:
    """The output that must be aligned with (or, SEQ_CLS: independent of) the input tokens."""
    if task == "FEATURE_EXTRACTION":
        return out.last_hidden_state
    return out.logits


def token_level(task: str) -> bool:
    return task in ("CAUSAL_LM", "TOKEN_CLS", "FEATURE_EXTRACTION")


# --------------------------------------------------------------------------------------------------- references


@torch.no_grad()
def reference(model, task: str, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The base model on [prompt ; input] embeddings, positions 0..P+L-1, prompt positions cut from the output."""
    base = model.get_base_model()
    prompt = model.prompt_embeddings().detach()
    embeds = base.get_input_embeddings()(ids)
    embeds = embeds[0] if isinstance(embeds, tuple) else embeds  # I-BERT's embedding also returns a scale
    embeds = torch.cat([prompt.to(embeds.dtype).expand(ids.shape[0], -1, -1), embeds], dim=1)
    extra = dict(kwargs)
    if not base.config.is_encoder_decoder:
        if _accepts(base, "position_ids"):
            extra["position_ids"] = torch.arange(embeds.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        if _accepts(base, "use_cache"):
            extra["use_cache"] = False
    out = base(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **extra)
    value = main_output(task, out)
    return value[:, P:] if token_level(task) else value


@torch.no_grad()
def base_hidden_lengths(base, task: str, ids: torch.Tensor, extra: dict) -> list[torch.Tensor]:
    """The base's own hidden states on an input P tokens longer (which of them keep the sequence length)."""
    longer = torch.cat([ids[:, :P], ids], dim=1)
    out = base(input_ids=longer, output_hidden_states=True, **extra)
    hidden = out.get("hidden_states") if task != "SEQ_2_SEQ_LM" else out.get("encoder_hidden_states")
    return [h for h in (hidden or ()) if isinstance(h, torch.Tensor) and h.dim() == 3]


@torch.no_grad()
def base_padding_broken(base, task: str, short, long, side: str, extra: dict, batch_extra: dict) -> str | None:
    """Why the base model alone (no prompt) is not padding invariant even with position ids that skip pads, or None.
    A prompted model can't be expected to be invariant where its base isn't."""
    try:
        alone = main_output(task, base(input_ids=short[None], **extra))[0]
        ids, mask = pad([short, long], side)
        kwargs = dict(batch_extra)
        if not base.config.is_encoder_decoder and _accepts(base, "position_ids"):
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        row = main_output(task, base(input_ids=ids, attention_mask=mask, **kwargs))[0]
        if token_level(task):
            row = row[real_span(mask[0])]
        close(row, alone, what="")
    except Exception as exc:  # noqa: BLE001
        return _describe(exc)
    return None


@torch.no_grad()
def greedy_loop_decoder(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by repeated full forwards of our model (no cache)."""
    for _ in range(steps):
        step = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, step], 1), torch.cat([mask, torch.ones_like(step)], 1)
    return ids


@torch.no_grad()
def greedy_loop_seq2seq(model, ids: torch.Tensor, mask: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    decoder = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return decoder


def same_greedy(generated: torch.Tensor, expected: torch.Tensor, offset: int) -> None:
    """Rows equal token by token up to (and including) the loop's first <eos>: generate stops or pads after it."""
    for row in range(expected.shape[0]):
        want = expected[row, offset:]
        eos = (want == arch_zoo.EOS).nonzero()
        if len(eos):
            want = want[: int(eos[0]) + 1]
        got = generated[row, offset : offset + len(want)]
        if not torch.equal(got, want):
            raise PropertyFailed(f"row {row}: generate {got.tolist()} != greedy loop {want.tolist()}")
    if not torch.equal(generated[:, :offset], expected[:, :offset]):
        raise PropertyFailed("generate changed the input ids")


# --------------------------------------------------------------------------------------------------- the checks


def forward_kwargs(task: str, base, batch: int, seed: int = 7) -> dict:
    if task == "SEQ_2_SEQ_LM":
        generator = torch.Generator().manual_seed(seed)
        return {"decoder_input_ids": torch.randint(3, text_vocab(base), (batch, 3), generator=generator)}
    return {}


def check_config(rec: Record, base, task: str, cfg: str, tmp_path: Path, eos_terminated: bool) -> dict:
    """All per-config properties; returns the gradients (name -> tensor) for the cross-config comparison."""
    applies = APPLIES[task]
    model = rec.check("wrap", cfg, wrap, base, task, CONFIGS[cfg])
    if model is None:
        return {}
    path = rec.check("path", cfg, lambda: model.execution_path)  # "prefix_kv" / "concat"
    if rec.unsupported:
        return {}
    rec.paths[cfg] = str(getattr(path, "value", path))
    if rec.paths[cfg] == "prefix_kv" and model.capabilities.prefix_attention:
        rec.paths[cfg] += ", softprompt_sdpa"  # the prefix-aware attention (attention.py) runs its shared calls
    rows = make_ids(base, [7, 7], seed=1, eos_terminated=eos_terminated)
    ids = torch.stack(rows)
    extra = forward_kwargs(task, base, 2)

    def aligned():
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, **extra)
        value = main_output(task, out)
        if token_level(task) and value.shape[:2] != ids.shape:
            raise PropertyFailed(f"output {tuple(value.shape)} not aligned with input {tuple(ids.shape)}")
        if task == "SEQ_CLS" and value.shape != (2, arch_zoo.NUM_LABELS):
            raise PropertyFailed(f"logits {tuple(value.shape)} != (2, {arch_zoo.NUM_LABELS})")
        if task == "SEQ_2_SEQ_LM":
            if value.shape[:2] != extra["decoder_input_ids"].shape:
                raise PropertyFailed(f"logits {tuple(value.shape)} not aligned with the decoder input")
            enc = out.encoder_last_hidden_state
            if enc is not None and enc.shape[:2] != ids.shape:
                raise PropertyFailed(f"encoder output {tuple(enc.shape)} not aligned with input {tuple(ids.shape)}")
        hidden = out.get("hidden_states") if task != "SEQ_2_SEQ_LM" else out.get("encoder_hidden_states")
        if hidden is not None:  # only the layers that keep the sequence length (Funnel pools the others)
            full = [h.shape[1] == ids.shape[1] + P for h in base_hidden_lengths(base, task, ids, extra)]
            lengths = [h.shape[1] for h in hidden if isinstance(h, torch.Tensor) and h.dim() == 3]
            if len(full) == len(lengths) and any(f and n != ids.shape[1] for f, n in zip(full, lengths, strict=True)):
                raise PropertyFailed(f"hidden states of lengths {sorted(set(lengths))} != {ids.shape[1]}")
        return value

    value = rec.check("aligned", cfg, aligned)

    def equal_to_reference():
        try:
            expected = reference(model, task, ids, **extra)
        except Exception as exc:  # noqa: BLE001
            raise PropertyFailed(f"reference itself fails (base on inputs_embeds): {_describe(exc)}") from exc
        if value is None:
            raise PropertyFailed("not compared: our forward failed (see aligned)")
        close(value, expected)

    rec.check("reference", cfg, equal_to_reference)

    short, long = make_ids(base, [5, 9], seed=2, eos_terminated=eos_terminated)
    alone_extra = forward_kwargs(task, base, 1)
    batch_extra = {k: torch.cat([v, v]) for k, v in alone_extra.items()}

    def padding(side: str):
        with torch.no_grad():
            alone = main_output(task, model(input_ids=short[None], **alone_extra))[0]
            padded_ids, mask = pad([short, long], side)
            row = main_output(task, model(input_ids=padded_ids, attention_mask=mask, **batch_extra))[0]
        if token_level(task):
            row = row[real_span(mask[0])]
        close(row, alone, what=f"{side}-padded row vs alone: ")

    for side in ("left", "right"):
        rec.check(f"pad_{side}", cfg, padding, side)
        if rec.outcomes[f"pad_{side}"][cfg] != "ok":
            broken = base_padding_broken(base, task, short, long, side, alone_extra, batch_extra)
            if broken is not None:
                rec.outcomes[f"pad_{side}"][cfg] = f"{NA_BASE} ({broken}); prompted: {rec.outcomes[f'pad_{side}'][cfg]}"

    if "generate" in applies:
        generate_checks(rec, model, base, task, cfg)
    if "slots" in applies:  # what the base itself can't do (n/a above) is not asked of slots either
        padded_ok = not rec.outcomes.get("pad_left", {}).get(cfg, "").startswith("n/a")
        generate_ok = not rec.outcomes.get("generate", {}).get(cfg, "").startswith("n/a")
        rec.check("slots", cfg, slot_checks, base, CONFIGS[cfg], padded_ok, generate_ok)

    grads = None
    if "grad" in applies:
        grads = rec.check("grad", cfg, gradients, model, task, base)
        if rec.outcomes["grad"][cfg] != "ok":
            mark_inherited(
                rec, "grad", cfg, lambda m: base_loss(task, m), base, "the base alone can't compute the loss"
            )

    def reload():
        directory = tmp_path / cfg
        with torch.no_grad():
            before = main_output(task, model(input_ids=ids, **extra))
        model.save_pretrained(str(directory))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = PeftModel.from_pretrained(arch_zoo.clone(base), str(directory)).eval()
        if not torch.equal(again.prompt_embeddings().detach(), model.prompt_embeddings().detach()):
            raise PropertyFailed("reloaded prompt differs")
        with torch.no_grad():
            after = main_output(task, again(input_ids=ids, **extra))
        close(after, before, atol=1e-6, rtol=0, what="reloaded: ")

    rec.check("reload", cfg, reload)
    return grads or {}


def slot_checks(base, shared: bool, padded_ok: bool, generate_ok: bool) -> None:
    """Two slots (2 + 2 virtual tokens) after a fixed head of hard tokens, in a left-padded batch of two rows."""
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, slots=[2, 2], shared_prompt_kv=shared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(arch_zoo.clone(base), config).eval()
    placeholders = [arch_zoo.VOCAB + 7, arch_zoo.VOCAB + 8]  # never embedded: beyond the table on purpose
    config.slot_token_ids = placeholders
    head = [5, 6, placeholders[0], placeholders[0], 7, placeholders[1], placeholders[1]]
    rows = [torch.tensor(head + tail) for tail in ([9, 10, 11], [12])]
    ids, mask = pad(rows, "left")
    prompt = model.prompt_embeddings().detach()
    clean = ids.masked_fill(ids >= arch_zoo.VOCAB, 0)
    embeds = base.get_input_embeddings()(clean).clone()
    for b in range(2):
        cols = [(ids[b] == p).nonzero()[:, 0] for p in placeholders]
        embeds[b, cols[0]], embeds[b, cols[1]] = prompt[:2], prompt[2:]
    extra = {"position_ids": (mask.cumsum(-1) - 1).clamp_min(0)} if _accepts(base, "position_ids") else {}
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **extra).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        for b in range(2 if padded_ok else 0):
            alone = model(input_ids=rows[b][None]).logits[0]
            close(got[b][mask[b].bool()], alone, what=f"row {b} in the batch vs alone: ")
        close(got[0][mask[0].bool()], expected[0][mask[0].bool()], what="spliced reference: ")
    if generate_ok:
        with torch.no_grad():
            out = model.generate(input_ids=rows[0][None], max_new_tokens=NEW, do_sample=False)
        same_greedy(
            out,
            greedy_loop_decoder(model, rows[0][None], torch.ones(1, len(rows[0]), dtype=torch.long), NEW),
            len(rows[0]),
        )


def generate_checks(rec: Record, model, base, task: str, cfg: str) -> None:
    """generate() vs a greedy loop over the same model's forward, on one row and on a padded batch; where that fails,
    the same check on the base alone (no prompt) tells whether the architecture's own generate() already differs."""
    if task == "CAUSAL_LM":
        (row,) = make_ids(base, [6], seed=3, eos_terminated=False)

        def single(m):
            with torch.no_grad():
                out = m.generate(input_ids=row[None], max_new_tokens=NEW, do_sample=False)
            same_greedy(out, greedy_loop_decoder(m, row[None], torch.ones(1, 6, dtype=torch.long), NEW), 6)

        def batch(m):
            ids, mask = pad(make_ids(base, [4, 7], seed=4, eos_terminated=False), "left")
            with torch.no_grad():
                out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
            same_greedy(out, greedy_loop_decoder(m, ids, mask, NEW), ids.shape[1])

    else:
        start = base.generation_config.decoder_start_token_id
        start = arch_zoo.PAD if start is None else start

        def single(m):
            ids = torch.stack(make_ids(base, [6], seed=3, eos_terminated=False))
            mask = torch.ones_like(ids)
            with torch.no_grad():
                out = m.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False)
            same_greedy(out, greedy_loop_seq2seq(m, ids, mask, start, NEW), 1)

        def batch(m):
            ids, mask = pad(make_ids(base, [4, 7], seed=4, eos_terminated=False), "right")
            with torch.no_grad():
                out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
            same_greedy(out, greedy_loop_seq2seq(m, ids, mask, start, NEW), 1)

    for prop, check in (("generate", single), ("gen_batch", batch)):
        rec.check(prop, cfg, check, model)
        if rec.outcomes[prop][cfg] != "ok":
            mark_inherited(rec, prop, cfg, check, base, "the base's own generate() differs from its greedy loop too")
    if (
        task == "CAUSAL_LM"
        and rec.outcomes["gen_batch"][cfg] not in ("ok",)
        and not rec.outcomes["gen_batch"][cfg].startswith("n/a")
    ):
        mark_inherited(
            rec,
            "gen_batch",
            cfg,
            lambda m: batched_generation_invariant(m, base),
            base,
            "the base's own left-padded generate() differs from each row alone",
        )


def batched_generation_invariant(m, base) -> None:
    """The base's left-padded batch generates what each of its rows generates alone (raises where it doesn't:
    positions taken from the length, no attention mask...)."""
    rows = make_ids(base, [4, 7], seed=4, eos_terminated=False)
    ids, mask = pad(rows, "left")
    with torch.no_grad():
        batched = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        for b, row in enumerate(rows):
            alone = m.generate(input_ids=row[None], max_new_tokens=NEW, do_sample=False)
            same_greedy(batched[b : b + 1, ids.shape[1] - len(row) :], alone, len(row))


def mark_inherited(rec: Record, prop: str, cfg: str, check, base, why: str) -> None:
    """Turn a failure into n/a when the same check fails on the base model alone (no prompt)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(base)
    except Exception as exc:  # noqa: BLE001
        rec.outcomes[prop][cfg] = f"n/a: {why} ({_describe(exc)}); prompted: {rec.outcomes[prop][cfg]}"


def base_loss(task: str, base) -> None:
    """The base alone computes the loss gradients() asks for (raises where the architecture itself can't)."""
    ids = torch.stack(
        make_ids(base, [6, 6, 6], seed=5, eos_terminated=task == "SEQ_CLS" and base.config.is_encoder_decoder)
    )
    base.train()
    try:
        if task == "CAUSAL_LM":
            base(input_ids=ids, labels=ids)
        elif task == "SEQ_2_SEQ_LM":
            base(input_ids=ids, decoder_input_ids=ids[:, :3].clone(), labels=ids[:, :3].clone())
        elif task == "SEQ_CLS":
            base(input_ids=ids, labels=torch.tensor([0, 2, 1]))
        elif task == "TOKEN_CLS":
            base(input_ids=ids, labels=ids % arch_zoo.NUM_LABELS)
    finally:
        base.eval()


def gradients(model, task: str, base) -> dict:
    rows = make_ids(base, [6, 6, 6], seed=5, eos_terminated=task == "SEQ_CLS" and base.config.is_encoder_decoder)
    ids = torch.stack(rows)
    model.train()
    try:
        if task == "CAUSAL_LM":
            loss = model(input_ids=ids, labels=ids).loss
        elif task == "SEQ_2_SEQ_LM":
            target = ids[:, :3].clone()  # decoder ids given too: FSMT doesn't derive them from labels
            loss = model(input_ids=ids, decoder_input_ids=target, labels=target).loss
        elif task == "SEQ_CLS":
            loss = model(input_ids=ids, labels=torch.tensor([0, 2, 1])).loss
        elif task == "TOKEN_CLS":
            loss = model(input_ids=ids, labels=ids % arch_zoo.NUM_LABELS).loss
        else:
            loss = model(input_ids=ids).last_hidden_state.square().mean()
        if loss is None:
            raise PropertyFailed("no loss returned")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        model.eval()
    out = {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}
    if not any("prompt_encoder" in n for n in out):
        raise PropertyFailed("the prompt got no gradient")
    return out


def compare_gradients(rec: Record, grads: dict[str, dict]) -> None:
    kv, cat = grads.get("kv"), grads.get("cat")
    if not kv or not cat:
        failed = {c: v for c, v in rec.outcomes.get("grad", {}).items() if v != "ok"}
        rec.outcomes["grad"] = failed or {"kv=cat": "not compared: a config failed earlier (see wrap)"}
        return

    def same():
        if kv.keys() != cat.keys():
            raise PropertyFailed(f"different trainable parameters: {sorted(kv.keys() ^ cat.keys())[:3]}")
        worst = max(kv, key=lambda n: _max_diff(kv[n], cat[n]))
        close(kv[worst], cat[worst], atol=1e-6, rtol=1e-4, what=f"{worst.split('.')[-2]}: prefix KV vs concat ")

    rec.outcomes["grad"] = {}
    rec.check("grad", "kv=cat", same)


def checkpointed_gradients(rec: Record, base, task: str, reference: dict) -> None:
    """Under transformers' default gradient checkpointing (non-reentrant), the shared-KV config's gradients equal
    concatenation's without checkpointing (`reference`): the shared prompt KV must survive the checkpointed layers."""
    if not reference:
        rec.outcomes["grad_ckpt"] = {"kv": "n/a: no concatenation gradients to compare with (see grad)"}
        return
    if not base.supports_gradient_checkpointing:
        rec.outcomes["grad_ckpt"] = {"kv": "n/a: the architecture doesn't support gradient checkpointing"}
        return

    def same():
        model = wrap(base, task, True)
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        grads = gradients(model, task, base)
        if grads.keys() != reference.keys():
            raise PropertyFailed(f"different trainable parameters: {sorted(grads.keys() ^ reference.keys())[:3]}")
        worst = max(grads, key=lambda n: _max_diff(grads[n], reference[n]))
        close(grads[worst], reference[worst], atol=1e-6, rtol=1e-4, what="checkpointed prefix KV vs concat ")

    rec.check("grad_ckpt", "kv", same)


# --------------------------------------------------------------------------------------------------- the sweep


def run_case(case: arch_zoo.Case, tmp_path: Path) -> None:
    started = time.perf_counter()
    row = {"task": case.task, "model_type": case.model_type, "skip": case.skip_reason}
    RESULTS.append(row)
    if case.skip_reason:
        pytest.skip(f"unbuildable: {case.skip_reason}")
    rec = Record(case)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = case.build()
    except Exception as exc:  # noqa: BLE001
        row["build_error"] = _describe(exc)
        raise AssertionError(
            f"{case.id} is not in arch_zoo.UNBUILDABLE but failed to build: {row['build_error']}"
        ) from exc
    row["build_s"] = round(case.build_seconds, 3)
    eos_terminated = case.task == "SEQ_CLS" and bool(base.config.is_encoder_decoder)
    grads = {}
    for cfg in CONFIGS:
        torch.manual_seed(0)
        grads[cfg] = check_config(rec, base, case.task, cfg, tmp_path, eos_terminated)
    if "grad" in APPLIES[case.task]:
        compare_gradients(rec, grads)
    if "grad_ckpt" in APPLIES[case.task] and not rec.unsupported:
        torch.manual_seed(0)
        checkpointed_gradients(rec, base, case.task, grads.get("cat"))
    row.update(outcomes=rec.outcomes, paths=rec.paths, seconds=round(time.perf_counter() - started, 2))
    if rec.unsupported:  # the package refused the model with its reason: every property is n/a, by design
        row["unsupported"] = rec.unsupported
        assert case.model_type in rec.unsupported or "embeddings" in rec.unsupported, rec.unsupported
        return
    failures = rec.failures()
    if failures:
        pytest.fail(
            f"{case.id}: {len(failures)} propert{'y' if len(failures) == 1 else 'ies'} failed:\n  "
            + "\n  ".join(failures),
            pytrace=False,
        )


def _params(task: str) -> list:
    return [pytest.param(case, id=case.model_type) for case in arch_zoo.cases(task)]


@pytest.mark.parametrize("case", _params("CAUSAL_LM"))
def test_causal_lm(case, tmp_path):
    run_case(case, tmp_path)


@pytest.mark.parametrize("case", _params("SEQ_CLS"))
def test_sequence_classification(case, tmp_path):
    run_case(case, tmp_path)


@pytest.mark.parametrize("case", _params("TOKEN_CLS"))
def test_token_classification(case, tmp_path):
    run_case(case, tmp_path)


@pytest.mark.parametrize("case", _params("FEATURE_EXTRACTION"))
def test_feature_extraction(case, tmp_path):
    run_case(case, tmp_path)


@pytest.mark.parametrize("case", _params("SEQ_2_SEQ_LM"))
def test_seq2seq(case, tmp_path):
    run_case(case, tmp_path)


# --------------------------------------------------------------------------------------------------- the table


def _cell(row: dict, prop: str) -> str:
    if prop not in APPLIES[row["task"]]:
        return ""
    outcomes = row.get("outcomes", {})
    wrap_fail = [c for c, v in outcomes.get("wrap", {}).items() if v != "ok"]
    by_cfg = outcomes.get(prop, {})
    bad = sorted({c for c, v in by_cfg.items() if v != "ok" and not v.startswith("n/a")} | set(wrap_fail))
    if not by_cfg and not wrap_fail:
        return "?"
    if not bad:
        return "n/a" if any(v.startswith("n/a") for v in by_cfg.values()) else "ok"
    whole = (prop == "grad" and "kv=cat" in bad) or prop == "grad_ckpt" or len(bad) == 2
    return "FAIL" if whole else f"FAIL({','.join(bad)})"


def write_table() -> str:
    header = ["task", "architecture", "path kv", "path cat", *PROPERTIES, "build s", "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    skipped, unsupported = [], []
    for row in RESULTS:
        if row.get("skip"):
            skipped.append(row)
            continue
        if row.get("unsupported"):
            unsupported.append(row)
            continue
        if row.get("build_error"):
            cells = [row["task"], row["model_type"], "", "", f"BUILD ERROR: {row['build_error'][:80]}"]
            lines.append("| " + " | ".join(cells + [""] * (len(header) - len(cells))) + " |")
            continue
        paths = row.get("paths", {})
        cells = [row["task"], row["model_type"], paths.get("kv", ""), paths.get("cat", "")]
        cells += [_cell(row, p) for p in PROPERTIES]
        cells += [str(row.get("build_s", "")), str(row.get("seconds", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    total = time.perf_counter() - _CLOCK["start"]
    ran = [r for r in RESULTS if not r.get("skip") and not r.get("unsupported")]
    clean = [
        r for r in ran if r.get("outcomes") and not any(v != "ok" for d in r["outcomes"].values() for v in d.values())
    ]
    passing = [
        r
        for r in ran
        if r.get("outcomes")
        and not any(v != "ok" and not v.startswith("n/a") for d in r["outcomes"].values() for v in d.values())
    ]
    builds = sorted(r["build_s"] for r in ran if r.get("build_s") is not None)
    build_line = (
        f"Builds: median {statistics.median(builds):.3f}s, max {builds[-1]:.2f}s "
        f"({sum(b >= 1 for b in builds)} of {len(builds)} took 1s or more; a type's first build imports its module)."
        if builds
        else ""
    )
    summary = [
        f"# Architecture sweep (transformers {transformers.__version__}, torch {torch.__version__}), "
        f"P={P}, window={arch_zoo.WINDOW}",
        "",
        f"{len(ran)} run: {len(clean)} with every property holding, {len(passing) - len(clean)} more where only n/a "
        f"cells remain, {len(ran) - len(passing)} failing; {len(unsupported)} refused by the package with a clear "
        f"error; {len(skipped)} unbuildable; "
        f"module wall time {total:.0f}s. Cells: ok / FAIL (both configs) / FAIL(kv|cat) (one config) / n/a (the "
        "base model alone isn't padding invariant either, even with pad-skipping position ids); grad FAIL = prefix-KV "
        "and concat gradients differ; grad_ckpt FAIL = with non-reentrant gradient checkpointing on, the prefix-KV "
        "config's gradients differ from concat's without it (n/a: the architecture has no gradient checkpointing). path: the model's `execution_path` if it has one; softprompt_sdpa: the probe let the shared path run "
        "the package's prefix-aware SDPA (attention.py) instead of transformers' own.",
        "",
        build_line,
        "",
        *lines,
        "",
        "## Refused by the package (a clear UnsupportedModelError up front)",
        "",
        "| task | architecture | reason |",
        "|---|---|---|",
        *[f"| {r['task']} | {r['model_type']} | {r['unsupported'][:300]} |" for r in unsupported],
        "",
        "## Unbuildable",
        "",
        "| task | architecture | reason |",
        "|---|---|---|",
        *[f"| {r['task']} | {r['model_type']} | {r['skip']} |" for r in skipped],
    ]
    text = "\n".join(summary) + "\n"
    for path in TABLE_PATHS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    Path("/tmp/arch").mkdir(parents=True, exist_ok=True)
    Path("/tmp/arch/results.json").write_text(json.dumps({"total_s": total, "rows": RESULTS}, indent=1))
    return text


@pytest.fixture(scope="module", autouse=True)
def _sweep_session():
    """Quiet transformers, one intra-op thread (tiny models gain nothing from more and a shared CI box loses), and
    the summary table at the end; the global settings are restored for the other test modules."""
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    _CLOCK["start"] = time.perf_counter()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
        if RESULTS:
            text = write_table()
            print("\n" + text[:4000])
