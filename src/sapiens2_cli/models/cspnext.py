"""CSPNeXt backbone and CSPNeXt-PAFPN neck of the RTMDet-m person detector.

Plain ``torch.nn`` modules whose attribute names reproduce the state-dict keys of the
published mmdet checkpoint (``backbone.*`` and ``neck.*``), so a checkpoint loads by name
without any key mapping. Every norm layer is ``BatchNorm2d(eps=1e-5)``: the detector config
passes ``norm_cfg=dict(type='SyncBN')`` without eps, so the PyTorch default applies (eps 1e-3
is a real error that moves logits by several units).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5


class ConvBNAct(nn.Module):
    """``Conv2d(bias=False)`` -> ``BatchNorm2d(eps=1e-5)`` -> ``SiLU``, padding ``k // 2``.

    State-dict keys: ``conv.weight`` and ``bn.{weight,bias,running_mean,running_var,
    num_batches_tracked}``. After :meth:`fuse_bn` the norm is folded into ``conv`` (which then
    has a bias) and ``bn`` becomes an identity; the keys change accordingly.
    """

    def __init__(
        self, cin: int, cout: int, kernel_size: int, *, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            cin,
            cout,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn: nn.Module = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, cin, H, W] -> [B, cout, H / stride, W / stride]``."""
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse_bn(self) -> None:
        """Fold the eval-mode BatchNorm into a new conv with bias (unshares a shared conv)."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        conv = self.conv
        # y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta = conv'(x) + b'
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [cout]
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            groups=conv.groups,
            bias=True,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv = fused
        self.bn = nn.Identity()


class DepthwiseSeparableConv(nn.Module):
    """Depthwise ``ConvBNAct(C, C, k, groups=C)`` then pointwise ``ConvBNAct(C, cout, 1)``."""

    def __init__(self, cin: int, cout: int, kernel_size: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNAct(cin, cin, kernel_size, groups=cin)
        self.pointwise_conv = ConvBNAct(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """Full 3x3 ``ConvBNAct`` then depthwise-separable 5x5; optional identity shortcut.

    ``[B, C, H, W] -> [B, C, H, W]`` (expansion 1.0 inside CSP layers).
    """

    def __init__(self, channels: int, *, add_identity: bool) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels, 3)
        self.conv2 = DepthwiseSeparableConv(channels, channels, 5)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.add_identity else y


class ChannelAttention(nn.Module):
    """Squeeze-excite style gate: ``x * hardsigmoid(fc(avgpool(x)))`` (hard, not plain, sigmoid)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.adaptive_avg_pool2d(x, 1)  # [B, C, 1, 1]
        return x * F.hardsigmoid(self.fc(a))


