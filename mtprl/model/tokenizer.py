"""A character-level tokenizer for the embedded default, built locally with `tokenizers`.

Every printable ASCII character (32..126) and the newline is one token; `<pad>`, `<bos>` and
`<eos>` are ids 0, 1, 2. Encoding a text with special tokens prepends `<bos>`. The result is a
`transformers.PreTrainedTokenizerFast`, so it saves and reloads with `save_pretrained`. Nothing is
downloaded.

It is stored as a byte-level BPE without merges, in exactly the pipeline of Qwen2's tokenizer
(NFC, Qwen2's split pattern, byte-level pre-tokenizer and decoder): `AutoTokenizer` on a saved
qwen2 model directory replaces the saved pipeline with Qwen2's own (transformers 5 ignores the
declared class for qwen2), so any other pipeline would be re-split on load by vLLM and every HF
tool. In the byte-level alphabet the space is `Ġ` and the newline `Ċ`, every other printable
character is itself, and with no merges each character stays one token. Directories written by
mtprl 0.1 hold the same ids as a `WordLevel` model; `load_tokenizer` still reads them, and
`export_tokenizer` converts them for a checkpoint other tools read.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
# Qwen2's pre-tokenizer split pattern (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _byte_level(ch: str) -> str:
    """The byte-level alphabet's symbol for one ASCII character (GPT-2's bytes_to_unicode)."""
    b = ord(ch)
    return ch if 33 <= b <= 126 else chr(256 + b if b < 33 else b)  # ' ' -> 'Ġ', '\n' -> 'Ċ'


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The default character-level tokenizer (99 tokens: 3 special + newline + 95 printable)."""
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in CHARACTERS:
        vocab[_byte_level(ch)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=None, padding_side="left",
        add_bos_token=True,
    )


def is_legacy_tokenizer(tokenizer) -> bool:
    """Whether `tokenizer` is mtprl 0.1's WordLevel form of the default character tokenizer (same ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str()).get("model", {}).get("type") != "WordLevel":
        return False
    ours = {PAD: 0, BOS: 1, EOS: 2, **{ch: 3 + i for i, ch in enumerate(CHARACTERS)}}
    return tokenizer.get_vocab() == ours


def export_tokenizer(tokenizer):
    """The tokenizer to save beside an exported model: the default's in its byte-level form, others as they are."""
    return build_tokenizer() if is_legacy_tokenizer(tokenizer) else tokenizer


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model directory: mtprl 0.1's WordLevel one as it was built, any other
    (the default's byte-level form included) through AutoTokenizer."""
    spec = Path(path) / "tokenizer.json"
    if spec.is_file() and json.loads(spec.read_text()).get("model", {}).get("type") == "WordLevel":
        # AutoTokenizer would pick the class of the model type in config.json (Qwen2Tokenizer
        # for the tiny default) and re-split the text its own way.
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
