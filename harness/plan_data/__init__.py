"""Data shipped with the planner: GPU table, calibration table, offline config catalog, observations."""
