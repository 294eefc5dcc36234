"""The tiny test runs' settings (tests/conftest.py's TINY names this file and --device=cpu). They
used to come from config/shapes_cpu.py, merged only on a machine without a GPU: the suite tested
other settings on a GPU machine, and an edit of the recipe changed what every tiny test covered.
These are the CPU recipe's choices as of this file; TINY's --key=value arguments set the rest."""

dataset = "shapes"
text_encoder = "minilm"
shapes_captions = "varied"
patch_size = 2
dropout = 0.0
pos_embed = True
prediction_type = "v"
min_lr = 1e-4
max_steps = 3000
eval_interval = 1000
sampler = "ddim"
eta = 0.0
sample_interval = 1000
ckpt_interval = 1000
