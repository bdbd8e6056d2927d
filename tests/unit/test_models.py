import pytest
import torch

from sophon_ray.config import ArchSpec
from sophon_ray.errors import UserError
from sophon_ray.models import (
    HEAD,
    build_classifier,
    build_diffusion,
    classifier_names,
    diffusion_names,
    downsample_factor,
    reset_head_,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_names():
    assert set(classifier_names()) == {"cnn-tiny", "cnn-small", "resnet18", "resnet34", "resnet50", "vgg13", "vgg13-bn",
                                       "resnet20", "torchvision:<builder>"}
    assert set(diffusion_names()) == {"unet-tiny", "unet-small", "unet-paper", "diffusers-unet"}


@pytest.mark.parametrize("name", ["cnn-tiny", "cnn-small"])
@pytest.mark.parametrize("size", [16, 8])
def test_small_cnns_forward(name, size):
    model = build_classifier(ArchSpec(name), num_classes=5, channels=1, size=size)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 5)
    names = dict(model.named_parameters())
    assert "head.weight" in names and "head.bias" in names
    assert isinstance(getattr(model, HEAD), torch.nn.Linear)


def test_cnn_small_kwargs():
    model = build_classifier(ArchSpec("cnn-small", {"width": 8, "norm": "none"}), 3, 1, 16)
    assert model.head.in_features == 16
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    with pytest.raises(UserError, match="norm"):
        build_classifier(ArchSpec("cnn-small", {"norm": "ln"}), 3, 1, 16)


@pytest.mark.parametrize("name,device", [("resnet18", "cpu"), ("vgg13-bn", "meta")])
def test_torchvision_forward(name, device):
    """A real forward pass; VGG's 30M weights on the meta device (shapes only, no allocation)."""
    with torch.device(device):
        model = build_classifier(ArchSpec(name), num_classes=10, channels=3, size=32)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "head.weight" in dict(model.named_parameters())


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "vgg13"])
def test_torchvision_builds(name):
    with torch.device("meta"):  # structure only: no weights allocated or initialised
        model = build_classifier(ArchSpec(name), num_classes=4, channels=1, size=32)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model.head.out_features == 4 and first_conv.in_channels == 1  # grey input, 4 classes
    assert "head.weight" in dict(model.named_parameters())


def test_resnet_cifar_stem():
    model = build_classifier(ArchSpec("resnet18"), 10, 1, 32)
    assert model.features.conv1.kernel_size == (3, 3) and model.features.conv1.in_channels == 1
    assert isinstance(model.features.maxpool, torch.nn.Identity)
    assert model.head.in_features == 512


def test_reset_head():
    model = build_classifier(ArchSpec("cnn-tiny"), 5, 1, 16)
    with torch.no_grad():
        model.head.bias.fill_(1.0)
    before = model.head.weight.detach().clone()
    reset_head_(model)
    assert torch.all(model.head.bias == 0)
    assert not torch.equal(model.head.weight, before)
    assert model.head.weight.requires_grad


def test_errors():
    with pytest.raises(UserError, match="cnn-small"):
        build_classifier(ArchSpec("nope"), 5, 1, 16)
    with pytest.raises(UserError, match="width"):
        build_classifier(ArchSpec("cnn-small", {"depth": 3}), 5, 1, 16)
    with pytest.raises(UserError, match="size"):
        build_classifier(ArchSpec("vgg13"), 5, 3, 16)
    with pytest.raises(UserError, match="num_classes"):
        build_classifier(ArchSpec("cnn-tiny"), 0, 1, 16)
    with pytest.raises(UserError, match="channels"):
        build_classifier(ArchSpec("resnet18"), 5, 2, 32)
    with pytest.raises(UserError, match="unet-tiny"):
        build_diffusion(ArchSpec("nope"), 1, 16)
    with pytest.raises(UserError, match="timesteps"):
        build_diffusion(ArchSpec("unet-tiny", {"steps": 10}), 1, 16)


def test_unet_tiny_forward():
    unet, scheduler = build_diffusion(ArchSpec("unet-tiny"), channels=1, size=16)
    x = torch.randn(2, 1, 16, 16)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (2,))
    assert unet(x, t).sample.shape == x.shape


def test_unet_scheduler():
    _, scheduler = build_diffusion(ArchSpec("unet-tiny"), 1, 16)
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.num_train_timesteps == 1000
    _, scheduler = build_diffusion(ArchSpec("unet-tiny", {"timesteps": 50}), 1, 16)
    assert scheduler.config.num_train_timesteps == 50


def test_unet_size_divisible():
    assert downsample_factor(ArchSpec("unet-tiny")) == 2
    assert downsample_factor(ArchSpec("unet-paper")) == 8
    with pytest.raises(UserError, match="divisible"):
        build_diffusion(ArchSpec("unet-tiny"), 1, 15)
    with pytest.raises(UserError, match="divisible"):
        build_diffusion(ArchSpec("unet-paper"), 3, 20)
