"""Small GPT-2-architecture checkpoints built offline, for tests and benchmarks.

They are saved the way a user's checkpoint is (config.json, model.safetensors, tokenizer.json),
so the real loading path runs on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

WORDS = (
    "When Mary and John went to the store shops park , gave a drink bag ball to . Tom James Dan "
    "Sid Amy Martin Michelle Jones Smith was top student she he they 're are king queen said that"
).split()


def word_tokenizer(words: Sequence[str]):
    """A word-level fast tokenizer over ``<bos> <unk> + words`` (whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<bos>", "<unk>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                                   unk_token="<unk>")


def save_tiny_checkpoint(path: str | Path, n_layer: int = 2, n_head: int = 4, n_embd: int = 32,
                         words: Sequence[str] = WORDS, n_positions: int = 64, seed: int = 0,
                         ) -> Path:
    """A randomly initialised GPT-2 with a word-level tokenizer, saved as safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = word_tokenizer(words)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=n_head, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_rich_checkpoint(path: str | Path, n_layer: int = 3, seed: int = 0) -> Path:
    """A tiny GPT-2 whose LayerNorms and biases are not the init defaults (folding matters)."""
    import torch
    from transformers import GPT2LMHeadModel

    save_tiny_checkpoint(path, n_layer=n_layer, seed=seed)
    model = GPT2LMHeadModel.from_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return Path(path)
