import numpy as np
import pytest
import torch

from exitserve.repository.preprocessing import normalize
from exitserve.models.data import load_splits
from exitserve.models.preprocess import Preprocessing


def torch_normalize(prep: Preprocessing, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The PyTorch arithmetic training used before it called the shared NumPy function."""
    batch = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (batch - torch.tensor(prep.mean).view(1, -1, 1, 1)) / torch.tensor(prep.std).view(1, -1, 1, 1)


def test_normalize_is_the_shared_function_bit_for_bit() -> None:
    test = load_splits("fashion-mnist").test
    prep = Preprocessing(1, 28, [0.2862], [0.3531])
    ours = prep.normalize(test.images)
    assert ours.dtype == torch.float32 and ours.shape == (10000, 1, 28, 28) and ours.is_contiguous()
    assert torch.equal(ours, torch_normalize(prep, test.images))
    assert torch.equal(ours, torch.from_numpy(normalize(test.images, prep.mean, prep.std)))
    batch = torch.from_numpy(test.images[:64]).flip(2)  # training hands it augmented uint8 tensors
    assert torch.equal(prep.normalize(batch), torch_normalize(prep, batch))
    rgb = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    prep3 = Preprocessing(3, 32, [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616])
    assert torch.equal(prep3.normalize(rgb), torch_normalize(prep3, rgb))


def test_old_checkpoint_keys_are_ignored() -> None:
    old = {"channels": 1, "size": 28, "mean": [0.2862], "std": [0.3531], "layout": "NCHW",
           "resize": "bilinear-to-size"}
    prep = Preprocessing.from_dict(old)
    assert prep == Preprocessing(1, 28, [0.2862], [0.3531])
    assert prep.to_dict() == {"channels": 1, "size": 28, "mean": [0.2862], "std": [0.3531]}
    with pytest.raises(TypeError):
        Preprocessing.from_dict({**old, "colour": "rgb"})
