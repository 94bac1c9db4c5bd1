"""Data, not code: one YAML file per model family, validated by ``xinf_llama_vision.schema``."""
