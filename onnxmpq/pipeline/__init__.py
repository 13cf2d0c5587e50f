"""One run from end to end: the run context built once per invocation (`context`), the choice of
precisions under budgets (`plan`), the Pareto sweep (`sweep`) and the Python API's jobs (`api`)."""
