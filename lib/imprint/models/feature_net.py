"""A small convolutional digit classifier whose penultimate layer is the feature space of FID and PRDC.

Used by the self-consuming diffusion chapter (04). Inception features make no sense for 8x8 digits, so,
as is usual for small-image benchmarks, a classifier trained on the real training digits provides the
embedding: two 3x3 convolutions, average pooling to 4x4, a ``n_features``-wide ReLU layer (the features)
and a linear read-out (the class, used for the class histograms of generated samples). Inputs are images in
[-1, 1], the diffusion model's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from imprint.runtime.checks import require_float, require_int


class DigitFeatureNet(nn.Module):
    """conv(32) - ReLU - conv(64) - ReLU - avgpool(4x4) - linear(n_features) - ReLU - linear(n_classes)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, n_features: int = 64):
        super().__init__()
        require_int("in_channels", in_channels, minimum=1)
        require_int("n_classes", n_classes, minimum=2)
        require_int("n_features", n_features, minimum=1)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, n_features), nn.ReLU(),
        )
        self.head = nn.Linear(n_features, n_classes)
        self.in_channels, self.n_classes, self.num_features = in_channels, n_classes, n_features

    def features(self, x: Float[Tensor, "n c h w"]) -> Float[Tensor, "n f"]:
        return self.body(x)

    def forward(self, x: Float[Tensor, "n c h w"]) -> Float[Tensor, "n k"]:
        return self.head(self.body(x))

    @torch.no_grad()
    def embed(self, x: Float[Tensor, "n c h w"], batch_size: int = 1024) -> Float[Tensor, "n f"]:
        """Features of many images, in eval mode, batch by batch."""
        self.eval()
        dev = next(self.parameters()).device
        return torch.cat([self.features(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def predict(self, x: Float[Tensor, "n c h w"], batch_size: int = 1024) -> Int[Tensor, " n"]:
        self.eval()
        dev = next(self.parameters()).device
        return torch.cat([self(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


class FeatureExtractor(nn.Module):
    """The feature map alone (``forward`` returns features), with ``num_features`` as torchmetrics expects."""

    def __init__(self, net: DigitFeatureNet):
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, x: Float[Tensor, "n c h w"]) -> Float[Tensor, "n f"]:
        return self.net.features(x)


@dataclass(frozen=True)
class FeatureNetOptions:
    """Adam with cross-entropy, mini-batches reshuffled every epoch; light pixel noise as augmentation."""

    n_epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    n_features: int = 64
    input_noise: float = 0.05

    def __post_init__(self):
        require_int("n_epochs", self.n_epochs, minimum=1)
        require_int("batch_size", self.batch_size, minimum=1)
        require_float("lr", self.lr, minimum=0.0, strict_minimum=True)
        require_int("n_features", self.n_features, minimum=1)
        require_float("input_noise", self.input_noise, minimum=0.0)


def train_feature_net(x: Float[Tensor, "n c h w"], labels: Int[Tensor, " n"], seed: int,
                      options: FeatureNetOptions = FeatureNetOptions(), n_classes: int = 10,
                      device: str | torch.device = "cpu") -> DigitFeatureNet:
    """Train :class:`DigitFeatureNet` on real images in [-1, 1]; deterministic under ``seed``."""
    if x.dim() != 4 or labels.shape != (x.shape[0],):
        raise ValueError(f"x has shape {tuple(x.shape)} and labels {tuple(labels.shape)}: expected "
                         f"[n, c, h, w] and [n]")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes - 1}]")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = DigitFeatureNet(x.shape[1], n_classes, options.n_features).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=options.lr)
    x, labels = x.float(), labels.long()
    net.train()
    for _ in range(options.n_epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), options.batch_size):
            idx = order[i:i + options.batch_size]
            xb = x[idx] + options.input_noise * torch.randn(x[idx].shape, generator=gen)
            loss = nn.functional.cross_entropy(net(xb.to(device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def accuracy(net: DigitFeatureNet, x: Float[Tensor, "n c h w"], labels: Int[Tensor, " n"]) -> float:
    return float((net.predict(x) == labels.cpu()).float().mean())
