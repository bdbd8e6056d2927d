"""Image classifiers as `features` (B, C, S, S) -> (B, F) plus a linear `head` (F -> classes).

Every model is a `Classifier` whose final layer is the `nn.Linear` at attribute `head`
(parameters "head.weight", "head.bias"), so fine-tuning strategies and FTS can find and
re-initialise it by name. Builders never seed: callers seed torch before building.

cnn-small at 1x16x16 with 5 classes (width=32, norm="bn") has 65,509 parameters.
resnet20 at 1 channel with 10 classes has 272,186 parameters at width=16 (He et al.'s CIFAR
ResNet-20) and 68,642 at width=8 (any input size).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from sophon_ray.config import ArchSpec
from sophon_ray.errors import UserError

HEAD = "head"


class Classifier(nn.Module):
    """`head(features(x))`: a feature extractor and a final linear layer named `head`."""

    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, C, S, S) -> (B, F) -> (B, num_classes)


def reset_head_(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Re-initialise `model.head` in place: Xavier-uniform weight, zero bias.

    Args:
        model: a module with an `nn.Linear` at attribute `head`.
        generator: optional RNG for the weight (default: torch's global RNG).
    """
    head = getattr(model, HEAD, None)
    if not isinstance(head, nn.Linear):
        raise UserError(f"model {type(model).__name__} has no nn.Linear at attribute '{HEAD}'; build it with build_classifier")
    with torch.no_grad():
        nn.init.xavier_uniform_(head.weight, generator=generator)
        if head.bias is not None:
            head.bias.zero_()


# ---------------------------------------------------------------------------------------
# Builders: (num_classes, channels, size, **kwargs) -> (features, feature_dim).
# ---------------------------------------------------------------------------------------


def _conv_block(cin: int, cout: int, norm: str) -> list[nn.Module]:
    bn = norm == "bn"
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return layers + [nn.ReLU(inplace=True)]


def _cnn_tiny(channels: int, size: int) -> tuple[nn.Module, int]:
    _min_size("cnn-tiny", size, 2)
    layers = _conv_block(channels, 8, "bn") + [nn.MaxPool2d(2)] + _conv_block(8, 16, "bn")
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 16  # (B, 16, 1, 1) -> (B, 16)


def _cnn_small(channels: int, size: int, width: int = 32, norm: str = "bn") -> tuple[nn.Module, int]:
    _min_size("cnn-small", size, 4)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise UserError(f"arch.kwargs.width must be a positive integer, got {width!r}")
    if norm not in ("bn", "none"):
        raise UserError(f"arch.kwargs.norm must be 'bn' or 'none', got {norm!r}")
    w, w2 = width, 2 * width
    layers = (
        _conv_block(channels, w, norm) + _conv_block(w, w, norm) + [nn.MaxPool2d(2)]
        + _conv_block(w, w2, norm) + _conv_block(w2, w2, norm) + [nn.MaxPool2d(2)]
    )
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), w2  # (B, 2w, 1, 1) -> (B, 2w)


