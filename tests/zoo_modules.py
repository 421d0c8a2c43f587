"""Stand-ins for the blocks of timm and torchvision, written the way those libraries write them (the
chain wired in forward(), norms that apply their own activation, identities as placeholders), so
that tests/test_fuse_zoo.py checks fuse() on their structure without either library installed."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def get_padding(kernel_size, stride=1, dilation=1):
    """timm's symmetric padding for a conv (layers/padding.py)."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: batch norm, then `drop`, then `act`, in one BatchNorm2d subclass."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, apply_act=True, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is not None and apply_act else nn.Identity()

    def forward(self, x):
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x,
                         self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        return self.act(x)


class ScaledNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass fuse() does not know: its forward computes more than the norm."""

    def forward(self, x):
        return super().forward(x) * 2


class DropPath(nn.Module):
    """timm's DropPath: stochastic depth per sample, an identity when drop_prob == 0 or in eval."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class SqueezeExcite(nn.Module):
    """timm's SqueezeExcite: x * gate(conv_expand(act(conv_reduce(mean(x)))))."""

    def __init__(self, chs, rd_ratio=0.25):
        super().__init__()
        rd = max(1, int(chs * rd_ratio))
        self.conv_reduce = nn.Conv2d(chs, rd, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, chs, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.act1(self.conv_reduce(x_se))
        return x * self.gate(self.conv_expand(x_se))


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow 'SAME' padding, computed from the input size at run time."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: the channels split in groups, each with its own (depthwise) kernel size."""

    def __init__(self, channels, kernel_sizes=(3, 5), stride=1):
        super().__init__()
        splits = [channels // len(kernel_sizes)] * len(kernel_sizes)
        splits[0] += channels - sum(splits)
        for idx, (k, c) in enumerate(zip(kernel_sizes, splits)):
            self.add_module(str(idx), nn.Conv2d(c, c, k, stride, get_padding(k, stride), groups=c, bias=False))
        self.splits = splits

    def forward(self, x):
        x_split = torch.split(x, self.splits, 1)
        return torch.cat([c(x_split[i]) for i, c in enumerate(self.values())], 1)


class DepthwiseSeparableConv(nn.Module):
    """timm's DepthwiseSeparableConv: conv_dw -> bn1 -> aa -> se -> conv_pw -> bn2 (-> drop_path + shortcut)."""

    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, dilation=1, noskip=False, pw_act=False,
                 act_layer=nn.ReLU, se_layer=None, drop_path_rate=0.0, conv_dw=None):
        super().__init__()
        self.has_skip = (stride == 1 and in_chs == out_chs) and not noskip
        self.has_pw_act = pw_act
        self.conv_dw = conv_dw if conv_dw is not None else nn.Conv2d(
            in_chs, in_chs, dw_kernel_size, stride, get_padding(dw_kernel_size, stride, dilation), dilation,
            groups=in_chs, bias=False)
        self.bn1 = BatchNormAct2d(in_chs, act_layer=act_layer)
        self.aa = nn.Identity()
        self.se = se_layer(in_chs) if se_layer else nn.Identity()
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = BatchNormAct2d(out_chs, apply_act=self.has_pw_act, act_layer=act_layer)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class InvertedResidual(nn.Module):
    """timm's InvertedResidual: conv_pw (expansion) -> bn1 -> conv_dw -> bn2 -> aa -> se -> conv_pwl -> bn3
    (-> drop_path + shortcut)."""

    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, dilation=1, exp_ratio=4.0, act_layer=nn.ReLU,
                 se_layer=None, noskip=False, drop_path_rate=0.0):
        super().__init__()
        mid = int(in_chs * exp_ratio)
        self.has_skip = (in_chs == out_chs and stride == 1) and not noskip
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid, act_layer=act_layer)
        self.conv_dw = nn.Conv2d(mid, mid, dw_kernel_size, stride, get_padding(dw_kernel_size, stride, dilation),
                                 dilation, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid, act_layer=act_layer)
        self.aa = nn.Identity()
        self.se = se_layer(mid) if se_layer else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = BatchNormAct2d(out_chs, apply_act=False)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class TimmLikeNet(nn.Module):
    """timm's EfficientNet/MobileNet skeleton: conv_stem, bn1, stages of blocks, conv_head, bn2, head."""

    def __init__(self, stages, stem_chs=16, head_chs=32, num_classes=5):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(stem_chs)
        self.blocks = nn.Sequential(*[nn.Sequential(*stage) for stage in stages])
        last = [m for m in self.blocks.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.conv_head = nn.Conv2d(last, head_chs, 1, bias=False)
        self.bn2 = BatchNormAct2d(head_chs)
        self.classifier = nn.Linear(head_chs, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        x = self.bn2(self.conv_head(x))
        return self.classifier(x.mean((2, 3)))


# -- torchvision ---------------------------------------------------------------------------------------

class Conv2dNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation: a Sequential subclass with only an __init__."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, activation_layer=nn.ReLU6, dilation=1):
        padding = (kernel_size - 1) // 2 * dilation
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class TorchvisionV3Block(nn.Module):
    """torchvision's MobileNetV3 InvertedResidual: a Sequential `block`, `result += input` in forward."""

    def __init__(self, cin, expanded, cout, kernel_size, stride, activation_layer=nn.ReLU):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size, stride, groups=expanded,
                                           activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


# -- hand-written forward()s -----------------------------------------------------------------------------

class FunctionalReluBlock(nn.Module):
    """Activations written as functions, the residual added in forward."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.dw(x)), inplace=True)
        y = self.bn2(self.pw(y))
        return (y + x).relu()


class SharedReluBlock(nn.Module):
    """One ReLU module called twice (after each norm): its slot must stay for the other call."""

    def __init__(self, cin, cout):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 5, stride=2, padding=4, dilation=2, groups=cin, bias=True)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.pw(self.relu(self.bn1(self.dw(x))))))


class SharedNormBlock(nn.Module):
    """The same BatchNorm2d applied twice: fusing its first use would drop the second's module."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.bn(self.pw(self.dw(x))))


class TrainingBranchBlock(nn.Module):
    """A forward() that takes another path in training mode: a traced copy would fix one of them."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.dw(x)
        if self.training:
            y = y * 0.5
        return self.bn(self.pw(y))


class DataDependent(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace this forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return self.inner(-x)
