"""LoRA operations (kohya / LyCORIS formats): naming, loading, merging, extracting."""
