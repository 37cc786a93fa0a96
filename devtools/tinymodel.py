"""Build a tiny random Llama model and LoRA adapter on disk for real-engine tests.

Nothing is downloaded: weights are random, the tokenizer is a byte-level BPE trained on a
few sentences. Output is gibberish, but lengths, streaming, metrics and LoRA are real.
Other test suites (clients, LoRA) reuse `build_tiny_model` and `build_tiny_lora`.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes operators reconcile desired state with observed state.",
    "vLLM serves large language models with paged attention.",
    "Hello, how are you today? I am fine, thank you.",
    "A system message sets the behaviour of the assistant.",
    "Streaming responses send tokens as soon as they are generated.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "user assistant system tool function json yaml python",
] * 20

VOCAB_SIZE = 512
MAX_POSITIONS = 1024


def _ascii_alphabet() -> list[str]:
    """Byte-level symbols of printable ASCII, tab and newline only.

    With no symbol for bytes >= 0x80 every token decodes to whole characters, so the
    detokenizer never holds text back waiting for the rest of a UTF-8 sequence: random
    weights then still stream one text event per token. (Non-ASCII input is dropped.)
    """
    # GPT-2's byte -> symbol table, as used by the ByteLevel pre-tokenizer.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    wanted = [*range(0x20, 0x7F), 0x09, 0x0A]
    return [table[b] for b in wanted]


def build_tiny_model(
    path: str | Path,
    seed: int = 0,
    max_positions: int = MAX_POSITIONS,
    hidden_size: int = 128,
    layers: int = 2,
) -> Path:
    """Write a random LlamaForCausalLM (hidden 128, 2 heads, 2 layers) and its tokenizer.

    `max_positions` is the longest context it accepts (vLLM's default max-model-len); the
    weights do not depend on it, so a longer one costs nothing until a prompt uses it. A larger
    `hidden_size` (a multiple of 64: one head per 64, two KV heads) or more `layers` make each
    token cost more, for benchmarks in which prefill has to weigh like a real model's.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if hidden_size % 64 or hidden_size < 128:
        raise ValueError(f"hidden_size must be a multiple of 64 and at least 128, not {hidden_size}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=_ascii_alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_positions,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,  # head_dim 64: the CPU attention kernels refuse 16
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",  # type: ignore[call-arg]  # the spelling every measured run used
    )
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(out, safe_serialization=True)
    # Keep generation_config neutral: vLLM reads its defaults from it.
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id})
    )
    return out


def build_tiny_lora(model_path: str | Path, out_path: str | Path, rank: int = 8, seed: int = 1) -> Path:
    """Write a rank-`rank` LoRA on q_proj/v_proj with random B so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    out = Path(out_path)
    if (out / "adapter_config.json").exists():
        return out
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(str(model_path), torch_dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft zero-inits B: randomize so the adapter matters
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    import sys

    m = build_tiny_model(sys.argv[1])
    if len(sys.argv) > 2:
        build_tiny_lora(m, sys.argv[2])
    print(m)