class CSPLayer(nn.Module):
    """Cross-stage-partial layer: ``final(cat[blocks(main(x)), short(x)])``, main branch first.

    ``[B, cin, H, W] -> [B, cout, H, W]`` with hidden width ``int(cout * 0.5)``. Submodules are
    registered in the checkpoint's order (main, short, final, blocks, attention), which differs
    from the execution order.
    """

    def __init__(
        self, cin: int, cout: int, *, num_blocks: int, add_identity: bool, attention: bool
    ) -> None:
        super().__init__()
        mid = int(cout * 0.5)
        self.main_conv = ConvBNAct(cin, mid, 1)
        self.short_conv = ConvBNAct(cin, mid, 1)
        self.final_conv = ConvBNAct(2 * mid, cout, 1)
        self.blocks = nn.Sequential(
            *(CSPNeXtBlock(mid, add_identity=add_identity) for _ in range(num_blocks))
        )
        self.attention = ChannelAttention(2 * mid) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], dim=1)
        if self.attention is not None:
            y = self.attention(y)
        return self.final_conv(y)


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: ``conv2(cat[x, pool5(x), pool9(x), pool13(x)])``, x = conv1(in).

    ``[B, C, H, W] -> [B, C, H, W]``. The three pools use stride 1 and -inf padding, so
    chaining 5x5 pools (SPPF) would give identical values; the parallel form is kept.
    """

    KERNELS = (5, 9, 13)

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = channels // 2
        self.conv1 = ConvBNAct(channels, mid, 1)
        self.conv2 = ConvBNAct(mid * (len(self.KERNELS) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        pools = [F.max_pool2d(x, k, stride=1, padding=k // 2) for k in self.KERNELS]
        return self.conv2(torch.cat([x, *pools], dim=1))


class CSPNeXt(nn.Module):
    """CSPNeXt-P5 backbone at deepen 0.67 / widen 0.75 (the "m" size).

    ``forward([B, 3, H, W]) -> (C3 [B, 192, H/8, W/8], C4 [B, 384, H/16, W/16],
    C5 [B, 768, H/32, W/32])`` for ``H, W`` divisible by 32.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvBNAct(3, 24, 3, stride=2),
            ConvBNAct(24, 24, 3),
            ConvBNAct(24, 48, 3),
        )
        self.stage1 = self._stage(48, 96, num_blocks=2, add_identity=True)
        self.stage2 = self._stage(96, 192, num_blocks=4, add_identity=True)
        self.stage3 = self._stage(192, 384, num_blocks=4, add_identity=True)
        self.stage4 = self._stage(384, 768, num_blocks=2, add_identity=False, spp=True)

    @staticmethod
    def _stage(
        cin: int, cout: int, *, num_blocks: int, add_identity: bool, spp: bool = False
    ) -> nn.Sequential:
        layers: list[nn.Module] = [ConvBNAct(cin, cout, 3, stride=2)]
        if spp:
            layers.append(SPPBottleneck(cout))
        layers.append(
            CSPLayer(cout, cout, num_blocks=num_blocks, add_identity=add_identity, attention=True)
        )
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.stem(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        return c3, c4, c5


class CSPNeXtPAFPN(nn.Module):
    """Path-aggregation neck: top-down then bottom-up CSP fusion, 192 channels per level.

    ``forward((C3, C4, C5)) -> (P3 [B, 192, H/8, W/8], P4 [B, 192, H/16, W/16],
    P5 [B, 192, H/32, W/32])``. The bottom-up path concatenates with the *reduced* lateral
    features (r4, r5), always as ``[resampled, lateral]``.
    """

    def __init__(self) -> None:
        super().__init__()

        def csp(cin: int, cout: int) -> CSPLayer:
            return CSPLayer(cin, cout, num_blocks=2, add_identity=False, attention=False)

        self.reduce_layers = nn.ModuleList([ConvBNAct(768, 384, 1), ConvBNAct(384, 192, 1)])
        self.top_down_blocks = nn.ModuleList([csp(768, 384), csp(384, 192)])
        self.downsamples = nn.ModuleList(
            [ConvBNAct(192, 192, 3, stride=2), ConvBNAct(384, 384, 3, stride=2)]
        )
        self.bottom_up_blocks = nn.ModuleList([csp(384, 384), csp(768, 768)])
        self.out_convs = nn.ModuleList(
            [ConvBNAct(192, 192, 3), ConvBNAct(384, 192, 3), ConvBNAct(768, 192, 3)]
        )

    def forward(
        self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = feats

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, scale_factor=2.0, mode="nearest")

        r5 = self.reduce_layers[0](c5)  # [B, 384, H/32, W/32]
        t4 = self.top_down_blocks[0](torch.cat([up(r5), c4], dim=1))  # [B, 384, H/16, W/16]
        r4 = self.reduce_layers[1](t4)  # [B, 192, H/16, W/16]
        p3 = self.top_down_blocks[1](torch.cat([up(r4), c3], dim=1))  # [B, 192, H/8, W/8]
        n4 = self.bottom_up_blocks[0](torch.cat([self.downsamples[0](p3), r4], dim=1))
        n5 = self.bottom_up_blocks[1](torch.cat([self.downsamples[1](n4), r5], dim=1))
        return self.out_convs[0](p3), self.out_convs[1](n4), self.out_convs[2](n5)
