"""Planner service: cost model, partitioner, plan set (pure), and its gRPC servicer."""
