"""Tiny models and optimizer factories shared by the tests (kept small: Inductor compiles each graph)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 10))


def wide_mlp(seed: int = 0) -> nn.Module:
    """An MLP whose projected states (rank 16: 512 x 16 and 16 x 512) are big enough for 8-bit."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 512), nn.GELU(), nn.Linear(512, 64), nn.GELU(), nn.Linear(64, 10))


def mlp40(seed: int = 0) -> nn.Module:
    """Two matrices the defaults project (64x40, 48x64 at min_dim 32) and a full-rank output layer (40x48)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 40))


def mlp40_batch(i: int, base: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(base + i)
    return torch.randn(16, 40, generator=g), torch.randint(0, 40, (16,), generator=g)


def mlp_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(12, 24, generator=g), torch.randint(0, 10, (12,), generator=g)


def mlp_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)  # a bias before BN has zero gradient
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        return self.head(x)


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet()


def conv_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + i)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def llama(seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = 96) -> nn.Module:
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg)


def llama_batch(i: int, vocab: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(3000 + i)
    return torch.randint(0, vocab, (2, 12), generator=g)


def llama_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


MODELS = {
    "mlp": (mlp, mlp_batch, mlp_loss),
    "conv": (convnet, conv_batch, mlp_loss),
    "llama": (llama, llama_batch, llama_loss),
}


def two_groups(model: nn.Module, lr: float, wd: float) -> list[dict]:
    """Two param groups with different lr and weight decay; each holds matrices the backend takes over."""
    params = [p for p in model.parameters() if p.requires_grad]
    half = len(params) // 2
    return [
        {"params": params[:half], "lr": lr, "weight_decay": wd},
        {"params": params[half:], "lr": lr * 0.5, "weight_decay": wd * 3 + 0.01},
    ]


OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(two_groups(m, 3e-3, 0.05), betas=(0.9, 0.99)),
    "adam_l2": lambda m: torch.optim.Adam(two_groups(m, 3e-3, 0.01)),
    "sgd_momentum": lambda m: torch.optim.SGD(two_groups(m, 5e-2, 1e-3), momentum=0.9, dampening=0.1),
    "sgd_nesterov": lambda m: torch.optim.SGD(two_groups(m, 5e-2, 1e-3), momentum=0.9, nesterov=True),
}
