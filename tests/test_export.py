"""The export stage on a tiny Llama trained in 4 bits: merged and GGUF exports reproduce the model the
evaluate stage scored, an adapter changed after evaluation publishes nothing, and the GGUF follows the
conventions transformers' GGUF loader (and llama.cpp) read: names, q/k permutation, tied embeddings,
tokenizer and chat template. Qwen2's mapping (biases, no permutation) is checked on a random model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.store.artifacts import Handle
from loraflow.config import build_config
from loraflow.stages.export import ExportParityError, wanted
from tests_support import export_adapter, write_examples
from loraflow.stages.gguf import GGUFExportError, check_supported, write_gguf
from test_flow_e2e import tiny_config


def with_export(cfg, **export):
    return build_config({**cfg.model_dump(mode="json"), "export": {**cfg.export.model_dump(mode="json"), **export}})


@pytest.fixture(scope="module")
def evaluated(tiny_llama_dir, tmp_path_factory):
    """The plain stages, trained and evaluated once: (cfg, tokenized, model, trained, scores, output dir)."""
    from loraflow.hardware import resolve
    from tests_support import build_model, evaluate_adapter, prepare_data, tokenize_data, train_adapter

    tmp = tmp_path_factory.mktemp("export")
    cfg = resolve(tiny_config(tmp, write_examples(tmp / "toy.jsonl"), tiny_llama_dir, max_steps=12, save_steps=12))
    out = tmp / "runs"
    data = prepare_data(cfg.data, out)
    tokenized = tokenize_data(data, cfg.prompt, cfg.model, out)
    model = build_model(cfg.model, cfg.quantization, cfg.lora, out)
    trained = train_adapter(cfg, tokenized, model, out)
    scores = evaluate_adapter(cfg, tokenized, model, trained, out)
    return cfg, tokenized, model, trained, scores, out


def test_merged_and_gguf_exports_pass_parity_and_load_as_a_user_would(evaluated):
    cfg, tokenized, model, trained, scores, out = evaluated
    exported = export_adapter(with_export(cfg, format="both"), tokenized, model, trained, scores, out)
    folder = Path(exported.path)
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"] is True and parity["format"] == "both" and parity["n"] == 8
    merged, gguf = parity["checks"]
    # the merged model is the scored model (dequantized NF4, the adapter beside it) up to the merge's rounding,
    # measured against the unmerged model, not against itself (on this random model bf16 flips a near-tie or two)
    assert merged["top1_agreement"] >= 0.95 and merged["greedy_exact_match"] >= 0.25
    assert merged["max_abs_logit_diff"] > 0.0
    assert gguf["label"] == "gguf q8_0" and gguf["top1_agreement"] >= 0.9 and gguf["tokenizer_match"] == 1.0
    assert gguf["chat_template_match"] is True and gguf["answer_positions"] > 8
    assert set(exported.info["files"]) == {"merged", "gguf"} and exported.info["size_mb"]["gguf"] > 0
    assert not (folder / "merged" / "adapter_config.json").exists()
    assert (folder / "gguf" / "Modelfile").read_text().startswith(f"FROM ./{cfg.run.name}-q8_0.gguf")

    # Loadable with plain transformers, peft unimportable, and its own generation config stops where the evaluate
    # stage stopped: plain `generate` gives what loraflow's generate with the evaluate stage's stop ids gives.
    import datasets

    from loraflow.config import EvalConfig
    from loraflow.stages.generation import generate
    from loraflow.stages.export import load_export

    row = datasets.load_from_disk(f"{tokenized.path}/dataset")["validation"][0]["prompt_ids"]
    loaded, loaded_tok = load_export(folder, "merged", exported.info["dtype"])
    reference = generate(loaded, loaded_tok, [row], EvalConfig(max_new_tokens=cfg.eval.max_new_tokens, batch_size=1),
                         "reference", list(scores.info["stop_token_ids"]))[0]
    script = (
        "import sys, json, torch; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder / 'merged')!r}, dtype=torch.{exported.info['dtype']})\n"
        f"t = AutoTokenizer.from_pretrained({str(folder / 'merged')!r})\n"
        f"ids = torch.tensor([{row}])\n"
        f"new = m.generate(input_ids=ids, max_new_tokens={cfg.eval.max_new_tokens}, do_sample=False)[0, ids.shape[1]:]\n"
        "print(json.dumps({'text': t.decode(new, skip_special_tokens=True).strip(), 'eos': m.generation_config.eos_token_id}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["text"] == reference
    assert set([result["eos"]] if isinstance(result["eos"], int) else result["eos"]) == set(scores.info["stop_token_ids"])


def test_the_gguf_tokenizer_round_trips_a_chat_prompt_and_q_k_are_permuted(evaluated, tmp_path):
    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    from loraflow.stages.export import merged_model
    from loraflow.stages.gguf import _permute

    cfg, tokenized, model, trained, scores, out = evaluated
    exported = export_adapter(with_export(cfg, format="gguf", gguf_type="f16"), tokenized, model, trained, scores, out)
    path = Path(exported.path) / exported.info["files"]["gguf"]
    assert exported.info["parity"]["checks"][0]["max_abs_logit_diff"] < 0.1  # f16 holds bf16/fp32 weights closely

    original = AutoTokenizer.from_pretrained(Path(trained.path) / "adapter")
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = [{"role": "user", "content": "Summarise: 3 goats crossed 12 rivers in 2024."}]
    ids = original.apply_chat_template(chat, add_generation_prompt=True)
    assert loaded.apply_chat_template(chat, add_generation_prompt=True) == ids
    assert loaded.decode(ids) == original.decode(ids) and "<|im_start|>" in loaded.decode(ids)

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert "<|im_start|>" in bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings: the loader ties them again
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    merged = merged_model(with_export(cfg), model, Path(trained.path) / "adapter")
    q = merged.state_dict()["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    stored = np.asarray(tensors["blk.0.attn_q.weight"].data, dtype=np.float32).reshape(q.shape)
    assert np.allclose(stored, _permute(q, merged.config.num_attention_heads), atol=1e-3)
    assert not np.allclose(stored, q, atol=1e-3)  # the permutation is not the identity on this shape


def test_an_adapter_changed_after_evaluation_fails_parity_and_publishes_nothing(evaluated, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, tokenized, model, trained, scores, out = evaluated
    altered = tmp_path / "train-altered"
    shutil.copytree(trained.path, altered)
    weights = altered / "adapter" / "adapter_model.safetensors"
    tensors = {k: (v * 4 if "lora_B" in k else v) for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    handle = Handle(stage="train", path=str(altered), fingerprint=trained.fingerprint, info=trained.info)
    export_cfg = with_export(cfg, parity_samples=8, gguf_type="bf16")
    from loraflow import store
    from loraflow.hardware import resolve

    key = store.export_key(resolve(export_cfg), scores.fingerprint).key
    report = out / "export" / f"{key}.rejected.json"
    with pytest.raises(ExportParityError, match=r"export parity failed for merged .* worst prompt: validation row \d+ "
                                                rf".*nothing published.* \(report: {re.escape(str(report))}\)$"):
        export_adapter(export_cfg, tokenized, model, handle, scores, out)
    assert not (out / "export" / key).exists()
    rejected = json.loads(report.read_text())
    assert rejected["passed"] is False and rejected["checks"][0]["failures"]


def _random(arch: str, tokenizer_dir: Path, out: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = kinds[arch]
    config = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=arch == "llama", initializer_range=0.1)
    torch.manual_seed(1)
    model = model_cls(config).eval()
    if arch == "qwen2":  # random biases: zero ones would not show a bias written to the wrong tensor
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5)
    tok.save_pretrained(out)
    return model, tok


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_random_model_written_as_gguf_loads_back_with_the_same_logits(arch, gpt2_tokenizer_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = _random(arch, gpt2_tokenizer_dir, tmp_path)
    path = write_gguf(model, tok, tmp_path, tmp_path / f"{arch}.gguf", "f16", arch)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert loaded.config.model_type == arch and loaded.config.tie_word_embeddings == (arch == "llama")
    ids = torch.tensor([tok("The goat crossed the river at dawn, twice.")["input_ids"]])
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (a - b).abs().max() < 2e-2 * a.abs().max(), (a - b).abs().max()  # f16 rounding only
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_a_llama_2_style_sentencepiece_tokenizer_round_trips_through_gguf(tmp_path):
    """Byte-fallback BPE pieces (what Llama 2's tokenizer.json holds) go out as `tokenizer.ggml.model = llama`
    and come back through transformers' GGUF loader with the same ids, BOS behaviour included."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    from loraflow.stages.gguf import tokenizer_model

    texts = [f"Report {i}: we saw a blue goat near the old river bank at dawn, {i * 7} times." for i in range(300)]
    spm = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    spm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    spm.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False))
    LlamaTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_model(tmp_path) == ("llama", None)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = write_gguf(LlamaForCausalLM(config).eval(), tok, tmp_path, tmp_path / "spm.gguf", "f16", "spm")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ("Report 12: we saw a blue goat", "h\u00e9llo w\u00f6rld \U0001F600 at dawn", "two  spaces"):
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text


