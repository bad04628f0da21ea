//! Liveness-based activation memory planner.
