"""LoRA adapters (Hu et al. 2021): low-rank weight updates ΔW = (alpha/rank)·B·A on a frozen model.

    targets.py   which of our weights each SD-named layer is (a layer may be rows of a fused weight)
    network.py   one adapted layer's tensors and ΔW; the trainable parametrization
    files.py     kohya's and diffusers/peft's file layouts, read and written
    merge.py     adapters applied to a pipeline for generation, and baked into a model

A file names layers as diffusers and transformers name SD's modules; kohya's layout writes the same
names with underscores (`lora_unet_down_blocks_0_..._to_q`). Adapters are matched against the model
they are applied to, and any layer with no match, or of the wrong shape, is refused by name.
"""
