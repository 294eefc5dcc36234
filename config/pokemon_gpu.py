"""The GPU recipe: Pokémon (BLIP captions) with CLIP's text encoder at 64 px. The model and the
schedule are train_diffusion.py's defaults: a 120 M-parameter U-Net (118.9 M with MiniLM's narrower
tokens), 30,000 steps of 64 images a GPU. How long it takes and what it draws: docs/results.md.
Beyond the defaults this file names the dataset and the encoder instead of `auto`, and holds out
a fifth of the art, enough for the in-training KID against held-out art (image_quality.py)."""

dataset = "pokemon"
text_encoder = "openai/clip-vit-base-patch32"
image_size = 64  # what the default 0 means for Pokémon, written out
val_fraction = 0.2  # of the Hub's 833 images 166 held-out captions for KID, where 5% would hold out 41
