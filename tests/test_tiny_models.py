"""The tiny test checkpoints load through transformers, resolve through the
catalog, tokenize code into multi-character pieces and are reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import CODE_TEXT, TINY_ARCHITECTURES, TinyHf, build_tiny_hf

from shoptalk.models.catalog import resolve_base
from shoptalk.models.files import sha256_file


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_checkpoint_loads_and_resolves(arch: str, tiny_hf: TinyHf) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_hf(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tokenizer)

    base = resolve_base(str(path))
    assert base.architecture == arch
    for token in base.fim.special_tokens():
        ids = tokenizer(token, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{token} is not a single token: {ids}"
    assert tokenizer.eos_token == base.fim.end
    assert tokenizer.pad_token_id is not None

    ids = tokenizer(CODE_TEXT, add_special_tokens=False).input_ids
    # A real tokenizer: code takes far fewer tokens than characters, and
    # decoding gives the text back byte for byte.
    assert len(ids) < len(CODE_TEXT) / 2
    assert tokenizer.decode(ids) == CODE_TEXT
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    assert torch.isfinite(logits).all()


def test_sentencepiece_file_and_hf_tokenizer_agree(tiny_hf: TinyHf) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    for arch in ("gemma3", "llama"):
        path = tiny_hf(arch)
        processor = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        tokenizer = AutoTokenizer.from_pretrained(path)
        text = CODE_TEXT + "\n# naïve café ✓ 12345\n"
        assert processor.encode(text) == tokenizer(text, add_special_tokens=False).input_ids


def test_gemma_vocabulary_layout(tiny_hf: TinyHf) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf("gemma3"))
    # Gemma's fixed ids: pad 0, eos 1, bos 2; the prompt starts with bos.
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer("x").input_ids[0] == 2


def test_build_is_deterministic(tmp_path: Path, tiny_hf: TinyHf) -> None:
    first = tiny_hf("llama")
    second = build_tiny_hf("llama", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer.model", "config.json"):
        assert sha256_file(first / name) == sha256_file(second / name), name


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gemma3"):
        build_tiny_hf("mamba", tmp_path)
