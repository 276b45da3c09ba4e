"""The run around the method: a YAML recipe trained on accelerate (one process, DDP or DeepSpeed ZeRO).

    config.py        the recipe schema: YAML + overrides -> one validated RecipeConfig
    preflight.py     every check before a weight loads -> a RunPlan
    recipe.py        FineTuneRecipe: setup() / train() / checkpoint() / finish()
    distributed.py   the Accelerator, accumulation, token counts, gradient averaging, agreed flags
    optim.py         optimizer, schedule, skipping a step
    checkpoint.py    atomic checkpoints of adapter + optimizer + schedule + RNG + data position; resume
    run_log.py       metrics.jsonl and W&B, the log window, peak memory
    stop_signals.py, run_lock.py, failpoints.py, dry_run.py

Nothing in the method modules (nola.basis ... nola.adapter_io) imports from here.
"""
