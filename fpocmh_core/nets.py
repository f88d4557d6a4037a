"""Hash networks: one MLP per modality with a tanh relaxation; codes are the signs of the outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fpocmh_core import codes
from fpocmh_core.records import Modality


class HashNet(nn.Module):
    """Standardise the input, MLP with ReLU and dropout, linear to ``bits``, tanh.

    The standardisation statistics are buffers, so a saved network carries its own preprocessing.
    """

    def __init__(self, in_dim: int, bits: int, hidden: Sequence[int] = (1024,), dropout: float = 0.1) -> None:
        super().__init__()
        codes.check_bits(bits)
        self.in_dim, self.bits, self.hidden, self.dropout = in_dim, bits, tuple(hidden), dropout
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        layers: list[nn.Module] = []
        width = in_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, bits))
        self.body = nn.Sequential(*layers)

    def fit_scaler(self, x: np.ndarray, per_feature: bool = True) -> None:
        """Per-feature standardisation, or (``per_feature=False``) one scale and no centring: for sparse
        features such as a bag of words, where per-feature scaling blows a rare word up to a huge input."""
        x = np.asarray(x, dtype=np.float32)
        if per_feature:
            self.mean.copy_(torch.from_numpy(x.mean(axis=0)))
            self.scale.copy_(torch.from_numpy(np.maximum(x.std(axis=0), 1e-3)))
        else:
            self.mean.zero_()
            self.scale.fill_(max(float(x.std()), 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body((x - self.mean) / self.scale))

    def arch(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "bits": self.bits, "hidden": list(self.hidden), "dropout": self.dropout}


class HashModel(nn.Module):
    """The image and the text hash network of one deployment."""

    def __init__(self, image: HashNet, text: HashNet) -> None:
        super().__init__()
        if image.bits != text.bits:
            raise ValueError(f"image and text networks disagree on bits: {image.bits} vs {text.bits}")
        self.image, self.text = image, text

    @classmethod
    def create(
        cls, dims: tuple[int, int], bits: int, hidden: Sequence[int] = (1024,), dropout: float = 0.1, seed: int = 0
    ) -> HashModel:
        torch.manual_seed(seed)
        return cls(HashNet(dims[0], bits, hidden, dropout), HashNet(dims[1], bits, hidden, dropout))

    @property
    def bits(self) -> int:
        return self.image.bits

    def net(self, modality: Modality) -> HashNet:
        return self.image if modality is Modality.IMAGE else self.text

    def relaxed(self, x: np.ndarray, modality: Modality, batch: int = 8192) -> np.ndarray:
        """tanh outputs in eval mode without gradient; leaves the train/eval mode as it found it."""
        net = self.net(modality)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                xs = torch.as_tensor(np.asarray(x, dtype=np.float32))
                out = [net(xs[i : i + batch]) for i in range(0, xs.shape[0], batch)]
                return torch.cat(out).numpy() if out else np.zeros((0, self.bits), np.float32)
        finally:
            net.train(was_training)

    def encode(self, x: np.ndarray, modality: Modality) -> np.ndarray:
        """Packed binary codes (n, bits/8) of ``x``; pure: no state changes."""
        return codes.pack(codes.sign_codes(self.relaxed(x, modality)))

    def arch(self) -> dict[str, Any]:
        return {"image": self.image.arch(), "text": self.text.arch()}

    def tensors(self, prefix: str = "model") -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, arch: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> HashModel:
        def make(a: Mapping[str, Any]) -> HashNet:
            return HashNet(a["in_dim"], a["bits"], a["hidden"], a["dropout"])

        model = cls(make(arch["image"]), make(arch["text"]))
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
        return model
