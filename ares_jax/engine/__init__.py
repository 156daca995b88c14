"""The serving engine: paged KV pool, prefill and decode engines, sampling, serving loop."""
