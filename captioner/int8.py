"""An int8 decoder whose numbers for one image do not depend on the other images in its batch.

torch's dynamic quantization scales each call's activations by the range of the whole batch, so a row's logits
moved with its neighbours: batched captions differed from single ones, and beams, branches and the stream showed
different probabilities for the same prefix. Here every input row is quantized with its own scale (its largest
magnitude), then multiplied by int8 weights (one scale per output channel) in fbgemm's u8 x s8 kernel with a fixed
activation scale, whose integer accumulation is exact: row i's output is the same, bit for bit, at any batch size.
The row scale costs one max and two elementwise products on the row; no calibration, nothing saved with the model.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def _activation_grid() -> tuple[float, int]:
    """(scale, zero point) of the uint8 grid a row in [-1, 1] is put on. With VNNI the kernel multiplies u8 x s8 into
    int32 (vpdpbusd): all 8 bits. Without it, fbgemm adds pairs of products in int16 (vpmaddubsw), which saturates
    for 8-bit activations and weights: 7 bits (0..127), as torch's own x86 int8 layers reduce the range."""
    from .precision import cpu_features

    f = cpu_features()
    return (1 / 127, 128) if f["vnni"] or f["amx"] else (2 / 127, 64)


def _pack(weight: torch.Tensor):
    """A float (N, K) weight -> fbgemm's packed int8 weight, symmetric, one scale per output row; no bias (it is added
    in float after the row scale)."""
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).clamp_min(1e-12).double()  # (N,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor types are deprecated; fbgemm's packed weight still takes one
        q = torch.quantize_per_channel(w, scales, torch.zeros(w.size(0), dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


class RowInt8Linear(nn.Module):
    """nn.Linear with int8 weights and each input row quantized by its own largest magnitude: batch-invariant.

    With `passes=2` a row is quantized twice, its rounding error the second time (by that error's own scale), and both
    go through the same product in one call: about 15 bits of the row instead of 8, for the input that decides
    captions (the LSTM cell's word and image context: 298 of the bundled model's first 300 dev captions as float32's,
    against 292 with one pass)."""

    def __init__(self, linear: nn.Linear, grid: tuple[float, int] | None = None, passes: int = 1):
        super().__init__()
        if passes not in (1, 2):
            raise ValueError(f"passes={passes}: expected 1 or 2")
        self.in_features, self.out_features, self.passes = linear.in_features, linear.out_features, passes
        self.scale, self.zero_point = grid or _activation_grid()
        self.__dict__["packed"] = _pack(linear.weight)  # not a buffer: a packed int8 weight is no state-dict tensor
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, K) -> (x / m in [-1, 1], m (n, 1)): each row over its own largest magnitude."""
        m = x.abs().amax(1, keepdim=True).clamp_min(1e-30)
        return x / m, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()  # (n, K)
        unit, m = self._rows(x)
        if self.passes == 2:
            n = x.size(0)
            error = (unit - torch.round(unit / self.scale) * self.scale) * m  # what the first pass rounds away
            unit2, m2 = self._rows(error)
            unit, m = torch.cat((unit, unit2)), torch.cat((m, m2))  # (2n, K), (2n, 1)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(unit, self.scale, self.zero_point,
                                                                               self.packed) * m  # (n or 2n, N)
        if self.passes == 2:
            y = y[:n] + y[n:]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, per-row int8 "
                f"activations x{self.passes}")


class RowInt8LSTMCell(nn.Module):
    """nn.LSTMCell with both of its products (input and hidden) as RowInt8Linear; gates in PyTorch's order (i, f, g, o)."""

    def __init__(self, cell: nn.LSTMCell):
        super().__init__()
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        grid = _activation_grid()
        self.ih = RowInt8Linear(_as_linear(cell.weight_ih, cell.bias_ih), grid, passes=2)  # the sensitive input
        self.hh = RowInt8Linear(_as_linear(cell.weight_hh, cell.bias_hh), grid)

    def forward(self, x: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = hc
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, 1)  # (B, H) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


class PerImageLinear(nn.Module):
    """nn.Linear run once per image of the batch (a row of (B, K), or an image's regions of (B, N, K)): each image's
    numbers come from the very call that computes them when it is alone, so they are batch-invariant by
    construction. float32 GEMM kernels change with the number of rows (one row takes a matrix-vector kernel, forty
    a blocked one), so a row's last bits can differ with its batch (about 1e-6 on a Xeon with AMX; none seen on
    the AMD EPYC), and the int8 layers after it then round that row differently: its logits moved by up to 8e-4.
    For the float layers before the int8 ones; a batch of B costs B calls instead of one."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features == 1:  # a dot product per row (the attention's score, every word): an elementwise
            y = (x * self.weight[0]).sum(-1, keepdim=True)  # product and a row sum, computed the same for every row
            return y if self.bias is None else y + self.bias
        if x.size(0) == 1:
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.cat([nn.functional.linear(one, self.weight, self.bias) for one in x.split(1)])  # (B, ..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, one call per image"


def _swap(module: nn.Module, names: tuple[str, ...], versions: dict[type, type], what: str) -> nn.Module:
    """Replace module.<name> for each of `names` by versions[its type](it); a type not there is a ValueError."""
    for name in names:
        child = getattr(module, name)
        version = versions.get(type(child))
        if version is None:
            raise ValueError(f"{name}={type(child).__name__}: {what} takes an {' or an '.join(t.__name__ for t in versions)}")
        setattr(module, name, version(child))
    return module


def per_image(module: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Replace module.<name> (an nn.Linear) for each of `names` by PerImageLinear."""
    return _swap(module, names, {nn.Linear: PerImageLinear}, "PerImageLinear")


def quantize(module: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Replace module.<name> (nn.Linear or nn.LSTMCell) for each of `names` by its batch-invariant int8 version."""
    return _swap(module, names, {nn.Linear: RowInt8Linear, nn.LSTMCell: RowInt8LSTMCell}, "int8")
