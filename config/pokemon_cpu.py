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
# 9000 x 32 = 288,000 images: about 400 passes over the 718 training images of pokedex-art. Chosen for bf16
# (dtype auto on a CPU whose bf16 matmuls pay: AMX, an AVX-512-bf16 AMD EPYC), where 9000 steps cost about the
# minutes 6000 cost in fp32; where auto trains in fp32, --max_steps=6000 keeps the fp32 recipe's minutes
# (docs/results.md)
max_steps = 9000
val_fraction = 0.2  # KID wants a few hundred held-out images; 5% of the Hub's 833 would be 41
eval_interval = 3000
sample_interval = 3000
ckpt_interval = 3000
# the evaluations' and grids' sampler: DPM-Solver++(2M) with twice the default's steps and twice its guidance (still
# only at t >= 300), chosen on the same trained weights (docs/ablations.md)
steps = 16
guidance_scale = 6.0
