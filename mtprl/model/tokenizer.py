"""A character-level tokenizer for the embedded default, built locally with `tokenizers`.

Every printable ASCII character (32..126) and the newline is one token; `<pad>`, `<bos>` and
`<eos>` are ids 0, 1, 2. Encoding a text with special tokens prepends `<bos>`. The result is a
`transformers.PreTrainedTokenizerFast`, so it saves and reloads with `save_pretrained` /
`load_tokenizer` (not `AutoTokenizer`: for a model directory whose config says `qwen2`,
transformers 5 swaps in Qwen2's own byte-level tokenizer class, which splits our text differently
and drops spaces). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

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


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model directory: ours as it was built, any other through AutoTokenizer."""
    spec = Path(path) / "tokenizer.json"
    if spec.is_file() and json.loads(spec.read_text()).get("model", {}).get("type") == "WordLevel":
        # Our character-level tokenizer. AutoTokenizer would pick the class of the model type in
        # config.json (Qwen2Tokenizer for the tiny default) and re-split the text its own way.
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
