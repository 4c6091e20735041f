"""Architecture search under budgets (prune.mode=minitron with prune.constraints): the grid and its costs (space),
measured latency (latency), ranking by KL after pruning and after a short distillation (rank), NSGA-II and the
Pareto front (pareto), the resumable state (state) and the pipeline stage (stage)."""
