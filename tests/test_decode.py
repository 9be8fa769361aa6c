"""Nearest-token decoding, decoding fidelity and PEZ-style projected training, against brute-force references."""

from __future__ import annotations

import logging

import pytest
import tiny
import torch
from peft import get_peft_model
from torch import nn
from torch.nn import functional as F

from peft_softprompt_ext import SoftPromptConfig
from peft_softprompt_ext.decode import (
    METRICS,
    DecodedPrompt,
    decode_prompt,
    evaluate_decoding,
    hard_prompt,
    nearest_tokens,
    projected_prompt,
)

TEXT = "w10 w41 w7 w93 w22"
TEXT_IDS = [10, 41, 7, 93, 22]
P = len(TEXT_IDS)


def text_model(tokenizer, arch: str = "llama", base_kw: dict | None = None, **kw):
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, init="text", init_text=TEXT, tokenizer=tokenizer, **kw
    )
    return get_peft_model(tiny.causal_lm(arch, **(base_kw or {})), config)


def brute_force(prompt: torch.Tensor, table: torch.Tensor, metric: str, k: int, exclude=()) -> tuple:
    """Independent reference: the full [P, V] score matrix, sorted."""
    p, t = prompt.double(), table.double()
    if metric == "cosine":
        scores = F.cosine_similarity(p[:, None, :], t[None, :, :], dim=-1)
    elif metric == "l2":
        scores = -torch.cdist(p, t)
    else:
        scores = p @ t.T
    scores[:, list(exclude)] = -float("inf")
    values, ids = scores.sort(dim=1, descending=True, stable=True)
    values = -values if metric == "l2" else values
    return ids[:, :k], values[:, :k].float()


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied and tied input/output embeddings
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_text_initialised_prompt_decodes_to_its_text(tokenizer, arch, metric):
    model = text_model(tokenizer, arch)
    result = model.decode_prompt(tokenizer, metric=metric, top_k=3)
    assert isinstance(result, DecodedPrompt) and result.adapter_name == "default"
    assert result.top1_ids == TEXT_IDS and result.token_ids.shape == (P, 3)
    assert result.text == TEXT
    best = torch.full((P,), 1.0 if metric == "cosine" else 0.0)
    torch.testing.assert_close(result.scores[:, 0], best, atol=1e-5, rtol=0)


def test_chunked_search_matches_brute_force_for_every_metric():
    torch.manual_seed(0)
    table = torch.randn(103, 16) * torch.rand(103, 1) * 3  # uneven norms, so the metrics disagree
    prompt = torch.randn(6, 16)
    exclude = {0, 5, 57, 102}
    for metric in METRICS:
        ids, scores = nearest_tokens(prompt, table, metric, top_k=7, exclude_ids=exclude, chunk_size=10)
        ref_ids, ref_scores = brute_force(prompt, table, metric, 7, exclude)
        assert torch.equal(ids, ref_ids), metric
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
        assert not set(ids.flatten().tolist()) & exclude


def test_search_reads_the_table_in_chunks_never_whole():
    class CountingEmbedding(nn.Embedding):
        largest = 0

        def forward(self, ids):
            CountingEmbedding.largest = max(CountingEmbedding.largest, ids.numel())
            return super().forward(ids)

    table = CountingEmbedding(1000, 8)
    prompt = torch.randn(4, 8)
    ids, _ = nearest_tokens(prompt, table, "cosine", top_k=20, chunk_size=64)
    assert torch.equal(ids, brute_force(prompt, table.weight.detach(), "cosine", 20)[0])
    assert CountingEmbedding.largest <= 64


def test_embedding_module_is_called_so_scaled_embeddings_are_searched_as_the_model_sees_them():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 4.0

    table = Scaled(50, 8)
    target = table(torch.tensor([17])).detach()  # what the model concatenates with the prompt
    ids, scores = nearest_tokens(target, table, "l2", top_k=1)
    assert ids.item() == 17 and scores.item() == pytest.approx(0.0, abs=1e-5)


