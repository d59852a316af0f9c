"""Our GGUF writer against the HF reference in real llama.cpp: same top-1
next token and close logits on a fixed code text, for each architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_models import (
    CODE_TEXT,
    TINY_ARCHITECTURES,
    TinyGguf,
    TinyHf,
    decisive_positions,
    hf_logits,
    llama_cpp_logits,
)

from shoptalk.trainer.gguf_writer import (
    GGUFWriteError,
    write_gguf,
    write_gguf_from_checkpoint,
)

# Largest logit difference allowed between HF (fp32) and llama.cpp.
TOLERANCE = {"f32": 0.02, "f16": 0.05}


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_gguf_matches_hf_in_llama_cpp(
    arch: str, dtype: str, tiny_hf: TinyHf, tiny_gguf: TinyGguf
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = tiny_hf(arch)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(CODE_TEXT).input_ids
    reference = hf_logits(AutoModelForCausalLM.from_pretrained(checkpoint), ids)
    got = llama_cpp_logits(tiny_gguf(arch, dtype), ids)

    assert got.shape == reference.shape
    assert np.abs(got - reference).max() < TOLERANCE[dtype]
    decisive = decisive_positions(reference, 2 * TOLERANCE[dtype])
    assert decisive.mean() > 0.6
    assert (got.argmax(-1) == reference.argmax(-1))[decisive].all()


@pytest.mark.e2e
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_llama_cpp_tokenizes_like_hf(arch: str, tiny_hf: TinyHf, tiny_gguf: TinyGguf) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    from shoptalk.models.catalog import resolve_base

    checkpoint = tiny_hf(arch)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    fim = resolve_base(str(checkpoint)).fim
    text = fim.prefix + CODE_TEXT + fim.suffix + "\n    return x  # é ✓\n" + fim.middle
    llm = llama_cpp.Llama(str(tiny_gguf(arch)), vocab_only=True, verbose=False)
    try:
        got = llm.tokenize(text.encode(), add_bos=tokenizer.bos_token is not None, special=True)
    finally:
        llm.close()
    assert got == tokenizer(text).input_ids


def test_written_metadata(tiny_gguf: TinyGguf) -> None:
    reader = gguf.GGUFReader(tiny_gguf("gemma3"))
    fields = {
        key: f.contents() for key, f in reader.fields.items() if key != "tokenizer.ggml.merges"
    }
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window"] == 16
    assert fields["gemma3.attention.key_length"] == 16
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (2, 1)
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokens.index("<unused0>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    qwen = gguf.GGUFReader(tiny_gguf("qwen2", "f16"))
    assert qwen.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert len(qwen.fields["tokenizer.ggml.merges"].contents()) > 100
    qnames = {t.name: t for t in qwen.tensors}
    assert qnames["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert qnames["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in qnames


def test_gemma_norms_store_one_plus_w(tiny_hf: TinyHf, tiny_gguf: TinyGguf) -> None:
    from safetensors.numpy import load_file

    hf = load_file(tiny_hf("gemma3") / "model.safetensors")
    reader = gguf.GGUFReader(tiny_gguf("gemma3"))
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    np.testing.assert_allclose(
        stored["blk.1.attn_q_norm.weight"], hf["model.layers.1.self_attn.q_norm.weight"] + 1.0
    )


def test_tokenizer_carried_over_from_source_gguf(
    tmp_path: Path, tiny_hf: TinyHf, tiny_gguf: TinyGguf
) -> None:
    source = tiny_gguf("llama")
    # A checkpoint without any tokenizer files: everything must come from the source GGUF.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_hf("llama") / name, bare / name)
    out = write_gguf_from_checkpoint(
        bare, tmp_path / "carried.gguf", dtype="f32", source_gguf=source
    )
    a, b = gguf.GGUFReader(source), gguf.GGUFReader(out)
    for key, reader_field in a.fields.items():
        if key.startswith("tokenizer."):
            assert b.fields[key].contents() == reader_field.contents(), key


def test_source_gguf_of_another_model_is_refused(
    tmp_path: Path, tiny_hf: TinyHf, tiny_gguf: TinyGguf
) -> None:
    with pytest.raises(GGUFWriteError, match="not the GGUF this base was converted from"):
        write_gguf_from_checkpoint(
            tiny_hf("qwen2"), tmp_path / "x.gguf", source_gguf=tiny_gguf("gemma3")
        )


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(GGUFWriteError, match="gemma3, qwen2, llama"):
        write_gguf(
            tmp_path / "x.gguf",
            config={"model_type": "mamba"},
            state_dict={},
            tokenizer_dir=tmp_path,
        )
    assert not list(tmp_path.iterdir())


def test_gemma3_layer_pattern_llama_cpp_cannot_run_is_refused(
    tmp_path: Path, tiny_hf: TinyHf
) -> None:
    checkpoint = tmp_path / "odd"
    shutil.copytree(tiny_hf("gemma3"), checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["layer_types"] = ["full_attention", "full_attention"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFWriteError, match="layer pattern"):
        write_gguf_from_checkpoint(checkpoint, tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()


def test_corrupt_safetensors_is_reported(tmp_path: Path, tiny_hf: TinyHf) -> None:
    checkpoint = tmp_path / "broken"
    shutil.copytree(tiny_hf("qwen2"), checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GGUFWriteError, match="damaged"):
        write_gguf_from_checkpoint(checkpoint, tmp_path / "out.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]
