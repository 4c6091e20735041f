"""Importance methods: Minitron activations, depth by removal and Block Importance, and the baselines."""
