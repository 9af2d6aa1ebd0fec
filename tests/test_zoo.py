import pytest
import torch

from rwdeploy import models
from rwdeploy.errors import OptionError

EXPECTED = {"lenet5", "resnet20", "resnet32", "resnet56", "vgg16_bn", "mobilenet_v2", "resnet18", "resnet50"}

# Parameter counts of the reference architectures (papers / common implementations),
# an independent check that the layer tables were transcribed correctly.
REFERENCE_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}


def test_registry_lists_every_zoo_model():
    assert EXPECTED <= set(models.list())
    assert models.list() == sorted(models.list())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_runs_at_default_shape_with_num_classes(name):
    shape = models.input_shape(name)
    if shape[-1] > 64:  # ImageNet layouts: a smaller image keeps the test fast; the net is size-agnostic
        shape = (*shape[:-2], 64, 64)
    net = models.create(name, num_classes=7)
    assert not net.training
    out = net(torch.randn(2, *shape[1:]))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name,count", sorted(REFERENCE_PARAMS.items()))
def test_imagenet_models_match_reference_parameter_counts(name, count):
    net = models.create(name)
    assert sum(p.numel() for p in net.parameters()) == count


def test_default_input_shapes():
    assert models.input_shape("lenet5") == (1, 1, 28, 28)
    assert models.input_shape("resnet20") == (1, 3, 32, 32)
    assert models.input_shape("resnet50") == (1, 3, 224, 224)


def test_unknown_name_lists_known_ones():
    with pytest.raises(OptionError) as err:
        models.create("resnet1000")
    assert "resnet20" in str(err.value) and "resnet1000" in str(err.value)
