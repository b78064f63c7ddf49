"""Build a tiny, randomly initialised Llama and a locally trained tokenizer: no hub downloads.

    python scripts/real_vllm/build_model.py OUT_DIR

2 layers, hidden 128 (2 heads of 64: vLLM's CPU attention wants a head size it has kernels for),
vocab 1000, 512 positions. The weights are random (seeded), so the text it generates is noise;
the load driver asks for exact output lengths with `ignore_eos`.
"""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB = 1000
WORDS = ("the quick brown fox jumps over lazy dogs while seven wizards quietly judge boxing matches "
         "prefill decode mixed idle token prompt model server batch request span trace metric gpu").split()


def corpus(lines: int = 4000):
    import random
    rng = random.Random(1)
    for _ in range(lines):
        yield " ".join(rng.choice(WORDS) + ("" if rng.random() < 0.7 else str(rng.randint(0, 99)))
                       for _ in range(rng.randint(3, 20)))


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=512)
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    print(f"built {out}: vocab {config.vocab_size}, {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(Path(sys.argv[1]))
