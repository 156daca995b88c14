"""Discrete-event simulator of a prefill/decode-disaggregated cluster (see docs/SIMULATOR.md).

    from ares_jax.sim import SimConfig, WorkloadConfig, load_workload, simulate, summarize
    result = simulate(load_workload(WorkloadConfig(name="azure-conv")), "ares", SimConfig())
    print(summarize(result, SimConfig().slo))
"""

from ares_jax.sim.config import PredictionConfig, SimClusterConfig, SimConfig, SloConfig
from ares_jax.sim.goodput import GoodputResult, find_goodput, search_rate
from ares_jax.sim.metrics import attainment, summarize, tpot_ms, ttft_s
from ares_jax.sim.simulator import SimResult, Simulator, simulate
from ares_jax.sim.workloads import Workload, WorkloadConfig, load_workload

__all__ = [
    "SimClusterConfig", "GoodputResult", "PredictionConfig", "SimConfig", "SimResult", "Simulator",
    "SloConfig", "Workload", "WorkloadConfig", "attainment", "find_goodput", "load_workload",
    "search_rate", "simulate", "summarize", "tpot_ms", "ttft_s",
]
