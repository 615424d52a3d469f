"""A small CLIP BPE vocabulary: every byte (so any text tokenizes) plus one token per caption word.

Written as the standard ``vocab.json`` + ``merges.txt`` pair, so ``CLIPTokenizer`` loads it exactly like the
real SD 1.x tokenizer; only the merge table is ours. Each caption word ends up as a single token; other text
falls back to shorter pieces down to single bytes.
"""

from __future__ import annotations

from pathlib import Path

from hediff.common.models import tiny_clip_vocab, write_clip_tokenizer


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])) if (a, b) in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which every word becomes a single token.

    A word is run through BPE with the merges so far; while it stays in several pieces, the merge of its first
    two pieces is appended. Appended merges rank last, so they never change how an earlier word tokenizes.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces := _bpe(pieces, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = tiny_clip_vocab()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = [t for t in base if t not in specials]
    merges = word_merges(words)
    for a, b in merges:
        merged = a + b
        if merged not in tokens:
            tokens.append(merged)
    tokens += specials
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, words: list[str]) -> None:
    vocab, merges = build_vocab(words)
    write_clip_tokenizer(folder, vocab, merges)
