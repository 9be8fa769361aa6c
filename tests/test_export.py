"""Export to vanilla PEFT (checked in a process that never imports us), import from PEFT, raw prompt embeddings,
safe output directories, and the decode/export CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tiny
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from peft_softprompt_ext import SoftPromptConfig, SoftPromptModelForCausalLM
from peft_softprompt_ext.app.cli import COMMANDS, main
from peft_softprompt_ext.atomic import transaction
from peft_softprompt_ext.export import (
    export_peft_prompt_tuning,
    export_prompt_embeds,
    import_peft_prompt_tuning,
    load_peft_prompt_tuning,
    load_prompt_embeds,
)

P = 4
TEXT = "w10 w41 w7 w93"


@pytest.fixture
def base_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved with its tokenizer, so adapters record it as their base model."""
    path = tmp_path_factory.mktemp("base")
    tiny.causal_lm().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load_base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def trained_model(base_dir, tokenizer, residual: bool = False):
    """A soft prompt that is not any token sequence (and, for residual, not its raw parameters either)."""
    extra = {"reparameterization": "residual", "residual_hidden_size": 8} if residual else {}
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, init="text", init_text=TEXT, tokenizer=tokenizer, **extra
    )
    model = get_peft_model(load_base(base_dir), config)
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.add_(torch.randn(P, 32, generator=torch.Generator().manual_seed(0)) * 0.02)
        if residual:
            encoder.residual.up.weight.normal_(0, 0.3)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


VANILLA = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "peft_softprompt_ext":
            raise ImportError("this process must not import peft_softprompt_ext")

sys.meta_path.insert(0, Refuse())
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained({base!r}).eval()
model = PeftModel.from_pretrained(base, {adapter!r})
assert type(model).__name__ == "PeftModelForCausalLM", type(model)
assert model.peft_config["default"].peft_type == "PROMPT_TUNING"
ids = load_file({io!r})["input_ids"]
with torch.no_grad():
    out = model(input_ids=ids).logits
