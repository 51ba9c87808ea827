"""WISP's discrete-event simulator: many edge devices around one verifier, on simulated time (SimPy).

The policies are the production classes, driven with the simulator's clock: `WispScheduler` /
`FcfsScheduler` and `TimeEstimator` on the server, the speculation `Controller` (rejection predictor,
confidence rule, `DraftBound`) on each device. What is modelled: the accelerator's forward time (an
estimator profile plus noise), the KV pool, admission, the network, drafting speed, arrivals and which
draft tokens the target accepts (replayed traces of the shipped pair, or a parametric model).

Modules, one job each: devices (drafting speed profiles), network (RTT and bandwidth), workload
(arrivals, lengths, SLO classes), acceptance (trace replay, parametric model), server_profile (estimator
profiles and the forward-time model), server (the verifier's batch loop), edge (a device's round loop),
systems (which production policies make up WISP, centralized, SLED and the ablations), metrics,
run (one simulation), experiments (capacity, goodput, bursts, RTT), plots. Entry: tools/simulate.py.
"""
