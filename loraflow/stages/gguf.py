"""Write a merged model as one GGUF file, with the `gguf` package's writer (it ships no converter: the
mapping from a transformers model to GGUF is here).

Supported: Llama-architecture models with default RoPE (SmolLM2, Llama 2/3-style) and Qwen2, with a
byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) or a Llama sentencepiece-style one (`llama`).
Everything else is refused by `check_supported` with a one-line reason, before any work.

GGUF conventions followed (what llama.cpp and transformers' GGUF loader expect):
- tensor names from `gguf.get_tensor_name_map` (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`);
- for `llama`, the q and k projections are permuted from transformers' rotate-half layout to the interleaved
  one (`_permute`; transformers' loader undoes it); Qwen2 is written unpermuted;
- 1-D tensors (norms, biases) stay f32; 2-D weights take `export.gguf_type` (q8_0 needs rows of 32: a
  tensor whose rows are not a multiple of 32 falls back to f16);
- no `output.weight` when the embeddings are tied (the loader ties them again);
- the tokenizer's tokens, types (special added tokens are CONTROL) and merges, its special ids and the chat
  template go into the metadata (`gguf.SpecialVocab`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCHES = {"llama": "LLAMA", "qwen2": "QWEN2"}
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
TENSOR_TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF; the message says why and what to use instead."""


def rope_type(config) -> tuple[str, float]:
    """(rope type, theta) of a transformers config, across the 4.x (`rope_scaling`) and 5.x (`rope_parameters`) spellings."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return kind, float(theta)


def check_supported(config, tokenizer_dir: Path) -> None:
    """Raise `GGUFExportError` unless this model maps to GGUF here (architecture, RoPE, shapes, tokenizer)."""
    arch = config.model_type
    fix = "use export.format=merged (a transformers folder) for this model"
    if arch not in ARCHES:
        raise GGUFExportError(f"export.format=gguf: model type '{arch}' is not mapped to GGUF here (only "
                              f"{' and '.join(sorted(ARCHES))}): {fix}")
    kind, _ = rope_type(config)
    if kind != "default":
        raise GGUFExportError(f"export.format=gguf: RoPE scaling '{kind}' is not written to GGUF here (default RoPE "
                              f"only): {fix}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim * heads != config.hidden_size:
        raise GGUFExportError(f"export.format=gguf: head_dim {head_dim} x {heads} heads != hidden size "
                              f"{config.hidden_size} is not written to GGUF here: {fix}")
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise GGUFExportError(f"export.format=gguf: a Llama model with attention/MLP biases is not written here: {fix}")
    tokenizer_model(tokenizer_dir)  # raises for a tokenizer we cannot describe


def tokenizer_model(tokenizer_dir: Path) -> tuple[str, str | None]:
    """(`tokenizer.ggml.model`, `tokenizer.ggml.pre`) for the tokenizer in `tokenizer_dir`."""
    try:
        spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    except (OSError, ValueError):
        raise GGUFExportError("export.format=gguf needs a fast tokenizer (tokenizer.json) in the model folder: "
                              "re-save the tokenizer with transformers, or use export.format=merged") from None
    model, decoder = spec.get("model", {}), spec.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder.get("type") == "Sequence":
        return "llama", None  # Llama 2-style: sentencepiece pieces with byte fallback
    if model.get("type") == "BPE" and decoder.get("type") == "ByteLevel":
        pre = _pre_tokenizer(spec.get("pre_tokenizer") or {})
        if pre is None:
            raise GGUFExportError("export.format=gguf: the tokenizer's pre-tokenizer "
                                  f"({json.dumps(spec.get('pre_tokenizer'))[:120]}) has no llama.cpp name known here: "
                                  "use export.format=merged")
        return "gpt2", pre
    raise GGUFExportError(f"export.format=gguf: tokenizer model '{model.get('type')}' is not written to GGUF here "
                          "(byte-level BPE and Llama sentencepiece-style only): use export.format=merged")


def _pre_tokenizer(pre: dict[str, Any]) -> str | None:
    """The llama.cpp name of a byte-level BPE pre-tokenizer: GPT-2's own regex, SmolLM's digit split, or a
    split regex that transformers' GGUF loader knows by name (Llama 3, Qwen2, ...)."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split" and "ByteLevel" in kinds:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            return None
        names = [name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern]
        for preferred in ("llama-bpe", "qwen2"):
            if preferred in names:
                return preferred
        return names[0] if names else None
    return None


def _permute(weight, n_head: int):
    """transformers' rotate-half q/k rows -> the interleaved pairs llama.cpp's `llama` RoPE expects."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(array, gguf_type: str):
    """(data, raw dtype or None) of one tensor in the file: 1-D in f32, 2-D in `gguf_type`."""
    import gguf
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1:
        return array, None
    if gguf_type == "f16" or (gguf_type == "q8_0" and array.shape[-1] % 32):
        return array.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, TENSOR_TYPES[gguf_type])
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, gguf_type: str, name: str) -> Path:
    """Write `model` (a merged transformers causal LM) and its tokenizer (saved in `tokenizer_dir`) to `path`."""
    import gguf

    config = model.config
    check_supported(config, tokenizer_dir)
    arch = getattr(gguf.MODEL_ARCH, ARCHES[config.model_type])
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope_type(config)[1])
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, Path(tokenizer_dir), config.vocab_size)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # the loader ties output to token_embd again
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(f"export.format=gguf: no GGUF name for tensor '{hf_name}': use export.format=merged")
        array = tensor.detach().float().cpu().numpy()
        if config.model_type == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            array = _permute(array, heads if "q_proj" in hf_name else kv_heads)
        data, raw = _encode(array, gguf_type)
        writer.add_tensor(target, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tokenizer, tokenizer_dir: Path, vocab_size: int) -> None:
    """Tokens in id order with their types, merges, special ids and the chat template."""
    import gguf

    kind, pre = tokenizer_model(tokenizer_dir)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # an embedding row with no token (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    if kind == "llama":  # sentencepiece-style: byte pieces are BYTE, scores favour earlier (more frequent) pieces
        types = [gguf.TokenType.BYTE if t == gguf.TokenType.NORMAL and len(s) == 6 and s.startswith("<0x") and s.endswith(">")
                 else t for s, t in zip(tokens, types)]
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=kind == "gpt2", n_vocab=len(tokens))
    special.chat_template = tokenizer.chat_template  # the template the adapter was trained with
    # what the tokenizer does, not what a loader would default to (transformers adds a BOS for `llama` otherwise)
    probe = tokenizer("a")["input_ids"]
    for kind_, token_id, ends in (("bos", tokenizer.bos_token_id, probe[:1]), ("eos", tokenizer.eos_token_id, probe[-1:])):
        special.add_special_token[kind_] = token_id is not None and len(probe) > 1 and ends == [token_id]
    special.add_to_gguf(writer, quiet=True)
