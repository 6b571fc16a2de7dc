"""LoRA file tools behind ``python -m flux_lightning.lora_tools``: ``merge`` (fuse into a diffusers folder),
``resize`` (lower the rank by SVD) and ``convert`` (diffusers / ComfyUI / kohya layouts).
:mod:`.files` reads every layout into diffusers modules; one module per verb; :mod:`.cli` the command."""
