"""llmstack: a Triton-kernel Llama training stack."""
__version__ = "0.1.0"
