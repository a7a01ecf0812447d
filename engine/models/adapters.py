"""A user's classifier brought to the engine's contract: x [B, *input_shape] in the data's range -> logits [B, K].

A fleet entry's `input:` and `output:` (engine.spec.audit) become a ModelAdapter around its module
(engine.runtime.fleet.adapt_classifier), in this order:

    scale -> resize -> crop -> normalise -> channels_last -> dtype -> model -> select (index | key) -> head -> float32

Every step is torch, so methods keep searching in the data's [0, 1] space, distances stay comparable across models
and gradients flow through the adapter to the input. An entry with neither option is not wrapped at all.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
HEADS = ("logits", "probabilities", "log_probabilities", "sigmoid")
PROBABILITY_FLOOR = 1e-12  # log(max(p, floor)): a zero probability becomes a finite, very low logit

Size = Union[int, Sequence[int], None]


def pair(value: Size) -> Optional[tuple[int, int]]:
    """An int or [H, W] as (H, W); None stays None."""
    if value is None:
        return None
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, h, w] around the centre (torchvision's rounding of the top-left corner)."""
    h, w = size
    top, left = int(round((x.shape[-2] - h) / 2.0)), int(round((x.shape[-1] - w) / 2.0))
    return x[..., top:top + h, left:left + w]


def probabilities_to_logits(p: torch.Tensor) -> torch.Tensor:
    """[B, K] probabilities -> logits whose softmax is p renormalised."""
    return p.clamp_min(PROBABILITY_FLOOR).log()


def sigmoid_to_logits(z: torch.Tensor) -> torch.Tensor:
    """One logit of a binary model, z [B] or [B, 1] -> logits [B, 2] = [0, z]: softmax gives [1 - σ(z), σ(z)]."""
    if z.dim() == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.dim() != 1:
        raise ValueError(f"output: sigmoid expects one logit per sample, [B] or [B, 1], but the model returned "
                         f"shape {list(z.shape)}")
    return torch.stack([torch.zeros_like(z), z], dim=1)


