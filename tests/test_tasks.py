"""Every task type: outputs aligned with the input, loss computed on the returned logits, the head trained."""

from __future__ import annotations

import pytest
import tiny
import torch
from peft import (
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from torch.nn import functional as F

from peft_softprompt_ext import ExecutionPath, SoftPromptConfig

P = 3


def wrap(base, task: str, **kw):
    return get_peft_model(base, SoftPromptConfig(task_type=task, num_virtual_tokens=P, **kw)).eval()


def manual_concat(model, ids: torch.Tensor, **kwargs):
    """Independent reference: prompt concatenated by hand in front of the input embeddings."""
    base = model.get_base_model()
    embeds = torch.cat([model.prompt_embeddings().expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], 1)
    return base(inputs_embeds=embeds, **kwargs)


@pytest.mark.parametrize("arch", list(tiny.SEQ_CLS))
def test_sequence_classification(arch):
    cls, make_config = tiny.SEQ_CLS[arch]
    model = wrap(tiny.build(cls, make_config, num_labels=3), "SEQ_CLS")
    assert isinstance(model, PeftModelForSequenceClassification)
    head = [n for n, p in model.named_parameters() if p.requires_grad and "prompt_encoder" not in n]
    assert head and all(("score" in n) or ("classifier" in n) for n in head)
    trainable, _ = model.get_nb_trainable_parameters()
    head_params = sum(p.numel() for n, p in model.named_parameters() if n in head)
    assert trainable == P * 32 + head_params

    short, long = tiny.random_ids(1, 4)[0], tiny.random_ids(1, 7, seed=2)[0]
    alone = model(input_ids=short[None]).logits
    labels = torch.tensor([2, 0])
    for pad in (tiny.left_pad, tiny.right_pad):
        ids, mask = pad([short, long])
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (2, 3)
        torch.testing.assert_close(out.logits[:1], alone, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels), atol=1e-6, rtol=1e-6)


def test_decoder_sequence_classification_concat_path_is_padding_invariant():
    cls, make_config = tiny.SEQ_CLS["llama"]
    model = wrap(tiny.build(cls, make_config, num_labels=2), "SEQ_CLS", shared_prompt_kv=False)
    short, long = tiny.random_ids(1, 4)[0], tiny.random_ids(1, 7, seed=2)[0]
    ids, mask = tiny.right_pad([short, long])
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask).logits[:1], model(input_ids=short[None]).logits, atol=1e-4, rtol=0
    )


def test_regression_loss_is_mse():
    cls, make_config = tiny.SEQ_CLS["bert"]
    model = wrap(tiny.build(cls, make_config, num_labels=1), "SEQ_CLS")
    ids = tiny.random_ids(2, 5)
    labels = torch.tensor([0.5, -1.0])
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), labels), atol=1e-6, rtol=1e-6)


def test_token_classification():
    model = wrap(tiny.bert("TOKEN_CLS", num_labels=5), "TOKEN_CLS")
    assert isinstance(model, PeftModelForTokenClassification)
    ids = tiny.random_ids(2, 6)
    labels = torch.randint(0, 5, (2, 6))
    labels[1, -2:] = -100
    out = model(input_ids=ids, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (2, 6, 5) and all(h.shape[1] == 6 for h in out.hidden_states)
    torch.testing.assert_close(out.logits, manual_concat(model, ids).logits[:, P:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1)))


def test_feature_extraction():
    model = wrap(tiny.bert("FEATURE_EXTRACTION"), "FEATURE_EXTRACTION")
    assert isinstance(model, PeftModelForFeatureExtraction)
    ids, mask = tiny.right_pad([tiny.random_ids(1, 4)[0], tiny.random_ids(1, 6, seed=3)[0]])
    out = model(input_ids=ids, attention_mask=mask)
    assert out.last_hidden_state.shape == (2, 6, 32)
    full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1)
    reference = manual_concat(model, ids, attention_mask=full_mask).last_hidden_state[:, P:]
    real = mask.bool()  # outputs at pad positions carry no meaning
    torch.testing.assert_close(out.last_hidden_state[real], reference[real], atol=1e-5, rtol=1e-5)
    assert model.execution_path is ExecutionPath.CONCAT, "an encoder must fall back to concatenation"


def test_seq2seq():
    model = wrap(tiny.t5(), "SEQ_2_SEQ_LM")
    assert isinstance(model, PeftModelForSeq2SeqLM) and model.execution_path is ExecutionPath.CONCAT
    ids, labels = tiny.random_ids(2, 6), tiny.random_ids(2, 4, seed=5)
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 4, tiny.VOCAB) and out.encoder_last_hidden_state.shape == (2, 6, 32)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, tiny.VOCAB), labels.reshape(-1)))
    reference = manual_concat(model, ids, labels=labels).logits
    torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=1e-5)

    generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    base = model.get_base_model()
    decoder = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(generated.shape[1] - 1):
            step = manual_concat(model, ids, decoder_input_ids=decoder).logits[:, -1:].argmax(-1)
            decoder = torch.cat([decoder, step], 1)
    assert torch.equal(generated, decoder)
    assert base.config.decoder_start_token_id == 0


def test_seq2seq_trains():
    model = wrap(tiny.t5(), "SEQ_2_SEQ_LM")
    model.train()
    ids, labels = tiny.random_ids(4, 6), tiny.random_ids(4, 3, seed=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
