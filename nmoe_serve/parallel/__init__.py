"""Expert parallelism: MoE transports, worker actors, the Ray executor."""
