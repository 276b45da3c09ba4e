"""bench/fidelity.py cannot rot: a tiny LLaMA written as a GGUF (as llama.cpp lays one out: q/k rows permuted for
its rotary layout, tied head, a byte-level BPE tokenizer with a chat template) converts into a checkpoint with the
very same logits, and the bench trains every method family on it through train_llama.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, script_environment, tiny_llama

gguf = pytest.importorskip("gguf", reason="the gguf package (dev and bench extras) writes the test's GGUF file")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes: the vocabulary of a byte-level BPE without merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


TOKENS = [*SPECIAL, *byte_level_alphabet(), "Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved), which a GGUF reader must undo."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(TOKENS))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    for index, layer in enumerate(model.model.layers):
        for hf_name, gguf_name in names.items():
            weight = layer.get_submodule(hf_name).weight.detach()
            if hf_name.endswith(("q_proj", "k_proj")):
                heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
                weight = llama_cpp_permute(weight, heads)
            writer.add_tensor(f"blk.{index}.{gguf_name}.weight", weight.contiguous().numpy())
    writer.add_tensor("output_norm.weight", model.model.norm.weight.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = tiny_llama(vocab_size=len(TOKENS), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, path)
    return model, path


def test_the_conversion_keeps_the_logits_and_the_tokenizer(tiny_gguf, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from fidelity import convert_gguf
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, path = tiny_gguf
    checkpoint = convert_gguf(path, tmp_path / "converted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # nothing half-written beside it
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    converted = AutoModelForCausalLM.from_pretrained(checkpoint).eval()  # a plain checkpoint: no gguf_file
    ids = torch.tensor([[1, 40, 7, 99, 3, 250, 17, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = "Give the answer: the cat sat."
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded) == text and TOKENS.index("Ġthe") in encoded
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template == CHAT_TEMPLATE


def test_the_bench_trains_each_method_family_through_train_llama(tiny_gguf, tmp_path):
    """Two steps (the first is warm-up at lr 0) each of LoRA, NOLA and VeRA on the converted checkpoint, in the
    bench's own protocol (200 held-out records), with the JSON, table and plot a user's sweep writes."""
    _, path = tiny_gguf
    records = [{"instruction": f"Add {i} and {i + 3}.", "input": "", "output": f"The sum is {2 * i + 3}."}
               for i in range(240)]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    out = tmp_path / "results" / "fidelity.json"
    command = [sys.executable, "bench/fidelity.py", "--gguf", str(path), "--methods", "lora-r1,nola-k8,vera",
               "--seeds", "0", "--steps", "2", "--data", str(tmp_path / "alpaca.json"), "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=script_environment(tmp_path / "cache"),
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "cache" / "tiny-hf" / "model.safetensors").is_file()  # converted once, cached
    runs = json.loads(out.read_text())["runs"]
    assert [run["method"] for run in runs] == ["lora-r1", "nola-k8", "vera"]
    for run in runs:
        assert set(run) == {"method", "seed", "trainable_params", "first_eval_loss", "final_eval_loss", "lr",
                            "steps", "seconds", "rank", "alpha"}
        assert run["steps"] == 2 and run["final_eval_loss"] != run["first_eval_loss"]
    assert len({run["first_eval_loss"] for run in runs}) == 1  # the same held-out records for every run
    assert runs[1]["trainable_params"] == 2 * 8 * 7 * 2  # k_A + k_B per matrix, 7 matrices, 2 layers
    assert out.with_suffix(".png").stat().st_size > 0 and "nola-k8" in completed.stdout
    again = subprocess.run([*command, "--resume"], cwd=REPO_ROOT, env=script_environment(tmp_path / "cache"),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("kept ") == 3  # a finished run is not redone
    assert json.loads(out.read_text())["runs"] == runs
