"""Train a CLIP-format byte-level BPE tokenizer (vocab.json + merges.txt) on our own text, offline.

The files follow the layout of OpenAI CLIP's tokenizer so that transformers' `CLIPTokenizer` and
`CLIPTokenizerFast` load them unchanged: the 256 byte symbols, the same 256 with the end-of-word
marker `</w>`, one entry per learned merge, then `<|startoftext|>` and `<|endoftext|>`.
Words are split with CLIP's own pre-tokenisation pattern, so what we train on is what CLIP sees.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

END_OF_WORD = "</w>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits,
# and runs of other non-space symbols.
_WORD_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\s a-zA-Z0-9]+""",
    re.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table: every byte gets a visible, non-space symbol."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def split_words(text: str) -> list[str]:
    """Lower-case, squash whitespace and split like CLIP, each word as byte symbols."""
    byte_symbol = bytes_to_unicode()
    text = re.sub(r"\s+", " ", text).strip().lower()
    return ["".join(byte_symbol[b] for b in w.encode("utf-8")) for w in _WORD_PATTERN.findall(text)]


def train_bpe(texts: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to `num_merges` BPE merges, most frequent adjacent pair first (ties: smallest pair)."""
    word_counts = collections.Counter(w for t in texts for w in split_words(t))
    # Each word is a tuple of symbols; the last symbol carries the end-of-word marker, as in CLIP.
    words = {tuple(w[:-1]) + (w[-1] + END_OF_WORD,): c for w, c in word_counts.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: collections.Counter = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        merged_words = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged_words[tuple(out)] = merged_words.get(tuple(out), 0) + count
        words = merged_words
    return merges


def write_clip_tokenizer(texts: list[str], out_dir: str | Path, num_merges: int, model_max_length: int = 77) -> Path:
    """Train on `texts` and write vocab.json, merges.txt and the tokenizer configs into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = train_bpe(texts, num_merges)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + END_OF_WORD for s in symbols]
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return out_dir
