"""The simulator: the real scheduler of one EP group, clients, and a fitted step-cost model instead of
workers, to predict latencies and throughput at scales that cannot be run here. Torch-free."""
