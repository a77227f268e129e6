"""The Diffusers side: the resident pipeline built offline (configs, tokenizers, LDM→Diffusers
key map), weights swapped in place (held fp16 with per-layer upcast on the CPU), generation
(weighted prompts, samplers, hires fix, img2img) and the PNG info written and read back."""
