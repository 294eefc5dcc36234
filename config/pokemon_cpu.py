"""The CPU Pokémon recipe: the Hub's Pokémon (BLIP captions) or any captioned imagefolder, e.g.
--dataset=../shared/data/pokedex-art, with the packaged MiniLM text encoder, at 32 px, sized for 2
CPU cores (its minutes and KID: docs/results.md). A fifth of the art is held out: every evaluation
draws one sample per held-out caption and measures KID against that art and the share of samples
that copy a training image (image_quality.py); grids of 8 held-out captions at a third, two thirds
and the end."""

dataset = "pokemon"
text_encoder = "minilm"
image_size = 32
base_channels = 32
channel_mults = (1, 2, 2)
num_res_blocks = 1
attention_levels = (2,)
dropout = 0.0
batch_size = 32
lr = 2e-3  # the learning rate the ablation chose on equal minutes (docs/ablations.md)
min_lr = 2e-4
warmup_steps = 100
max_steps = 6000  # 6000 x 32 = 192,000 images: about 270 passes over the 718 training images of pokedex-art
val_fraction = 0.2  # KID wants a few hundred held-out images; 5% of the Hub's 833 would be 41
eval_interval = 2000
sample_interval = 2000
ckpt_interval = 2000
