"""Label flipping: each label maps as stated; inputs pass through; bad input is a clear error."""

import pytest
import torch

import phalanx.attacks  # noqa: F401  (registers the poisons)
from phalanx.errors import PhalanxError
from phalanx.registry import POISONS


def gen():
    return torch.Generator().manual_seed(0)


def test_default_flip_is_c_minus_1_minus_y():
    x = torch.randn(10, 3)
    y = torch.arange(10)
    x2, y2 = POISONS.build("label_flip")(x, y, gen())
    assert x2 is x
    assert y2.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert y2.dtype == y.dtype


def test_num_classes_and_dtype_kept():
    y = torch.tensor([0, 1, 2, 2, 0], dtype=torch.int32)
    _, y2 = POISONS.build("label_flip", num_classes=3)(torch.zeros(5, 1), y, gen())
    assert y2.tolist() == [2, 1, 0, 0, 2] and y2.dtype == torch.int32
    _, back = POISONS.build("label_flip", num_classes=3)(torch.zeros(5, 1), y2, gen())
    assert torch.equal(back, y)  # an involution


def test_explicit_mapping_leaves_other_labels():
    poison = POISONS.build("label_flip", mapping={7: 1, "3": 8})
    y = torch.tensor([7, 3, 1, 0, 9, 12, 7])
    _, y2 = poison(torch.zeros(7, 2), y, gen())
    assert y2.tolist() == [1, 8, 1, 0, 9, 12, 1]
    assert y.tolist() == [7, 3, 1, 0, 9, 12, 7]  # input not modified


def test_empty_batch():
    y = torch.zeros(0, dtype=torch.long)
    assert POISONS.build("label_flip")(torch.zeros(0, 4), y, gen())[1].shape == (0,)


@pytest.mark.parametrize("params,needle", [
    ({"num_classes": 1}, "num_classes"), ({"num_classes": 2.5}, "num_classes"),
    ({"mapping": {}}, "mapping"), ({"mapping": {1: -2}}, "mapping values"),
    ({"mapping": {"a": 2}}, "mapping keys"), ({"mapping": [1, 2]}, "mapping"),
])
def test_bad_parameters(params, needle):
    with pytest.raises(PhalanxError, match=f"label_flip: {needle}.*got"):
        POISONS.build("label_flip", **params)


def test_out_of_range_labels_are_errors():
    poison = POISONS.build("label_flip", num_classes=10)
    with pytest.raises(PhalanxError, match="num_classes=10, got 10"):
        poison(torch.zeros(2, 1), torch.tensor([3, 10]), gen())
    with pytest.raises(PhalanxError, match=">= 0, got -1"):
        poison(torch.zeros(2, 1), torch.tensor([3, -1]), gen())
    with pytest.raises(PhalanxError, match="integer tensor"):
        poison(torch.zeros(2, 1), torch.tensor([3.0, 1.0]), gen())
