"""Tests of layerwatch.probe.augment: token-level augmented views (SPEC §2)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from layerwatch.probe.augment import augment_batch, make_views, max_view_length, right_align, view_generator

BOS, EOS, PAD = 1, 2, 0
SPECIAL = (PAD, BOS, EOS)
VOCAB = 1000


def _batch(lengths: list[int], *, width: int | None = None, left: bool = False, seed: int = 0):
    """Prompts ``[BOS, content..., EOS]`` of the given real lengths, padded with PAD on one side."""
    generator = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        content = torch.randint(3, VOCAB, (length,), generator=generator)
        content[0] = BOS
        content[-1] = EOS
        where = slice(width - length, width) if left else slice(0, length)
        ids[row, where] = content
        mask[row, where] = 1
    return ids, mask


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _expected_k(t_eff: int, fraction: float = 0.3) -> int:
    return 0 if t_eff == 0 else min(t_eff, max(1, math.ceil(round(fraction * t_eff, 9))))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _is_subsequence(short: list[int], long: list[int]) -> bool:
    iterator = iter(long)
    return all(any(token == other for other in iterator) for token in short)


LENGTHS = [12, 3, 7, 40, 25, 2, 1]


def test_deterministic_per_seed_and_different_across_seeds():
    ids, mask = _batch(LENGTHS)
    kwargs = dict(num_views=3, vocab_size=VOCAB, special_token_ids=SPECIAL)
    first = make_views(ids, mask, generator=_gen(7), **kwargs)
    again = make_views(ids, mask, generator=_gen(7), **kwargs)
    other = make_views(ids, mask, generator=_gen(8), **kwargs)
    for (a_ids, a_mask), (b_ids, b_mask) in zip(first, again):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # Views drawn one after another from one generator differ from each other.
    assert not torch.equal(first[0][0], first[1][0])


def test_global_rng_state_unchanged():
    ids, mask = _batch(LENGTHS)
    torch_state = torch.get_rng_state()
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    make_views(ids, mask, num_views=4, vocab_size=VOCAB, generator=_gen(0), special_token_ids=SPECIAL)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    new_numpy_state = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(new_numpy_state, numpy_state))


def test_shapes_masks_and_lengths_are_consistent():
    ids, mask = _batch(LENGTHS)
    for view_ids, view_mask in make_views(
        ids, mask, num_views=3, vocab_size=VOCAB, generator=_gen(1), special_token_ids=SPECIAL, pad_token_id=PAD
    ):
        assert view_ids.dtype == torch.long and view_mask.dtype == torch.long
        assert view_ids.shape == view_mask.shape and view_ids.shape[0] == len(LENGTHS)
        lengths = view_mask.sum(dim=1)
        # Right-padded: the mask is 1 exactly on the first `length` positions, padding is PAD.
        expected_mask = (torch.arange(view_ids.shape[1])[None, :] < lengths[:, None]).long()
        assert torch.equal(view_mask, expected_mask)
        assert bool((view_ids[view_mask == 0] == PAD).all())
        assert view_ids.shape[1] == int(lengths.max())
        for row, length in enumerate(LENGTHS):
            t_eff = max(0, length - 2)  # BOS and EOS are not editable
            assert int(lengths[row]) == length + _expected_k(t_eff)


def test_bos_and_special_tokens_untouched_and_never_drawn():
    ids, mask = _batch(LENGTHS)
    ids[0, 5] = EOS  # a special id in the middle of a prompt
    ids[3, 10] = PAD  # the pad id as a real (masked-in) token is special too
    special_before = [[t for t in row if t in SPECIAL] for row in _rows(ids, mask)]
    for view_ids, view_mask in make_views(
        ids, mask, num_views=5, vocab_size=VOCAB, generator=_gen(2), special_token_ids=SPECIAL
    ):
        rows = _rows(view_ids, view_mask)
        assert [row[0] for row in rows] == ids[:, 0].tolist()
        # Special tokens keep their order and count: none was edited, none was drawn as a random token.
        assert [[t for t in row if t in SPECIAL] for row in rows] == special_before


def test_random_tokens_come_from_the_non_special_vocabulary():
    vocab = 6
    ids = torch.tensor([[BOS, 3, 4, 5, 3, 4, 5, 3, 4, EOS]])
    for view_ids, _ in make_views(ids, num_views=20, vocab_size=vocab, generator=_gen(3), special_token_ids=SPECIAL):
        assert set(view_ids[0, 1:-1].tolist()) <= {3, 4, 5}


def test_position_zero_never_edited_even_if_not_special():
    ids = torch.tensor([[17, 5, 6, 7, 8, 9]])  # no special tokens at all
    for view_ids, _ in make_views(ids, num_views=20, vocab_size=VOCAB, generator=_gen(4)):
        assert int(view_ids[0, 0]) == 17


def test_split_inserts_exactly_k_tokens_after_editable_positions():
    ids, mask = _batch(LENGTHS)
    view_ids, view_mask = augment_batch(
        ids, mask, vocab_size=VOCAB, generator=_gen(5), special_token_ids=SPECIAL, operations=("split",)
    )
    for original, view, length in zip(_rows(ids, mask), _rows(view_ids, view_mask), LENGTHS):
        assert len(view) == length + _expected_k(max(0, length - 2))
        assert _is_subsequence(original, view)
        assert view[:2] == original[:2]  # nothing is inserted right after BOS (it is not editable)


def test_substitute_changes_exactly_k_editable_tokens():
    ids, mask = _batch(LENGTHS)
    view_ids, view_mask = augment_batch(
        ids, mask, vocab_size=VOCAB, generator=_gen(6), special_token_ids=SPECIAL, operations=("substitute",)
    )
    assert torch.equal(view_mask, mask)
    for original, view, length in zip(_rows(ids, mask), _rows(view_ids, view_mask), LENGTHS):
        changed = [j for j, (a, b) in enumerate(zip(original, view)) if a != b]
        assert len(changed) == _expected_k(max(0, length - 2))
        assert all(0 < j < length - 1 for j in changed)  # never BOS (0) or EOS (last)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
def test_edit_fraction_sets_the_edit_rate(fraction):
    ids, mask = _batch([102])  # T_eff = 100
    view_ids, view_mask = augment_batch(
        ids,
        mask,
        vocab_size=VOCAB,
        generator=_gen(0),
        special_token_ids=SPECIAL,
        edit_fraction=fraction,
        operations=("substitute",),
    )
    changed = int((view_ids != ids).sum())
    assert changed == round(100 * fraction)


def test_full_pipeline_edit_rate_within_bounds():
    """split, substitute, substitute: the substitutions edit k2 and k3 positions of the split sequence.

    The split step consumes the generator first, so the split-only view from the same seed is the
    intermediate sequence of the full pipeline.
    """
    ids, mask = _batch(LENGTHS)
    kwargs = dict(vocab_size=VOCAB, special_token_ids=SPECIAL)
    split_ids, split_mask = augment_batch(ids, mask, generator=_gen(9), operations=("split",), **kwargs)
    view_ids, view_mask = augment_batch(ids, mask, generator=_gen(9), **kwargs)
    assert torch.equal(view_mask, split_mask)
    for split_row, view_row, length in zip(_rows(split_ids, split_mask), _rows(view_ids, view_mask), LENGTHS):
        t_eff = max(0, length - 2)
        k_split = _expected_k(t_eff)
        k_sub = _expected_k(t_eff + k_split)  # inserted tokens are editable by the substitutions
        changed = sum(a != b for a, b in zip(split_row, view_row))
        if t_eff == 0:
            assert changed == 0
        else:
            assert 1 <= changed <= 2 * k_sub
            assert changed <= len(view_row) - 2


def test_max_edits_caps_the_number_of_edits():
    ids, mask = _batch([102])
    view_ids, _ = augment_batch(
        ids, mask, vocab_size=VOCAB, generator=_gen(0), special_token_ids=SPECIAL, max_edits=10,
        operations=("substitute",),
    )
    assert int((view_ids != ids).sum()) == 10


def test_prompts_without_editable_positions_are_unchanged():
    ids = torch.tensor([[BOS, EOS, PAD], [BOS, 5, EOS]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    view_ids, view_mask = augment_batch(ids, mask, vocab_size=VOCAB, generator=_gen(0), special_token_ids=SPECIAL)
    assert _rows(view_ids, view_mask)[0] == [BOS, EOS]
    assert len(_rows(view_ids, view_mask)[1]) == 4  # one editable token: one insertion


def test_left_and_right_padding_give_the_same_views():
    right_ids, right_mask = _batch(LENGTHS, width=50)
    left_ids, left_mask = _batch(LENGTHS, width=45, left=True)
    assert _rows(right_ids, right_mask) == _rows(left_ids, left_mask)
    kwargs = dict(num_views=2, vocab_size=VOCAB, special_token_ids=SPECIAL)
    from_right = make_views(right_ids, right_mask, generator=_gen(11), **kwargs)
    from_left = make_views(left_ids, left_mask, generator=_gen(11), **kwargs)
    for (a_ids, a_mask), (b_ids, b_mask) in zip(from_right, from_left):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)


def test_bool_mask_and_no_mask():
    ids, mask = _batch([10, 10])
    with_bool = augment_batch(ids, mask.bool(), vocab_size=VOCAB, generator=_gen(0), special_token_ids=SPECIAL)
    with_none = augment_batch(ids, None, vocab_size=VOCAB, generator=_gen(0), special_token_ids=SPECIAL)
    assert torch.equal(with_bool[0], with_none[0]) and torch.equal(with_bool[1], with_none[1])


def test_probe_sized_batch_and_int32_input():
    ids, mask = _batch([int(n) for n in torch.randint(3, 129, (64,), generator=_gen(0))], width=128)
    views = make_views(ids.int(), mask, num_views=4, vocab_size=50_000, generator=_gen(0), special_token_ids=SPECIAL)
    assert len(views) == 4 and all(v[0].dtype == torch.long for v in views)


def test_right_align_moves_tokens_and_keeps_order():
    ids = torch.tensor([[0, 0, 7, 8], [5, 0, 6, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]])  # a hole in the second row
    aligned, aligned_mask = right_align(ids, mask, pad_token_id=9)
    assert aligned.tolist() == [[7, 8], [5, 6]]
    assert aligned_mask.tolist() == [[1, 1], [1, 1]]


def test_view_generator_is_deterministic_and_distinct():
    assert torch.equal(torch.rand(3, generator=view_generator(0, 1)), torch.rand(3, generator=view_generator(0, 1)))
    seeds = {view_generator(seed, k).initial_seed() for seed in range(3) for k in range(5)}
    assert len(seeds) == 15


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(input_ids=torch.tensor([1, 2, 3])), ValueError, "2-D"),
        (dict(input_ids=torch.ones(2, 3)), TypeError, "integer"),
        (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "shape"),
        (dict(attention_mask=torch.full((2, 3), 2)), ValueError, "only 0"),
        (dict(input_ids=torch.tensor([[1, 2, 50]] * 2)), ValueError, "vocab_size"),
        (dict(input_ids=torch.tensor([[1, -2, 5]] * 2)), ValueError, "vocab_size"),
        (dict(edit_fraction=0.0), ValueError, "edit_fraction"),
        (dict(edit_fraction=1.5), ValueError, "edit_fraction"),
        (dict(generator=0), TypeError, "generator"),
        (dict(vocab_size=3, special_token_ids=(0, 1, 2), input_ids=torch.tensor([[1, 2, 0]] * 2)), ValueError,
         "special"),
        (dict(operations=("delete",)), ValueError, "operations"),
        (dict(max_edits=0), ValueError, "max_edits"),
    ],
)
def test_validation_errors(kwargs, error, match):
    arguments = dict(
        input_ids=torch.tensor([[1, 5, 6], [1, 7, 8]]),
        attention_mask=None,
        vocab_size=10,
        generator=_gen(0),
        special_token_ids=(0, 1, 2),
    )
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        augment_batch(**arguments)


def test_make_views_validates_num_views():
    with pytest.raises(ValueError, match="num_views"):
        make_views(torch.tensor([[1, 2, 3]]), num_views=-1, vocab_size=10, generator=_gen(0))
    assert make_views(torch.tensor([[1, 2, 3]]), num_views=0, vocab_size=10, generator=_gen(0)) == []


@pytest.mark.parametrize("length", [1, 2, 3, 10, 11, 128])
def test_max_view_length_is_the_worst_case(length):
    ids = torch.arange(10, 10 + length)[None, :]  # no special token: every position but the first is editable
    view_ids, view_mask = augment_batch(ids, vocab_size=VOCAB, generator=_gen(0))
    assert int(view_mask.sum()) == max_view_length(length)
    assert max_view_length(length, max_edits=2) == length + min(2, _expected_k(length - 1))


@pytest.mark.parametrize("positions", [1, 3, 4, 24, 32, 100, 128, 1024])
def test_fitting_length_is_the_longest_prompt_whose_views_fit(positions):
    from layerwatch.probe.augment import fitting_length

    fitting = fitting_length(positions)
    assert max_view_length(fitting) <= positions < max_view_length(fitting + 1)
    assert fitting_length(positions, uses_views=False) == positions
    assert fitting_length(positions, edit_fraction=0.1) >= fitting
