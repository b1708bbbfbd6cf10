"""Reference models on which backprop pathologies show: deep MLPs, recurrent nets, plain vs residual CNNs."""

from bpkit.models.mlp import MLP
from bpkit.models.resnet import ResNet
from bpkit.models.rnn import RNN

__all__ = ["MLP", "RNN", "ResNet"]