def _kaiming_conv(cin: int, cout: int, k: int, stride: int, padding: int, bias: bool) -> nn.Conv2d:
    """A conv initialised like torchvision's ResNet/VGG convs (Kaiming-normal, fan_out)."""
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _resnet(depth: int) -> Callable[..., tuple[nn.Module, int]]:
    def build(channels: int, size: int, zero_init_residual: bool = False, cifar_stem: bool | None = None):
        """torchvision ResNet; `cifar_stem` (default: size <= 64) = 3x3/1 conv1 and no maxpool."""
        from torchvision import models as tvm

        _torchvision_channels(f"resnet{depth}", channels)
        _min_size(f"resnet{depth}", size, 8)
        net = getattr(tvm, f"resnet{depth}")(weights=None, zero_init_residual=bool(zero_init_residual))
        small = size <= 64 if cifar_stem is None else bool(cifar_stem)
        if small:
            net.conv1 = _kaiming_conv(channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif channels != 3:
            net.conv1 = _kaiming_conv(channels, 64, 7, 2, 3, bias=False)
        dim = net.fc.in_features
        net.fc = nn.Identity()  # the ResNet now returns pooled, flattened features (B, dim)
        return net, dim

    return build


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the identity, or a 1x1 conv-BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _kaiming_conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _kaiming_conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_kaiming_conv(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))  # (B, cin, H, W) -> (B, cout, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet20(channels: int, size: int, width: int = 16) -> tuple[nn.Module, int]:
    """CIFAR-style ResNet-20 (He et al. 2016, 6n+2 with n=3): a 3x3 stem, three stages of three
    basic blocks with `width`, 2*`width`, 4*`width` channels (strides 1, 2, 2), global average pool;
    1x1 conv-BN projection shortcuts where the shape changes (the paper's option B; it used zero
    padding, option A). width=16 is the paper's size; smaller widths trade capacity for CPU time (FLOPs ~ width^2)."""
    _min_size("resnet20", size, 4)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise UserError(f"arch.kwargs.width must be a positive integer, got {width!r}")
    layers: list[nn.Module] = [_kaiming_conv(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    # (B, C, S, S) -> (B, 4w, ceil(S/4), ceil(S/4)) -> (B, 4w)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4 * width


def _vgg(variant: str) -> Callable[..., tuple[nn.Module, int]]:
    def build(channels: int, size: int):
        """torchvision VGG conv stack + global average pool.

        torchvision's 7x7 adaptive pool and 4096-wide classifier are always dropped (they are
        sized for 224x224 ImageNet inputs); the head is a single Linear(512, num_classes).
        """
        from torchvision import models as tvm

        name = variant.replace("_", "-")
        _torchvision_channels(name, channels)
        if size < 32:
            raise UserError(
                f"{name} halves the image 5 times, so input.size={size} makes the feature map vanish; "
                "use input.size >= 32 (e.g. --set input.size=32) or a cnn-*/resnet* arch"
            )
        convs = getattr(tvm, variant)(weights=None).features
        if channels != 3:
            convs[0] = _kaiming_conv(channels, convs[0].out_channels, 3, 1, 1, bias=True)
        return nn.Sequential(convs, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512  # (B, 512, h, w) -> (B, 512)

    return build


_BUILDERS: dict[str, tuple[Callable[..., tuple[nn.Module, int]], tuple[str, ...]]] = {
    "cnn-tiny": (_cnn_tiny, ()),
    "cnn-small": (_cnn_small, ("width", "norm")),
    "resnet20": (_resnet20, ("width",)),
    "resnet18": (_resnet(18), ("zero_init_residual", "cifar_stem")),
    "resnet34": (_resnet(34), ("zero_init_residual", "cifar_stem")),
    "resnet50": (_resnet(50), ("zero_init_residual", "cifar_stem")),
    "vgg13": (_vgg("vgg13"), ()),
    "vgg13-bn": (_vgg("vgg13_bn"), ()),
}


def _min_size(name: str, size: int, minimum: int) -> None:
    if size < minimum:
        raise UserError(f"{name} needs input.size >= {minimum}, got {size}; raise input.size or pick another arch")


def _torchvision_channels(name: str, channels: int) -> None:
    if channels not in (1, 3):
        raise UserError(f"{name} supports input.channels 1 or 3, got {channels}; set input.channels to 1 or 3")


def check_kwargs(name: str, kwargs: dict[str, Any], accepted: tuple[str, ...]) -> None:
    """Raise UserError for keys of `kwargs` that arch `name` does not accept."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        ok = ", ".join(accepted) if accepted else "none"
        raise UserError(f"arch {name!r} does not accept arch.kwargs {unknown}; accepted: {ok}")


TORCHVISION = "torchvision:"  # arch.name prefix: any torchvision.models classifier builder taking num_classes


def classifier_names() -> list[str]:
    """Names accepted by `build_classifier` (plus `torchvision:<builder>`, e.g. torchvision:resnet18)."""
    return list(_BUILDERS) + [TORCHVISION + "<builder>"]


def last_linear(model: nn.Module) -> str:
    """The dotted path of the last `nn.Linear` registered in `model` (a torchvision classifier's
    output layer: `fc`, `classifier.6`, `heads.head`, ...); UserError when there is none."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no nn.Linear output layer; sophon-ray needs a linear head")
    return names[-1]


def torchvision_model(builder: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """`torchvision.models.<builder>(num_classes=..., weights=None, **kwargs)` (random weights)."""
    from torchvision import models as tvm

    try:
        fn = tvm.get_model_builder(builder)
    except ValueError:
        raise UserError(f"unknown torchvision builder {builder!r}; see torchvision.models.list_models() "
                        "(e.g. arch.name=torchvision:resnet18)") from None
    try:
        return fn(weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"torchvision builder {builder!r} does not take these arguments ({e}); "
                        "it must accept num_classes") from None


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _torchvision_generic(builder: str, num_classes: int, channels: int, size: int, **kwargs: Any) -> Classifier:
    """A torchvision classifier as `Classifier`: `features` = the model with its last Linear
    replaced by Identity, `head` = that Linear (so its weights keep their values on import)."""
    if channels != 3:
        raise UserError(f"torchvision:{builder} takes 3-channel images, got input.channels={channels}; "
                        "set input.channels=3 (grey images are repeated to 3 channels)")
    model = torchvision_model(builder, num_classes, **kwargs)
    path = last_linear(model)
    head = model.get_submodule(path)
    _set_module(model, path, nn.Identity())
    with torch.no_grad():
        try:
            out = model.eval()(torch.zeros(1, channels, size, size))
        except RuntimeError as e:
            raise UserError(f"torchvision:{builder} cannot take {channels}x{size}x{size} inputs ({str(e)[:120]}); "
                            "raise input.size") from None
    if out.dim() != 2 or out.shape[1] != head.in_features:
        raise UserError(f"torchvision:{builder}: its last Linear ({path}) is not its final layer; "
                        "sophon-ray needs a model whose output is a linear head")
    model.train()
    return Classifier(model, head)


def torchvision_keys(builder: str, num_classes: int, **kwargs: Any) -> Callable[[str], str]:
    """Map a torchvision state-dict key of `builder` to the `Classifier` key (`fc.weight` ->
    `head.weight`, `layer1.0.conv1.weight` -> `features.layer1.0.conv1.weight`)."""
    path = last_linear(torchvision_model(builder, num_classes, **kwargs))

    def key(k: str) -> str:
        return HEAD + k[len(path):] if k.startswith(path + ".") else "features." + k

    return key


def build_classifier(arch: ArchSpec, num_classes: int, channels: int, size: int) -> Classifier:
    """Build an unseeded classifier for (B, channels, size, size) inputs.

    Args:
        arch: architecture name and builder kwargs (see `classifier_names()`).
        num_classes: number of logits (>= 1).
        channels: input channels (1 or 3 for torchvision archs).
        size: square input side length.

    Returns:
        A `Classifier` with `features` (B, C, S, S) -> (B, F) and `head` = nn.Linear(F, num_classes).
    """
    tv = arch.name.startswith(TORCHVISION)
    if arch.name not in _BUILDERS and not tv:
        raise UserError(f"unknown classifier arch {arch.name!r}; choose one of {classifier_names()} (arch.name=...)")
    if not tv:
        builder, accepted = _BUILDERS[arch.name]
        check_kwargs(arch.name, dict(arch.kwargs), accepted)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be an integer >= 1, got {num_classes!r}; check the domain's classes")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise UserError(f"input.channels must be an integer >= 1, got {channels!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"input.size must be a positive integer, got {size!r}")
    if tv:
        return _torchvision_generic(arch.name[len(TORCHVISION):], num_classes, channels, size, **arch.kwargs)
    features, dim = builder(channels, size, **arch.kwargs)
    return Classifier(features, nn.Linear(dim, num_classes))