save_file({{"logits": out.contiguous()}}, {out!r})
assert not [m for m in sys.modules if m.startswith("peft_softprompt_ext")]
"""


def test_export_to_peft_loads_in_plain_peft_with_the_same_logits(base_dir, tokenizer, tmp_path):
    model = trained_model(base_dir, tokenizer, residual=True)
    out = tmp_path / "peft_adapter"
    assert export_peft_prompt_tuning(model, out) == str(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_transformer_submodules"] == 1
    assert config["base_model_name_or_path"] == base_dir and config["num_virtual_tokens"] == P
    assert list(load_file(out / "adapter_model.safetensors")) == ["prompt_embeddings"], "residual MLP folded"

    ids = tiny.random_ids(2, 6)
    save_file({"input_ids": ids}, tmp_path / "io.safetensors")
    code = VANILLA.format(
        base=base_dir, adapter=str(out), io=str(tmp_path / "io.safetensors"), out=str(tmp_path / "logits.safetensors")
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = load_file(tmp_path / "logits.safetensors")["logits"]
    assert theirs.shape == (2, P + 6, tiny.VOCAB), "PEFT's own prompt tuning returns P extra positions"
    torch.testing.assert_close(theirs[:, P:], logits(model, ids), atol=1e-5, rtol=1e-5)


def test_export_sequence_classifier_keeps_its_head(tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    def classifier():
        return tiny.build(LlamaForSequenceClassification, tiny.llama_config, num_labels=3)

    config = SoftPromptConfig(
        task_type="SEQ_CLS", num_virtual_tokens=P, init="text", init_text=TEXT, tokenizer=tokenizer
    )
    model = get_peft_model(classifier(), config)
    with torch.no_grad():
        model.base_model.score.modules_to_save["default"].weight.normal_()
    export_peft_prompt_tuning(model, tmp_path / "peft")
    assert sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors")) == [
        "base_model.score.weight",
        "prompt_embeddings",
    ]
    theirs = PeftModel.from_pretrained(classifier(), tmp_path / "peft")
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    ids = tiny.random_ids(2, 5)
    torch.testing.assert_close(logits(theirs.eval(), ids), logits(model.eval(), ids), atol=1e-5, rtol=1e-5)


def test_import_from_peft_prompt_tuning(base_dir, tmp_path):
    theirs = get_peft_model(load_base(base_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.mul_(0.05)  # PEFT's RANDOM init is N(0, 1)
    theirs.save_pretrained(tmp_path / "peft")
    ids = tiny.random_ids(3, 5)
    expected = logits(theirs.eval(), ids)[:, P:]

    converted = import_peft_prompt_tuning(tmp_path / "peft", tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SOFT_PROMPT" and config["base_model_name_or_path"] == base_dir
    ours = PeftModel.from_pretrained(load_base(base_dir), converted)
    assert isinstance(ours, SoftPromptModelForCausalLM)
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
    direct = load_peft_prompt_tuning(load_base(base_dir), tmp_path / "peft", is_trainable=True)
    assert isinstance(direct, SoftPromptModelForCausalLM)
    assert direct.prompt_encoder["default"].embedding.weight.requires_grad
    torch.testing.assert_close(logits(direct, ids), expected, atol=1e-5, rtol=1e-5)


def test_round_trip_ours_peft_ours_keeps_the_prompt_exactly(base_dir, tokenizer, tmp_path):
    model = trained_model(base_dir, tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    export_peft_prompt_tuning(tmp_path / "adapter", tmp_path / "peft")
    import_peft_prompt_tuning(tmp_path / "peft", tmp_path / "back")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(back, model.prompt_embeddings().detach())


def test_peft_imports_that_would_change_the_model_are_refused(base_dir, tmp_path):
    seq2seq = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM",
        "num_virtual_tokens": P,
        "token_dim": 32,
        "num_transformer_submodules": 2,
    }
    (tmp_path / "s2s").mkdir()
    (tmp_path / "s2s" / "adapter_config.json").write_text(json.dumps(seq2seq))
    save_file({"prompt_embeddings": torch.zeros(2 * P, 32)}, tmp_path / "s2s" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="num_transformer_submodules=2"):
        import_peft_prompt_tuning(tmp_path / "s2s", tmp_path / "out")

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({**seq2seq, "num_transformer_submodules": 1}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="a pickle, which is never loaded"):
        import_peft_prompt_tuning(tmp_path / "pickled", tmp_path / "out")
    with pytest.raises(ValueError, match="expected SOFT_PROMPT"):
        export_peft_prompt_tuning(tmp_path / "s2s", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompt_embeds_export_reproduces_the_forward(base_dir, tokenizer, tmp_path):
    model = trained_model(base_dir, tokenizer)
    export_prompt_embeds(model, tmp_path / "embeds")
    assert sorted(os.listdir(tmp_path / "embeds")) == ["prompt_embeds.json", "prompt_embeds.safetensors"]
    prompt, meta = load_prompt_embeds(tmp_path / "embeds")
    assert prompt.shape == (P, 32) and meta["shape"] == [P, 32] and meta["dtype"] == "float32"
    assert meta["base_model_name_or_path"] == base_dir and meta["num_virtual_tokens"] == P
    ids = tiny.random_ids(1, 6)
    base = load_base(base_dir)
    with torch.no_grad():  # how a server uses it: prompt + embedded input as inputs_embeds
        served = base(inputs_embeds=torch.cat([prompt, base.get_input_embeddings()(ids[0])])[None]).logits[:, P:]
    torch.testing.assert_close(served, logits(model, ids), atol=1e-5, rtol=1e-5)
    export_prompt_embeds(model, tmp_path / "bf16", dtype="bfloat16")
    half, meta = load_prompt_embeds(tmp_path / "bf16")
    assert half.dtype == torch.bfloat16 and meta["dtype"] == "bfloat16"


def test_outputs_never_overwrite_unless_asked_and_are_atomic(base_dir, tokenizer, tmp_path):
    model = trained_model(base_dir, tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        export_peft_prompt_tuning(model, out)
    with pytest.raises(FileExistsError, match="not empty"):
        export_prompt_embeds(model, out)
    with pytest.raises(ValueError, match="not an adapter directory"):  # --overwrite never replaces foreign data
        export_peft_prompt_tuning(model, out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    export_prompt_embeds(model, tmp_path / "empty")  # an empty directory is fine
    export_prompt_embeds(model, tmp_path / "empty", overwrite=True)  # and an export of ours may be replaced
    export_peft_prompt_tuning(model, tmp_path / "peft")
    (tmp_path / "peft" / "notes.txt").write_text("the user's, beside the export")
    (tmp_path / "peft" / "training_info.json").write_text("{}")  # a file the package writes, stale here
    export_peft_prompt_tuning(model, tmp_path / "peft", overwrite=True)
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    with pytest.raises(RuntimeError, match="boom"), transaction(tmp_path / "failed") as tmp:
        (open(os.path.join(tmp, "partial"), "w")).close()
        raise RuntimeError("boom")
    assert not (tmp_path / "failed").exists()
    assert not tiny.staging_leftovers(tmp_path), "no temporary directories left behind"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_prompt_embeds(model, tmp_path / "a_file", overwrite=True)


# --------------------------------------------------------------------------- CLI


def test_cli_decode_prints_the_table(base_dir, tokenizer, tmp_path, capsys):
    model = trained_model(base_dir, tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["decode", str(tmp_path / "adapter")]) == 0  # base (and its tokenizer) from the adapter config
    printed = capsys.readouterr().out
    assert "top 5 by cosine" in printed and "top-5" in printed and f"text: {TEXT!r}" in printed
    assert (
        main(["decode", str(tmp_path / "adapter"), "--base", base_dir, "--metric", "l2", "--top-k", "2", "--json"]) == 0
    )
    decoded = json.loads(capsys.readouterr().out)
    assert decoded["metric"] == "l2" and [row[0] for row in decoded["token_ids"]] == [10, 41, 7, 93]
    assert len(decoded["token_ids"][0]) == 2
    for bad, message in ((["--top-k", "0"], "must be > 0"), (["--metric", "euclid"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:  # usage errors, before any model is loaded
            main(["decode", str(tmp_path / "adapter"), *bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert main(["decode", str(tmp_path / "adapter"), "--top-k", "1000"]) == 1
    assert "exceeds the 92 candidate tokens" in capsys.readouterr().err


def test_cli_export_and_mounting(base_dir, tokenizer, tmp_path, capsys):
    model = trained_model(base_dir, tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--to", "peft", str(tmp_path / "peft")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "peft")
    assert main(["export", str(tmp_path / "adapter"), "--to", "peft", str(tmp_path / "peft")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--to", "peft", str(tmp_path / "peft"), "--overwrite"]) == 0
    assert (
        main(["export", str(tmp_path / "adapter"), "--to", "embeds", str(tmp_path / "emb"), "--dtype", "float16"]) == 0
    )
    assert load_prompt_embeds(tmp_path / "emb")[0].dtype == torch.float16
    assert main(["export", str(tmp_path / "peft"), "--to", "softprompt", str(tmp_path / "back")]) == 0
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(back, model.prompt_embeddings().detach())
    assert main(["decode", str(tmp_path / "peft"), "--top-k", "1"]) == 0  # PEFT dirs decode too
    assert f"text: {TEXT!r}" in capsys.readouterr().out
    assert set(COMMANDS) == {"train", "generate", "info", "decode", "export"}