def describe(out: Any) -> str:
    """A model's non-tensor output in words, with what to set on the fleet entry to pick the logits from it."""
    def shape(v: Any) -> str:
        return str(list(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__

    if isinstance(out, Mapping):
        keys = {str(k): shape(v) for k, v in out.items()}
        return f"a dict with keys {keys}; set `output.key` on its fleet entry to the key that holds the logits"
    if isinstance(out, (tuple, list)):
        entries = ", ".join(shape(v) for v in out)
        return (f"a {type(out).__name__} of {len(out)} entries ({entries}); set `output.index` on its fleet entry "
                f"to the entry that holds the logits")
    return f"a {type(out).__name__}"


def select(out: Any, index: Optional[int], key: Optional[str]) -> Any:
    """The entry `key` of a dict output or `index` of a tuple/list output; `out` itself when neither is given."""
    if key is not None:
        if not isinstance(out, Mapping):
            raise ValueError(f"output.key {key!r} needs a dict output, but the model returned {describe(out)}")
        if key not in out:
            raise ValueError(f"output.key {key!r} is not one of the model's outputs {[str(k) for k in out]}")
        return out[key]
    if index is not None:
        if not isinstance(out, (tuple, list)):
            raise ValueError(f"output.index {index} needs a tuple or list output, but the model returned "
                             f"{describe(out)}")
        if not -len(out) <= index < len(out):
            raise ValueError(f"output.index {index} is out of range for the model's {len(out)} outputs")
        return out[index]
    return out


def looks_like_probabilities(out: torch.Tensor, atol: float = 1e-4) -> bool:
    """Every row of [B, K] (K >= 2) lies in [0, 1] and sums to 1: a softmax output, most likely."""
    if out.dim() != 2 or out.shape[1] < 2 or out.numel() == 0:
        return False
    out = out.double()
    return bool(((out >= 0) & (out <= 1)).all()) and bool(((out.sum(1) - 1).abs() <= atol).all())


_CHANNELS = re.compile(r"to have (\d+) channels, but got \d+ channels")  # torch's conv message
_SPATIAL = re.compile(r"mat1 and mat2 shapes cannot be multiplied|size mismatch|is invalid for input of size|"
                      r"kernel size can't be greater|output size is too small|must match the size", re.I)
_DTYPE = re.compile(r"dtype|scalar type|half|double|bfloat16", re.I)


def input_hint(message: str, input_shape: Sequence[int]) -> str:
    """What to set on the fleet entry when a forward pass on x [B, *input_shape] failed with `message`
    ('' when nothing fits)."""
    hints, image = [], len(input_shape) == 3
    channels = _CHANNELS.search(message) if image else None
    if channels and int(channels.group(1)) == int(input_shape[0]):  # the data's C, read from another axis
        hints.append("if the model takes [B, H, W, C] images, set `input.channels_last: true`")
    if image and _SPATIAL.search(message):
        hints.append("if it was trained at another image size, set `input.size` (and `input.crop`) to what it takes")
    if _DTYPE.search(message):
        hints.append("if its weights are not float32, set `input.dtype` to their precision")
    return f" ({'; '.join(hints)} on its fleet entry)" if hints else ""


class ModelAdapter(nn.Module):
    """x [B, *input_shape] float32 in the data's range -> logits [B, K] float32 around a user's `model`.

    Validated against the data at construction: ValueErrors name the `input.` / `output.` field to fix.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], num_classes: int, *, scale: float = 1.0,
                 size: Size = None, crop: Size = None, mean: Union[float, Sequence[float], None] = None,
                 std: Union[float, Sequence[float], None] = None, channels_last: bool = False,
                 dtype: str = "float32", head: str = "logits", index: Optional[int] = None,
                 key: Optional[str] = None, declared: bool = True, model_id: str = "model") -> None:
        super().__init__()
        shape, who = tuple(int(s) for s in input_shape), f"model {model_id!r}"
        image = len(shape) == 3
        for name, asked in (("size", size is not None), ("crop", crop is not None), ("channels_last", channels_last)):
            if asked and not image:
                raise ValueError(f"{who}: input.{name} needs image data [C, H, W], but the data's inputs are "
                                 f"{list(shape)}")
        if dtype not in DTYPES:
            raise ValueError(f"{who}: expected input.dtype to be one of {list(DTYPES)} but got {dtype!r}")
        if head not in HEADS:
            raise ValueError(f"{who}: expected output.kind to be one of {list(HEADS)} but got {head!r}")
        if head == "sigmoid" and num_classes != 2:
            raise ValueError(f"{who}: output: sigmoid is a binary head (logits [0, z]), but the data has "
                             f"{num_classes} classes")
        self.size, self.crop = pair(size), pair(crop)
        seen = self.size or (shape[1:] if image else None)
        if self.crop is not None and (self.crop[0] > seen[0] or self.crop[1] > seen[1]):
            raise ValueError(f"{who}: input.crop {list(self.crop)} is larger than the image it crops, "
                             f"{list(seen)} ({'input.size' if self.size else 'the data'})")
        channels = shape[0] if shape else 1
        self.register_buffer("mean", self._per_channel(mean, 0.0, "mean", channels, shape, who), persistent=False)
        self.register_buffer("std", self._per_channel(std, 1.0, "std", channels, shape, who), persistent=False)
        self.normalise = mean is not None or std is not None
        self.scale, self.channels_last = float(scale), bool(channels_last)
        self.model_dtype = DTYPES[dtype]
        self.head, self.index, self.key = head, index, key
        self.declared = declared  # False: `output` was not given (preflight then checks the outputs look like logits)
        self.model = model if self.model_dtype == torch.float32 else model.to(self.model_dtype)

    @staticmethod
    def _per_channel(value, default: float, name: str, channels: int, shape: tuple[int, ...],
                     who: str) -> torch.Tensor:
        """A per-channel value as a tensor broadcasting over x [B, *shape] (channel = shape[0])."""
        values = torch.as_tensor([default] if value is None else value, dtype=torch.float32).flatten()
        if values.numel() not in (1, channels):
            unit = "channels" if len(shape) == 3 else "features" if len(shape) == 1 else "rows"
            raise ValueError(f"{who}: input.{name} has {values.numel()} values, but the data has {channels} "
                             f"{unit} {list(shape)}; give one value or {channels}")
        if name == "std" and not bool((values > 0).all()):
            raise ValueError(f"{who}: every input.std must be > 0, got {values.tolist()}")
        return values.reshape(-1, *([1] * (len(shape) - 1))) if shape else values.reshape(())

    def train(self, mode: bool = True) -> "ModelAdapter":
        # torch.export modules refuse train()/eval(): their mode was fixed when they were exported.
        self.training = mode
        try:
            self.model.train(mode)
        except NotImplementedError:
            pass
        return self

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, *input_shape] in the data's range -> what the model takes."""
        if self.scale != 1.0:
            x = x * self.scale
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=False)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        if self.normalise:
            x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        return x.to(self.model_dtype)

    def logits(self, out: Any) -> torch.Tensor:
        """What the model returned -> logits [B, K] float32."""
        out = select(out, self.index, self.key)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the model returned {describe(out)}")
        if self.head == "probabilities":
            out = probabilities_to_logits(out)
        elif self.head == "sigmoid":
            out = sigmoid_to_logits(out)
        return out.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.model(self.prepare(x)))


def declared_output(module: nn.Module) -> Optional[str]:
    """The output kind a fleet entry declared for `module` (None: not declared, the logits contract assumed)."""
    return module.head if isinstance(module, ModelAdapter) and module.declared else None
