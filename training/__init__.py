"""Training pipeline that produces the served bundle (python -m training STAGE; docs/training.md).

Stages: synthetic (data for tests and demos), finetune (RORem: the whole inpainting UNet), distill
(LCM-LoRA: RORem-4S), discriminator (LoRA + head scoring removals), annotate (one automated data
round), bundle (assemble the servable bundle). Modules: data (metadata format, Dataset), synthetic,
common (settings, accelerator, summary), checkpoint, loop (the one optimizer loop), one per stage,
cli.
"""
