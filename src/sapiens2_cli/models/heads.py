"""Task heads: seg and pose (deconvolution heads), normal / albedo / pointmap (upsampling heads).

Every head maps the backbone feature map ``[B, D, h, w]`` to its raw output. Norms are
``InstanceNorm2d`` (no affine, eps 1e-5, so no tensors in the checkpoint) except in the albedo
head, which uses channel RMSNorm with a weight. ``nn.Sequential`` indices follow the release,
so norm and activation slots are skipped in the state-dict keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from sapiens2_cli.models.layers import RMSNorm2d

HeadTask = Literal["seg", "pose", "normal", "albedo", "pointmap"]
FINAL_LAYER: dict[str, str] = {
    "seg": "conv_seg",
    "pose": "conv_pose",
    "normal": "conv_normal",
    "albedo": "conv_albedo",
    "pointmap": "conv_pointmap",
}


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Every number that shapes a head (channel widths, kernel sizes, the pointmap scale MLP)."""

    task: HeadTask
    in_channels: int
    out_channels: int
    final_kernel_size: int = 1
    deconv_out_channels: tuple[int, ...] = ()
    deconv_kernel_sizes: tuple[int, ...] = ()
    input_conv_channels: int = 0
    upsample_channels: tuple[int, ...] = ()
    conv_out_channels: tuple[int, ...] = ()
    conv_kernel_sizes: tuple[int, ...] = ()
    scale_conv_out_channels: tuple[int, ...] = ()
    scale_conv_kernel_sizes: tuple[int, ...] = ()
    scale_mlp: tuple[int, ...] = ()  # Linear widths [in, hidden..., 1]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> HeadConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _act_norm(norm: str, channels: int) -> list[nn.Module]:
    if norm == "rms":
        return [RMSNorm2d(channels), nn.SiLU()]
    return [nn.InstanceNorm2d(channels), nn.SiLU()]


def _conv_stack(
    cin: int, widths: Sequence[int], kernels: Sequence[int], norm: str, stride: int = 1
) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for cout, k in zip(widths, kernels, strict=True):
        layers += [nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2), *_act_norm(norm, cout)]
        cin = cout
    return nn.Sequential(*layers), cin


def _deconv(cin: int, cout: int, kernel: int) -> nn.ConvTranspose2d:
    # x2 upsampling for the kernel sizes the official heads accept
    padding, output_padding = {4: (1, 0), 3: (1, 1), 2: (0, 0)}[kernel]
    return nn.ConvTranspose2d(cin, cout, kernel, 2, padding, output_padding, bias=False)


