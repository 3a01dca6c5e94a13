"""DP-GEN driver: `alkpu run` (work in progress: parameter handling)."""