def test_dot_product_is_exact_only_when_norms_agree():
    """Why dot product isn't guaranteed: <e_j, e_i> > <e_j, e_j> when ||e_i|| cos(angle) > ||e_j||."""
    table = torch.tensor([[1.0, 0.0], [3.0, 0.5], [0.0, 1.0]])
    prompt = table[:1].clone()
    assert nearest_tokens(prompt, table, "dot")[0].item() == 1, "the long neighbour wins under dot product"
    assert nearest_tokens(prompt, table, "cosine")[0].item() == 0
    assert nearest_tokens(prompt, table, "l2")[0].item() == 0
    equal_norms = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    ids, _ = nearest_tokens(equal_norms[[3, 9, 27]], equal_norms, "dot")
    assert ids[:, 0].tolist() == [3, 9, 27]


def test_plain_function_special_tokens_and_table(tokenizer):
    model = text_model(tokenizer)
    table = model.get_base_model().get_input_embeddings().weight.detach()
    prompt = table[[2, 10, 11]]  # </s> is special
    skipped = decode_prompt(prompt, table, tokenizer, metric="l2", top_k=2)
    assert skipped.top1_ids[1:] == [10, 11] and skipped.top1_ids[0] != 2
    kept = decode_prompt(prompt, table, tokenizer, metric="l2", top_k=2, skip_special_tokens=False)
    assert kept.top1_ids == [2, 10, 11] and kept.tokens[0][0] == "</s>"
    ids_only = decode_prompt(prompt, table, metric="cosine", top_k=2)
    assert ids_only.text is None and ids_only.tokens is None
    text = str(kept)
    assert "top-1" in text and "top-2" in text and "'w10'" in text and "l2" in text and "lower is closer" in text
    assert "#10" in str(ids_only)
    assert kept.to_dict()["token_ids"] == kept.token_ids.tolist()


def test_decode_any_adapter_and_config_tokenizer(tokenizer):
    model = text_model(tokenizer)
    other = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, init="text", init_text="w60 w61", tokenizer=tokenizer
    )
    model.add_adapter("other", other)
    assert model.active_adapter == "default"
    result = model.decode_prompt(adapter_name="other", metric="l2")  # tokenizer taken from the adapter's config
    assert result.top1_ids == [60, 61] and result.text == "w60 w61" and result.adapter_name == "other"
    assert model.decode_prompt(metric="cosine").top1_ids == TEXT_IDS


def test_decode_residual_prompt_reads_the_effective_prompt(tokenizer):
    model = text_model(tokenizer, reparameterization="residual", residual_hidden_size=8)
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.residual.up.weight.normal_(0, 0.5)
    ref_ids, _ = brute_force(
        encoder().detach(), model.get_input_embeddings().weight.detach(), "cosine", 1, {0, 1, 2, 3}
    )
    assert model.decode_prompt(tokenizer, top_k=1).top1_ids == ref_ids[:, 0].tolist()


def test_errors_name_sizes_ranges_and_metrics(tokenizer):
    table = torch.randn(64, 32)
    with pytest.raises(ValueError, match=r"prompt has hidden size 16 .* hidden size 32"):
        decode_prompt(torch.randn(3, 16), table)
    with pytest.raises(ValueError, match=r"tokenizer has 96 tokens .* 64 rows"):
        decode_prompt(torch.randn(3, 32), table, tokenizer)
    for bad in (0, -1, 65, True, 2.0):
        with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 64\]"):
            decode_prompt(torch.randn(3, 32), table, top_k=bad)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 62\]"):
        decode_prompt(torch.randn(3, 32), table, top_k=63, exclude_ids=[0, 1])
    with pytest.raises(ValueError, match="valid metrics are cosine, l2, dot"):
        decode_prompt(torch.randn(3, 32), table, metric="euclid")
    model = text_model(tokenizer)
    with pytest.raises(ValueError, match="valid metrics are cosine, l2, dot"):
        model.decode_prompt(tokenizer, metric="manhattan")
    with pytest.raises(ValueError, match="No soft-prompt adapter 'nope'"):
        model.decode_prompt(tokenizer, adapter_name="nope")
    small = get_peft_model(tiny.causal_lm(vocab_size=64), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"96 tokens .* 64 rows"):
        small.decode_prompt(tokenizer)


