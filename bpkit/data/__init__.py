"""Lightning DataModules, deterministic for a seed: bundled digits and synthetic tasks."""

from bpkit.data._base import TensorDataModule
from bpkit.data.charlm import CharLMDataModule
from bpkit.data.digits import DigitsDataModule
from bpkit.data.streaming import StreamingTextDataModule, StreamWindows
from bpkit.data.synthetic import AddingDataModule, CopyDataModule, MultilabelDataModule, RegressionDataModule

__all__ = ["AddingDataModule", "CharLMDataModule", "CopyDataModule", "DigitsDataModule", "MultilabelDataModule",
           "RegressionDataModule", "StreamWindows", "StreamingTextDataModule", "TensorDataModule"]
