"""Statistics of a Linear layer's inputs, kept as raw sums plus a sequence count.

Raw sums merge across batches and workers by plain addition; the division by N happens once, in
`scaler_row` / `hessian`, so nothing is ever averaged twice.

Each batch's sums are computed in fp32 and added into fp64 accumulators, rounded to fp32 once at the end:
fp32 numbers of similar size add exactly in fp64, so the result does not depend on the order in which
batches (and workers) are summed, and masks do not depend on how the sequences were split.

X^T X is added a block of rows at a time: the whole product of down_proj's 13824 inputs at 13B is a 764 MB
fp32 temporary (1.5 GB more while it is widened to fp64) beside the 1.5 GB fp64 sum.

On CUDA, half-precision inputs go through the tensor cores with an fp32 result (`torch.mm(..., out_dtype=)`):
a product of two bf16 or fp16 numbers is exact in fp32 and both products accumulate in fp32, so this is the
precision of the fp32 product of the widened inputs at the tensor cores' rate (an H200 makes down_proj's
X^T X of 8 x 2048 tokens in 0.05 s, against 1.07 s in fp32). Each batch's product has the same shape and
inputs whatever the number of workers, so it rounds the same way.
"""

import torch
from torch import Tensor

# fp32 elements of one block of X^T X: 16 MB on a CPU (whose memory the plan keeps tight); 512 MB on a GPU,
# where a block of 585 rows of down_proj's 28672 ran the tensor cores at a third of the rate of 4681 rows.
PRODUCT_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}
HALF = (torch.bfloat16, torch.float16)


class InputStatistics:
    """sum_{n,t} x^2 per input feature (Wanda, GBLM) and optionally sum_{n,t} x x^T (SparseGPT)."""

    def __init__(self, in_features: int, with_hessian: bool, device: torch.device | str = "cpu"):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sum_xxt = (
            torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if with_hessian else None
        )
        self.count = 0
        self._hessian: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """x: (batch, tokens, in). N counts sequences, not tokens (as in the reference code)."""
        flat = x.reshape(-1, x.shape[-1])  # (batch * tokens, in)
        wide = flat.float()
        self.sum_sq += wide.square().sum(dim=0)
        if self.sum_xxt is not None:
            source = flat if _tensor_core_product(flat) else wide
            del wide
            rows = max(1, PRODUCT_BLOCK_ELEMENTS[flat.device.type] // flat.shape[1])
            for start in range(0, flat.shape[1], rows):
                self.sum_xxt[start : start + rows] += _fp32_product(source[:, start : start + rows].T, source)
        self.count += x.shape[0] if x.dim() == 3 else 1

    def round_once(self) -> None:
        """Once every batch and worker is in: the fp64 sums become fp32, halving what the layer holds
        (SparseGPT's X X^T of down_proj is 1.5 GB in fp64 at 13B). X X^T becomes the Hessian in place, so the
        layer never holds a sum and its Hessian side by side."""
        self.sum_sq = self.sum_sq.float()
        if self.sum_xxt is not None:
            self._hessian = self.sum_xxt.float().mul_(2.0 / self.count)
            self.sum_xxt = None

    def tensors(self) -> list[Tensor]:
        """The raw sums, for a cross-worker sum."""
        return [t for t in (self.sum_sq, self.sum_xxt) if t is not None]

    @property
    def has_hessian(self) -> bool:
        return self._hessian is not None or self.sum_xxt is not None

    def scaler_row(self) -> Tensor:
        return (self.sum_sq / self.count).float()

    def hessian(self) -> Tensor:
        """SparseGPT's H = (2/N) sum X X^T (after round_once: the one the statistics hold; do not modify it)."""
        if self._hessian is not None:
            return self._hessian
        if self.sum_xxt is None:
            raise ValueError("these statistics were collected without the Hessian")
        return (self.sum_xxt * (2.0 / self.count)).float()


def _tensor_core_product(x: Tensor) -> bool:
    return x.is_cuda and x.dtype in HALF and hasattr(torch.ops.aten.mm, "dtype")


def _fp32_product(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result: half inputs on the tensor cores, accumulating in fp32."""
    if a.dtype in HALF:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


class CrossStatistics:
    """Reconstruction's sums for one input group (methods/reconstruction.py): H = sum x_p x_p^T of the pruned
    layer's inputs and, with a cross term, C = B^T = sum x_d x_p^T against the dense layer's and each member's
    target energy sum ||W x_d||^2. fp64 accumulators of fp32 batch products, as above: the sums do not depend
    on how the batches were split between workers."""

    def __init__(self, in_features: int, members: int, with_cross: bool, device: torch.device | str = "cpu"):
        self.sum_xxt = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.sum_cross = torch.zeros_like(self.sum_xxt) if with_cross else None
        self.energy = torch.zeros(members, dtype=torch.float64, device=device) if with_cross else None

    def update(self, x_pruned: Tensor, x_reference: Tensor | None = None, outputs: list[Tensor] = ()) -> None:
        """One batch: the group's input in the pruned layer and, with a cross term, in the reference and the
        reference's outputs."""
        p = _product_operand(x_pruned)
        d = None if self.sum_cross is None else _product_operand(x_reference)
        rows = max(1, PRODUCT_BLOCK_ELEMENTS[p.device.type] // p.shape[1])
        for start in range(0, p.shape[1], rows):
            self.sum_xxt[start : start + rows] += _fp32_product(p[:, start : start + rows].T, p)
            if d is not None:
                self.sum_cross[start : start + rows] += _fp32_product(d[:, start : start + rows].T, p)
        for j, y in enumerate(outputs):
            self.energy[j] += y.float().square().sum()

    def tensors(self) -> list[Tensor]:
        """The raw sums, for a cross-worker sum."""
        return [t for t in (self.sum_xxt, self.sum_cross, self.energy) if t is not None]

    def rounded(self) -> tuple[Tensor, Tensor | None]:
        """Once every batch and worker is in: H and C in fp32 (C None: H), each fp64 sum dropped as soon as it
        is rounded (the statistics hold only the energies after)."""
        H = self.sum_xxt.float()
        self.sum_xxt = None
        C = None if self.sum_cross is None else self.sum_cross.float()
        self.sum_cross = None
        return H, C


def _product_operand(x: Tensor) -> Tensor:
    """(tokens, in): half precision as it is for the tensor cores, else fp32."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if _tensor_core_product(flat) else flat.float()
