"""The CPU recipe: the built-in shapes dataset and the packaged MiniLM text encoder at 32 px, in the
minutes of the 16 px recipe (config/shapes_16px.py): the same 1.2 M-parameter U-Net works on 2x2 cells
of pixels (patch_size 2), so each step costs what a 16 px step costs (1.00x its images/s, README,
Results). 3000 steps of 32 images, 9-13 minutes on 2 cores. v-prediction, positions on the image
tokens and varied captions are what the README's adherence ablation chose; the 32 px ablation chose
the patches. 6 of 7 training seeds reach the README's adherence goal; seed 1 needed 6000 steps.
Samples are guided at noise levels t >= 300 only (sample_guidance_t_min, the default)."""
dataset = "shapes"
text_encoder = "minilm"
shapes_captions = "varied"
image_size = 32
patch_size = 2
base_channels = 32
channel_mults = (1, 2)
num_res_blocks = 1
attention_levels = (1,)
dropout = 0.0
pos_embed = True
prediction_type = "v"
batch_size = 32
lr = 1e-3
min_lr = 1e-4
warmup_steps = 100
max_steps = 3000
eval_interval = 1000
sample_steps = 25  # the in-training judge and grids use the sampler of the README's goal, deterministic
sample_eta = 0.0   # DDIM-25, at half the cost of the default DDIM-50
sample_interval = 1000
ckpt_interval = 1000
