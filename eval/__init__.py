"""MT-Bench / Spec-Bench evaluation: `specdec-eval` (see docs/eval.md).

One concept per module: `questions` (question files and subsets), `methods` (drafter|tree|verifier
configurations), `metrics` (Spec-Bench speed.py formulas, lossless check), `mtbench` (the runner),
`report` (answers, metrics.json, report.md, plots), `cli` (the console script).
"""
