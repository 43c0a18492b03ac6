"""VisPruner's duplicate-removal rounds run in numpy (issue 28): on similarities full of ties they drop exactly
what the rounds written with torch's stable sort drop, the order VisPruner's official code ranks in."""

import pytest
import torch

from explorer.methods.vispruner import without_duplicates


def torch_rounds(similarity: torch.Tensor, k: int, start: int) -> list[int]:
    """The rounds as the official code writes them (Theia-4869/VisPruner, llava/model/llava_arch.py L161-177),
    with the stable sort this project's default uses: A, B alternate; drop A's r most duplicated."""
    tokens = torch.arange(start, len(similarity))
    while (r := min(8, len(tokens) - k)) > 0:
        a, b = tokens[::2], tokens[1::2]
        duplication = similarity[a][:, b].max(1).values
        tokens = torch.cat([a[duplication.argsort(descending=True, stable=True)[r:]], b])
    return tokens.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_the_rounds_drop_what_torch_s_stable_sort_drops_ties_included(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(120, 6, generator=generator)
    similarity = (x @ x.T).round()  # (120, 120) whole numbers: many equal scores, -0.0 among them
    for k, start in [(30, 10), (7, 0), (100, 20)]:
        kept = without_duplicates(similarity[start:, start:], k) + start  # the rounds on tokens start, start + 1, ...
        assert kept.tolist() == torch_rounds(similarity, k, start)
