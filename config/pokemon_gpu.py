"""The GPU recipe: Pokémon (BLIP captions) with CLIP's text encoder at 64 px, a 120 M-parameter
U-Net (118.9 M with MiniLM's narrower tokens), 30,000 steps of 64 images a GPU. How long it takes
and what it draws have not been measured yet. These are also the defaults of train_diffusion.py;
this file names them, sets the dataset instead of `auto`, and holds out a fifth of the art, enough
for the in-training KID against held-out art (image_quality.py)."""

dataset = "pokemon"
text_encoder = "openai/clip-vit-base-patch32"
image_size = 64
base_channels = 128
channel_mults = (1, 2, 2, 4)
num_res_blocks = 2
attention_levels = (1, 2, 3)
dropout = 0.1
pos_embed = True
prediction_type = "v"
batch_size = 64
lr = 2e-4
min_lr = 2e-5
warmup_steps = 500
max_steps = 30000
val_fraction = 0.2
