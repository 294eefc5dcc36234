"""The CPU recipe, what `python train_diffusion.py` trains without a GPU: a model that draws the
color, shape, size and position it is told, from the built-in shapes dataset and the packaged MiniLM
text encoder at 32 px, offline, sized for 2 CPU cores (its minutes and adherence: README, "Results").
The 1.2 M-parameter U-Net of the 16 px recipe (config/shapes_16px.py) works on 2x2 cells of pixels
(patch_size 2): 32 / 2 = 16 cells a side, so a 32 px step costs what a 16 px step costs. The rest
are the defaults: v-prediction keeps deterministic DDIM as good as DDPM; positions on the image
tokens let captions name places; varied captions let users word prompts their own way; guidance
only at t >= 300 keeps it from bending held-out color x shape pairs into seen ones."""

dataset = "shapes"
text_encoder = "minilm"
image_size = 32
patch_size = 2
base_channels = 32
channel_mults = (1, 2)
num_res_blocks = 1
attention_levels = (1,)
dropout = 0.0
batch_size = 32
lr = 1e-3
min_lr = 1e-4
warmup_steps = 100
max_steps = 3000  # 3000 x 32 = 96,000 images, about 5 passes over the 19,744 training images
eval_interval = 1000
