"""The networks. They know nothing about noise schedules, losses or samplers.

    layers.py         the shared blocks: ResBlock, attention, the spatial transformer, timestep embedding
    unet.py           the noise predictor ε_θ(x_t, t, text)
    vae.py            the KL autoencoder
    text.py           the CLIP text encoder (open_clip's tower and tokenizer)
    discriminator.py  the PatchGAN that the VAE stage trains against
"""
