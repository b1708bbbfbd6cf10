"""Pieces shared by the reference models: activation, norm and init by name."""

from __future__ import annotations

import math

import torch
from torch import nn

from bpkit.errors import check_choice

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "tanh", "sigmoid")
NORMS = ("none", "batch", "layer")
INITS = ("default", "xavier", "he", "orthogonal")

_GAIN_NAME = {"relu": "relu", "leaky_relu": "leaky_relu", "gelu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


def make_activation(name: str) -> nn.Module:
    check_choice("activation", name, ACTIVATIONS)
    return {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "gelu": nn.GELU, "tanh": nn.Tanh,
            "sigmoid": nn.Sigmoid}[name]()


def make_norm1d(name: str, features: int) -> nn.Module:
    check_choice("norm", name, NORMS)
    return {"none": nn.Identity, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[name](features) \
        if name != "none" else nn.Identity()


def init_weight(weight: torch.Tensor, scheme: str, activation: str = "relu") -> None:
    """Initialise a Linear/Conv weight in place. ``default`` keeps PyTorch's own initialisation.

    ``he``: normal, variance 2/fan_in (Kaiming, fan-in mode); ``xavier``: normal, variance
    gain^2 * 2/(fan_in + fan_out) with the activation's gain; ``orthogonal``: orthogonal with the
    activation's gain.
    """
    check_choice("init", scheme, INITS)
    if scheme == "default":
        return
    with torch.no_grad():
        if scheme == "he":
            nn.init.kaiming_normal_(weight, a=0.01 if activation == "leaky_relu" else 0.0, mode="fan_in",
                                    nonlinearity="leaky_relu" if activation == "leaky_relu" else "relu")
        elif scheme == "xavier":
            nn.init.xavier_normal_(weight, gain=nn.init.calculate_gain(_GAIN_NAME.get(activation, "linear")))
        else:
            nn.init.orthogonal_(weight, gain=nn.init.calculate_gain(_GAIN_NAME.get(activation, "linear")))


def he_std(fan_in: int) -> float:
    return math.sqrt(2.0 / fan_in)
