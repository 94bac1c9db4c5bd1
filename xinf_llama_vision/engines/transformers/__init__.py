"""The Transformers engine: ``engine`` fills in Xinference's hooks, ``scheduler`` runs the requests
(continuous batching), ``batch`` holds the running rows' Mllama caches."""

from .engine import MllamaChatModel, MllamaGenerateModel, default_dtype

__all__ = ["MllamaChatModel", "MllamaGenerateModel", "default_dtype"]
