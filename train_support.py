"""What a training run needs around the model: the checks and fetches train.py does before it builds one.

kem_mtl.py is the model and knows nothing of the command line or the network; this file holds what
a run needs around it, in train.py's words:
- fetch_pretrained_weights: a torchvision backbone's ImageNet weights put into torch's cache
  before the model is built (so that building it only reads a file), or WeightsUnavailable with a
  message saying where the file must go and how to train without it;
- check_network_options: the network's own argument checks (MultiTaskNet.check_options), run
  before any data, weights or network are touched.
"""
import os
import urllib.error

import torch

from kem_mtl import MultiTaskNet


class WeightsUnavailable(RuntimeError):
    """The ImageNet weights of a torchvision backbone are not on disk and could not be fetched."""


def fetch_pretrained_weights(name, download=True):
    """The torchvision weights enum of backbone `name`, with its file in torch's hub cache.

    A file already in <torch hub dir>/checkpoints/ is used as is; otherwise it is downloaded once
    (download=False: not even tried). Raises WeightsUnavailable saying where the file must go.
    MultiTaskNet(pretrained=True) then asks torchvision for the same default weights and finds them there.
    """
    try:
        import torchvision
    except ImportError as error:
        raise WeightsUnavailable(f"backbone {name!r} needs torchvision (pip install torchvision); "
                                 f"--backbone tiny works without it") from error
    weights = torchvision.models.get_model_weights(name).DEFAULT
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    if os.path.isfile(os.path.join(folder, os.path.basename(weights.url))):
        return weights
    where = (f"They are downloaded once from {weights.url} into {folder}/. Offline, copy that file there "
             f"from a machine with network access, or train from scratch with pretrained=False "
             f"(train.py --no-pretrained)")
    if not download:
        raise WeightsUnavailable(f"the ImageNet weights of {name} are not on this machine and downloading "
                                 f"is switched off. {where}")
    try:
        weights.get_state_dict(progress=False)            # downloads into the cache (and checks the hash)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise WeightsUnavailable(f"could not load the ImageNet weights of {name} ({type(error).__name__}: "
                                 f"{error}). {where}") from None
    return weights


def check_network_options(tasks, **options):
    """MultiTaskNet's own checks (ValueError naming `name` or `name=value`), before anything is built
    or downloaded; train.py turns the names into its flags."""
    MultiTaskNet.check_options(tasks, **options)
