"""The named benchmark shapes of DESIGN §6 (used by bench/, ``univigu-fast profile`` and tests)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchShape:
    """One DESIGN §6 row: per-sample video/text lengths, prompt length and model sizes."""

    name: str
    video_lens: tuple[int, ...]
    text_lens: tuple[int, ...]
    prompt_len: int
    dim: int
    ffn_dim: int
    num_heads: int
    head_dim: int
    num_layers: int

    @property
    def batch(self) -> int:
        return len(self.video_lens)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """Joint ``[video; text]`` length per sample."""
        return tuple(v + t for v, t in zip(self.video_lens, self.text_lens))


SHAPES: dict[str, BenchShape] = {
    s.name: s
    for s in (
        BenchShape("wan1.3b-480p", (32760,), (256,), 512, 1536, 8960, 12, 128, 30),
        BenchShape("wan1.3b-varlen", (32760, 8190, 16380, 4096), (256, 128, 200, 0), 512, 1536, 8960, 12, 128, 30),
        BenchShape("wan14b-720p", (75600,), (256,), 512, 5120, 13824, 40, 128, 40),
    )
}