class DeconvHead(nn.Module):
    """Seg / pose head: deconv (x2 each) stack, conv stack, final 1x1 conv.

    ``[B, D, h, w] -> [B, out, h * 2**len(deconvs), w * 2**len(deconvs)]``: seg logits at the
    input resolution (4 deconvs), pose heatmaps at 1/4 of it (2 deconvs).
    """

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = cfg.in_channels
        for cout, k in zip(cfg.deconv_out_channels, cfg.deconv_kernel_sizes, strict=True):
            layers += [_deconv(cin, cout, k), *_act_norm("instance", cout)]
            cin = cout
        self.deconv_layers = nn.Sequential(*layers)
        self.conv_layers, cin = _conv_stack(cin, cfg.conv_out_channels, cfg.conv_kernel_sizes, "instance")
        self.final_name = FINAL_LAYER[cfg.task]
        k = cfg.final_kernel_size
        setattr(self, self.final_name, nn.Conv2d(cin, cfg.out_channels, k, padding=(k - 1) // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.final_name)(self.conv_layers(self.deconv_layers(x)))


class UpsampleHead(nn.Module):
    """Normal / albedo head: 3x3 input conv, up blocks (conv to 4C + PixelShuffle(2)), conv stack.

    ``[B, D, h, w] -> [B, 3, h * 2**len(ups), w * 2**len(ups)]`` (16x for the released heads),
    raw (normals not normalised, albedo not clamped).
    """

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        norm = "rms" if cfg.task == "albedo" else "instance"
        width = cfg.input_conv_channels or cfg.in_channels
        self.input_conv = nn.Sequential(
            nn.Conv2d(cfg.in_channels, width, 3, padding=1), *_act_norm(norm, width)
        )
        blocks = []
        for cout in cfg.upsample_channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(width, 4 * cout, 3, padding=1),
                    nn.PixelShuffle(2),
                    *_act_norm(norm, cout),
                )
            )
            width = cout
        self.upsample_blocks = nn.ModuleList(blocks)
        self.conv_layers, width = _conv_stack(width, cfg.conv_out_channels, cfg.conv_kernel_sizes, norm)
        self.final_name = FINAL_LAYER[cfg.task]
        k = cfg.final_kernel_size
        setattr(self, self.final_name, nn.Conv2d(width, cfg.out_channels, k, padding=(k - 1) // 2))

    def forward_main(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_conv(x)
        for block in self.upsample_blocks:
            x = block(x)
        return getattr(self, self.final_name)(self.conv_layers(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_main(x)


class PointmapHead(UpsampleHead):
    """Upsampling head for canonical XYZ plus a scale branch on the backbone features.

    Returns ``(pointmap [B, 3, H, W], scale [B, 1])``; metric XYZ = pointmap / scale. The scale
    MLP's input width fixes the feature-map size the head accepts (64x48 for the release).
    """

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__(cfg)
        self.scale_conv_layers, _ = _conv_stack(
            cfg.in_channels, cfg.scale_conv_out_channels, cfg.scale_conv_kernel_sizes, "instance", stride=2
        )
        mlp: list[nn.Module] = [nn.Flatten()]
        widths = cfg.scale_mlp
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            mlp.append(nn.Linear(cin, cout))
            if i < len(widths) - 2:
                mlp.append(nn.SiLU())
        self.scale_final_layer = nn.Sequential(*mlp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale_in = self.scale_conv_layers(x)  # [B, C_s, ceil(h/8), ceil(w/8)]
        if scale_in[0].numel() != self.scale_final_layer[1].in_features:
            raise ValueError(
                f"this pointmap head's scale branch takes {self.scale_final_layer[1].in_features} "
                f"features but the {x.shape[-2]}x{x.shape[-1]} feature map gives "
                f"{scale_in[0].numel()}: run it at the input size it was trained for"
            )
        return self.forward_main(x), self.scale_final_layer(scale_in)


def build_head(cfg: HeadConfig) -> nn.Module:
    if cfg.task in ("seg", "pose"):
        return DeconvHead(cfg)
    if cfg.task == "pointmap":
        return PointmapHead(cfg)
    return UpsampleHead(cfg)


def pointmap_scale_inputs(channels: int, grid: tuple[int, int], num_convs: int = 3) -> int:
    """Scale-MLP input width for a feature grid ``(h, w)``: each stride-2 1x1 conv maps n -> ceil(n/2)."""
    h, w = grid
    for _ in range(num_convs):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return channels * h * w


# --------------------------------------------------------------------------- inference from shapes

Shapes = Mapping[str, Sequence[int]]


def _ordered(shapes: Shapes, prefix: str, suffix: str = r"weight") -> list[Sequence[int]]:
    rx = re.compile(re.escape(prefix) + r"(\d+)\." + suffix)
    found = sorted((int(m.group(1)), s) for k, s in shapes.items() if (m := rx.fullmatch(k)))
    return [s for _, s in found]


def infer_head_task(shapes: Shapes) -> HeadTask | None:
    """The task whose final layer is present in a ``decode_head.*``-stripped head state dict."""
    found = [t for t, name in FINAL_LAYER.items() if f"{name}.weight" in shapes]
    if len(found) > 1:
        raise KeyError(f"several final layers: {', '.join(FINAL_LAYER[t] for t in found)}")
    return found[0] if found else None


def infer_head(shapes: Shapes) -> HeadConfig:
    """A head's configuration from its tensor shapes (keys without the ``decode_head.`` prefix)."""
    task = infer_head_task(shapes)
    if task is None:
        raise KeyError("no final layer (" + ", ".join(f"{n}.weight" for n in FINAL_LAYER.values()) + ")")
    final = shapes[f"{FINAL_LAYER[task]}.weight"]
    convs = _ordered(shapes, "conv_layers.")
    common = dict(
        task=task,
        out_channels=final[0],
        final_kernel_size=final[-1],
        conv_out_channels=tuple(s[0] for s in convs),
        conv_kernel_sizes=tuple(s[-1] for s in convs),
    )
    if task in ("seg", "pose"):
        deconvs = _ordered(shapes, "deconv_layers.")
        first = deconvs[0] if deconvs else convs[0] if convs else final
        return HeadConfig(
            in_channels=first[0] if deconvs else first[1],
            deconv_out_channels=tuple(s[1] for s in deconvs),
            deconv_kernel_sizes=tuple(s[-1] for s in deconvs),
            **common,
        )
    inp = shapes["input_conv.0.weight"]
    ups = _ordered(shapes, "upsample_blocks.", r"0\.weight")
    extra = {}
    if task == "pointmap":
        scale_convs = _ordered(shapes, "scale_conv_layers.")
        linears = _ordered(shapes, "scale_final_layer.")
        extra = dict(
            scale_conv_out_channels=tuple(s[0] for s in scale_convs),
            scale_conv_kernel_sizes=tuple(s[-1] for s in scale_convs),
            scale_mlp=tuple([linears[0][1]] + [s[0] for s in linears]),
        )
    return HeadConfig(
        in_channels=inp[1],
        input_conv_channels=inp[0],
        upsample_channels=tuple(s[0] // 4 for s in ups),
        **common,
        **extra,
    )


# --------------------------------------------------------------------------- the released heads

def official_head(task: HeadTask, size: str, embed_dims: int) -> HeadConfig:
    """The head of the released ``task`` checkpoint of ``size`` (per the official configs)."""
    big = size == "5b"
    if task == "seg":
        return HeadConfig(
            task, embed_dims, 29,
            deconv_out_channels=(512, 256, 128, 64), deconv_kernel_sizes=(4, 4, 4, 4),
            conv_out_channels=(64, 64), conv_kernel_sizes=(1, 1),
        )  # fmt: skip
    if task == "pose":
        deconv, conv = ((1536, 1024), (768, 512, 256)) if size == "1b" else ((1024, 768), (512, 512, 256))
        return HeadConfig(
            task, embed_dims, 308,
            deconv_out_channels=deconv, deconv_kernel_sizes=(4, 4),
            conv_out_channels=conv, conv_kernel_sizes=(1, 1, 1),
        )  # fmt: skip
    ups = {
        "normal": (1536, 768, 512, 256) if big else (768, 512, 256, 128),
        "albedo": (1536, 768, 512, 256) if big else (768, 512, 256, 128),
        "pointmap": (1536, 768, 768, 768) if big else (1536, 768, 512, 256),
    }[task]
    convs = (128, 64, 32) if big and task in ("normal", "pointmap") else (64, 32, 16)
    extra = {}
    if task == "pointmap":
        extra = dict(
            scale_conv_out_channels=(1536, 512, 128),
            scale_conv_kernel_sizes=(1, 1, 1),
            scale_mlp=(pointmap_scale_inputs(128, (64, 48)), 512, 128, 1),
        )
    return HeadConfig(
        task, embed_dims, 3,
        input_conv_channels=embed_dims, upsample_channels=ups,
        conv_out_channels=convs, conv_kernel_sizes=(3, 3, 3), **extra,
    )  # fmt: skip
