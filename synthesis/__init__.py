"""The embedded latent-diffusion engine: models, attention, pipelines, inpainting steps.

Works on numpy arrays and tensors only; it never imports ``histosynth.integration`` or
the plugin layer.
"""