def test_tokenizer_smaller_than_table_searches_its_ids_only(tokenizer, caplog):
    model = get_peft_model(
        tiny.causal_lm(vocab_size=128), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(model.get_input_embeddings().weight[[120, 40]])
    with caplog.at_level(logging.INFO, logger="peft_softprompt_ext"):
        result = model.decode_prompt(tokenizer, metric="l2", top_k=3)
    assert (result.token_ids < len(tokenizer)).all() and result.top1_ids[1] == 40
    assert "searching the tokenizer's ids only" in caplog.text


# --------------------------------------------------------------------------- fidelity


def perturbed(tokenizer, scale: float = 2.0):
    """A "trained" prompt far enough from its text that the three metrics decode it differently."""
    model = text_model(tokenizer, base_kw={"initializer_range": 0.2})
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        noise = torch.randn(P, table.shape[1], generator=torch.Generator().manual_seed(3))
        model.prompt_encoder["default"].embedding.weight.add_(noise * table.std() * scale)
    return model.eval()


def reference_logprobs(model, input_ids: list[int], hard_ids: list[int] | None) -> torch.Tensor:
    """Next-token log-probs of one unpadded input: the soft prompt via our forward, a hard prompt as real tokens."""
    with torch.no_grad():
        if hard_ids is None:
            logits = model(input_ids=torch.tensor([input_ids])).logits
        else:
            logits = model.get_base_model()(input_ids=torch.tensor([hard_ids + input_ids])).logits
    return logits[0, -1].float().log_softmax(-1)


def test_evaluate_decoding_on_a_dataset_matches_per_example_reference(tokenizer):
    model = perturbed(tokenizer)
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randint(4, tiny.VOCAB, (n,), generator=gen).tolist() for n in (3, 7, 5, 2, 6)]
    soft_lp = [reference_logprobs(model, x, None) for x in inputs]
    targets = [int(lp.argmax()) if i % 2 else 50 for i, lp in enumerate(soft_lp)]  # soft gets 3 of 5 right at least
    dataset = [(torch.tensor(x), t) for x, t in zip(inputs[:3], targets[:3], strict=True)]
    dataset += [{"input_ids": x, "target_id": t} for x, t in zip(inputs[3:], targets[3:], strict=True)]
    report = evaluate_decoding(model, dataset, tokenizer=tokenizer, batch_size=2)
    assert [r.prompt for r in report.results] == ["soft", "cosine", "l2", "dot"] and report.num_examples == 5
    for result in report.results:
        hard = None if result.prompt == "soft" else model.decode_prompt(tokenizer, metric=result.prompt).top1_ids
        assert result.token_ids == hard
        lps = [reference_logprobs(model, x, hard) for x in inputs]
        accuracy = sum(int(lp.argmax()) == t for lp, t in zip(lps, targets, strict=True)) / len(targets)
        kl = sum(float((s.exp() * (s - h)).sum()) for s, h in zip(soft_lp, lps, strict=True)) / len(lps)
        assert result.score == pytest.approx(accuracy)
        assert result.kl == pytest.approx(kl, abs=1e-5)
    assert len({tuple(r.token_ids) for r in report.results[1:]}) == 3, "metrics disagree on this prompt"
    assert report["soft"].kl == pytest.approx(0.0, abs=1e-6)
    assert report["cosine"].kl > 1e-4, "the perturbed prompt is not its decoded tokens"
    assert "KL(soft||p)" in str(report) and report.to_dict()["results"][1]["prompt"] == "cosine"


def test_evaluate_decoding_with_eval_fn_swaps_the_prompt_and_restores_the_model(tokenizer):
    model = perturbed(tokenizer)
    model.train()
    x = tiny.random_ids(2, 5)
    before = model(input_ids=x).logits.detach()
    seen = []

    def eval_fn(m):  # a task score computed however the caller likes: here the mean logit of token 50
        seen.append(m.training)
        return float(m(input_ids=x).logits[:, -1, 50].mean())

    report = evaluate_decoding(model, eval_fn, metrics=("l2", "cosine"))
    assert [r.prompt for r in report.results] == ["soft", "l2", "cosine"] and report.num_examples is None
    assert all(r.kl is None for r in report.results) and seen == [False, False, False]
    hard = model.decode_prompt(metric="l2").top1_ids
    with torch.no_grad():
        ref = model.get_base_model()(input_ids=torch.cat([torch.tensor([hard] * 2), x], 1)).logits[:, -1, 50]
    assert report["l2"].score == pytest.approx(float(ref.mean()), abs=1e-5)
    assert report["soft"].score == pytest.approx(float(before[:, -1, 50].mean()), abs=1e-5)
    assert model.training and torch.equal(model(input_ids=x).logits.detach(), before), "hooks removed, mode restored"

    with_kl = evaluate_decoding(model, eval_fn, metrics=("l2",), kl_inputs=[x[0], x[1].tolist()])
    on_data = evaluate_decoding(model, [x[0], x[1].tolist()], metrics=("l2",))
    assert with_kl["l2"].kl == pytest.approx(on_data["l2"].kl, abs=1e-6) and on_data["l2"].score is None
    with pytest.raises(ValueError, match="valid metrics"):
        evaluate_decoding(model, eval_fn, metrics=("cos",))
    with pytest.raises(ValueError, match="empty dataset"):
        evaluate_decoding(model, [])


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hard_prompt_context_equals_prepended_tokens(tokenizer):
    model = perturbed(tokenizer)
    x = tiny.random_ids(2, 4)
    ids = [12, 13, 14, 15, 16]
    soft = logits_of(model, x)  # in eval mode: may compile the soft prompt's cache, which must not leak inside
    with hard_prompt(model, ids):
        ours = logits_of(model, x)
    with torch.no_grad():
        ref = model.get_base_model()(input_ids=torch.cat([torch.tensor([ids] * 2), x], 1)).logits[:, P:]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits_of(model, x), soft), "nor the hard prompt's outside"
    with pytest.raises(ValueError, match="needs 5 token ids, got 2"), hard_prompt(model, [1, 2]):
        pass


