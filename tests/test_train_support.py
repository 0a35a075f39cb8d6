"""train_support.py: what a training run checks and fetches around the model.

Pinned down: with the network unreachable and an empty torch cache, fetch_pretrained_weights raises
WeightsUnavailable naming the backbone, the cache folder, pretrained=False and --no-pretrained;
with downloading switched off it does not even try.
"""
import urllib.error

import pytest
import torch

from train_support import WeightsUnavailable, fetch_pretrained_weights


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network for torchvision's downloads, and an empty torch cache in tmp_path."""
    import torchvision.models._api as api

    tried = []

    def unreachable(*args, **kwargs):
        tried.append(args)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", unreachable)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tried


def test_pretrained_weights_unreachable_gives_a_clear_error(offline, tmp_path):
    with pytest.raises(WeightsUnavailable, match="could not load the ImageNet weights of resnet18") as error:
        fetch_pretrained_weights("resnet18")
    message = str(error.value)
    assert str(tmp_path) in message and "pretrained=False" in message and "--no-pretrained" in message
    assert offline, "the download was tried"


def test_no_download_does_not_try(offline):
    with pytest.raises(WeightsUnavailable, match="not on this machine and downloading is switched off"):
        fetch_pretrained_weights("swin_t", download=False)
    assert not offline

