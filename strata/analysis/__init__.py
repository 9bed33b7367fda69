"""Performance model and planner: model shapes, hardware catalog, roofline/offload cost model, validation,
calibration, probe of this machine and the configuration planner (see docs/analysis.md)."""
