"""monai_ood.networks.feature_grid: labels on a coarser grid, the fractions and the majority vote."""

import numpy as np
import pytest
import torch

from monai_ood.networks.feature_grid import area_fractions, labels_to_feature_grid


def _brute_force_vote(labels: np.ndarray, num_classes: int, cell: int) -> np.ndarray:
    """Per cell of ``cell x cell`` pixels, the most frequent class (lowest index on ties), by counting."""
    b, h, w = labels.shape
    out = np.zeros((b, h // cell, w // cell), np.int64)
    for n in range(b):
        for i in range(h // cell):
            for j in range(w // cell):
                block = labels[n, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
                counts = np.bincount(block.ravel(), minlength=num_classes)
                out[n, i, j] = int(np.argmax(counts))  # first maximum: the lower class on ties
    return out


def test_majority_vote_matches_counting_and_the_fractions_argmax():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (3, 16, 16))
    labels[0, :4, :4] = 2  # a cell held by one class
    labels[1, :4, :4] = np.array([[0, 1] * 2] * 4)  # a tie between 0 and 1: the lower class
    got = labels_to_feature_grid(torch.from_numpy(labels)[:, None], 4, (4, 4))
    np.testing.assert_array_equal(got.numpy(), _brute_force_vote(labels, 4, 4))
    fractions = area_fractions(torch.from_numpy(labels)[:, None], 4, (4, 4))
    np.testing.assert_allclose(fractions.sum(1).numpy(), 1.0)
    assert fractions[0, 2, 0, 0] == 1.0 and fractions[1, 0, 0, 0] == fractions[1, 1, 0, 0] == 0.5
    # float labels (as MONAI loads them) and (B, *spatial) labels give the same vote
    same = labels_to_feature_grid(torch.from_numpy(labels).float(), 4, (4, 4))
    torch.testing.assert_close(same, got)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.full((1, 1, 8, 8), 4), r"\[0, 3\]"),
        (torch.full((1, 1, 8, 8), 0.5), "integer class indices"),
        (torch.zeros(1, 2, 8, 8), "class indices"),
    ],
)
def test_bad_labels_are_refused(labels, match):
    with pytest.raises(ValueError, match=match):
        labels_to_feature_grid(labels, 4, (4, 4))