def test_models_gguf_cannot_describe_are_refused_in_one_line(gpt2_tokenizer_dir, tmp_path):
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(GGUFExportError, match=r"model type 'gpt2' is not mapped .* use export.format=merged"):
        check_supported(GPT2Config(), gpt2_tokenizer_dir)
    scaled = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                                 "rope_theta": 10000.0})
    with pytest.raises(GGUFExportError, match=r"RoPE scaling 'linear' .* use export.format=merged"):
        check_supported(scaled, gpt2_tokenizer_dir)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}, "decoder": {}}))
    with pytest.raises(GGUFExportError, match=r"tokenizer model 'Unigram' .* use export.format=merged"):
        check_supported(LlamaConfig(hidden_size=64, num_attention_heads=4), tmp_path)


def test_export_enabled_auto_means_after_a_promotion_in_retraining_only():
    cfg = build_config({})
    assert cfg.export.enabled == "auto" and "enabled" in cfg.export.run_only()
    assert not wanted(cfg.export, "finetune") and not wanted(cfg.export, "retrain", promoted=False)
    assert wanted(cfg.export, "retrain", promoted=True)
    on = with_export(cfg, enabled=True).export
    assert wanted(on, "finetune") and not wanted(on, "retrain", promoted=False)
    assert not wanted(with_export(cfg, enabled=False).export, "retrain", promoted=True)
