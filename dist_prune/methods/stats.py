"""Statistics of a Linear layer's inputs, kept as raw sums plus a sequence count.

Raw sums merge across batches and workers by plain addition; the division by N happens once, in
`scaler_row` / `hessian`, so nothing is ever averaged twice.
"""

import torch
from torch import Tensor


class InputStatistics:
    """sum_{n,t} x^2 per input feature (Wanda, GBLM) and optionally sum_{n,t} x x^T (SparseGPT)."""

    def __init__(self, in_features: int, with_hessian: bool, device: torch.device | str = "cpu"):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.sum_xxt = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if with_hessian else None
        )
        self.count = 0

    def update(self, x: Tensor) -> None:
        """x: (batch, tokens, in). N counts sequences, not tokens (as in the reference code)."""
        flat = x.reshape(-1, x.shape[-1]).float()  # (batch * tokens, in)
        self.sum_sq += flat.square().sum(dim=0)
        if self.sum_xxt is not None:
            self.sum_xxt.addmm_(flat.T, flat)
        self.count += x.shape[0] if x.dim() == 3 else 1

    def tensors(self) -> list[Tensor]:
        """The raw sums, for a cross-worker sum."""
        return [t for t in (self.sum_sq, self.sum_xxt) if t is not None]

    def scaler_row(self) -> Tensor:
        return self.sum_sq / self.count

    def hessian(self) -> Tensor:
        """SparseGPT's H = (2/N) sum X X^T."""
        if self.sum_xxt is None:
            raise ValueError("these statistics were collected without the Hessian")
        return self.sum_xxt * (2.0 / self.count)
