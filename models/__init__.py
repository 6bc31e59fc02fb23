"""Models: one configurable decoder (the Llama, Mistral, Qwen, Gemma and GPT-2 families, and DeepSeek-V2's
latent attention), attention, sharding names, checkpoints, Hugging Face import and export."""

from models.attention import dot_product_attention
from models.config import ModelConfig, flops_per_token, param_count
from models.transformer import Decoder, KVCache, apply, build, init_cache, init_params, split_params

__all__ = ["Decoder", "KVCache", "ModelConfig", "apply", "build", "dot_product_attention", "flops_per_token",
           "init_cache", "init_params", "param_count", "split_params"]
