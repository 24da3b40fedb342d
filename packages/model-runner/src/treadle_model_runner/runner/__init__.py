"""The model runner: persistent batch, input preparation, CUDA graphs, and the step that ties them together."""

from __future__ import annotations

from treadle_model_runner.runner.model_runner import ModelRunner

__all__ = ["ModelRunner"]
