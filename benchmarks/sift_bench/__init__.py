"""`sift-bench`: time to accuracy of every selection policy against vanilla and random controls.

`cli` (arms, launch, outputs) -> `job` (every arm through `pipeline.run.run`, in one process
group) and `hf_trainer` (the Hugging Face `Trainer` baseline) -> `report` (targets, ratios,
tables, plots). The library (`pipeline`) knows nothing of it.
"""
