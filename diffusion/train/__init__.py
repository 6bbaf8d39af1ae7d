"""Training: `run.train` sets a run up and runs its stages through the loop that both share (`loop`).

    run.py          the output folder's policy, the saved config, Accelerate, the data
    loop.py         resume, step, log, checkpoint, preview, stop, final sync: written once
    vae_stage.py    stage 1, the autoencoder;  ldm_stage.py  stage 2, the U-Net on its latents
    optim.py        AdamW, the LR schedule, the EMA
    checkpoints.py  atomic checkpoint folders and the exact training state
    distributed.py  what the ranks must agree on
    order.py        the seeded data order (buckets too);  augment.py  flips and captions;  cache.py  the latent cache on disk
    metrics.py      metrics.jsonl;  signals.py  stopping on SIGINT/SIGTERM
"""