# --------------------------------------------------------------------------- projected (PEZ) training


def test_projected_training_lowers_the_loss_and_ends_on_a_real_hard_prompt():
    base = tiny.causal_lm(initializer_range=0.2)
    model = get_peft_model(base, SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, init="vocab"))
    x = torch.cat([tiny.random_ids(8, 6, seed=3), torch.full((8, 1), 42)], 1)
    labels = torch.full_like(x, -100)
    labels[:, -1] = 42  # the prompt must make the model say 42 after any input
    start = model.prompt_embeddings().detach().clone()
    optimizer = torch.optim.AdamW(model.prompt_encoder.parameters(), lr=0.05, weight_decay=0.0)
    model.train()
    losses = []
    with projected_prompt(model, "cosine") as state:
        for _ in range(40):
            loss = model(input_ids=x, labels=labels).loss
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            projected_loss = model(input_ids=x, labels=labels).loss.item()
        ids = list(state.token_ids)
    assert not torch.equal(model.prompt_embeddings().detach(), start), "gradients reached the continuous prompt"
    assert projected_loss < losses[0] - 0.5, (losses[0], projected_loss)
    assert len(ids) == 3 and all(3 <= i < tiny.VOCAB for i in ids), "valid, non-special token ids"
    assert ids == model.decode_prompt(metric="cosine", top_k=1).top1_ids
    hard_ids = torch.cat([torch.tensor([ids] * 8), x], 1)
    hard_labels = torch.cat([torch.full((8, 3), -100), labels], 1)
    with torch.no_grad():
        hard_loss = base(input_ids=hard_ids, labels=hard_labels).loss.item()
    assert hard_loss == pytest.approx(projected_loss, abs=1e-5)
    with torch.no_grad():  # outside the block the continuous prompt is back
        soft_loss = model(input_ids=x, labels=labels).loss.item()
    assert soft_loss != pytest.approx(projected_loss, abs=1e-6)
    with pytest.raises(ValueError, match="valid metrics"), projected_prompt(model, "hamming"):
        pass


def test_evaluate_decoding_on_a_classifier_scores_the_class_logits(tokenizer):
    from transformers import LlamaForSequenceClassification

    base = tiny.build(LlamaForSequenceClassification, tiny.llama_config, num_labels=3)
    config = SoftPromptConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3, init="text", init_text="w5 w6 w7", tokenizer=tokenizer
    )
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.add_(0.05)
    x = tiny.random_ids(3, 5)
    report = evaluate_decoding(model, [(row, 1) for row in x], metrics=("l2",))
    hard = report["l2"].token_ids
    with torch.no_grad():
        soft = model(input_ids=x).logits.log_softmax(-1)
        ref = base(input_ids=torch.cat([torch.tensor([hard] * 3), x], 1)).logits.log_softmax(-1)
    assert report["soft"].score == pytest.approx(float((soft.argmax(-1) == 1).float().mean()))
    assert report["l2"].score == pytest.approx(float((ref.argmax(-1) == 1).float().mean()))
    assert report["l2"].kl == pytest.approx(float((soft.exp() * (soft - ref)).sum(-1).mean()), abs=1e-5)
