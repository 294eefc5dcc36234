"""The quick CPU recipe, for checks and tests: the built-in shapes dataset and the packaged MiniLM
text encoder at 16 px, a 1.2 M-parameter U-Net, 3000 steps of 32 images, roughly 10-12 minutes on
2 cores. v-prediction, positions on the image tokens and varied captions, as in the CPU recipe
(config/shapes_cpu.py), which trains the same U-Net at 32 px on 2x2 patches in about the same time."""

dataset = "shapes"
text_encoder = "minilm"
shapes_captions = "varied"
image_size = 16
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
sample_interval = 1000
ckpt_interval = 1000
