"""Measurement at scale: sweeps of methods x budgets (bench), the lmms-eval model (lmms), the grid through
lmms-eval (evaluate), a local data.jsonl folder as a task (localdata) and accuracy summaries (accuracy).
It imports the engine and the views, and nothing imports it but the CLI and the app."""
