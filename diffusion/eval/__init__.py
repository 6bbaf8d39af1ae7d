"""Measuring models: prompt fidelity on the shapes task (`fidelity`, with the pixel evaluator in `shapes`)
and reconstruction quality (`image.psnr`). `python -m diffusion.eval` is the command line."""
