"""ares-jax: ARES adaptive decode-phase rescheduling for PD-disaggregated LLM serving, in JAX."""

from ares_jax.engine.outputs import RequestOutput, StreamChunk
from ares_jax.engine.sampling import SamplingParams
from ares_jax.llm import LLM

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StreamChunk"]
__version__ = "0.1.0"
