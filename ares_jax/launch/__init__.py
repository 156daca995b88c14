"""Launching and deployment helpers: multi-controller replicas (``distributed``) and the
group self-check (``python -m ares_jax.launch.check_distributed``)."""
