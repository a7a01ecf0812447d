"""A user model (factory + weights_only state dict) whose process dies, as under the OOM killer, whenever a
model host runs it on a unit of exactly `DEADLY_BATCH` queries; everywhere else it is a linear classifier."""
import os
import signal

import torch
from torch import nn

DEADLY_BATCH = 5


def _in_model_host() -> bool:
    with open("/proc/self/cmdline", "rb") as fh:  # Ray titles an actor's process after its class
        return b"ModelHost" in fh.read()


class DiesOnOneUnit(nn.Module):
    def __init__(self, features: int = 3 * 32 * 32, classes: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == DEADLY_BATCH and _in_model_host():
            os.kill(os.getpid(), signal.SIGKILL)
        return self.linear(x.flatten(1))


def build() -> nn.Module:
    torch.manual_seed(0)
    return DiesOnOneUnit()
