"""model/batch.py: packing and padding a step's tokens, ragged or uniform (every sequence the
same length, where padding is a view)."""

import pytest
import torch

from model.batch import BatchLayout


def reference_padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Per-sequence loop: [T, F] -> [B, L, F], zeros past each sequence's length."""
    out = x.new_zeros(len(lengths), max(lengths), *x.shape[1:])
    offset = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[offset:offset + n]
        offset += n
    return out


@pytest.mark.parametrize("lengths", [[3, 1, 4], [4, 4, 4], [1, 1], [5]])
def test_padding_round_trip(lengths):
    layout = BatchLayout.build(list(range(len(lengths))), [0] * len(lengths), lengths)
    x = torch.randn(sum(lengths), 6)
    padded = layout.to_padded(x)
    assert layout.is_uniform == (len(set(lengths)) == 1)
    torch.testing.assert_close(padded, reference_padded(x, lengths), rtol=0, atol=0)
    torch.testing.assert_close(layout.to_packed(padded), x, rtol=0, atol=0)
