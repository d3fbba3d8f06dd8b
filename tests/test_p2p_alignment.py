"""Needleman-Wunsch token alignment for Prompt-to-Prompt refine, against alignments written by hand
(with the configured scores, synthesis.attention.google.align: match +1, mismatch -1, gap 0)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ip2p.synthesis.p2p_alignment import needleman_wunsch, refine_map, replace_map
from ip2p.synthesis.run import settings_from_config

BOS, EOS = 900, 901


@pytest.fixture
def scores(cfg):
    """The alignment scores of the composed config (their one home)."""
    scores = settings_from_config(cfg).align
    assert (scores.match, scores.mismatch, scores.gap) == (1.0, -1.0, 0.0)  # what the hand alignments assume
    return scores


def test_identical_sequences_align_position_by_position(scores):
    x = [BOS, 5, 6, 7, EOS]
    assert needleman_wunsch(x, x, scores) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]


def test_word_swap_is_a_deletion_plus_an_insertion(scores):
    # "a photo of a cat" -> "a photo of a dog": with gap 0 < mismatch -1 the new word is unmatched
    x = [BOS, 1, 2, 3, 1, 10, EOS]
    y = [BOS, 1, 2, 3, 1, 20, EOS]
    assert needleman_wunsch(x, y, scores) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, -1), (6, 6)]


def test_insertion_in_the_middle(scores):
    # "a cat on a sofa" -> "a black cat on a sofa"
    x = [BOS, 1, 10, 11, 1, 12, EOS]
    y = [BOS, 1, 30, 10, 11, 1, 12, EOS]
    assert needleman_wunsch(x, y, scores) == [(0, 0), (1, 1), (2, -1), (3, 2), (4, 3), (5, 4), (6, 5), (7, 6)]


def test_deletion(scores):
    # "a big red car" -> "a car": the dropped input words have no partner, every output word has one
    x = [BOS, 1, 40, 41, 42, EOS]
    y = [BOS, 1, 42, EOS]
    assert needleman_wunsch(x, y, scores) == [(0, 0), (1, 1), (2, 4), (3, 5)]


def test_multi_token_swap_with_different_lengths(scores):
    # "a dog in snow" -> "a golden retriever in snow" where the new words take three tokens
    x = [BOS, 1, 50, 51, 52, EOS]
    y = [BOS, 1, 60, 61, 62, 51, 52, EOS]
    assert needleman_wunsch(x, y, scores) == [(0, 0), (1, 1), (2, -1), (3, -1), (4, -1), (5, 3), (6, 4), (7, 5)]


def test_ties_prefer_a_match_step(scores):
    # x = "a" after BOS; y repeats it: the traceback (from the end) takes the diagonal first,
    # so the input "a" pairs with the LAST "a" of the output
    x = [BOS, 1, EOS]
    y = [BOS, 1, 1, EOS]
    assert needleman_wunsch(x, y, scores) == [(0, 0), (1, -1), (2, 1), (3, 2)]


def test_mismatch_steps_appear_when_scored_above_two_gaps(scores):
    # with gap -2 a substitution (-1) beats deleting + inserting (-4): the swap maps in place
    x = [BOS, 1, 10, EOS]
    y = [BOS, 1, 20, EOS]
    assert needleman_wunsch(x, y, dataclasses.replace(scores, gap=-2.0)) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_refine_map_mapper_alphas_and_padding(scores):
    x = [BOS, 1, 10, 11, EOS]                 # "a cat sleeps"
    y = [BOS, 1, 30, 10, 11, EOS]             # "a black cat sleeps"
    tm = refine_map(x, y, max_len=10, scores=scores)
    # output position -> input position, by hand; padding (6..9) follows the input's padding (5..8)
    assert tm.mapper.tolist() == [0, 1, 0, 2, 3, 4, 5, 6, 7, 8]
    assert tm.alphas.tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert tm.changed_output == [2]
    assert tm.changed_input == []
    assert tm.mapper.dtype == torch.int64


def test_refine_map_changed_words_of_a_swap(scores):
    x = [BOS, 1, 10, EOS]
    y = [BOS, 1, 20, EOS]
    tm = refine_map(x, y, max_len=6, scores=scores)
    assert tm.mapper.tolist() == [0, 1, 0, 3, 4, 5]
    assert tm.alphas.tolist() == [1, 1, 0, 1, 1, 1]
    assert tm.changed_input == [2] and tm.changed_output == [2]


def test_padding_is_clipped_to_the_last_position(scores):
    x = [BOS, 1, 2, 3, 4, EOS]  # longer input: output padding would run past max_len
    y = [BOS, 4, EOS]
    tm = refine_map(x, y, max_len=8, scores=scores)
    assert tm.mapper.tolist() == [0, 4, 5, 6, 7, 7, 7, 7]


def test_replace_map_is_the_identity_and_marks_swapped_tokens():
    tm = replace_map([BOS, 1, 10, EOS], [BOS, 1, 20, EOS], max_len=5)
    assert tm.mapper.tolist() == [0, 1, 2, 3, 4]
    assert tm.alphas.tolist() == [1, 1, 1, 1, 1]
    assert tm.changed_input == [2] and tm.changed_output == [2]


def test_alignment_of_real_captions_with_the_tiny_tokenizer(scores, tiny_base):
    """Hand alignment at word level, expanded to tokens with each word's own token count."""
    tok = tiny_base.tokenizer

    def words_to_tokens(words):
        return [tok(w, add_special_tokens=False).input_ids for w in words]

    cases = [
        # (input words, output words, output word -> input word by hand, None = inserted)
        ("a photo of a cat".split(), "a photo of a dog".split(), [0, 1, 2, 3, None]),
        ("a cat on the street".split(), "a cat on the wet street".split(), [0, 1, 2, 3, None, 4]),
        ("a red car on the street".split(), "a car on the street".split(), [0, 2, 3, 4, 5]),
    ]
    for x_words, y_words, hand in cases:
        x_tok, y_tok = words_to_tokens(x_words), words_to_tokens(y_words)
        # the swapped / inserted words share no token with the others (so the hand answer is unique)
        x_ids = [tok.bos_token_id] + [t for w in x_tok for t in w] + [tok.eos_token_id]
        y_ids = [tok.bos_token_id] + [t for w in y_tok for t in w] + [tok.eos_token_id]
        assert x_ids == tok(" ".join(x_words)).input_ids and y_ids == tok(" ".join(y_words)).input_ids
        x_start = [1 + sum(len(w) for w in x_tok[:i]) for i in range(len(x_tok))]
        expected = [(0, 0)]
        j = 1
        for wi, w in enumerate(y_tok):
            for t in range(len(w)):
                expected.append((j, -1 if hand[wi] is None else x_start[hand[wi]] + t))
                j += 1
        expected.append((j, len(x_ids) - 1))
        assert needleman_wunsch(x_ids, y_ids, scores) == expected, (x_words, y_words)
