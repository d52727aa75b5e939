"""Training data: one token stream, a train/validation split, and seeded batch sampling.

Batches are random windows of the stream (as in nanoGPT). Every batch is drawn from a
generator seeded by (seed, split, step, micro-step) alone, so the data order is
reproducible, and resuming at step k needs nothing but k: no sampler state to save.
The stream may be a np.memmap of a prepared folder (`python -m npgpt.data prepare`, see
npgpt.prepare): a batch reads only the windows it draws.
"""

from __future__ import annotations

import numpy as np

SPLITS = {"train": 0, "val": 1}


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the stream for training, the rest for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:cut], tokens[cut:]


class BatchSampler:
    """(B, T) input windows of a token stream and their (B, T) next-token targets."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, split: str = "train"):
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"the {split} split has {len(tokens)} tokens, fewer than block size + 1 = {block_size + 1}: "
                "use a longer text, a smaller --block-size, or a different --val-fraction"
            )
        self.tokens = tokens  # any integer array, a np.memmap included: only the drawn windows are read
        self.batch_size, self.block_size, self.seed, self.split = batch_size, block_size, seed, split

    def batch(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The batch of optimizer step `step`, micro-batch `micro`: ids, targets (B, T) int64."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], step, micro])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)  # (B,)
        window = starts[:, None] + np.arange(self.block_size + 1)  # (B, T + 1)
        chunk = self.tokens[window].astype(np.int64)  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]


if __name__ == "__main__":  # python -m npgpt.data prepare ...: see npgpt.prepare
    import sys

    from npgpt.prepare import main

    sys.exit(main())
