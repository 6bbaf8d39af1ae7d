"""The networks. They know nothing about noise schedules, losses or samplers.

    layers.py         the shared blocks: ResBlock, attention, the spatial transformer, timestep embedding
    unet.py           the noise predictor ε_θ(x_t, t, text)
    vae.py            the KL autoencoder
    text.py           the CLIP text encoder: tokenize, run the tower, pick the layer, pool
    clip_text.py      CLIP's text tower in open_clip's layout, checked against open_clip's bit for bit
    tokenizer.py      open_clip's BPE tokenizer, and the same BPE over a Hugging Face tokenizer folder
    openclip_files.py open_clip's tokenizer and architecture files, reached without importing open_clip
    discriminator.py  the PatchGAN that the VAE stage trains against
"""
