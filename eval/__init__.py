"""Benchmarks, studies and profiles over `runtime` and `unify`: scripts run from the repository root as
`python -m eval.<name>`. Not installed with the package."""
