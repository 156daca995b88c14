"""The multi-process system: a scheduler process and prefill/decode replica processes that
talk gRPC (``protos/ares.proto``), launched by ``ares-jax serve`` / ``scheduler`` / ``replica``.
"""
