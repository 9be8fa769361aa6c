"""Residual reparameterisation (prompt = P + LN(MLP(P))): what a save keeps, how it loads for inference and for
resuming. Tiny Llama built from a config; the residual MLP is trained (or perturbed) first so the effective prompt
differs from the raw parameters and a fold that dropped the MLP would show."""

from __future__ import annotations

import tiny
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_softprompt_ext import SoftPromptConfig, SoftPromptModelForCausalLM

P = 4
HIDDEN = 8
MLP_KEYS = {"down.weight", "down.bias", "up.weight", "up.bias", "norm.weight", "norm.bias", "gate"}


def residual_model(steps: int = 3, seed: int = 0) -> SoftPromptModelForCausalLM:
    """A residual soft prompt on a tiny Llama, trained a few steps so every raw parameter has moved."""
    torch.manual_seed(seed)
    config = SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        init="random",
        reparameterization="residual",
        residual_hidden_size=HIDDEN,
    )
    model = get_peft_model(tiny.causal_lm("llama"), config)
    tiny.train_steps(model, steps)
    return model.eval()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def raw_state(model) -> dict[str, torch.Tensor]:
    encoder = model.prompt_encoder["default"]
    state = {"raw_prompt": encoder.embedding.weight.detach().clone()}
    state.update({k: v.detach().clone() for k, v in encoder.residual.state_dict().items()})
    return state


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_residual_starts_at_its_initialisation_and_trains_mlp_and_prompt():
    torch.manual_seed(0)
    config = SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        init="random",
        reparameterization="residual",
        residual_hidden_size=HIDDEN,
    )
    model = get_peft_model(tiny.causal_lm("llama"), config)
    encoder = model.prompt_encoder["default"]
    torch.testing.assert_close(encoder().detach(), encoder.embedding.weight.detach())  # zero-initialised up-proj
    names = {n.split("default.", 1)[1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"embedding.weight"} | {f"residual.{k}" for k in MLP_KEYS}
    before = raw_state(model)
    tiny.train_steps(model, 2)
    after = raw_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in ("raw_prompt", "up.weight", "down.weight", "gate"))


def test_saved_adapter_keeps_effective_prompt_and_raw_parameters(tmp_path):
    model = residual_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert set(state) == {"prompt_embeddings", "residual.raw_prompt"} | {f"residual.{k}" for k in MLP_KEYS}
    encoder = model.prompt_encoder["default"]
    torch.testing.assert_close(state["prompt_embeddings"], encoder().detach())
    for key, value in raw_state(model).items():
        torch.testing.assert_close(state[f"residual.{key}"], value)
    # the effective prompt really differs from the raw one: keeping only one of them would lose something
    assert not torch.allclose(state["prompt_embeddings"], state["residual.raw_prompt"])


def test_inference_load_folds_to_plain_prompt_with_identical_outputs(tmp_path):
    model = residual_model()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path)
    assert isinstance(loaded, SoftPromptModelForCausalLM)
    encoder = loaded.prompt_encoder["default"]
    assert encoder.residual is None, "inference load should fold the residual MLP away"
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(encoder.embedding.weight, model.prompt_embeddings().detach())

    ids, mask = tiny.left_pad([tiny.random_ids(1, n, seed=n)[0] for n in (3, 6, 5)])
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out_loaded = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        out_model = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out_loaded, out_model)


def test_folded_adapter_resaves_as_plain_prompt(tmp_path):
    model = residual_model()
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    state = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert list(state) == ["prompt_embeddings"]
    torch.testing.assert_close(state["prompt_embeddings"], model.prompt_embeddings().detach())


def test_resume_restores_raw_parameters_and_continues_from_them(tmp_path):
    model = residual_model()
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path, is_trainable=True)
    encoder = resumed.prompt_encoder["default"]
    assert encoder.residual is not None, "a trainable load must keep the residual MLP"
    assert not resumed.peft_config["default"].inference_mode
    for key, value in raw_state(model).items():
        torch.testing.assert_close(raw_state(resumed)[key], value)
    assert {id(p) for p in trainable(resumed)} == {id(p) for p in encoder.parameters()}
    ids = tiny.random_ids(2, 5)
    torch.testing.assert_close(logits(resumed, ids), logits(model, ids), atol=1e-5, rtol=1e-5)

    # One more step from the saved state (fresh optimiser on both) lands on the same parameters: resuming
    # continues from the raw parameters, not from a re-initialised MLP on top of the folded prompt.
    tiny.train_steps(model, 1)
    tiny.train_steps(resumed, 1)
    for key, value in raw_state(model).items():
        torch.testing.assert_close(raw_state(resumed)[key], value, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(resumed, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_resume_then_save_again_round_trips(tmp_path):
    model = residual_model()
    model.save_pretrained(tmp_path / "a")
    resumed = PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path / "a", is_trainable=True)
    tiny.train_steps(resumed, 2)
    resumed.save_pretrained(tmp_path / "b")
    again = PeftModel.from_pretrained(tiny.causal_lm("llama"), tmp_path / "b", is_trainable=True)
    for key, value in raw_state(resumed).items():
        torch.testing.assert_close(raw_state(again)[key], value)


def test_residual_starts_at_init_and_moves_smoothly():
    """One AdamW step moves the residual prompt about as far as it moves a plain prompt (no LayerNorm blow-up)."""

    def step_size(**kw) -> float:
        model = get_peft_model(
            tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, init="random", **kw)
        )
        before = model.prompt_embeddings().detach().clone()
        torch.testing.assert_close(before, model.prompt_encoder["default"].embedding.weight.detach())
        tiny.train_steps(model, 1, lr=1e-3)
        return (model.prompt_embeddings().detach() - before).norm().item()

    assert step_size(reparameterization="residual") < 3 * step_size()
