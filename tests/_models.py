"""Tiny models and inputs shared by the model tests."""
import torch

from univigu_fast.config import UniViGUConfig
from univigu_fast.reference import UniViGUModel as ReferenceModel


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised heads included) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def tiny_reference(seed: int = 0, **overrides) -> ReferenceModel:
    torch.manual_seed(seed)
    return randomize(ReferenceModel(UniViGUConfig.tiny(**overrides)).eval(), seed)


def sample_batch(config: UniViGUConfig, seed: int = 0, dtype=torch.float32):
    """Two samples of different video sizes, text lengths 7 and 0, prompts of lengths 5 and 3."""
    g = torch.Generator().manual_seed(seed)
    C = config.in_channels
    videos = [torch.randn(C, 3, 6, 10, generator=g, dtype=dtype), torch.randn(C, 1, 4, 4, generator=g, dtype=dtype)]
    prompts = [torch.randn(5, config.text_dim, generator=g, dtype=dtype), torch.randn(3, config.text_dim, generator=g, dtype=dtype)]
    if config.text_flow == "discrete":
        texts = [torch.randint(0, config.vocab_size, (7,), generator=g), torch.randint(0, config.vocab_size, (0,), generator=g)]
    else:
        texts = [torch.randn(7, config.dim, generator=g, dtype=dtype), torch.randn(0, config.dim, generator=g, dtype=dtype)]
    return videos, prompts, texts, torch.tensor([0.3, 0.9]), torch.tensor([0.2, 0.6])
