"""A character-level tokenizer for the embedded default, built locally with `tokenizers`.

Every printable ASCII character (32..126) and the newline is one token; `<pad>`, `<bos>` and
`<eos>` are ids 0, 1, 2. Encoding a text with special tokens prepends `<bos>`. The result is a
`transformers.PreTrainedTokenizerFast`, so it saves and reloads with `save_pretrained` /
`AutoTokenizer.from_pretrained` like any Hugging Face tokenizer. Nothing is downloaded.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The default character-level tokenizer (99 tokens: 3 special + newline + 95 printable)."""
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # One token per character; `[\s\S]` matches the newline too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
