"""The bioS world: pools, population, templates, tokenizer, rendering, Grain sources and pipeline."""
